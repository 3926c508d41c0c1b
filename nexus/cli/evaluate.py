"""``nexus evaluate``, ``nexus generate``, ``nexus plot``: judge an adapter and look at a run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nexus.cli.options import FiniteFloat
from nexus.constants import DEFAULT_SEQ_LEN


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True), help="Base model checkpoint directory.")
@click.option("--adapter", type=click.Path(exists=True), default=None, help="Adapter directory (omit to evaluate the base alone).")
@click.option("--data", required=True, help="Held-out data: .jsonl/.parquet/.txt file, a directory of them, or a cached dataset.")
@click.option("--output", type=click.Path(), default=None, help="Write the results JSON here (default: print it).")
@click.option("--seq-len", type=click.IntRange(min=2), default=DEFAULT_SEQ_LEN, show_default=True, help="Tokens per row.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Rows per forward pass.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Stop after this many batches.")
@click.option("--tokenizer", type=click.Path(exists=True), default=None, help="Tokenizer directory (default: the model's).")
@click.option("--text-column", default=None, help="Text column of the data (default: text, or chat messages).")
@click.option("--bf16", is_flag=True, help="Run in bfloat16.")
@click.option("--dequantize", is_flag=True, help="Dequantise experts stored quantised (MXFP4, FP8) at load instead of keeping them packed as stored.")
def evaluate(model_path, adapter, data, output, seq_len, batch_size, max_batches, tokenizer, text_column, bf16,
             dequantize):
    """Perplexity of the adapted model vs its base, KL(base || adapted), router entropy and load per layer.

    \b
    Example:
      nexus evaluate --model base/ --adapter runs/a/final --data heldout.jsonl --output eval.json
    """
    from nexus.engines.evaluate import evaluate as run_evaluate
    from nexus.io import check_writable_output, write_json

    if output:
        check_writable_output(output, directory=False)
    result = run_evaluate(model_path, data, adapter=adapter, seq_len=seq_len, batch_size=batch_size,
                          max_batches=max_batches, tokenizer=tokenizer, text_column=text_column, bf16=bf16,
                          dequantize=dequantize)
    if output:
        write_json(output, result)
        base = result["base"]["perplexity"]
        line = f"base perplexity {base:.3f}"
        if "adapted" in result:
            line += f", adapted {result['adapted']['perplexity']:.3f}, KL(base||adapted) {result['kl_base_adapted']:.4f}"
        click.echo(f"{line} over {result['tokens']} tokens; details in {output}")
    else:
        click.echo(json.dumps(result, indent=2))


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True), help="Base model checkpoint directory.")
@click.option("--adapter", type=click.Path(exists=True), default=None, help="Adapter directory (omit for the base).")
@click.option("--prompt", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Format the prompt with the tokenizer's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=FiniteFloat(min=0.0), default=0.0, show_default=True, help="0: greedy; otherwise sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--tokenizer", type=click.Path(exists=True), default=None, help="Tokenizer directory (default: the model's).")
@click.option("--dequantize", is_flag=True, help="Dequantise experts stored quantised (MXFP4, FP8) at load instead of keeping them packed as stored.")
def generate(model_path, adapter, prompt, chat, max_new_tokens, temperature, seed, tokenizer, dequantize):
    """Generate text with the base or adapted model.

    \b
    Example:
      nexus generate --model base/ --adapter runs/a/final --chat --prompt "Summarise the budget."
    """
    from nexus.engines.evaluate import generate as run_generate

    click.echo(run_generate(model_path, prompt, adapter=adapter, chat=chat, max_new_tokens=max_new_tokens,
                            temperature=temperature, tokenizer=tokenizer, seed=seed, dequantize=dequantize))


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir):
    """Draw loss, KL, router drift/entropy, LR and grad-norm curves of RUN_DIR into RUN_DIR/plots/."""
    from nexus.engines.plots import PLOTS_DIR, plot_run
    from nexus.io import check_writable_output

    check_writable_output(Path(run_dir) / PLOTS_DIR, directory=True, what="plot output")
    for path in plot_run(run_dir):
        click.echo(str(path))


def register(cli):
    cli.add_command(evaluate)
    cli.add_command(generate)
    cli.add_command(plot)

"""``nexus collect``, ``nexus select``, ``nexus convert``: from a base checkpoint to an initialised adapter."""

from __future__ import annotations

from pathlib import Path

import click

from nexus.cli.options import FiniteFloat
from nexus.constants import (DEFAULT_DIVERSITY, DEFAULT_GATE_MODE, DEFAULT_SEQ_LEN, DEFAULT_STRATEGY, DEFAULT_TOP_K,
                             GATE_MODES, INIT_STRATEGIES)


def _model_or_demo(ctx: click.Context, model_path: str | None) -> tuple[str, bool]:
    """``(model path, is_demo)``: ``--model`` or, with ``--family``, that family's demo checkpoint."""
    if model_path is not None:
        return model_path, False
    if ctx.find_root().obj.get("family") is None:
        raise click.UsageError("give --model PATH, or --family NAME to use that family's demo checkpoint")
    from nexus.cli import get_family
    from nexus.demo import demo_checkpoint

    return str(demo_checkpoint(get_family(ctx))), True


def _progress(ctx: click.Context) -> bool:
    return not ctx.find_root().obj.get("quiet", False)


COLLECT_EPILOG = """\b
Examples:
  nexus --family gpt_oss collect --output stats/            # the demo model on the demo text
  nexus collect --model ~/models/gpt-oss-20b --data corpus.jsonl --target-tokens 2000000 --output stats/
  accelerate launch --multi_gpu --num_processes 8 $(which nexus) collect --model ... --data ... --output stats/
  torchrun --nproc_per_node 2 $(which nexus) collect ...      # CPU processes (gloo)
"""


@click.command(epilog=COLLECT_EPILOG)
@click.option("--model", "model_path", type=click.Path(), default=None,
              help="Base checkpoint directory with its tokenizer (default with --family: the demo checkpoint).")
@click.option("--data", "data_path", type=click.Path(), default=None,
              help="Text data: .jsonl/.json/.parquet/.txt/.arrow file or directory, or a cached dataset name "
                   "(default with the demo model: the demo text).")
@click.option("--output", "-o", type=click.Path(), required=True,
              help="Directory for router_stats.safetensors/.json (and the resume checkpoints).")
@click.option("--target-tokens", type=int, default=None,
              help="Stop after exactly this many non-padding tokens (default: the whole data, once).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per forward pass, per process.")
@click.option("--seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True, help="Tokens per row (documents are packed).")
@click.option("--text-column", default=None, help="Text column of the data (default: text, or chat 'messages').")
@click.option("--seed", type=int, default=None, help="Shuffle rows with this seed (default: data order).")
@click.option("--checkpoint-every", type=int, default=50, show_default=True,
              help="Save partial statistics every N batches (0: only at the end); a rerun resumes from them.")
@click.option("--max-batches", type=int, default=None,
              help="Stop after N batches in this invocation, leaving resumable partial statistics.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Dtype the base is loaded in.")
@click.option("--overwrite", is_flag=True, help="Discard statistics of a different run found in --output.")
@click.option("--dequantize", is_flag=True, help="Dequantise experts stored quantised (MXFP4, FP8) at load instead of keeping them packed as stored.")
@click.pass_context
def collect(ctx, model_path, data_path, output, target_tokens, batch_size, seq_len, text_column, seed,
            checkpoint_every, max_batches, dtype, overwrite, dequantize):
    """Accumulate per-layer router statistics of the base model over your data.

    Streams float64 sums (token count, sum p, sum p p^T, top-k counts and weights) per MoE
    layer: memory does not grow with the number of tokens, shards from several processes merge
    by addition, and an interrupted run resumes from its last checkpoint. Padding is never
    counted; --target-tokens is met exactly (the first tokens of the last batch, row by row).
    """
    import torch

    from nexus.engines.collect import CollectArgs, run_collect

    model_path, demo = _model_or_demo(ctx, model_path)
    if data_path is None:
        if not demo:
            raise click.UsageError("give --data: the text to collect router statistics on")
        from nexus.demo import demo_text_path

        data_path = str(demo_text_path())
    args = CollectArgs(target_tokens=target_tokens, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every)
    stats = run_collect(
        model_path, data_path, output, args, family_name=ctx.find_root().obj.get("family"), seq_len=seq_len,
        text_column=text_column, dtype=getattr(torch, dtype), max_batches=max_batches, overwrite=overwrite,
        progress=_progress(ctx), dequantize=dequantize,
    )
    from nexus.training.distributed import end_processes
    from nexus.engines.collect import process_state

    main = process_state().is_main_process
    end_processes()
    if not main:
        return
    state = "complete" if stats.meta.get("complete") else f"partial, resume from batch {stats.meta.get('next_batch')}"
    click.echo(f"router statistics: {stats.tokens} tokens, {len(stats.layers)} MoE layers ({state}) -> {output}")


SELECT_EPILOG = f"""\b
Rule, per layer: PCA of the covariance of the router probabilities (from the streamed
moments, unbiased N-1); importance_e = sum_i |loading_ie| * explained_ratio_i; then K greedy
picks maximising importance_e/max(importance) - LAMBDA * max over already picked f of
max(0, cos(loading_e, loading_f)), loadings scaled by sqrt(explained variance) (so the cosine
is the correlation of the two experts' probabilities). LAMBDA 0: plain top-K by importance.
Patterns: even (CV<0.1), cliff (a step >= 0.3 x top), moderate (CV>=0.3), gradual.

\b
Examples:
  nexus select --stats stats/ --output selection.json
  nexus select --stats stats/ --top-k 8 --diversity 0 --output sel/
Default --top-k: ceil(E/4), at least 1 and at most {DEFAULT_TOP_K}: the shared expert starts as the
average of the picked experts, so K stays a minority of E for the selection to matter (K >= E/2 warns).
"""


@click.command(epilog=SELECT_EPILOG)
@click.option("--stats", "stats_path", type=click.Path(), required=True,
              help="Directory (or .safetensors file) written by `nexus collect`.")
@click.option("--output", "-o", type=click.Path(), default=None,
              help="Selection file (.json) or directory for expert_selection.json (default: beside the stats).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help=f"Experts per layer (default: ceil(E/4), at most {DEFAULT_TOP_K}); more than E is an error.")
@click.option("--diversity", type=FiniteFloat(min=0.0), default=DEFAULT_DIVERSITY, show_default=True, metavar="LAMBDA",
              help="Weight of the redundancy penalty in the greedy pick (0: pure importance).")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Also write <output>_importance.png (heatmap) and <output>_variance.png.")
def select(stats_path, output, top_k, diversity, plots):
    """Pick K experts per MoE layer by PCA importance of the router statistics, with diversity.

    Writes expert_selection.json: per layer the picked ids, their scores, the explained
    variance, the importance share of the picked set and a pattern label, plus the family,
    base fingerprint, NEXUS version and arguments.
    """
    from nexus.engines.select import run_select

    if output is None:
        base = Path(stats_path)
        output = str(base if base.is_dir() else base.parent)
    doc, files = run_select(stats_path, output, top_k=top_k, diversity=diversity, plots=plots)
    for x in doc["layers"]:
        click.echo(f"layer {x['layer']:>3}: {len(x['experts'])}/{x['num_experts']} experts, "
                   f"importance share {x['importance_share']:.3f} ({x['pattern']})")
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


CONVERT_EPILOG = """\b
Strategies: pca (the selected experts), random (K random experts, seeded), top1 (the most
important expert), mean_all (all experts), zeros (outputs 0 at init: zero down_proj).
Width: --shared-intermediate-size N < I keeps the N units of largest |gate|^2+|up|^2+|down|^2;
N > I adds units with zero down_proj columns (the function is unchanged).

\b
Examples:
  nexus convert --model ~/models/gpt-oss-20b --selection selection.json --output adapter/
  nexus convert --model ~/models/gpt-oss-20b --strategy mean_all --gate-mode none --output adapter/
"""


@click.command(epilog=CONVERT_EPILOG)
@click.option("--model", "model_path", type=click.Path(), default=None,
              help="Base checkpoint directory (MXFP4 or float; never loaded whole). Default with --family: the demo.")
@click.option("--selection", "selection_path", type=click.Path(), default=None,
              help="expert_selection.json from `nexus select` (needed by pca and top1).")
@click.option("--output", "-o", type=click.Path(), required=True, help="Adapter directory to write.")
@click.option("--strategy", type=click.Choice(INIT_STRATEGIES), default=DEFAULT_STRATEGY, show_default=True,
              help="Which experts initialise each shared expert.")
@click.option("--gate-mode", type=click.Choice(GATE_MODES), default=DEFAULT_GATE_MODE, show_default=True,
              help="none: plain add; scalar: learnable per-layer scale from 0; token: sigmoid(w.x) per token.")
@click.option("--shared-intermediate-size", type=int, default=None,
              help="Width of each shared expert (default: the routed expert width).")
@click.option("--weighted/--uniform", default=False, show_default=True,
              help="pca: weight the selected experts by importance, or average them uniformly.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random picks and of new units.")
@click.pass_context
def convert(ctx, model_path, selection_path, output, strategy, gate_mode, shared_intermediate_size, weighted, seed):
    """Write an adapter whose shared experts are averages of routed experts, read from disk.

    Only the needed experts are read, one at a time (MXFP4 dequantised on the fly): peak
    memory is about one expert plus one accumulator. An interrupted conversion resumes at the
    next layer; the adapter appears whole or not at all.
    """
    from nexus.engines.convert import convert as run_convert

    model_path, _ = _model_or_demo(ctx, model_path)
    path = run_convert(
        model_path, output, selection=selection_path, strategy=strategy, gate_mode=gate_mode,
        shared_intermediate_size=shared_intermediate_size, weighted=weighted, seed=seed,
        family_name=ctx.find_root().obj.get("family"), progress=_progress(ctx),
    )
    click.echo(f"wrote a {strategy} adapter ({gate_mode} gate) to {path}")


def register(cli):
    """Add ``collect``, ``select`` and ``convert`` to the ``nexus`` group."""
    cli.add_command(collect)
    cli.add_command(select)
    cli.add_command(convert)

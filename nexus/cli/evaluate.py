"""``nexus evaluate``, ``nexus generate``, ``nexus plot``: judge an adapter and look at a run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from nexus.cli.options import ExpandedPath, dataclass_options
from nexus.engines.evaluate_config import EvaluateConfig, GenerateConfig


@click.command()
@dataclass_options(EvaluateConfig)
def evaluate(**kwargs):
    """Perplexity of the adapted model vs its base, KL(base || adapted), router entropy and load per layer.

    \b
    Example:
      nexus evaluate --model base/ --adapter runs/a/final --data heldout.jsonl --output eval.json
    """
    from nexus.engines.evaluate import check_output
    from nexus.engines.evaluate import evaluate as run_evaluate
    from nexus.io import write_json

    config = EvaluateConfig(**kwargs)
    output = config.output
    check_output(config)
    result = run_evaluate(dataclasses.replace(config, output=None))
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
@dataclass_options(GenerateConfig)
def generate(**kwargs):
    """Generate text with the base or adapted model.

    \b
    Example:
      nexus generate --model base/ --adapter runs/a/final --chat --prompt "Summarise the budget."
    """
    from nexus.engines.evaluate import generate as run_generate

    click.echo(run_generate(GenerateConfig(**kwargs)))


@click.command()
@click.argument("run_dir", type=ExpandedPath(exists=True, file_okay=False))
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

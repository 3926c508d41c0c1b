"""``nexus run``: the whole pipeline in one command."""

from __future__ import annotations

import click

from nexus.cli.options import dataclass_options
from nexus.pipeline.run import RunConfig


@click.command()
@dataclass_options(RunConfig, skip=("family",))
@click.pass_context
def run(ctx, **kwargs):
    """Collect router statistics, select experts, convert, train, evaluate and plot.

    Stages whose outputs exist and match their inputs are skipped, so rerunning the same
    command resumes an interrupted run.

    \b
    Examples:
      nexus --family gpt_oss run --output runs/demo          # built-in demo, about a minute
      nexus run --model ~/models/gpt-oss-20b --data domain.jsonl --eval-data heldout.jsonl \\
          --output runs/domain --top-k 24 --max-steps 2000 --seq-len 1024
    """
    from nexus.pipeline.run import run_pipeline

    cfg = RunConfig(family=ctx.find_root().obj.get("family"), **kwargs)
    result = run_pipeline(cfg)
    ev = result["eval"]
    base, adapted = ev["base"]["perplexity"], ev.get("adapted", {}).get("perplexity")
    click.echo(f"run {result['run_dir']}: ran {', '.join(result['ran']) or 'nothing'}"
               f"{'; skipped ' + ', '.join(result['skipped']) if result['skipped'] else ''}")
    click.echo(f"held-out perplexity: base {base:.3f} -> adapted {adapted:.3f} over {ev['tokens']} tokens")


def register(cli):
    cli.add_command(run)

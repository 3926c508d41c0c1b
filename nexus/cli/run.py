"""``nexus run``: the whole pipeline in one command."""

from __future__ import annotations

import click

from nexus.cli.options import dataclass_options
from nexus.engines.run import RunConfig


@click.command()
@dataclass_options(RunConfig, skip=("family",))
@click.pass_context
def run(ctx, **kwargs):
    """Collect router statistics, select experts, convert, train, evaluate and plot.

    Stages whose outputs exist and match their inputs (paths resolved, the data's content
    included) are skipped, so rerunning the same command resumes an interrupted run. A rerun
    whose inputs differ from what a stage was made from is refused, naming what differs, unless
    --overwrite lets it replace that stage and the ones after it. Every argument is checked before
    the first stage starts. Without --eval-data, 10% of the documents of --data (picked by a hash
    of their content) are held out of collect and train and evaluated on. SIGINT/SIGTERM stop
    the run after the interrupted stage has saved its state (exit status 130/143).

    \b
    Examples:
      nexus --family gpt_oss run --output runs/demo          # built-in demo, about half a minute
      nexus run --model ~/models/gpt-oss-20b --data domain.jsonl --eval-data heldout.jsonl \\
          --output runs/domain --top-k 24 --max-steps 2000 --seq-len 1024
    """
    from nexus.io import check_writable_output
    from nexus.engines.run import run_pipeline

    check_writable_output(kwargs["output"], directory=True)
    cfg = RunConfig(family=ctx.find_root().obj.get("family"), **kwargs)
    result = run_pipeline(cfg)
    ev = result["eval"]
    base, adapted = ev["base"]["perplexity"], ev.get("adapted", {}).get("perplexity")
    click.echo(f"run {result['run_dir']}: ran {', '.join(result['ran']) or 'nothing'}"
               f"{'; skipped ' + ', '.join(result['skipped']) if result['skipped'] else ''}")
    src = ev.get("eval_source") or {}
    if src.get("kind") == "heldout_split":
        label = (f"{src['documents']} of {src['of_documents']} documents of --data held out by content hash, "
                 "not trained on")
    else:
        label = f"--eval-data {src.get('data', ev.get('data'))}"
    click.echo(f"held-out perplexity ({label}): base {base:.3f} -> adapted {adapted:.3f} over {ev['tokens']} tokens")


def register(cli):
    cli.add_command(run)

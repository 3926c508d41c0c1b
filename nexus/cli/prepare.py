"""``nexus collect``, ``nexus select``, ``nexus convert``: from a base checkpoint to an initialised adapter."""

from __future__ import annotations


import click

from nexus.cli.options import dataclass_options
from nexus.constants import DEFAULT_TOP_K
from nexus.engines.collect_config import CollectConfig
from nexus.engines.convert_config import ConvertConfig
from nexus.engines.select_config import SelectConfig


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
@dataclass_options(CollectConfig)
@click.pass_context
def collect(ctx, **kwargs):
    """Accumulate per-layer router statistics of the base model over your data.

    Streams float64 sums (token count, sum p, sum p p^T, top-k counts and weights) per MoE
    layer: memory does not grow with the number of tokens, shards from several processes merge
    by addition, and an interrupted run resumes from its last checkpoint. Padding is never
    counted; --target-tokens is met exactly (the first tokens of the last batch, row by row).
    """
    from nexus.engines.collect import run_collect

    config = CollectConfig(**kwargs)
    config.model, demo = _model_or_demo(ctx, config.model)
    if config.data is None:
        if not demo:
            raise click.UsageError("give --data: the text to collect router statistics on")
        from nexus.demo import demo_text_path

        config.data = str(demo_text_path())
    stats = run_collect(config, ctx.find_root().obj.get("family"), progress=_progress(ctx))
    from nexus.training.distributed import end_processes
    from nexus.engines.collect import process_state

    main = process_state().is_main_process
    end_processes()
    if not main:
        return
    state = "complete" if stats.meta.get("complete") else f"partial, resume from batch {stats.meta.get('next_batch')}"
    click.echo(f"router statistics: {stats.tokens} tokens, {len(stats.layers)} MoE layers ({state}) "
               f"-> {config.output}")


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
@dataclass_options(SelectConfig)
def select(**kwargs):
    """Pick K experts per MoE layer by PCA importance of the router statistics, with diversity.

    Writes expert_selection.json: per layer the picked ids, their scores, the explained
    variance, the importance share of the picked set and a pattern label, plus the family,
    base fingerprint, NEXUS version and arguments.
    """
    from nexus.engines.select import run_select

    doc, files = run_select(SelectConfig(**kwargs))
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
@dataclass_options(ConvertConfig)
@click.pass_context
def convert(ctx, **kwargs):
    """Write an adapter whose shared experts are averages of routed experts, read from disk.

    Only the needed experts are read, one at a time (MXFP4 dequantised on the fly): peak
    memory is about one expert plus one accumulator. An interrupted conversion resumes at the
    next layer; the adapter appears whole or not at all.
    """
    from nexus.engines.convert import convert as run_convert

    config = ConvertConfig(**kwargs)
    config.model, _ = _model_or_demo(ctx, config.model)
    path = run_convert(config, ctx.find_root().obj.get("family"), progress=_progress(ctx))
    click.echo(f"wrote a {config.strategy} adapter ({config.gate_mode} gate) to {path}")


def register(cli):
    """Add ``collect``, ``select`` and ``convert`` to the ``nexus`` group."""
    cli.add_command(collect)
    cli.add_command(select)
    cli.add_command(convert)

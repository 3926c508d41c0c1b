"""Quality benchmark: NEXUS vs LoRA vs full fine-tuning on a pretrained MoE, real text.

    python benchmarks/bench_quality.py --quick          # minutes: every method on tiny models
    python benchmarks/bench_quality.py                  # hours: the full preset
    python benchmarks/bench_quality.py --preset smoke   # seconds: plumbing only

Base models are pretrained once and cached under ``$NEXUS_CACHE/bench`` (default
``~/.cache/nexus/bench``); finished runs are cached too, so an interrupted run resumes.
Results: ``benchmarks/results/quality-<preset>.json``, ``.md`` and ``-*.png``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(["smoke", "quick", "full"]), default="full", show_default=True)
@click.option("--quick", is_flag=True, help="Shorthand for --preset quick.")
@click.option("--methods", default="all", show_default=True,
              help="Comma-separated method names, 'all', or 'milestone' (nexus, nexus-init-mean_all, lora-experts, full-experts).")
@click.option("--models", default=None, help="Comma-separated base models (gpt_oss, qwen3_moe); default all.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "benchmarks" / "results",
              show_default=True, help="Where the JSON, markdown and plots go.")
@click.option("--name", default=None, help="File stem of the outputs (default quality-<preset>).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache root for base models and runs (default $NEXUS_CACHE/bench).")
@click.option("--isolate/--no-isolate", default=None,
              help="Run each adaptation in its own process (per-run peak RSS); default: the preset's (full: on).")
@click.option("--workers", type=int, default=1, show_default=True, help="Concurrent runs (1 for honest timings).")
@click.option("--threads", type=int, default=None, help="Torch threads per run (default the preset's).")
@click.option("--lrs", default=None, help="Override the preset's LR grid, e.g. '1e-3,3e-3,1e-2' (finished runs are reused).")
@click.option("--seeds", type=int, default=None, help="Override the preset's seed count.")
@click.option("--lr-extensions", type=int, default=None, help="Override how often a grid may grow past an edge.")
@click.option("--carry-over", "carry", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An earlier results JSON of the same experiment: its runs seed the run cache (same settings, base "
                   "and data path only; each is marked with where it came from). Repeatable.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
def main(preset, quick, methods, models, out_dir, name, cache, isolate, workers, threads, lrs, seeds, lr_extensions, carry, verbose):
    """Run the quality benchmark and write its results."""
    import dataclasses

    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.methods import METHODS, METHODS_BY_NAME, MILESTONE_METHODS
    from benchmarks.quality.report import write_report
    from nexus.errors import NexusError

    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PRESETS["quick" if quick else preset]
    if threads:
        cfg = dataclasses.replace(cfg, threads=threads)
    if isolate is not None:
        cfg = dataclasses.replace(cfg, isolate=isolate)
    if lrs:
        try:
            cfg = dataclasses.replace(cfg, lrs=tuple(sorted(float(x) for x in lrs.split(","))))
        except ValueError as exc:
            raise click.BadParameter(f"{lrs!r} is not a comma-separated list of numbers", param_hint="--lrs") from exc
    if seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=max(1, seeds))
    if lr_extensions is not None:
        cfg = dataclasses.replace(cfg, lr_extensions=max(0, lr_extensions))
    if methods == "all":
        chosen = list(METHODS)
    else:
        wanted = MILESTONE_METHODS if methods == "milestone" else [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METHODS_BY_NAME]
        if unknown:
            raise click.BadParameter(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS_BY_NAME)}", param_hint="--methods")
        chosen = [METHODS_BY_NAME[m] for m in wanted]
    from benchmarks.quality.run import bench_cache, carry_over, run_benchmark

    for path in carry:
        click.echo(f"carried over {carry_over(path, cache or bench_cache())} runs from {path}")
    try:
        results = run_benchmark(cfg, chosen, models=models.split(",") if models else None, workers=workers, cache=cache)
        paths = write_report(results, out_dir, name)
    except NexusError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(paths["markdown"].read_text())
    click.echo(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots")


if __name__ == "__main__":
    main()

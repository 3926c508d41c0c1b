"""Quality benchmark: NEXUS vs LoRA vs full fine-tuning on a pretrained MoE, real text.

    python benchmarks/bench_quality.py --quick          # minutes: every method on tiny models
    python benchmarks/bench_quality.py                  # hours: the full preset
    python benchmarks/bench_quality.py --preset smoke   # seconds: plumbing only
    python benchmarks/bench_quality.py --preset gpu --methods milestone   # one CUDA GPU: ~99M-parameter bases

Base models are pretrained once and cached under ``$NEXUS_CACHE/bench`` (default
``~/.cache/nexus/bench``); finished runs are cached too, so an interrupted run resumes.
Results: ``<results-dir>/quality-<preset>.json``, ``.md`` and ``-*.png`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import arguments, bench_parser, parse_bench_args  # noqa: E402


def build_parser():
    """The benchmark's flags: the common ones (:func:`benchmarks.common.bench_parser`) and its own."""
    p = bench_parser(__doc__.splitlines()[0], threads=None,
                     threads_help="Torch threads per run (default the preset's: 1).")
    p.add_argument("--preset", choices=["smoke", "quick", "full", "gpu"], default="full",
                   help="Sizes and grids (default full; --quick is the quick preset; gpu needs a CUDA GPU).")
    p.add_argument("--methods", default="all",
                   help="Comma-separated method names (the files of benchmarks/quality/variants/), 'all' "
                        "(default), or 'milestone' (the variants marked so).")
    p.add_argument("--domain", choices=["python", "licenses"], default="python",
                   help="The adaptation domain: python (the stdlib's source, default) or licenses (the installed "
                        "packages' licence texts: legal English).")
    p.add_argument("--models", default=None, help="Comma-separated base models (gpt_oss, qwen3_moe); default all.")
    p.add_argument("--name", default=None, help="File stem of the outputs (default quality-<preset>).")
    p.add_argument("--cache", type=Path, default=None,
                   help="Cache root for base models and runs (default $NEXUS_CACHE/bench).")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="Run each adaptation in its own process (per-run peak RSS); default: the preset's (full: on).")
    p.add_argument("--workers", type=int, default=1, help="Concurrent runs (default 1, for honest timings).")
    p.add_argument("--lrs", default=None,
                   help="Override the preset's LR grid, e.g. '1e-3,3e-3,1e-2' (finished runs are reused).")
    p.add_argument("--seeds", type=int, default=None, help="Override the preset's seed count.")
    p.add_argument("--lr-extensions", type=int, default=None, help="Override how often a grid may grow past an edge.")
    p.add_argument("--carry-over", dest="carry", action="append", type=Path, default=[],
                   help="An earlier results JSON of the same experiment: its runs seed the run cache (same settings, "
                        "base and data path only; each is marked with where it came from). Repeatable.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the quality benchmark and write its results; return the exit status (0: done, 1: a run failed).

    ``--quick`` is the ``quick`` preset. Results: ``<results-dir>/<name>.json``, ``.md`` and ``-*.png``.
    """
    import dataclasses

    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.device import require_device
    from benchmarks.quality.methods import METHODS, METHODS_BY_NAME, MILESTONE_METHODS
    from nexus.errors import NexusError

    p = build_parser()
    args = parse_bench_args(p, argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PRESETS["quick" if args.quick else args.preset]
    try:
        require_device(cfg.device, cfg.preset)
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.isolate is not None:
        cfg = dataclasses.replace(cfg, isolate=args.isolate)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: give 1 or more")
    if args.lrs:
        try:
            cfg = dataclasses.replace(cfg, lrs=tuple(sorted(float(x) for x in args.lrs.split(","))))
        except ValueError:
            p.error(f"--lrs {args.lrs!r} is not a comma-separated list of numbers")
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=max(1, args.seeds))
    if args.lr_extensions is not None:
        cfg = dataclasses.replace(cfg, lr_extensions=max(0, args.lr_extensions))
    if args.methods == "all":
        chosen = list(METHODS)
    else:
        wanted = (MILESTONE_METHODS if args.methods == "milestone"
                  else [m.strip() for m in args.methods.split(",") if m.strip()])
        unknown = [m for m in wanted if m not in METHODS_BY_NAME]
        if unknown:
            p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS_BY_NAME)}")
        chosen = [METHODS_BY_NAME[m] for m in wanted]
    missing = [str(path) for path in args.carry if not path.is_file()]
    if missing:
        p.error(f"--carry-over {', '.join(missing)}: no such file; give an earlier results JSON")
    from benchmarks.quality.report import write_report
    from benchmarks.quality.run import bench_cache, carry_over, run_benchmark

    try:
        for path in args.carry:
            print(f"carried over {carry_over(path, args.cache or bench_cache())} runs from {path}")
        results = run_benchmark(cfg, chosen, models=args.models.split(",") if args.models else None,
                                workers=args.workers, cache=args.cache, domain=args.domain)
        results["arguments"] = arguments(args)
        paths = write_report(results, args.results_dir, args.name)
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())

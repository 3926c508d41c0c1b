"""Merge the results of several benchmark invocations of one experiment into one results dict.

Invocations that share a run cache but differ in their method lists or LR grids (one grid per
method family, say) each write a results JSON. Merged, a method's runs are the union of its runs
(keyed by LR and seed), its grid the union of its grids, its best LR the one with the lowest seed-0
validation domain perplexity over that grid (the benchmark's own rule), and the invocations'
arguments are kept in ``arguments["invocations"]``. Only results of the same experiment merge:
same preset, corpora and adaptation settings, and per base model the same work directory.
"""

from __future__ import annotations

import copy

import numpy as np

from nexus.errors import NexusError

SAME = ("benchmark", "preset", "corpora", "tokenizer")
ADAPTATION = ("steps", "batch_size", "seq_len", "warmup_frac", "eval_points", "eval_rows", "drift_rows",
              "collect_rows", "nexus_top_k", "vocab_size")


def _domain(results: dict) -> str:
    """The results' domain name; ``python``, the only domain, for results from before the key."""
    return (results.get("domain") or {}).get("name", "python")


def _score(run: dict) -> float:
    v = run["final"]["domain_val"]
    return v if run.get("diverged") is False and np.isfinite(v) else float("inf")


def merge_entry(a: dict, b: dict) -> dict:
    """One method's sweep entries (``grid``, ``best_lr``, ``edge``, ``runs``) merged."""
    runs = {(r["lr"], r["seed"]): r for r in a["runs"]}
    runs.update({(r["lr"], r["seed"]): r for r in b["runs"] if (r["lr"], r["seed"]) not in runs})
    grid = sorted(set(a["grid"]) | set(b["grid"]))
    seed0 = {lr: _score(runs[(lr, 0)]) for lr in grid if (lr, 0) in runs}
    best = min(seed0, key=lambda lr: (seed0[lr], lr))
    edge = None
    if len(grid) > 1 and best in (grid[0], grid[-1]):
        edge = "low" if best == grid[0] else "high"
    return {"grid": grid, "best_lr": best, "edge": edge,
            "runs": sorted(runs.values(), key=lambda r: (r["lr"], r["seed"]))}


def merge_results(parts: list[dict]) -> dict:
    """``parts`` (raw or written results dicts) as one results dict.

    :raises NexusError: the parts are not one experiment (the message names the difference).
    """
    if not parts:
        raise NexusError("nothing to merge: give at least one results JSON")
    out = copy.deepcopy(parts[0])
    for k in ("summary", "comparisons", "headline"):
        out.pop(k, None)
    invocations = []
    for i, part in enumerate(parts):
        args = part.get("arguments") or {}
        invocations += args.get("invocations", [args]) if args else []
        if i == 0:
            continue
        for key in SAME:
            if part.get(key) != out.get(key):
                raise NexusError(f"results {i + 1} differ from the first in {key!r}: not the same experiment")
        if _domain(part) != _domain(out):
            raise NexusError(f"results {i + 1} adapt to another domain: not the same experiment")
        for key in ADAPTATION:
            if part["config"].get(key) != out["config"].get(key):
                raise NexusError(f"results {i + 1} differ from the first in config {key!r}: not the same experiment")
        out["methods"].update({k: v for k, v in part["methods"].items() if k not in out["methods"]})
        for mname, model in part["models"].items():
            if mname not in out["models"]:
                out["models"][mname] = copy.deepcopy(model)
                continue
            mine = out["models"][mname]
            if mine["work_dir"] != model["work_dir"]:
                raise NexusError(f"results {i + 1} ran {mname} in {model['work_dir']}, the first in "
                                 f"{mine['work_dir']}: another base model or data")
            for name, entry in model["methods"].items():
                mine["methods"][name] = (merge_entry(mine["methods"][name], entry) if name in mine["methods"]
                                         else copy.deepcopy(entry))
            mine.get("context", {}).pop("summary", None)
            mine.pop("summary", None)
            mine["seconds"] = round(mine.get("seconds", 0) + model.get("seconds", 0), 1)
        out["started"] = min(out["started"], part["started"])
        out["seconds"] = round(out.get("seconds", 0) + part.get("seconds", 0), 1)
    for model in out["models"].values():
        model.pop("summary", None)
    out["arguments"] = {"invocations": invocations,
                        "note": f"{len(parts)} invocations sharing one run cache, merged "
                                "(benchmarks/quality/merge.py)"} if len(parts) > 1 else parts[0].get("arguments", {})
    return out

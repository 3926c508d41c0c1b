"""One factor at a time: each NEXUS variant against the reference ``nexus`` run, over seeds.

Every NEXUS variant of :data:`benchmarks.quality.methods.METHODS` changes one setting of
``nexus`` (init strategy, gate mode, router, KD, SFA, width). For each variant and base model
this module compares the held-out test perplexities of the seeds at each method's best LR with
Welch's t-test (unequal variances; ``scipy.stats.ttest_ind``), and says whether the variant is
better, worse or indistinguishable from the reference at ``ALPHA``. With 3 seeds a test has
little power: "within noise" means "not shown to differ", not "equal".

These verdicts read one factor at a time against a CE-only reference: an option is suggested
only if it improves on every base model. The shipped gate and loss defaults are set instead by
the serving-first rule of :mod:`benchmarks.quality.default_choice`, which compares gates under
every loss and prefers an adapter ``nexus export`` can fold. Distillation and
SFA trade domain perplexity for retained general perplexity by design, so they are judged at
matched forgetting instead: the best domain perplexity whose general perplexity stayed within
``MATCHED_FORGETTING`` x the base's (a read-out of the Pareto front over LRs, seeds and
checkpoints; optimistic, as a minimum over evaluations, for every method alike).
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
MATCHED_FORGETTING = "1.5"  # key of the summary's domain_at_forgetting
TRADEOFFS = ("kd_weight", "sfa")
REFERENCE = "nexus"
# factor -> (the reference's setting, {variant method: its setting})
FACTORS: dict[str, tuple[str, dict[str, str]]] = {
    "init": ("pca", {"nexus-init-random": "random", "nexus-init-top1": "top1", "nexus-init-mean_all": "mean_all",
                     "nexus-init-zeros": "zeros (gate none)"}),
    "gate": ("scalar", {"nexus-gate-none": "none", "nexus-gate-token": "token",
                        "nexus-gate-scalar_token": "scalar_token (zero-start per-token)"}),
    "router": ("frozen", {"nexus-router": "trained"}),
    "kd_weight": ("0", {"nexus-kd": "1 (teacher self)", "nexus-kd-general": "1 on general text (--kd-data)"}),
    "sfa": ("off", {"nexus-sfa": "on"}),
    "width": ("expert width", {"nexus-small": "1/4 of it"}),
}
METRICS = ("domain_test", "general_test")


def seed_values(entry: dict, metric: str) -> list[float]:
    """Final ``metric`` perplexity of every seed at the method's best LR (finite ones only)."""
    vals = [r["final"][metric] for r in entry["runs"] if r["lr"] == entry["best_lr"] and not r.get("diverged")]
    return [v for v in vals if v is not None and math.isfinite(v)]


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test for ``mean(a) == mean(b)``; None with under 2 values
    on a side. Two constant samples give 0 when their means differ, 1 when they do not."""
    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def verdict(ref: list[float], var: list[float], p: float | None) -> str:
    """``better`` / ``worse`` (lower / higher perplexity at p < ALPHA), ``within noise``, or
    ``one seed`` when no test is possible."""
    if p is None:
        return "one seed"
    if p >= ALPHA:
        return "within noise"
    return "better" if np.mean(var) < np.mean(ref) else "worse"


def compare_model(methods: dict, summary: dict | None = None) -> list[dict]:
    """Every variant of :data:`FACTORS` present in ``methods`` (a model's ``methods`` entry of
    the raw results) against :data:`REFERENCE`.

    :return: one dict per variant: ``factor``, ``method``, ``setting``, ``reference_setting``,
        ``n`` (seeds of variant and reference), per metric ``{"ratio": mean(var)/mean(ref),
        "p": p-value or None, "verdict": ...}`` and, given the model's ``summary``,
        ``matched`` = ``[variant, reference]`` domain ppl at matched forgetting (None: never reached).
    """
    if REFERENCE not in methods:
        return []
    rows = []
    for factor, (ref_setting, variants) in FACTORS.items():
        for name, setting in variants.items():
            if name not in methods:
                continue
            row = {"factor": factor, "method": name, "setting": setting, "reference_setting": ref_setting}
            for metric in METRICS:
                ref, var = seed_values(methods[REFERENCE], metric), seed_values(methods[name], metric)
                p = welch(ref, var)
                ratio = float(np.mean(var) / np.mean(ref)) if ref and var else float("nan")
                row[metric] = {"ratio": ratio, "p": p, "verdict": verdict(ref, var, p)}
                row["n"] = [len(var), len(ref)]
            if summary and name in summary and REFERENCE in summary:
                row["matched"] = [summary[m]["domain_at_forgetting"].get(MATCHED_FORGETTING) for m in (name, REFERENCE)]
            rows.append(row)
    return rows


def compare(results: dict) -> dict[str, list[dict]]:
    """:func:`compare_model` for every base model of ``results``."""
    return {name: compare_model(model["methods"], model.get("summary")) for name, model in results["models"].items()}


def consistent(comparisons: dict[str, list[dict]], metric: str = "domain_test") -> dict[str, str]:
    """``method -> verdict`` when every base model gives the same one (else ``mixed``)."""
    by_method: dict[str, set[str]] = {}
    for rows in comparisons.values():
        for row in rows:
            by_method.setdefault(row["method"], set()).add(row[metric]["verdict"])
    return {m: next(iter(v)) if len(v) == 1 else "mixed" for m, v in by_method.items()}


def improves(row: dict) -> bool:
    """Whether a variant is an improvement on one base model: lower domain perplexity without
    more forgetting, or the same domain perplexity (within noise) with less forgetting."""
    d, g = row["domain_test"]["verdict"], row["general_test"]["verdict"]
    return (d == "better" and g != "worse") or (d == "within noise" and g == "better")


def improves_matched(row: dict) -> bool:
    """Whether a forgetting control does its job: at the LR chosen by validation it forgets
    less than the reference (general ppl better), and at matched forgetting it does better (it
    reaches the bounded-forgetting region where the reference does not, or has the lower domain
    ppl there)."""
    var, ref = row.get("matched") or (None, None)
    return row["general_test"]["verdict"] == "better" and var is not None and (ref is None or var < ref)


def recommend(comparisons: dict[str, list[dict]]) -> dict[str, dict]:
    """The setting each factor should default to: a variant that improves on **every** base
    model (:func:`improves`; for :data:`TRADEOFFS` :func:`improves_matched`) replaces the
    reference's setting (several: the lowest mean domain-ppl ratio); otherwise the reference's
    setting stays. The :data:`TRADEOFFS` were each measured alone against CE-only training, not
    together, so at most one of them is switched on: the one with the lowest mean domain ppl at
    matched forgetting.

    :return: ``factor -> {"setting", "method" (None: the reference), "evidence": [rows]}``.
    """
    models = [rows for rows in comparisons.values() if rows]
    out = {}
    for factor, (ref_setting, variants) in FACTORS.items():
        winners = []
        for name in variants:
            rows = [r for rows in models for r in rows if r["method"] == name]
            better = improves_matched if factor in TRADEOFFS else improves
            if rows and len(rows) == len(models) and all(better(r) for r in rows):
                winners.append((float(np.mean([r["domain_test"]["ratio"] for r in rows])), name, rows))
        if winners:
            _, name, rows = min(winners)
            out[factor] = {"setting": variants[name], "method": name, "evidence": rows}
        else:
            out[factor] = {"setting": ref_setting, "method": None, "evidence": []}
    switched = [f for f in TRADEOFFS if out.get(f, {}).get("method")]
    if len(switched) > 1:
        matched = lambda f: float(np.mean([r["matched"][0] for r in out[f]["evidence"]]))  # noqa: E731
        keep = min(switched, key=matched)
        for f in switched:
            if f != keep:
                out[f] = {"setting": FACTORS[f][0], "method": None, "evidence": out[f]["evidence"],
                          "note": f"also reaches bounded forgetting, with higher domain ppl there than {keep}; "
                                  f"the two were not measured together"}
    return out


def _p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def markdown(comparisons: dict[str, list[dict]]) -> str:
    """The comparisons as a markdown section: a table per base model, then the verdicts shared
    by every model."""
    if not any(comparisons.values()):
        return ""
    lines = [
        "## One factor at a time (vs `nexus`: pca init, scalar gate, frozen router, CE only, no SFA, expert width)",
        "",
        f"Ratios are mean perplexity over seeds (variant / `nexus`, < 1 is better), p from Welch's t-test; "
        f"better/worse at p < {ALPHA}. Each method at its own best LR.",
        "",
    ]
    for model, rows in comparisons.items():
        if not rows:
            continue
        lines += [f"### {model}", "", "| factor | variant | seeds | domain ppl ratio | p | verdict | general ppl ratio | p | verdict "
                  f"| domain ppl at general ≤ {MATCHED_FORGETTING}x base, variant / nexus |",
                  "|---|---|---:|---:|---:|---|---:|---:|---|---:|"]
        for r in rows:
            d, g = r["domain_test"], r["general_test"]
            matched = " / ".join("none" if v is None else f"{v:.1f}" for v in r.get("matched") or ()) or "–"
            lines.append(f"| {r['factor']} | {r['setting']} (`{r['method']}`) | {r['n'][0]} vs {r['n'][1]} | {d['ratio']:.3f} | "
                         f"{_p(d['p'])} | {d['verdict']} | {g['ratio']:.3f} | {_p(g['p'])} | {g['verdict']} | {matched} |")
        lines.append("")
    if len([rows for rows in comparisons.values() if rows]) > 1:
        dom, gen = consistent(comparisons, "domain_test"), consistent(comparisons, "general_test")
        lines += ["Across every base model (the same verdict on each, else *mixed*):", "",
                  "| variant | domain ppl | general ppl |", "|---|---|---|"]
        lines += [f"| `{m}` | {dom[m]} | {gen[m]} |" for m in dom]
        lines.append("")
    rec = recommend(comparisons)
    lines += ["What these one-factor comparisons alone suggest (the gate and loss defaults follow the serving-first "
              "rule of `benchmarks/quality/default_choice.py`; a variant replaces `nexus`'s setting only when, "
              "on every base model, it has lower domain ppl without more forgetting, or the same domain ppl with "
              "less forgetting; "
              f"{' and '.join(TRADEOFFS)}: when it forgets less at its best LR and has the lower domain ppl at general "
              f"≤ {MATCHED_FORGETTING}x base, or reaches that region where `nexus` does not):", ""]
    lines += [f"- {factor}: **{r['setting']}**" + (f" (`{r['method']}`)" if r["method"] else " (unchanged)")
              + (f": {r['note']}" if r.get("note") else "") for factor, r in rec.items()]
    lines.append("")
    return "\n".join(lines)

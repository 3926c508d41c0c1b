"""The default gate and loss of ``nexus convert`` / ``nexus train``, chosen from the gate x loss grid
by a rule fixed before the measurement, which prefers an adapter that ``nexus export`` can fold.

The grid: every NEXUS variant that differs from the reference only in its gate mode and its loss
(CE only; KD on the domain batches; KD on general text, ``--kd-data``). Per base model, each cell
is the mean over seeds at its best LR (chosen on validation domain perplexity).

The rule:

1. **Matched forgetting.** A cell is eligible when its mean general perplexity is within
   ``limit`` x the base's on every base model, for the first ``limit`` of
   :data:`FORGETTING_LIMITS` that any cell meets. Adaptation that forgets more is not a default.
2. **Exportable first.** Among eligible cells whose gate folds into a stock checkpoint
   (:data:`nexus.constants.FOLDABLE_GATE_MODES`), the lowest domain perplexity (geometric mean
   over base models) is the candidate.
3. **Clearly better.** The best eligible non-exportable cell replaces it only when, on every
   base model, its mean domain perplexity is at least :data:`CLEAR_MARGIN` lower and Welch's
   test over seeds gives p < ``ALPHA``. 3% is about twice the seed-to-seed spread of the domain
   perplexity in this benchmark, and less than that is not worth an adapter that stock serving
   engines cannot load.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.quality.compare import ALPHA, seed_values, welch
from nexus.constants import FOLDABLE_GATE_MODES

FORGETTING_LIMITS = (1.1, 1.5)
CLEAR_MARGIN = 0.03
LOSSES = ("CE", "KD on domain", "KD on general text")


def cell_of(method: dict) -> tuple[str, str] | None:
    """``(gate mode, loss)`` of a method (a results ``methods`` entry: the variant as a dict), or
    None when it changes anything else than the gate and the loss (init, width, router, SFA...)."""
    if method.get("kind") != "nexus" or method.get("width_fraction", 1.0) != 1.0 or method.get("sfa_interval_frac"):
        return None
    convert, train = method.get("convert") or {}, method.get("train") or {}
    if convert.get("strategy", "pca") != "pca" or train.get("train_routers") or set(train) - {
            "kd_weight", "temperature", "train_routers", "sfa_beta"}:
        return None
    if float(train.get("temperature", 1.0)) != 1.0:
        return None
    kd = float(train.get("kd_weight", 0.0))
    if kd not in (0.0, 1.0):
        return None
    loss = LOSSES[0] if kd == 0 else (LOSSES[2] if method.get("kd_on") == "general" else LOSSES[1])
    return convert.get("gate_mode", "scalar"), loss


def _cells(results: dict) -> dict[str, tuple[str, str]]:
    cells = {}
    for name, method in results.get("methods", {}).items():
        cell = cell_of(method)
        if cell is not None and cell not in cells.values():
            cells[name] = cell
    return cells


def _stats(entry: dict, base_general: float) -> dict | None:
    dom, gen = seed_values(entry, "domain_test"), seed_values(entry, "general_test")
    if not dom or not gen:
        return None
    std = float(np.std(dom, ddof=1)) if len(dom) > 1 else 0.0
    return {"domain": dom, "domain_mean": float(np.mean(dom)), "domain_std": std,
            "forgetting": float(np.mean(gen)) / base_general, "lr": entry["best_lr"], "edge": entry.get("edge"),
            "grid": list(entry.get("grid") or [entry["best_lr"]])}


def choose(results: dict) -> dict:
    """Apply the rule to ``results`` (raw benchmark results).

    :return: ``cells`` (method -> gate, loss, exportable, per-model stats), ``limit`` (the
        forgetting limit used, or None), ``exportable`` / ``other`` (the best of each, or None),
        ``clearly`` (per model: margin and p of ``other`` vs ``exportable``), ``choice`` (the
        chosen method, or None) and ``reason``.
    """
    models = results.get("models", {})
    table = {}
    for name, (gate, loss) in _cells(results).items():
        per_model = {}
        for mname, model in models.items():
            entry = model["methods"].get(name)
            stats = _stats(entry, model["context"]["base_ppl"]["general_test"]) if entry else None
            if stats is not None:
                per_model[mname] = stats
        if per_model:
            table[name] = {"gate": gate, "loss": loss, "exportable": gate in FOLDABLE_GATE_MODES, "models": per_model}
    out = {"cells": table, "limit": None, "exportable": None, "other": None, "clearly": {}, "choice": None}
    complete = [n for n, c in table.items() if len(c["models"]) == len(models)]
    for limit in FORGETTING_LIMITS:
        eligible = [n for n in complete if all(s["forgetting"] <= limit for s in table[n]["models"].values())]
        if eligible:
            out["limit"] = limit
            break
    else:
        out["reason"] = (f"no gate/loss cell kept general ppl within {FORGETTING_LIMITS[-1]}x the base on every base "
                         "model")
        return out

    def score(n):
        return math.exp(np.mean([math.log(s["domain_mean"]) for s in table[n]["models"].values()]))

    exportable = [n for n in eligible if table[n]["exportable"]]
    other = [n for n in eligible if not table[n]["exportable"]]
    best_e = min(exportable, key=score) if exportable else None
    best_o = min(other, key=score) if other else None
    out["exportable"], out["other"] = best_e, best_o
    if best_o is not None and best_e is not None:
        for mname in models:
            e, o = table[best_e]["models"][mname], table[best_o]["models"][mname]
            out["clearly"][mname] = {"margin": 1 - o["domain_mean"] / e["domain_mean"], "p": welch(o["domain"], e["domain"])}
        clearly = all(c["margin"] >= CLEAR_MARGIN and c["p"] is not None and c["p"] < ALPHA
                      for c in out["clearly"].values())
    else:
        clearly = best_e is None
    out["choice"] = best_o if clearly else best_e
    chosen = table[out["choice"]]
    if clearly and best_e is not None:
        out["reason"] = (f"the per-token gate is clearly better: >= {CLEAR_MARGIN:.0%} lower domain ppl at p < {ALPHA} "
                         "on every base model")
    elif best_e is None:
        out["reason"] = "no exportable cell kept the forgetting within the limit"
    else:
        out["reason"] = (f"exportable and not clearly beaten (a non-exportable cell must be >= {CLEAR_MARGIN:.0%} "
                         f"lower in domain ppl at p < {ALPHA} on every base model)")
    out["default"] = {"gate_mode": chosen["gate"], "loss": chosen["loss"]}
    return out


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3f}"


def markdown(results: dict) -> str:
    """The gate x loss grid per base model and the default it supports, as a markdown section."""
    c = choose(results)
    if not c["cells"]:
        return ""
    gates = sorted({cell["gate"] for cell in c["cells"].values()}, key=lambda g: (g not in FOLDABLE_GATE_MODES, g))
    lines = ["## Default gate and loss (serving first)", "",
             "Each cell: domain ppl (mean ± sample std over the seeds at the best LR, how many in brackets) / "
             "general ppl as a multiple of the base's. "
             "Gates marked † do not fold into a stock checkpoint (`nexus export` needs `--remote-code`).", ""]
    for mname in results.get("models", {}):
        lines += [f"### {mname}", "", "| gate | " + " | ".join(LOSSES) + " |", "|---|" + "---:|" * len(LOSSES)]
        for gate in gates:
            row = []
            for loss in LOSSES:
                name = next((n for n, cell in c["cells"].items() if (cell["gate"], cell["loss"]) == (gate, loss)), None)
                s = c["cells"][name]["models"].get(mname) if name else None
                if s is None:
                    row.append("–")
                    continue
                n = len(s["domain"])
                spread = f" ± {s['domain_std']:.1f}" if n > 1 else ""
                row.append(f"{s['domain_mean']:.1f}{spread} ({n} seed{'s' if n > 1 else ''}) / {s['forgetting']:.2f}x"
                           + (" ‡" if s["edge"] else "") + (" §" if len(s["grid"]) < 2 else ""))
            lines.append(f"| {gate}{'' if gate in FOLDABLE_GATE_MODES else ' †'} | " + " | ".join(row) + " |")
        lines.append("")
    lines.append("‡ best LR on an edge of its grid; § one LR only, no grid.")
    lines.append("")
    lines += [f"Rule (`benchmarks/quality/default_choice.py`): eligible cells keep general ppl within "
              f"{' or '.join(f'{x}x' for x in FORGETTING_LIMITS)} the base's (the first limit any cell meets) on every "
              f"base model; the exportable cell with the lowest domain ppl is the default unless a non-exportable "
              f"one is at least {CLEAR_MARGIN:.0%} lower on every base model with Welch p < {ALPHA}.", ""]
    if c["choice"] is None:
        lines += [f"**No default supported**: {c['reason']}.", ""]
        return "\n".join(lines)
    if c["clearly"]:
        versus = "; ".join(f"{m}: domain ppl {-v['margin']:+.1%}, Welch p = {_p(v['p'])}" for m, v in c["clearly"].items())
        lines += [f"- best exportable: `{c['exportable']}`; best non-exportable: `{c['other']}` (against the "
                  f"exportable: {versus})"]
    d = c["default"]
    lines += [f"- limit used: general ≤ {c['limit']}x base", f"- **default: gate `{d['gate_mode']}`, loss {d['loss']}** "
              f"(`{c['choice']}`): {c['reason']}.", ""]
    return "\n".join(lines)

"""The quality benchmark's figures, each a function of the results dict alone.

- ``headline``: per base model, the Pareto fronts (over LRs, seeds and checkpoints) of the NEXUS
  default and the baselines matched to it, as domain ppl against forgetting (general ppl / base
  general ppl), with the forgetting limit and each method's best domain ppl within it.
- ``factors-<model>``: one panel per comparison, the NEXUS variants grouped by the one factor
  they change (:func:`factor_panels`, read from the variant definitions), same axes.
- ``efficiency``: best domain ppl within the forgetting limit against trainable parameters, one
  line per ``curve`` label of the variants (skipped when no variant has one).
- ``lr``, ``curves``: the seed-0 LR sweeps and training curves, at most :data:`MAX_SERIES` per panel.
- ``pretrain``: the base models' pretraining curves.
"""

from __future__ import annotations

import math
from fractions import Fraction

from benchmarks.quality.methods import PRESENTATION_KEYS

FORGETTING_LIMIT = 1.5
MAX_SERIES = 8  # per panel of the LR and training-curve figures
MAX_LEGEND = 6  # series per factor panel
BASELINE_KINDS = ("lora_experts", "lora_attention", "full_experts")
PRESENTATION = ("name", "about", "milestone", "curve", "kind")
# Flattened variant key -> the factor it belongs to; any other key is a factor of its own.
FACTOR_OF = {
    "convert.strategy": "init",
    "convert.gate_mode": "gate",
    "train.kd_weight": "loss",
    "train.temperature": "loss",
    "train.kd_batch_size": "loss",
    "kd_on": "loss",
    "train.train_routers": "router",
    "sfa_interval_frac": "sfa",
    "train.sfa_beta": "sfa",
    "width_fraction": "width",
    "budget_of": "budget",
    "lora_alpha_ratio": "lora alpha",
}
FACTOR_ORDER = ("gate", "loss", "init", "width", "router", "sfa", "budget", "lora alpha")


# --------------------------------------------------------------------------- labels and variants


def corpus_label(results: dict, which: str) -> str:
    """A short label of the ``general`` or ``domain`` corpus for axes: the results' ``domain``
    label (``{"name", "label"}``) or the corpus summary's, else guessed from its source path."""
    if which == "domain" and isinstance(results.get("domain"), dict) and results["domain"].get("label"):
        return results["domain"]["label"]
    summary = (results.get("corpora") or {}).get(which) or {}
    if summary.get("label"):
        return summary["label"]
    source = str(summary.get("source", "")).lower()
    if "sotu" in source:
        return "State of the Union"
    if which == "domain" and "python" in source:
        return "Python stdlib source"
    return which


def _legacy_variant(m: dict) -> dict:
    """A variant dict from a method entry written before methods were data (``init``, ``gate``,
    ``kd``, ``sfa``, ``small``, ``train_router`` flags)."""
    return {
        "name": m["name"], "kind": m["kind"], "about": m.get("about", ""), "budget_of": m.get("budget_of"),
        "width_fraction": 0.25 if m.get("small") else 1.0, "sfa_interval_frac": 0.25 if m.get("sfa") else 0.0,
        "convert": {"strategy": m.get("init", "pca"), "gate_mode": m.get("gate", "scalar")},
        "train": {"kd_weight": 1.0 if m.get("kd") else 0.0, "train_routers": bool(m.get("train_router")),
                  "sfa_beta": 0.25},
    }


def variant_of(results: dict, model: dict, name: str) -> dict:
    """The variant definition of method ``name``: from its runs (``variant``), else the results'
    ``methods`` entry (older formats converted), else ``{"name": name, "kind": "unknown"}``. The
    presentation keys (``about``, ``milestone``, ``curve``) come from the results' ``methods``
    entry when there is one, a key it lacks included: a run cached before a variant was retitled,
    or taken off a curve, is shown as the variant is defined now."""
    m = (results.get("methods") or {}).get(name)
    for run in model.get("methods", {}).get(name, {}).get("runs", []):
        if run.get("variant"):
            if m is None:
                return run["variant"]
            return {**{k: v for k, v in run["variant"].items() if k not in PRESENTATION_KEYS},
                    **{k: m[k] for k in PRESENTATION_KEYS if m.get(k) is not None}}
    if m is None:
        return {"name": name, "kind": "unknown"}
    return m if "convert" in m or "train" in m else _legacy_variant(m)


def _variants(results: dict, model: dict) -> dict[str, dict]:
    return {name: variant_of(results, model, name) for name in model.get("summary", {})}


def headline(results: dict) -> dict:
    """Which methods the headline figure compares: ``results["headline"]`` when set, else the
    variant named ``nexus`` (or the first NEXUS milestone, or the first NEXUS variant) against
    the LoRA variants whose budget follows it and any full fine-tuning of the experts.

    :return: ``{"nexus": name or None, "baselines": [names]}``.
    """
    if results.get("headline"):
        return results["headline"]
    variants: dict[str, dict] = {}
    for model in results.get("models", {}).values():
        for name, v in _variants(results, model).items():
            variants.setdefault(name, v)
    nexus = [n for n, v in variants.items() if v.get("kind") == "nexus"]
    ref = "nexus" if "nexus" in nexus else next((n for n in nexus if variants[n].get("milestone")),
                                                  nexus[0] if nexus else None)
    baselines = [n for n, v in variants.items()
                 if (v.get("kind") in ("lora_experts", "lora_attention") and v.get("budget_of") == ref)
                 or v.get("kind") == "full_experts"]
    order = {k: i for i, k in enumerate(BASELINE_KINDS)}
    baselines.sort(key=lambda n: (order[variants[n]["kind"]], n))
    return {"nexus": ref, "baselines": baselines}


def _flatten(variant: dict) -> dict:
    """The variant's training settings as ``{"convert.x": ..., "train.y": ..., "top": ...}``,
    with settings that have no effect dropped (KD options without KD, SFA beta without SFA)."""
    flat = {}
    for k, v in variant.items():
        if k in PRESENTATION:
            continue
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    flat.setdefault("kd_on", "domain")
    if not float(flat.get("train.kd_weight") or 0):
        for k in ("kd_on", "train.temperature", "train.kd_batch_size"):
            flat.pop(k, None)
    if not float(flat.get("sfa_interval_frac") or 0):
        flat.pop("train.sfa_beta", None)
    return flat


def _setting(factor: str, flat: dict) -> str:
    """A short label of one factor's setting."""
    if factor == "init":
        return str(flat.get("convert.strategy", "pca"))
    if factor == "gate":
        return str(flat.get("convert.gate_mode", "scalar"))
    if factor == "loss":
        w = float(flat.get("train.kd_weight") or 0)
        if not w:
            return "CE"
        t = float(flat.get("train.temperature") or 1.0)
        return (f"CE + {w:g} KD on {flat.get('kd_on', 'domain')} text" + (f", T {t:g}" if t != 1 else "")
                + (f", {flat['train.kd_batch_size']} rows" if flat.get("train.kd_batch_size") else ""))
    if factor == "router":
        return "trained" if flat.get("train.train_routers") else "frozen"
    if factor == "sfa":
        frac = float(flat.get("sfa_interval_frac") or 0)
        return f"every {frac:.0%}, beta {float(flat.get('train.sfa_beta', 0.5)):g}" if frac else "off"
    if factor == "width":
        frac = Fraction(float(flat.get("width_fraction", 1.0))).limit_denominator(64)
        return "expert width" if frac == 1 else f"{frac} of it"
    if factor == "budget":
        return f"matched to {flat.get('budget_of')}"
    keys = sorted(k for k in flat if FACTOR_OF.get(k, k) == factor)
    return ", ".join(f"{flat.get(k)}" for k in keys)


def settings_by_factor(variants: dict[str, dict]) -> dict[str, dict[str, str]]:
    """``variant -> {factor: setting label}`` over the factors on which ``variants`` differ."""
    flats = {n: _flatten(v) for n, v in variants.items()}
    keys = {k for f in flats.values() for k in f}
    varying = {k for k in keys if len({repr(f.get(k)) for f in flats.values()}) > 1}
    factors = sorted({FACTOR_OF.get(k, k) for k in varying},
                     key=lambda f: (FACTOR_ORDER.index(f) if f in FACTOR_ORDER else len(FACTOR_ORDER), f))
    return {n: {f: _setting(f, flat) for f in factors} for n, flat in flats.items()}


def factor_panels(variants: dict[str, dict], reference: str | None) -> list[dict]:
    """Comparisons of one factor each: variants equal on every other factor, differing on this one.

    :param variants: ``name -> variant definition`` (one kind of method, e.g. the NEXUS variants).
    :param reference: the variant the others are described against (listed first in its panels).
    :return: panels ``{"factor", "title", "series": [(name, setting label)]}``, at most
        :data:`MAX_LEGEND` series each (a larger group is split, the reference-setting variant in
        every part), panels at the reference's other settings first.
    """
    settings = settings_by_factor(variants)
    ref = settings.get(reference, {})
    panels = []
    for factor in next(iter(settings.values()), {}):
        groups: dict[tuple, list[str]] = {}
        for name, s in settings.items():
            context = tuple((f, v) for f, v in s.items() if f != factor)
            groups.setdefault(context, []).append(name)
        for context, names in groups.items():
            if len({settings[n][factor] for n in names}) < 2:
                continue
            names.sort(key=lambda n: (n != reference, settings[n][factor] != ref.get(factor), n))
            differs = [f"{f} {v}" for f, v in context if ref.get(f) != v]
            title = factor + (f" (with {', '.join(differs)})" if differs else "")
            head, rest = names[:1], names[1:]
            step = MAX_LEGEND - 1
            for i in range(0, len(rest), step):
                panels.append({"factor": factor, "title": title, "context_matches": not differs,
                               "series": [(n, settings[n][factor]) for n in head + rest[i:i + step]]})
    order = {f: i for i, f in enumerate(FACTOR_ORDER)}
    panels.sort(key=lambda p: (not p["context_matches"], order.get(p["factor"], len(order)), p["title"]))
    for p in panels:
        del p["context_matches"]
    return panels


# --------------------------------------------------------------------------- geometry


def forgetting_points(summary: dict, base_general: float) -> list[tuple[float, float]]:
    """``(general ppl / base general ppl, domain ppl)`` of every finite Pareto point of a method."""
    return [(p["general_test_ppl"] / base_general, p["domain_test_ppl"]) for p in summary.get("pareto_points", [])
            if math.isfinite(p["domain_test_ppl"]) and math.isfinite(p["general_test_ppl"])]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both forgetting and domain ppl, by increasing forgetting."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def best_within(points: list[tuple[float, float]], limit: float) -> tuple[float, float] | None:
    """The lowest-domain-ppl point whose forgetting is at most ``limit`` (None: none is)."""
    ok = [p for p in points if p[0] <= limit]
    return min(ok, key=lambda p: p[1]) if ok else None


def _chunks(names: list[str], first: list[str], size: int) -> list[list[str]]:
    """``first`` (its present members) as one group, the other ``names`` in groups of ``size``."""
    head = [n for n in first if n in names]
    rest = [n for n in names if n not in head]
    groups = [head] if head else []
    return groups + [rest[i:i + size] for i in range(0, len(rest), size)]


# --------------------------------------------------------------------------- figures


def _style(names: list[str]):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _log_ticks(ax, which: str = "xy", subs: tuple = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)) -> None:
    """Plain-number tick labels at ``subs`` per decade on the (log) axes ``which``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in [a for name, a in (("x", ax.xaxis), ("y", ax.yaxis)) if name in which]:
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _forgetting_panel(ax, model: dict, series: list[tuple[str, str]], limit: float, title: str, xlabel: str,
                      ylabel: str) -> None:
    """Pareto fronts of ``series`` ``[(method, legend label)]`` in forgetting x domain-ppl space,
    each method's best domain ppl within ``limit`` marked; the axes frame the fronts (dominated
    outliers fall outside). Each front's line has the method name as its ``gid``."""
    base = model["context"]["base_ppl"]
    colors = _style([n for n, _ in series])
    fx, fy = [], []
    for name, label in series:
        s = model["summary"].get(name)
        if s is None:
            continue
        pts = forgetting_points(s, base["general_test"])
        if not pts:
            ax.plot([], [], color=colors[name], label=f"{label}: diverged", gid=name)
            continue
        front = pareto_front(pts)
        best = best_within(pts, limit)
        within = f"{best[1]:.1f} within {limit:g}x" if best else f"none within {limit:g}x"
        ax.scatter(*zip(*pts), s=7, alpha=0.25, color=colors[name], linewidths=0)
        ax.plot(*zip(*front), "-o", ms=3, color=colors[name], label=f"{label}: {within}", gid=name)
        fx += [x for x, _ in front]
        fy += [y for _, y in front]
        if best is not None:
            ax.plot(*best, marker="D", ms=8, mfc="none", mec=colors[name], mew=1.5)
            ax.annotate(f"{best[1]:.1f}", best, textcoords="offset points", xytext=(6, -3), fontsize=8,
                        color=colors[name])
    ax.axvline(limit, color="k", ls="--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
    if fx:
        ax.set_xlim(0.97 * min(min(fx), 1.0), 1.15 * max(max(fx), limit))
        lo, hi = 0.93 * min(fy), 1.1 * max(fy)
        if base["domain_test"] <= 1.5 * hi:
            ax.axhline(base["domain_test"], color="grey", ls=":", lw=1)
            hi = max(hi, 1.05 * base["domain_test"])
        else:
            title += f"\n(base domain ppl {base['domain_test']:,.0f}, off the axis)"
        ax.set_ylim(lo, hi)
    ax.set_title(title, fontsize=10)
    _log_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")


def headline_figure(results: dict, limit: float = FORGETTING_LIMIT):
    """NEXUS vs the baselines at the same forgetting, one panel per base model (see the module docstring)."""
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    chosen = headline(results)
    names = [n for n in [chosen.get("nexus"), *chosen.get("baselines", [])] if n]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    domain = corpus_label(results, "domain")
    for ax, (mname, model) in zip(axes[0], models):
        series = [(n, n) for n in names if n in model.get("summary", {})]
        _forgetting_panel(ax, model, series, limit, f"{mname}: domain gain at the same forgetting",
                          "general ppl / base general ppl (forgetting, 1 = none)", f"domain ppl ({domain}) ↓")
    fig.text(0.5, -0.02, f"Lines: Pareto fronts over LRs, seeds and checkpoints; dashed: general ppl {limit:g}x the "
             f"base's; diamonds: each method's best domain ppl within it; dotted: the base's domain ppl; faint dots: "
             f"every evaluation.",
             ha="center", fontsize=8)
    return fig


def factor_figure(results: dict, mname: str, limit: float = FORGETTING_LIMIT):
    """One panel per single-factor comparison of ``mname``'s variants (None when there is none).

    Variants are grouped per kind (the NEXUS variants against the headline NEXUS variant, each
    baseline kind against its headline member) by :func:`factor_panels`.
    """
    import matplotlib.pyplot as plt

    model = results["models"][mname]
    variants = _variants(results, model)
    chosen = headline(results)
    panels = []
    for kind in dict.fromkeys(v.get("kind") for v in variants.values()):
        group = {n: v for n, v in variants.items() if v.get("kind") == kind}
        if len(group) < 2:
            continue
        ref = next((n for n in [chosen.get("nexus"), *chosen.get("baselines", [])] if n in group), sorted(group)[0])
        panels += [{**p, "title": (p["title"] if kind == "nexus" else f"{kind}: {p['title']}")}
                   for p in factor_panels(group, ref)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.3 * rows), squeeze=False)
    domain = corpus_label(results, "domain")
    for ax, p in zip(axes.flat, panels):
        _forgetting_panel(ax, model, [(n, f"{s} ({n})") for n, s in p["series"]], limit, f"{mname}: {p['title']}",
                          "general ppl / base (forgetting)", f"domain ppl ({domain}) ↓")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def efficiency_figure(results: dict, limit: float = FORGETTING_LIMIT):
    """Best domain ppl at general ppl <= ``limit`` x base against trainable parameters, one line
    per ``curve`` label, one panel per base model with a curve of two sizes or more; None when
    no base model has one."""
    import matplotlib.pyplot as plt

    from benchmarks.quality.report import domain_at_forgetting

    curves = {}
    for mname, model in results["models"].items():
        labels = {}
        for name, v in _variants(results, model).items():
            if v.get("curve"):
                labels.setdefault(v["curve"], []).append(name)
        if any(len(names) > 1 for names in labels.values()):
            curves[mname] = labels
    models = [(mname, results["models"][mname]) for mname in curves]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    domain = corpus_label(results, "domain")
    for ax, (mname, model) in zip(axes[0], models):
        colors = _style(sorted(curves[mname]))
        hollow = False
        for label, names in sorted(curves[mname].items()):
            pts = []
            for n in names:
                s = model["summary"][n]
                v = domain_at_forgetting(s["pareto_points"], model["context"]["base_ppl"]["general_test"], limit)
                within = v is not None
                y = v if within else s["domain_test_ppl"]["mean"]
                if math.isfinite(y):
                    pts.append((s["trainable_params"], y, within, n))
            pts.sort()
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colors[label], label=label)
            for x, y, within, n in pts:
                ax.plot(x, y, "o", ms=6, color=colors[label], mfc=colors[label] if within else "none")
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=colors[label])
                hollow |= not within
        note = f"\n(hollow: no evaluation within {limit:g}x; its best-LR mean shown)" if hollow else ""
        ax.set(xlabel="trainable parameters", ylabel=f"domain ppl ({domain}) ↓", xscale="log")
        ax.set_title(f"{mname}: best domain ppl with general ppl ≤ {limit:g}x base{note}", fontsize=10)
        _log_ticks(ax, "x", subs=(1.0, 2.0, 5.0))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _ordered_methods(results: dict, model: dict) -> tuple[list[str], list[str]]:
    chosen = headline(results)
    first = [n for n in [chosen.get("nexus"), *chosen.get("baselines", [])] if n]
    return list(model.get("summary", {})), first


def _method_panels(results: dict, draw) -> object:
    """A grid of panels, a row per base model, at most :data:`MAX_SERIES` methods per panel (the
    headline methods first); ``draw(ax, model name, model, method names, colours)`` fills each."""
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    layout = [_chunks(*_ordered_methods(results, model), MAX_SERIES) for _, model in models]
    cols = max(len(c) for c in layout)
    fig, axes = plt.subplots(len(models), cols, figsize=(5.5 * cols, 4.2 * len(models)), squeeze=False)
    for row, ((mname, model), chunks) in enumerate(zip(models, layout)):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(chunks):
                ax.set_visible(False)
                continue
            draw(ax, mname, model, chunks[col], _style(chunks[col]))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def lr_figure(results: dict):
    """Validation domain ppl against peak LR (seed 0), at most :data:`MAX_SERIES` methods per panel."""

    def draw(ax, mname, model, names, colors):
        for n in names:
            pts = [(p["lr"], p["domain_val_ppl"]) for p in model["summary"][n]["lr_curve"]
                   if math.isfinite(p["domain_val_ppl"])]
            if pts:
                ax.plot(*zip(*pts), "-o", ms=3, color=colors[n], label=n)
        ax.set(title=f"{mname}: LR sweep (seed 0)", xlabel="peak LR", ylabel="validation domain ppl ↓",
               xscale="log", yscale="log")
        _log_ticks(ax, "y")

    return _method_panels(results, draw)


def curves_figure(results: dict):
    """Smoothed training CE (best LR, seed 0), at most :data:`MAX_SERIES` methods per panel."""
    import numpy as np

    def draw(ax, mname, model, names, colors):
        for n in names:
            entry = model["methods"][n]
            run = next((r for r in entry["runs"] if r["seed"] == 0 and r["lr"] == entry["best_lr"]), None)
            if run and run.get("curve"):
                steps = [c["step"] for c in run["curve"]]
                ce = np.array([c["ce"] for c in run["curve"]])
                k = max(1, len(ce) // 20)
                ax.plot(steps[k - 1:], np.convolve(ce, np.ones(k) / k, mode="valid"), color=colors[n], label=n)
        ax.set(title=f"{mname}: training CE on domain (best LR, seed 0)", xlabel="step", ylabel="CE (nats)")

    return _method_panels(results, draw)


def pretrain_figure(results: dict):
    """Pretraining CE and held-out general ppl of every base model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for mname, model in results["models"].items():
        pre = model["context"]["pretrain"]
        axes[0].plot([c["tokens"] for c in pre["curve"]], [c["loss"] for c in pre["curve"]], label=mname, alpha=0.8)
        axes[1].plot([e["tokens"] for e in pre["evals"]], [e["general_val_ppl"] for e in pre["evals"]], "-o",
                     label=mname)
    general = corpus_label(results, "general")
    axes[0].set(title="pretraining: training CE", xlabel="tokens", ylabel="CE (nats)")
    axes[1].set(title=f"pretraining: held-out general ppl ({general})", xlabel="tokens", ylabel="ppl", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def build_figures(results: dict) -> dict:
    """Every figure of a summarised ``results`` (:func:`benchmarks.quality.report.summarize`).

    :return: ``suffix -> matplotlib Figure`` in display order (``headline``, ``factors-<model>``,
        ``efficiency`` when a variant has a ``curve``, ``lr``, ``curves``, ``pretrain``); the
        caller closes them.
    """
    import matplotlib

    matplotlib.use("Agg")
    if not results.get("models"):
        return {}
    figs = {"headline": headline_figure(results)}
    for mname in results["models"]:
        fig = factor_figure(results, mname)
        if fig is not None:
            figs[f"factors-{mname}"] = fig
    eff = efficiency_figure(results)
    if eff is not None:
        figs["efficiency"] = eff
    figs["lr"] = lr_figure(results)
    figs["curves"] = curves_figure(results)
    figs["pretrain"] = pretrain_figure(results)
    return figs

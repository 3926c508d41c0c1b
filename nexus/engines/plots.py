"""``nexus plot``: PNG curves of a training run, from its ``metrics.jsonl`` (and ``run_config.json``).

Writes into ``run/plots/``:

- ``loss.png``: the back-propagated loss and, each on its own axes, the terms it sums
  (``ce_weight * CE``, ``kd_weight * T^2 * KL``, ``router_kl_weight * router KL``);
- ``kl.png``: token KL(teacher || student) and router KL, unweighted, from zero (0: the student
  matches the teacher);
- ``router_drift.png``, ``router_entropy.png``: per MoE layer, student vs teacher;
- ``lr.png`` (peak LR marked), ``grad_norm.png`` (clipping threshold marked), ``throughput.png``.

SFA merge steps are dotted vertical lines on every plot. Axes of quantities whose zero means
something (KL, drift, entropy, learning rate, throughput) start at zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nexus.constants import METRICS_NAME, RUN_CONFIG_NAME
from nexus.errors import NexusError
from nexus.io import locks_output, refuse_output_over_inputs

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
MAX_LEGEND_LAYERS = 8  # more layers than this are told apart by a colour bar, not a legend


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _merges(records: list[dict]) -> list[int]:
    return sorted({s for r in records for s in r.get("sfa_merge_steps", []) or []})


def _run_config(run_dir: Path) -> dict:
    """The training arguments recorded in ``run_config.json`` (empty if absent or unreadable)."""
    try:
        return json.loads((run_dir / RUN_CONFIG_NAME).read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _decorate(ax, merges: list[int], title: str, ylabel: str, from_zero: bool = False) -> None:
    for i, step in enumerate(merges):
        ax.axvline(step, color="grey", linestyle=":", linewidth=0.8, label="SFA merge" if i == 0 else None)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if from_zero:
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)  # headroom: a flat line must not hide in the frame
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _new_figure(rows: int = 1, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height if rows == 1 else 1.0 + 2.2 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    axes[-1].set_xlabel("optimizer step")
    return fig, list(axes)


def _panels(panels: list[dict], merges: list[int]):
    """One figure with a row of axes per panel that has data; None when none has.

    A panel: ``title``, ``ylabel``, ``lines`` (``(label, xs, ys, style)``), optional ``from_zero``,
    ``hlines`` (``(y, label)``), ``logy``.
    """
    panels = [p for p in panels if any(ln[1] for ln in p["lines"])]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels))
    for ax, p in zip(axes, panels):
        for label, xs, ys, style in p["lines"]:
            if xs:
                ax.plot(xs, ys, label=label, linewidth=1.2, **style)
        for y, label in p.get("hlines", []):
            ax.axhline(y, color="black", linestyle="--", linewidth=0.9, label=label)
        if p.get("logy") and all(y > 0 for _, _, ys, _ in p["lines"] for y in ys):
            ax.set_yscale("log")
        _decorate(ax, merges, p["title"], p["ylabel"], p.get("from_zero", False))
    fig.tight_layout()
    return fig


def _per_layer_figure(title: str, ylabel: str, steps: list[int], layers: list[int], values: list[list[float]],
                      merges: list[int], reference: tuple[list[float], str] | None = None):
    """One line per MoE layer (legend up to :data:`MAX_LEGEND_LAYERS` layers, else a colour bar)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig, (ax,) = _new_figure()
    cmap = colormaps["viridis"]
    many = len(layers) > MAX_LEGEND_LAYERS
    for i, layer in enumerate(layers):
        colour = cmap(i / max(1, len(layers) - 1) * 0.9)
        ax.plot(steps, [v[i] for v in values], linewidth=1.0, color=colour, label=None if many else f"layer {layer}")
    if reference is not None:
        ax.plot(steps, reference[0], color="black", linestyle="--", linewidth=1.2, label=reference[1])
    if many:
        fig.colorbar(ScalarMappable(norm=Normalize(layers[0], layers[-1]), cmap=cmap), ax=ax, label="MoE layer")
    _decorate(ax, merges, title, ylabel, from_zero=True)
    fig.tight_layout()
    return fig


def run_figures(records: list[dict], config: dict | None = None) -> dict:
    """The figures of a run, by file stem (``loss``, ``kl``, ...); plots without data are left out.

    :param records: the ``metrics.jsonl`` records (``step``, ``loss``, ``ce``, ``kd``, ...).
    :param config: the run's ``TrainConfig`` as a dict (weights, temperature, peak LR, clipping);
        without it the loss terms are drawn unweighted.
    :return: ``{stem: matplotlib Figure}``.
    """
    config = config or {}
    merges = _merges(records)
    nats = "nats/token"
    figures = {}

    weighted = all(k in config for k in ("ce_weight", "kd_weight", "temperature"))
    ce_w, kd_w, t = config.get("ce_weight", 1.0), config.get("kd_weight", 1.0), config.get("temperature", 1.0)
    rkl_w = config.get("router_kl_weight", 0.0 if weighted else 1.0)

    def scaled(key: str, factor: float):
        xs, ys = _series(records, key)
        return xs, [factor * y for y in ys]

    rkl_xs, rkl_ys = _series(records, "router_kl")
    has_router_kl = any(y != 0 for y in rkl_ys)
    suffix = "" if weighted else " (weights unknown: unweighted)"
    loss_panels = [
        {"title": "total loss (back-propagated)", "ylabel": nats, "lines": [("loss", *_series(records, "loss"), {})]},
        {"title": f"cross-entropy term: {ce_w:g} x CE{suffix}", "ylabel": nats,
         "lines": [("CE term", *scaled("ce", ce_w), {"color": "C1"})]},
        {"title": f"distillation term: {kd_w:g} x T^2 x KL, T={t:g}{suffix}", "ylabel": nats, "from_zero": True,
         "lines": [("KD term", *scaled("kd", kd_w * t * t), {"color": "C2"})]},
    ]
    if rkl_w > 0 and has_router_kl:
        loss_panels.append({"title": f"router term: {rkl_w:g} x router KL{suffix}", "ylabel": "nats/token/layer",
                            "from_zero": True,
                            "lines": [("router KL term", *scaled("router_kl", rkl_w), {"color": "C3"})]})
    figures["loss"] = _panels(loss_panels, merges)

    kl_panels = [{"title": "token KL(teacher || student), unweighted", "ylabel": nats, "from_zero": True,
                  "lines": [("token KL", *_series(records, "kd"), {"color": "C2"})]}]
    if has_router_kl:
        kl_panels.append({"title": "router KL(teacher || student), mean over MoE layers", "ylabel": "nats/token/layer",
                          "from_zero": True, "lines": [("router KL", rkl_xs, rkl_ys, {"color": "C3"})]})
    figures["kl"] = _panels(kl_panels, merges)

    lr_refs = [(config["lr"], f"peak --lr {config['lr']:g}")] if isinstance(config.get("lr"), (int, float)) else []
    figures["lr"] = _panels([{
        "title": "learning rate", "ylabel": "learning rate", "from_zero": True, "hlines": lr_refs,
        "lines": [("shared experts", *_series(records, "lr"), {}), ("routers", *_series(records, "router_lr"), {})],
    }], merges)
    clip = config.get("max_grad_norm")
    clip_refs = [(clip, f"clipping threshold {clip:g}")] if isinstance(clip, (int, float)) and clip > 0 else []
    figures["grad_norm"] = _panels([{
        "title": "gradient norm before clipping (mean over the logged steps)", "ylabel": "L2 norm", "logy": True,
        "hlines": clip_refs, "lines": [("grad norm", *_series(records, "grad_norm"), {})],
    }], merges)
    figures["throughput"] = _panels([{
        "title": "training throughput", "ylabel": "input tokens/s", "from_zero": True,
        "lines": [("tokens/s", *_series(records, "tokens_per_s"), {})],
    }], merges)

    with_router = [r for r in records if r.get("router_layers")]
    if with_router:
        layers = with_router[-1]["router_layers"]
        with_router = [r for r in with_router if r["router_layers"] == layers]
        steps = [r["step"] for r in with_router]
        figures["router_drift"] = _per_layer_figure(
            "router drift from the teacher: mean L1 |p_student - p_teacher| per token", "L1 distance (0 to 2)",
            steps, layers, [r["router_drift"] for r in with_router], merges)
        teacher = [sum(r["router_entropy_teacher"]) / len(layers) for r in with_router]
        figures["router_entropy"] = _per_layer_figure(
            "router entropy per MoE layer: student (lines) vs teacher", "entropy (nats/token)",
            steps, layers, [r["router_entropy_student"] for r in with_router], merges,
            reference=(teacher, "teacher, mean over layers"))
    return {name: fig for name, fig in figures.items() if fig is not None}


def _check_plots_dir(arguments: dict) -> None:
    """Refuse a ``RUN_DIR/plots`` that is (through a link) or holds the run's records."""
    run_dir = Path(arguments["run_dir"])
    refuse_output_over_inputs(run_dir / PLOTS_DIR, {"the run's metrics": run_dir / METRICS_NAME,
                                                    "the run's configuration": run_dir / RUN_CONFIG_NAME},
                              flag="plot output")


@locks_output("run_dir", subpath=PLOTS_DIR, before=_check_plots_dir)
def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every plot of ``run_dir`` into ``run_dir/plots``.

    :return: the PNG paths written.
    :raises NexusError: no ``metrics.jsonl`` or no records in it.
    """
    from nexus.metrics_log import read_metrics
    from nexus.io import atomic_path

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if isinstance(r.get("step"), (int, float))]
    if not records:
        raise NexusError(f"{run_dir}/metrics.jsonl has no records: train for at least --log-every steps first")
    out_dir = run_dir / PLOTS_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NexusError(f"cannot write {out_dir}: {exc.strerror}; make {run_dir} writable") from exc
    written: list[Path] = []
    for name, fig in run_figures(records, _run_config(run_dir)).items():
        path = out_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        written.append(path)
    log.info("wrote %d plots into %s", len(written), out_dir)
    return written

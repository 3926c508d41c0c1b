"""``nexus plot``: PNG curves of a training run, from its ``metrics.jsonl``.

Writes into ``run/plots/``: ``loss.png`` (total, CE, T^2-free KD, router KL), ``kl.png``,
``router_drift.png`` and ``router_entropy.png`` (per MoE layer, student vs teacher),
``lr.png``, ``grad_norm.png``, ``throughput.png``. SFA merge steps are marked by dotted
vertical lines on every plot.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nexus.errors import NexusError

log = logging.getLogger(__name__)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _merges(records: list[dict]) -> list[int]:
    return sorted({s for r in records for s in r.get("sfa_merge_steps", [])})


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every plot of ``run_dir`` into ``run_dir/plots``.

    :return: the PNG paths written.
    :raises NexusError: no ``metrics.jsonl`` or no records in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nexus.engines.checkpointing import read_metrics
    from nexus.io import atomic_path

    records = read_metrics(run_dir)
    if not records:
        raise NexusError(f"{run_dir}/metrics.jsonl is empty: train for at least --log-every steps first")
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = _merges(records)
    written: list[Path] = []

    def figure(name: str, title: str, ylabel: str, lines: list[tuple[str, list, list]], logy: bool = False):
        lines = [ln for ln in lines if ln[1]]
        if not lines:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, xs, ys in lines:
            ax.plot(xs, ys, label=label, linewidth=1.2)
        for i, step in enumerate(merges):
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8, label="SFA merge" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if logy and all(y > 0 for _, _, ys in lines for y in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    figure("loss", "training loss", "loss", [(k, *_series(records, k)) for k in ("loss", "ce", "kd", "router_kl")])
    figure("kl", "distillation KL(teacher || student)", "KL (nats/token)",
           [("token KL", *_series(records, "kd")), ("router KL", *_series(records, "router_kl"))])
    figure("lr", "learning rate", "lr", [("shared", *_series(records, "lr")), ("routers", *_series(records, "router_lr"))])
    figure("grad_norm", "gradient norm (before clipping)", "norm", [("grad norm", *_series(records, "grad_norm"))], logy=True)
    figure("throughput", "throughput", "tokens/s", [("tokens/s", *_series(records, "tokens_per_s"))])
    with_router = [r for r in records if r.get("router_layers")]
    if with_router:
        layers = with_router[-1]["router_layers"]
        steps = [r["step"] for r in with_router]

        def per_layer(key: str, i: int) -> list[float]:
            return [r[key][i] for r in with_router]

        figure("router_drift", "router drift: mean |p_student - p_teacher|", "L1 drift",
               [(f"layer {layer}", steps, per_layer("router_drift", i)) for i, layer in enumerate(layers)])
        figure("router_entropy", "router entropy: student per layer, teacher mean", "nats",
               [(f"layer {layer}", steps, per_layer("router_entropy_student", i)) for i, layer in enumerate(layers)]
               + [("teacher (mean over layers)", steps, [sum(r["router_entropy_teacher"]) / len(layers) for r in with_router])])
    log.info("wrote %d plots into %s", len(written), out_dir)
    return written

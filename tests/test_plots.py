"""``nexus plot`` and the selection plots: what a reader sees (panels, reference lines, axes)."""

from __future__ import annotations

import numpy as np
import pytest

from nexus.engines.plots import run_figures


def _records(n: int = 6, layers=(0, 1, 2), merge_at: int | None = 4) -> list[dict]:
    return [{
        "step": s, "loss": 5.0 - 0.1 * s, "ce": 4.9 - 0.1 * s, "kd": 0.01 * s, "router_kl": 0.001 * s,
        "lr": 1e-3 * min(1.0, s / 3), "router_lr": None, "grad_norm": 0.5 / s, "tokens_per_s": 1000.0 + s,
        "sfa_merge_steps": [s] if s == merge_at else [], "router_layers": list(layers),
        "router_drift": [0.01 * s] * len(layers), "router_entropy_student": [1.3] * len(layers),
        "router_entropy_teacher": [1.31] * len(layers),
    } for s in range(1, n + 1)]


CONFIG = {"ce_weight": 0.5, "kd_weight": 2.0, "temperature": 2.0, "router_kl_weight": 0.1, "lr": 1e-3,
          "max_grad_norm": 1.0}


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_loss_terms_each_on_their_own_axes_weighted_as_trained():
    figures = run_figures(_records(), CONFIG)
    assert sorted(figures) == ["grad_norm", "kl", "loss", "lr", "router_drift", "router_entropy", "throughput"]
    total, ce, kd, router = figures["loss"].axes
    assert "total" in total.get_title() and "0.5 x CE" in ce.get_title()
    assert "2 x T^2 x KL, T=2" in kd.get_title() and "0.1 x router KL" in router.get_title()
    # The KD term is what the loss adds: kd_weight * T^2 * KL.
    assert kd.lines[0].get_ydata()[-1] == pytest.approx(2.0 * 4 * 0.06)
    assert ce.lines[0].get_ydata()[0] == pytest.approx(0.5 * 4.8)
    for ax in (total, ce, kd, router):
        assert ax.get_ylabel().startswith("nats/token")
    assert kd.get_ylim()[0] == 0 and router.get_ylim()[0] == 0
    assert figures["loss"].axes[-1].get_xlabel() == "optimizer step"
    assert "SFA merge" in _labels(total)


def test_an_unweighted_router_kl_has_no_loss_panel_and_weights_unknown_are_said():
    records = _records()
    assert len(run_figures(records, dict(CONFIG, router_kl_weight=0.0))["loss"].axes) == 3
    assert len(run_figures([dict(r, router_kl=0.0) for r in records], {})["kl"].axes) == 1
    assert "unweighted" in run_figures(records, {})["loss"].axes[1].get_title()


def test_reference_lines_and_axes_from_zero():
    figures = run_figures(_records(merge_at=None), CONFIG)
    (grad,) = figures["grad_norm"].axes
    assert "clipping threshold 1" in _labels(grad) and grad.get_yscale() == "log"
    (lr,) = figures["lr"].axes
    assert "peak --lr 0.001" in _labels(lr) and lr.get_ylim()[0] == 0
    for name in ("kl", "throughput", "router_drift", "router_entropy"):
        for ax in figures[name].axes:
            assert ax.get_ylim()[0] == 0, name
            assert ax.get_ylim()[1] > max(max(line.get_ydata()) for line in ax.lines), name
    (entropy,) = figures["router_entropy"].axes
    assert "teacher, mean over layers" in _labels(entropy)
    assert "nats" in entropy.get_ylabel() and "tokens/s" in figures["throughput"].axes[0].get_ylabel()


def test_many_layers_get_a_colour_bar_not_a_legend():
    figures = run_figures(_records(layers=range(24)), CONFIG)
    drift = figures["router_drift"]
    assert len(drift.axes) == 2 and drift.axes[1].get_ylabel() == "MoE layer"  # the colour bar
    assert not any(label.startswith("layer ") for label in _labels(drift.axes[0]))


def _doc(layers: int, experts: int) -> dict:
    rng = np.random.default_rng(0)
    return {"family": "toy", "layers": [{
        "layer": i, "experts": [0, 2], "num_experts": experts, "importance": rng.random(experts).tolist(),
        "explained_variance_ratio": (np.ones(experts - 1) / (experts - 1)).tolist(),
    } for i in range(layers)]}


@pytest.mark.parametrize("experts", [3, 5, 128])
def test_selection_plots_have_integer_expert_and_component_ticks(tmp_path, experts, monkeypatch):
    from matplotlib.figure import Figure

    from nexus.engines import plots_selection

    figures = []
    monkeypatch.setattr(plots_selection, "_save", lambda fig, path: figures.append(fig) or path)
    plots_selection.plot_selection(_doc(2, experts), tmp_path / "sel")
    importance, variance = figures
    assert isinstance(importance, Figure)
    for ax, axis in ((importance.axes[0], "x"), (variance.axes[0], "x")):
        ticks = [t for t in getattr(ax, f"get_{axis}ticks")() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert importance.axes[0].images[0].get_clim()[0] == 0  # shares are drawn from zero
    assert importance.axes[0].get_xlabel() == "expert id"

"""The rule that picks the default gate and loss from the benchmark's gate x loss grid."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.default_choice import choose, cell_of, markdown  # noqa: E402

BASE_GENERAL = 100.0


def _method(gate: str, kd: float = 0.0, kd_on: str = "domain", **extra) -> dict:
    return {"kind": "nexus", "width_fraction": 1.0, "sfa_interval_frac": 0.0, "kd_on": kd_on,
            "convert": {"strategy": "pca", "gate_mode": gate},
            "train": {"kd_weight": kd, "temperature": 1.0, "train_routers": False, "sfa_beta": 0.25}, **extra}


def _entry(domain: list[float], general: list[float]) -> dict:
    runs = [{"lr": 0.03, "seed": i, "final": {"domain_test": d, "general_test": g}} for i, (d, g) in
            enumerate(zip(domain, general))]
    return {"best_lr": 0.03, "edge": None, "runs": runs}


def _results(cells: dict[str, tuple[dict, list[float], list[float]]], models=("a", "b")) -> dict:
    return {"methods": {n: m for n, (m, _, _) in cells.items()},
            "models": {mn: {"context": {"base_ppl": {"general_test": BASE_GENERAL}},
                            "methods": {n: _entry(d, g) for n, (_, d, g) in cells.items()}} for mn in models}}


def _grid(token_domain: list[float]) -> dict:
    return {
        "nexus": (_method("scalar"), [120, 121, 122], [300, 310, 305]),  # best domain ppl, but forgets 3x
        "nexus-kd-general": (_method("scalar", 1.0, "general"), [150, 151, 149], [102, 103, 102]),
        "nexus-gate-none-kd-general": (_method("none", 1.0, "general"), [155, 156, 154], [102, 102, 103]),
        "nexus-gate-token-kd-general": (_method("token", 1.0, "general"), token_domain, [103, 103, 102]),
    }


def test_an_exportable_gate_wins_unless_a_per_token_gate_is_clearly_better():
    close = choose(_results(_grid([148, 147.5, 148.5])))  # 1.3% lower: not clearly
    assert close["limit"] == 1.1 and close["exportable"] == "nexus-kd-general"
    assert close["other"] == "nexus-gate-token-kd-general" and close["choice"] == "nexus-kd-general"
    assert close["default"] == {"gate_mode": "scalar", "loss": "KD on general text"}
    clear = choose(_results(_grid([140, 139, 141])))  # 7% lower, consistent over seeds
    assert clear["choice"] == "nexus-gate-token-kd-general" and clear["default"]["gate_mode"] == "token"
    assert all(v["margin"] > 0.06 and v["p"] < 0.05 for v in clear["clearly"].values())
    noisy = choose(_results(_grid([120, 170, 130])))  # 7% lower on average, but not significant
    assert noisy["choice"] == "nexus-kd-general"
    res = _results(_grid([148, 147.5, 148.5]))
    for model in res["models"].values():
        model["methods"]["nexus-gate-none-kd-general"]["grid"] = [0.01, 0.03, 0.09]
    text = markdown(res)
    assert "token †" in text and "default: gate `scalar`, loss KD on general text" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "155.0 ± 1.0 (3 seeds)" in rows["none"] and "§" not in rows["none"]  # sample std
    assert "§" in rows["token †"]  # a cell of one LR says so


def test_the_forgetting_limit_relaxes_only_when_no_cell_meets_it_and_nothing_else_is_a_cell():
    grid = _grid([148, 147.5, 148.5])
    for name in ("nexus-kd-general", "nexus-gate-none-kd-general", "nexus-gate-token-kd-general"):
        m, d, _ = grid[name]
        grid[name] = (m, d, [130, 131, 129])
    relaxed = choose(_results(grid))
    assert relaxed["limit"] == 1.5 and relaxed["choice"] == "nexus-kd-general"
    grid = {"nexus": grid["nexus"]}
    assert choose(_results(grid))["choice"] is None
    assert cell_of(_method("scalar", width_fraction=0.25)) is None
    assert cell_of({**_method("scalar"), "convert": {"strategy": "top1", "gate_mode": "scalar"}}) is None
    assert cell_of(_method("scalar_token", 1.0)) == ("scalar_token", "KD on domain")

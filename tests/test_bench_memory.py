"""Benchmark 7 at its quick size: every configuration measured (or marked the same on a CPU) beside the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_memory_quick_measures_each_configuration_beside_the_plan(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_memory.py"), "--quick", "--threads", "1",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("memory-quick-*.json")).read_text())
    rows = {r["configuration"]: r for r in doc["rows"]}
    measured = [r for r in rows.values() if "measured_gib" in r]
    assert {"chunked", "chunked+checkpointing", "adamw8bit"} <= {r["configuration"] for r in measured}
    for r in measured:
        assert r["measured_gib"] > 0 and r["predicted_gib"] > 0
        assert r["error"] == pytest.approx(r["predicted_gib"] / r["measured_gib"] - 1)
        # the optimizer state the plan predicts is what the trained optimizer held
        assert r["planned_optimizer_bytes"] == r["optimizer_state_bytes"]
    if measured[0]["device"] == "cpu":  # nothing moves between host and device on a CPU
        assert rows["experts-host"]["same_on_cpu_as"] == {}
        assert rows["experts-host+embeddings-host+checkpointing"]["same_on_cpu_as"] == {"gradient_checkpointing": True}
    assert set(doc["planner_only"]) == {"gpt-oss-120b", "Qwen3-30B-A3B", "Qwen3-30B-A3B-FP8", "DeepSeek-V3"}
    for name, plans in doc["planner_only"].items():
        assert plans["least device memory"]["device_gib"] < plans["chunked"]["device_gib"], name
    # streaming the experts leaves at most two layers of them on the device
    assert doc["planner_only"]["DeepSeek-V3"]["least device memory"]["host_gib"] > 500

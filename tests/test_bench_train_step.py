"""The train-step benchmark end to end at its quick size: three layouts measured, ratios and arguments written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")


@pytest.mark.slow
def test_train_step_quick_writes_ratios_into_results_dir(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_train_step.py"), "--quick", "--repeats", "1",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("train_step-quick-*.json")).read_text())
    assert set(doc["variants"]) == {"nexus", "two_model", "lora"}
    assert doc["ratios"]["lora_over_nexus_trainable"] == pytest.approx(1.0, rel=0.1)  # matched budgets
    assert doc["arguments"]["results_dir"] == str(tmp_path) and doc["arguments"]["threads"] == 1

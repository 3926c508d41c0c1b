"""The GPU check's CPU mode: every part runs at tiny sizes, so the script never rots before a GPU is there."""

from __future__ import annotations

import json


def test_gpu_check_quick_runs_every_part_on_the_cpu(tmp_path):
    from benchmarks.gpu_check import main

    figures = main(["--quick", "--results-dir", str(tmp_path)])
    (written,) = tmp_path.glob("gpu_check-*.json")
    assert json.loads(written.read_text())["config"]["layers"] == 2
    assert [r["experts"] for r in figures["packed"]] == ["packed", "dequantised"]
    options = {(r["experts_on"], r["gradient_checkpointing"], r["loss"]) for r in figures["train"]}
    assert options == {("device", False, "full logits"), ("device", False, "chunked"), ("device", True, "chunked"),
                       ("host", False, "chunked"), ("host", True, "chunked")}
    for row in figures["train"]:
        assert row["step_s"] > 0
        if row["experts_on"] == "host":
            assert row["peak_layers_on_device"] <= 2
    chunked = figures["losses"]["chunked"]
    assert chunked["loss_rel_diff"] < 1e-2 and chunked["grad_rel_diff"] < 2e-2  # bf16 inputs: a few roundings

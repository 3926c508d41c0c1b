"""Every stage that writes an output holds its lock: a second process writing the same output is
refused with the holder's pid before any work, and the lock goes away with the stage."""

from __future__ import annotations

import json
import os
import socket

import pytest

from helpers_train import make_base, make_data
from nexus.errors import OutputLockedError
from nexus.io import lock_path


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    return {"base": make_base(gpt_oss_mxfp4_dir, root / "base"), "data": make_data(root / "data.jsonl", n=2)}


def _stages(work, out):
    from nexus.engines.convert import ConvertConfig, convert
    from nexus.engines.evaluate import EvaluateConfig, evaluate
    from nexus.engines.plots import PLOTS_DIR, plot_run
    from nexus.engines.collect import CollectConfig, run_collect
    from nexus.engines.select import SelectConfig, run_select
    from nexus.engines.precompute import PrecomputeConfig, precompute

    base, data = str(work["base"]), str(work["data"])
    return {
        "collect": (out, lambda: run_collect(CollectConfig(model=base, data=data, output=out, batch_size=2, seq_len=32))),
        "select": (out, lambda: run_select(SelectConfig(stats=out.parent / "stats", output=out))),
        "convert": (out, lambda: convert(ConvertConfig(model=base, output=out, strategy="mean_all"))),
        "precompute": (out, lambda: precompute(PrecomputeConfig(teacher=base, data=data, output=str(out), seq_len=32))),
        "evaluate": (out, lambda: evaluate(EvaluateConfig(model=base, data=data, seq_len=32, output=out))),
        "plot": (out / PLOTS_DIR, lambda: plot_run(out)),
    }


@pytest.mark.parametrize("stage", ["collect", "select", "convert", "precompute", "evaluate", "plot"])
def test_stage_refuses_an_output_locked_by_a_live_process(work, tmp_path, stage):
    locked, run = _stages(work, tmp_path / "out")[stage]
    lock = lock_path(locked)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = os.getppid()
    lock.write_text(json.dumps({"pid": holder, "host": socket.gethostname()}))
    with pytest.raises(OutputLockedError, match=f"in use by process {holder}"):
        run()
    assert lock.exists() and json.loads(lock.read_text())["pid"] == holder  # someone else's lock is left alone


def test_a_finished_stage_releases_its_lock(work, tmp_path):
    out = tmp_path / "out"
    locked, run = _stages(work, out)["convert"]
    run()
    assert out.is_dir() and not lock_path(locked).exists()

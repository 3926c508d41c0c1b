"""Real multi-process runs (torchrun, gloo on CPU) and SIGTERM handling, through the nexus CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data, subprocess_env, torchrun
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.training.train_state import latest_checkpoint

pytestmark = pytest.mark.slow

NEXUS = str(Path(sys.executable).parent / "nexus")


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    from nexus.data import load_token_data, load_tokenizer

    root = tmp_path_factory.mktemp("dist")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    tok = load_tokenizer(base)
    # An odd number of rows, so that one global batch per epoch leaves rank 1 without a row.
    for n in range(2, 12):
        data = make_data(root / "data.jsonl", n=n)
        if len(load_token_data(data, tok, 64).rows) % 2 == 1:
            break
    return {"root": root, "base": base, "adapter": make_adapter(base, root / "adapter"), "data": data}


def _torchrun(args, timeout=240):
    return torchrun(NEXUS, *args, no_python=True, timeout=timeout)


def test_two_processes_equal_one_process_with_double_batch(work, tmp_path):
    from nexus.data import load_token_data, load_tokenizer
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    rows = len(load_token_data(work["data"], load_tokenizer(work["base"]), 64).rows)
    assert rows % 2 == 1
    steps = -(-rows // 4) + 1  # cross an epoch boundary: its last global batch leaves rank 1 a placeholder
    common = ["--model", str(work["base"]), "--adapter", str(work["adapter"]), "--data", str(work["data"]),
              "--seq-len", "64", "--grad-accum", "2", "--max-steps", str(steps), "--lr", "3e-3", "--log-every", "1",
              "--save-every", "0", "--router-kl-weight", "0.3", "--sfa-interval", "2", "--seed", "5"]
    _torchrun(["train", *common, "--batch-size", "1", "--output", str(tmp_path / "ddp")])
    single = train(TrainConfig(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]),
                               output=str(tmp_path / "one"), seq_len=64, grad_accum=2, max_steps=steps, lr=3e-3,
                               log_every=1, save_every=0, router_kl_weight=0.3, sfa_interval=2, seed=5, batch_size=2))
    a = load_file(str(tmp_path / "ddp" / "final" / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(single.final / ADAPTER_WEIGHTS_NAME))
    init = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    for k in b:
        assert not torch.equal(b[k], init[k])
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == steps
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["tokens"] == y["tokens"]
    run_cfg = json.loads((tmp_path / "ddp" / "run_config.json").read_text())
    assert run_cfg["world_size"] == 2 and run_cfg["global_batch_size"] == 4


def test_two_process_precompute_equals_one_process(work, tmp_path):
    from nexus.engines.precompute import PrecomputeConfig, precompute
    from nexus.teacher_cache import TeacherCache

    args = ["--teacher", str(work["base"]), "--data", str(work["data"]), "--top-k", "16", "--seq-len", "32",
            "--rows-per-shard", "2", "--router-logits"]
    _torchrun(["precompute", *args, "--output", str(tmp_path / "two")])
    precompute(PrecomputeConfig(teacher=str(work["base"]), data=str(work["data"]), output=str(tmp_path / "one"),
                                top_k=16, seq_len=32, rows_per_shard=2, router_logits=True))
    a, b = TeacherCache(tmp_path / "two"), TeacherCache(tmp_path / "one")
    assert a.rows == b.rows and a.meta["num_shards"] == b.meta["num_shards"] >= 2
    idx = list(range(len(a.rows)))
    ba, bb = a.collate(idx), b.collate(idx)
    for key in ("teacher_topk_indices", "teacher_topk_logprobs", "teacher_router_logits"):
        torch.testing.assert_close(ba[key], bb[key], rtol=1e-5, atol=1e-5)


def test_sigterm_saves_checkpoint_then_resume_completes(work, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]), "--data", str(work["data"]),
            "--seq-len", "32", "--batch-size", "2", "--log-every", "1", "--save-every", "0", "--schedule", "constant",
            "--output", str(run)]
    proc = subprocess.Popen([NEXUS, *args, "--max-steps", "100000"], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # 128 + SIGTERM, so that `nexus train ... && next` stops
    assert "stopped by SIGTERM at step" in out and "Traceback" not in out
    ckpt = latest_checkpoint(run)
    step = int(ckpt.name.split("-")[1])
    assert 1 <= step < 100000 and not (run / "final").exists()
    r = subprocess.run([NEXUS, *args, "--max-steps", str(step + 2), "--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "final" / ADAPTER_WEIGHTS_NAME).exists()
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, step + 3))

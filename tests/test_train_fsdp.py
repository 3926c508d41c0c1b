"""FSDP2 training (accelerate's fully_shard path, two processes, gloo on CPU): the same adapter
as one process with the global batch, whole-tensor checkpoints, bit-identical resume, frozen
shards untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data, torchrun
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.engines.checkpointing import latest_checkpoint

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).with_name("fsdp_train.py"))


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter"), "data": make_data(root / "data.jsonl", n=12)}


def _settings(work, out, **kw) -> dict:
    # Routers trained (sharded base weights swapped back for the self-teacher), KD + router KL, SFA,
    # gradient accumulation: every part of the engine that touches parameters.
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=1, grad_accum=2, max_steps=6, lr=3e-3, log_every=1, save_every=0, seed=4,
                train_routers=True, router_kl_weight=0.3, sfa_interval=2, sfa_beta=0.25, warmup_steps=2)
    args.update(kw)
    return args


def _fsdp(tmp_path, name, settings) -> dict:
    cfg, res = tmp_path / f"{name}.json", tmp_path / f"{name}-result.json"
    cfg.write_text(json.dumps(settings))
    torchrun(SCRIPT, str(cfg), str(res))
    return json.loads(res.read_text())


def test_fsdp2_equals_one_process_and_resumes_bit_identically(work, tmp_path):
    from nexus.engines.train import train
    from nexus.engines.train_config import TrainConfig

    straight = _fsdp(tmp_path, "straight", _settings(work, tmp_path / "fsdp"))
    assert straight["world"] == 2 and straight["step"] == 6
    assert straight["sharded"] == straight["frozen"] > 0, "the frozen base was not sharded"
    assert straight["frozen_identical"]

    # One process, batch 2 = the same global batch.
    single = train(TrainConfig(**_settings(work, tmp_path / "one", batch_size=2)))
    a = load_file(str(tmp_path / "fsdp" / "final" / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(single.final / ADAPTER_WEIGHTS_NAME))
    init = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    assert set(a) == set(b) and any("router" in k for k in a)
    for k in b:
        assert a[k].shape == b[k].shape
        if k in init:
            assert not torch.equal(b[k], init[k])
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in ma] == list(range(1, 7)) and ma[-1]["sfa_merges"] == 3
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["kd"] == pytest.approx(y["kd"], rel=1e-4, abs=1e-7)

    # 3 steps, stop with a checkpoint of whole tensors, resume for the rest: the same adapter bit for bit.
    half = _fsdp(tmp_path, "half", _settings(work, tmp_path / "resumed", stop_after=3))
    assert half["interrupted"] and half["step"] == 3
    ckpt = latest_checkpoint(tmp_path / "resumed")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    shapes = {k: v.shape for k, v in load_file(str(ckpt / "adapter" / ADAPTER_WEIGHTS_NAME)).items()}
    assert shapes == {k: v.shape for k, v in init.items()} | {k: v.shape for k, v in a.items()}
    snapshot = state["sfa"]["snapshot"]
    assert all(snapshot[k].shape == shapes[k] for k in snapshot)
    assert all(v["exp_avg"].shape == shapes[k] for k, v in state["optimizer"]["state"].items())
    _fsdp(tmp_path, "rest", _settings(work, tmp_path / "resumed", resume=True))
    c = load_file(str(tmp_path / "resumed" / "final" / ADAPTER_WEIGHTS_NAME))
    assert set(c) == set(a) and all(torch.equal(a[k], c[k]) for k in a)

"""Training under the sharded engines, through accelerate's own preparation (two processes, gloo
on CPU): FSDP2 and DeepSpeed ZeRO-1/2 each give the adapter of one process with the same global
batch, resume bit-identically from their checkpoints and leave the frozen base untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_tolerance import bf16_rtol
from helpers_train import make_adapter, make_base, make_data, torchrun
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.training.train_state import latest_checkpoint

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).with_name("engine_train.py"))


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter"), "data": make_data(root / "data.jsonl", n=12)}


def _settings(work, out, **kw) -> dict:
    # Routers trained (base weights swapped back for the self-teacher), KD + router KL, SFA (merges
    # written into sharded or partitioned weights), gradient accumulation, clipping, weight decay:
    # every part of the engine that touches parameters.
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=1, grad_accum=2, max_steps=6, lr=3e-3, log_every=1, save_every=0, seed=4,
                train_routers=True, router_kl_weight=0.3, sfa_interval=2, sfa_beta=0.25, warmup_steps=2,
                max_grad_norm=0.05, weight_decay=0.01)
    args.update(kw)
    return args


def _launch(tmp_path, engine, name, settings, env=None) -> dict:
    """Train with ``settings`` as two processes under ``engine`` (fsdp2, zero1, zero2); rank 0's report."""
    cfg, res = tmp_path / f"{name}.json", tmp_path / f"{name}-result.json"
    cfg.write_text(json.dumps(settings))
    torchrun(SCRIPT, engine, str(cfg), str(res), timeout=400, env=env)
    return json.loads(res.read_text())


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", ["fsdp2", "zero1", "zero2"])
def test_engine_equals_one_process_and_resumes_bit_identically(work, tmp_path, engine):
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    straight = _launch(tmp_path, engine, "straight", _settings(work, tmp_path / "multi"))
    assert straight["world"] == 2 and straight["step"] == 6 and straight["frozen_identical"]
    assert straight["gloo_threads_after_end"] == 0, "a process group outlived end_processes"
    if engine == "fsdp2":
        assert straight["sharded"] == straight["frozen"] > 0, "the frozen base was not sharded"

    # One process, batch 2 = the same global batch.
    single = train(TrainConfig(**_settings(work, tmp_path / "one", batch_size=2)))
    a = load_file(str(tmp_path / "multi" / "final" / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(single.final / ADAPTER_WEIGHTS_NAME))
    init = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    assert set(a) == set(b) and any("router" in k for k in a)
    for k in b:
        assert a[k].shape == b[k].shape
        if k in init:
            assert not torch.equal(b[k], init[k])
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma, mb = _metrics(tmp_path / "multi"), _metrics(tmp_path / "one")
    assert [x["step"] for x in ma] == list(range(1, 7)) and ma[-1]["sfa_merges"] == 3
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["kd"] == pytest.approx(y["kd"], rel=1e-4, abs=1e-7)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4) and x["lr"] == pytest.approx(y["lr"], rel=1e-12)

    # 3 steps, stop with a checkpoint, resume for the rest: the same adapter bit for bit.
    half = _launch(tmp_path, engine, "half", _settings(work, tmp_path / "resumed", stop_after=3))
    assert half["interrupted"] and half["step"] == 3
    ckpt = latest_checkpoint(tmp_path / "resumed")
    shapes = {k: v.shape for k, v in load_file(str(ckpt / "adapter" / ADAPTER_WEIGHTS_NAME)).items()}
    assert shapes == {k: v.shape for k, v in a.items()}, "the checkpoint's adapter is not whole"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert all(v.shape == shapes[k] for k, v in state["sfa"]["snapshot"].items())
    if engine == "fsdp2":
        assert all(v["exp_avg"].shape == shapes[k] for k, v in state["optimizer"]["state"].items())
    else:  # DeepSpeed's own per-process optimizer partitions, moved in from the staging directory
        assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if "optim_states" in p.name) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        assert not list((tmp_path / "resumed" / "checkpoints").glob(".*")), "staging files were left behind"
    _launch(tmp_path, engine, "rest", _settings(work, tmp_path / "resumed", resume=True))
    c = load_file(str(tmp_path / "resumed" / "final" / ADAPTER_WEIGHTS_NAME))
    assert set(c) == set(a) and all(torch.equal(a[k], c[k]) for k in a)


def test_ddp_run_frees_its_process_group(work, tmp_path):
    # A group still referenced at interpreter exit can abort the process (see end_processes).
    result = _launch(tmp_path, "ddp", "ddp", _settings(work, tmp_path / "ddp", max_steps=2))
    assert result["world"] == 2 and result["step"] == 2 and result["frozen_identical"]
    assert result["gloo_threads_after_end"] == 0, "a process group outlived end_processes"


def test_zero2_bf16_saves_fp32_masters_and_tracks_one_process(work, tmp_path):
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    settings = _settings(work, tmp_path / "zero", bf16=True, max_steps=4, sfa_interval=0)
    result = _launch(tmp_path, "zero2", "bf16", settings)
    assert result["step"] == 4 and result["frozen_identical"]
    a = load_file(str(tmp_path / "zero" / "final" / ADAPTER_WEIGHTS_NAME))
    single = train(TrainConfig(**{**settings, "output": str(tmp_path / "one"), "batch_size": 2}))
    b = load_file(str(single.final / ADAPTER_WEIGHTS_NAME))
    assert all(v.dtype == torch.float32 for v in a.values())
    ma, mb = _metrics(tmp_path / "zero"), _metrics(tmp_path / "one")
    init = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    da = torch.cat([(a[k] - init[k]).flatten() for k in init])
    db = torch.cat([(b[k] - init[k]).flatten() for k in init])
    # DeepSpeed keeps bf16 weights with fp32 masters where one process keeps fp32 weights under bf16
    # autocast: the same training up to bf16 rounding, not bit for bit.
    assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.99
    assert float(da.norm()) == pytest.approx(float(db.norm()), rel=bf16_rtol(steps=len(mb)))
    assert [x["step"] for x in ma] == [x["step"] for x in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):  # the loss of step s follows s - 1 updates
        assert x["loss"] == pytest.approx(y["loss"], rel=bf16_rtol(steps=x["step"] - 1))


def test_engines_benchmark_quick_shows_each_engine_partitioning_its_share(tmp_path):
    import subprocess
    import sys

    from helpers_train import subprocess_env

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engines.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-8000:]
    ratios = json.loads(next(tmp_path.glob("engines-*.json")).read_text())["ratios"]
    assert set(ratios) == {"fsdp2", "zero1", "zero2"}
    # Two processes: FSDP2 halves the base, every engine halves AdamW's state; ZeRO keeps the base whole.
    assert ratios["fsdp2"]["frozen_base_ddp_over_engine"] == pytest.approx(2.0, rel=0.05)
    assert ratios["zero2"]["frozen_base_ddp_over_engine"] == pytest.approx(1.0)
    for engine in ratios:
        assert ratios[engine]["optimizer_state_ddp_over_engine"] == pytest.approx(2.0, rel=0.05)


def test_zero2_bf16_never_applies_a_non_finite_gradient(work, tmp_path):
    settings = _settings(work, tmp_path / "nan", bf16=True, max_steps=4, sfa_interval=0, grad_accum=1, save_every=1)
    # Step 3's loss is finite but its gradient is NaN: DeepSpeed must skip the update and nexus stop.
    result = _launch(tmp_path, "zero2", "nan", settings, env={"NEXUS_TEST_NAN_GRADIENT_AT": "3"})
    assert result["error"] and "non-finite" in result["error"] and "at step 3" in result["error"]
    assert "stopped without updating the weights" in result["error"] and "step-2" in result["error"]
    assert result["trainable_finite"]

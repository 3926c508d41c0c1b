"""``--optim adamw8bit``: bitsandbytes' 8-bit AdamW over the adapter, its state size, resume, refusals."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data, subprocess_env
from nexus.constants import ADAPTER_WEIGHTS_NAME, RUN_CONFIG_NAME
from nexus.engines.train import train
from nexus.errors import NexusError
from nexus.training.optimizers import build_optimizer, state_bytes
from nexus.training.train_config import TrainConfig


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("optim8bit")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    # width 64: each shared expert's gate_up (128 x 64) holds 8-bit state; down (64 x 64) holds it too
    return {"base": base, "adapter": make_adapter(base, root / "adapter", intermediate_size=64),
            "data": make_data(root / "data.jsonl", n=12)}


def _config(work, out, **kw) -> TrainConfig:
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=2, max_steps=4, lr=3e-3, log_every=1, save_every=0, seed=3, optim="adamw8bit")
    args.update(kw)
    return TrainConfig(**args)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_step(name: str, shapes, lr=1e-3, weight_decay=0.0):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = build_optimizer(name, [{"params": params, "lr": lr}], lr, weight_decay)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


def test_state_bytes_per_parameter():
    # A shared expert of realistic proportions (hidden 512, width 512): gate_up and down.
    shapes = [(1024, 512), (512, 512)]
    fp32, _ = _one_step("adamw", shapes)
    q8, _ = _one_step("adamw8bit", shapes)
    fp32_bytes, n = state_bytes(fp32)
    q8_bytes, n8 = state_bytes(q8)
    assert n == n8 == 1024 * 512 + 512 * 512
    # exp_avg + exp_avg_sq in fp32, plus a 4-byte step counter per tensor
    assert fp32_bytes == 8 * n + 4 * len(shapes)
    assert all(t.dtype == torch.uint8 for s in q8.state.values() for k, t in s.items() if k in ("state1", "state2"))
    # 2 uint8 moments, one fp32 absmax per 256 values each, two 256-entry fp32 code maps per tensor
    assert q8_bytes == 2 * n + 2 * 4 * (n // 256) + 2 * 256 * 4 * len(shapes)
    assert 2.0 < q8_bytes / n < 2.05


def test_8bit_update_follows_adamw_with_weight_decay_and_group_lrs():
    torch.manual_seed(0)
    init = [torch.randn(256, 64), torch.randn(32, 64)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(3)]
    results = {}
    for name in ("adamw", "adamw8bit"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": [params[0]], "lr": 1e-2, "name": "shared"}, {"params": [params[1]], "lr": 1e-1,
                                                                         "name": "routers"}]
        opt = build_optimizer(name, groups, 1e-2, 0.1)
        assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-1]
        assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results[name] = [p.detach() for p in params]
    for a, b, t, lr in zip(results["adamw"], results["adamw8bit"], init, (1e-2, 1e-1)):
        moved = (a - t).abs().mean()
        assert moved > lr  # three steps of about lr each
        assert (a - b).abs().mean() < 0.05 * moved  # the same update up to 8-bit rounding of the moments


def test_resume_is_bit_identical_and_the_choice_is_recorded(work, tmp_path):
    kw = dict(max_steps=6, grad_accum=2, train_routers=True, router_lr=1e-3, warmup_steps=1, weight_decay=0.01,
              router_kl_weight=0.3)
    straight = train(_config(work, tmp_path / "a", **kw))
    assert any(t.dtype == torch.uint8 for s in straight.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))
    assert [g["name"] for g in straight.optimizer.param_groups] == ["shared", "routers"]
    first = train(_config(work, tmp_path / "b", stop_after=3, save_every=2, **kw))
    assert first.interrupted and first.step == 3
    resumed = train(_config(work, tmp_path / "b", resume=True, **kw))
    assert resumed.step == 6
    # tensor by tensor: safetensors writes its metadata in no fixed order
    a, b = (load_file(str(r.final / ADAPTER_WEIGHTS_NAME)) for r in (straight, resumed))
    assert a.keys() == b.keys() and any("router" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    assert any(not torch.equal(t, init[k]) for k, t in a.items() if k in init)
    timeless = [[{k: v for k, v in m.items() if k != "tokens_per_s"} for m in _metrics(tmp_path / run)]
                for run in ("a", "b")]
    assert len(timeless[0]) == 6 and timeless[0] == timeless[1]
    assert json.loads((tmp_path / "b" / RUN_CONFIG_NAME).read_text())["config"]["optim"] == "adamw8bit"
    with pytest.raises(NexusError, match=r"optim \('adamw8bit' vs 'adamw'\)"):
        train(_config(work, tmp_path / "b", resume=True, optim="adamw", **{**kw, "max_steps": 8}))


def test_run_recorded_before_the_option_resumes_as_adamw(work, tmp_path):
    from nexus.training.run_record import check_resume

    config = _config(work, tmp_path, optim="adamw")
    old = {k: v for k, v in config.to_dict().items() if k != "optim"}
    (tmp_path / RUN_CONFIG_NAME).write_text(json.dumps({"config": old, "world_size": 1, "engine": "ddp"}))
    check_resume(tmp_path, config, 1, "ddp")
    with pytest.raises(NexusError, match=r"optim \('adamw' vs 'adamw8bit'\)"):
        check_resume(tmp_path, _config(work, tmp_path), 1, "ddp")


@pytest.mark.parametrize("kind, engine", [("DEEPSPEED", "DeepSpeed ZeRO"), ("FSDP", "FSDP2")])
def test_refused_under_sharding_engines_before_any_work(work, tmp_path, kind, engine):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2),
                            deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}}))
    fake = SimpleNamespace(distributed_type=DistributedType[kind], state=state, num_processes=2,
                           is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(NexusError, match=f"--optim adamw8bit is not supported under {engine}.*--optim adamw"):
        train(_config(work, tmp_path / "run"), accelerator=fake)


def test_unknown_optimizer_is_refused(work, tmp_path):
    with pytest.raises(NexusError, match="--optim must be one of adamw, adamw8bit, got 'sgd'"):
        _config(work, tmp_path / "run", optim="sgd")


def test_missing_bitsandbytes_names_the_extra(work, tmp_path, monkeypatch):
    import builtins

    import nexus.loading

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(NexusError, match=r"needs bitsandbytes.*pip install 'nexus-moe\[optim8bit\]'"):
        build_optimizer("adamw8bit", [{"params": [p]}], 1e-3, 0.0)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before bitsandbytes was looked for")

    monkeypatch.setattr(nexus.loading, "load_model", no_load)
    with pytest.raises(NexusError, match=r"needs bitsandbytes.*or train with --optim adamw"):
        train(_config(work, tmp_path / "run"))


@pytest.mark.parametrize("code", [
    "import logging; logging.basicConfig(level=logging.INFO)\n"
    "from nexus.training.optimizers import import_bitsandbytes\nimport_bitsandbytes()\n",
    # another library importing it (as peft does when it is installed), after `import nexus`
    "import sys, nexus\nassert 'torch' not in sys.modules\nimport bitsandbytes\n",
], ids=["nexus", "other-library"])
def test_importing_bitsandbytes_is_quiet(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit_forward" not in out.stdout + out.stderr


def test_kernel_warning_goes_to_debug(caplog):
    from nexus.training.optimizers import quiet_bitsandbytes

    quiet_bitsandbytes()
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.DEBUG):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
        noisy.warning("something else")
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["something else"] == logging.WARNING
    assert levels["bitsandbytes: Failed to load CPU gemm_4bit_forward from kernels-community: no kernels."] == \
        logging.DEBUG


@pytest.mark.slow
def test_ddp_with_8bit_state_and_host_embeddings_matches_one_process(work, tmp_path):
    from pathlib import Path

    from helpers_train import torchrun

    nexus = str(Path(sys.executable).parent / "nexus")
    options = dict(seq_len=32, max_steps=3, lr=3e-3, log_every=1, save_every=0, seed=5, train_routers=True,
                   router_lr=1e-3, weight_decay=0.01, optim="adamw8bit", embeddings_on="host")
    args = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args = [a for a in args if a != "True"]  # a flag takes no value
    run = torchrun(nexus, "train", "--model", str(work["base"]), "--adapter", str(work["adapter"]), "--data",
                   str(work["data"]), "--batch-size", "1", "--output", str(tmp_path / "ddp"), *args, no_python=True)
    assert "stays in host memory" in run.stdout + run.stderr
    single = train(TrainConfig(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]),
                               output=str(tmp_path / "one"), batch_size=2, **options))
    a = load_file(str(tmp_path / "ddp" / "final" / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(single.final / ADAPTER_WEIGHTS_NAME))
    init = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in init:
        assert not torch.equal(b[k], init[k]), k
        # the 8-bit moments may round a last-bit difference of the summed gradients to another code
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    ma, mb = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["tokens"] == y["tokens"]
    recorded = json.loads((tmp_path / "ddp" / RUN_CONFIG_NAME).read_text())
    assert recorded["world_size"] == 2 and recorded["config"]["optim"] == "adamw8bit"

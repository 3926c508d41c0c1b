"""Routed experts kept in host memory and streamed to the compute device per MoE layer
(``experts_on="host"``): the same numbers as the resident experts, at most two layers' bytes on
the device, one copy per layer per pass. On a GPU the copies are real; on a CPU the ledger
accounts for them."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from helpers_conformance import input_ids
from helpers_train import make_adapter, make_base, make_data
from nexus.errors import NexusError
from nexus.loading import load_model
from nexus.quant.packed_experts import PackedMatrices
from nexus.quant.packed_loading import packed_modules
from nexus.shared_expert import attach_shared_experts, disable_shared_experts, is_shared_parameter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [("gpt_oss", "mxfp4"), ("qwen3_moe", "fp8")]


def _with_adapter(family, model):
    """``model`` with seeded random shared experts (the same in every call)."""
    torch.manual_seed(7)
    attach_shared_experts(model, family, 16, "scalar")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_shared_parameter(name):
                p.normal_(0, 0.05).add_(0.5 if "scale" in name else 0.0)
    for name, p in model.named_parameters():
        p.requires_grad_(is_shared_parameter(name))
    return model


def _forward_backward(model, ids):
    """Logits, the input-embedding gradient and the shared experts' gradients."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), emb.grad, grads


def _packed_bytes(model) -> dict[str, torch.Tensor]:
    """Every packed buffer of ``model`` (a copy, on the CPU)."""
    return {f"{n}.{b}": t.detach().cpu().clone()
            for n, m in packed_modules(model).items() for b, t in m.named_buffers()
            if not b.endswith("bias")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,fmt", CASES)
def test_host_experts_equal_resident_experts(packed_dir, name, fmt, dtype):
    family, path = packed_dir(name, fmt)
    resident = _with_adapter(family, load_model(path, dtype=dtype, device=DEVICE))
    host = _with_adapter(family, load_model(path, dtype=dtype, device=DEVICE, experts_on="host"))
    streamer = host._nexus_streamer
    # The bytes stay in host memory; everything else is on the compute device.
    for m in packed_modules(host).values():
        for sub in m.modules():
            if isinstance(sub, PackedMatrices):
                assert all(t.device.type == "cpu" for t in sub.buffers())
    assert {p.device.type for p in host.parameters()} == {DEVICE}
    assert streamer.host_bytes() == sum(m.stored_bytes() for m in packed_modules(resident).values()) > 0
    ids = input_ids(host.config, batch=2, seq=9).to(DEVICE)
    (lr, gr, ar), (lh, gh, ah) = _forward_backward(resident, ids), _forward_backward(host, ids)
    assert torch.equal(lr, lh)
    assert torch.equal(gr, gh)
    assert ar.keys() == ah.keys() and ar
    assert all(torch.equal(ar[k], ah[k]) for k in ar)
    assert streamer.ledger.on_device == {} and streamer.resident == {}  # nothing left on the device
    assert _packed_bytes(host).keys() == _packed_bytes(resident).keys()
    assert all(torch.equal(a, b) for a, b in zip(_packed_bytes(host).values(), _packed_bytes(resident).values()))


@pytest.fixture
def host_model(gpt_oss, gpt_oss_mxfp4_dir):
    """The 3-MoE-layer GPT-OSS base with host experts and a trainable adapter."""
    return _with_adapter(gpt_oss, load_model(gpt_oss_mxfp4_dir, device=DEVICE, experts_on="host"))


def _calls(model) -> list[int]:
    """Count the forward calls of each packed experts module (a list updated in place)."""
    modules = list(packed_modules(model).values())
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_ledger_two_layers_on_device_and_one_fetch_per_layer_per_pass(host_model):
    streamer = host_model._nexus_streamer
    ledger, n = streamer.ledger, len(streamer.modules)
    assert n == 3
    every = {i: 1 for i in range(n)}
    largest_two = sum(sorted(streamer.nbytes)[-2:])
    ids = input_ids(host_model.config, batch=2, seq=9).to(DEVICE)
    with torch.no_grad():  # a teacher's pass
        host_model(ids)
    assert ledger.fetches["forward"] == every and not ledger.fetches["backward"]
    # The next layer arrives while one computes: two on the device at once, never three.
    assert ledger.peak_layers == 2 and ledger.peak_bytes <= largest_two
    assert ledger.on_device == {}
    ledger.reset()
    with torch.no_grad(), disable_shared_experts(host_model):  # the self-teacher
        host_model(ids)
    assert ledger.fetches["forward"] == every
    ledger.reset()
    _forward_backward(host_model, ids)
    assert ledger.fetches["forward"] == every and ledger.fetches["backward"] == every
    assert ledger.peak_layers == 2 and ledger.on_device == {}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_recompute_and_backward_share_one_fetch(host_model, gpt_oss_mxfp4_dir, gpt_oss, reentrant):
    from transformers.modeling_layers import GradientCheckpointingLayer

    reference = _forward_backward(_with_adapter(gpt_oss, load_model(gpt_oss_mxfp4_dir, device=DEVICE)),
                                  input_ids(host_model.config, batch=2, seq=9).to(DEVICE))
    # As nexus.training.run_inputs.enable_checkpointing, in both of torch's checkpointing modes.
    host_model.activation_checkpointing_enable({"use_reentrant": reentrant})
    for module in host_model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True
    streamer, calls = host_model._nexus_streamer, _calls(host_model)
    logits, grad, shared = _forward_backward(host_model, input_ids(host_model.config, batch=2, seq=9).to(DEVICE))
    assert calls == [2, 2, 2]  # each layer's forward ran again in backward
    every = {i: 1 for i in range(3)}
    assert streamer.ledger.fetches["forward"] == every and streamer.ledger.fetches["backward"] == every
    assert streamer.ledger.peak_layers == 2 and streamer.ledger.on_device == {}
    # Backward alone: the previous layer arrives while one recomputes and differentiates.
    emb = host_model.get_input_embeddings()(input_ids(host_model.config, batch=2, seq=9).to(DEVICE))
    loss = host_model(inputs_embeds=emb.detach().requires_grad_()).logits.float().square().mean()
    streamer.ledger.reset()
    loss.backward()
    assert streamer.ledger.fetches["backward"] == every and not streamer.ledger.fetches["forward"]
    assert streamer.ledger.peak_layers == 2 and streamer.ledger.on_device == {}
    assert torch.equal(logits, reference[0]) and torch.equal(grad, reference[1])
    assert all(torch.equal(shared[k], reference[2][k]) for k in reference[2])


def test_layer_without_backward_is_not_fetched_in_backward(host_model):
    # Only the last layer's inputs need grad: the earlier layers have no backward to feed.
    streamer = host_model._nexus_streamer
    for name, p in host_model.named_parameters():
        p.requires_grad_(is_shared_parameter(name) and ".layers.1." in name)
    ids = input_ids(host_model.config, batch=2, seq=9).to(DEVICE)
    host_model(ids).logits.float().square().mean().backward()
    assert streamer.ledger.fetches["backward"] == {2: 1}
    assert streamer.ledger.on_device == {}


def test_to_device_leaves_the_host_bytes(host_model):
    before = _packed_bytes(host_model)
    host_model.to("meta")  # every other tensor moves; the packed bytes stay where they are
    assert all(t.device.type == "meta" for t in host_model.parameters())
    after = _packed_bytes(host_model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_refusals(gpt_oss_float_dir, gpt_oss_mxfp4_dir):
    from nexus.training.run_inputs import load_student
    from nexus.training.train_config import TrainConfig

    with pytest.raises(NexusError, match=f"{gpt_oss_float_dir}.*keeps none packed.*--experts-on device"):
        load_model(gpt_oss_float_dir, experts_on="host")
    with pytest.raises(NexusError, match="keeps none packed"):
        load_model(gpt_oss_mxfp4_dir, experts_on="host", dequantize=True)
    with pytest.raises(NexusError, match="experts_on must be one of device, host, got 'gpu'"):
        load_model(gpt_oss_mxfp4_dir, experts_on="gpu")
    args = dict(model="m", adapter="a", output="o", data="d")
    with pytest.raises(NexusError, match="--experts-on host .* --dequantize .*only one"):
        TrainConfig(**args, experts_on="host", dequantize=True)
    with pytest.raises(NexusError, match="--experts-on must be one of device, host"):
        TrainConfig(**args, experts_on="cpu")
    fsdp2 = types.SimpleNamespace(kind="fsdp2", load_device="cpu")
    with pytest.raises(NexusError, match="--experts-on host is not supported under FSDP2"):
        load_student(TrainConfig(**args, experts_on="host"), fsdp2, None)


def test_cli_option(tmp_path):
    from click.testing import CliRunner

    from nexus.cli import cli

    result = CliRunner().invoke(cli, ["train", "--help"])
    assert "--experts-on [device|host]" in result.output
    result = CliRunner().invoke(cli, ["train", "--model", str(tmp_path), "--adapter", str(tmp_path), "--output",
                                      str(tmp_path / "o"), "--experts-on", "gpu"])
    assert result.exit_code == 2 and "'--experts-on'" in result.output and "'gpu'" in result.output


# -- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_train")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter"), "data": make_data(root / "data.jsonl", n=12),
            "kd": make_data(root / "kd.jsonl", n=8)}


def _train(work, out, **kw):
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=2, max_steps=4, lr=3e-3, log_every=1, save_every=2, seed=3,
                router_kl_weight=0.2)
    args.update(kw)
    return train(TrainConfig(**args))


def _outcome(result):
    from nexus.constants import ADAPTER_WEIGHTS_NAME

    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        for key in [k for k in row if "time" in k or "per_s" in k or "mem" in k]:
            del row[key]  # wall-clock and memory readings differ from run to run
    return metrics, load_file(str(result.final / ADAPTER_WEIGHTS_NAME))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_training_with_host_experts_equals_resident(work, tmp_path, checkpointing):
    from nexus.checkpoint import CheckpointReader

    kw = dict(gradient_checkpointing=checkpointing, train_routers=True)
    resident = _train(work, tmp_path / "resident", **kw)
    host = _train(work, tmp_path / "host", experts_on="host", **kw)
    (m_r, a_r), (m_h, a_h) = _outcome(resident), _outcome(host)
    assert len(m_h) == 4 and m_h == m_r
    assert a_h.keys() == a_r.keys() and all(torch.equal(a_h[k], a_r[k]) for k in a_r)
    assert getattr(resident.model, "_nexus_streamer", None) is None
    streamer = host.model._nexus_streamer
    assert streamer.ledger.peak_layers == 2 and streamer.ledger.on_device == {}
    # The frozen bytes are the checkpoint's after training.
    reader = CheckpointReader(work["base"])
    for n, m in packed_modules(host.model).items():
        disk = f"model.layers.{n.split('.')[2]}.mlp.experts.down_proj"
        assert torch.equal(m.down.blocks, reader.read(disk + "_blocks"))
        assert torch.equal(m.down.scales, reader.read(disk + "_scales"))


def test_kd_data_and_resume_with_host_experts(work, tmp_path):
    kw = dict(kd_data=str(work["kd"]), kd_batch_size=1, gradient_checkpointing=True, bf16=True)
    resident = _train(work, tmp_path / "resident", **kw)
    _train(work, tmp_path / "host", experts_on="host", stop_after=2, **kw)
    resumed = _train(work, tmp_path / "host", experts_on="host", resume=True, **kw)
    (m_r, a_r), (m_h, a_h) = _outcome(resident), _outcome(resumed)
    assert [r["step"] for r in m_h] == [1, 2, 3, 4] and m_h == m_r
    assert all(torch.equal(a_h[k], a_r[k]) for k in a_r)


def test_trainer_wrapper_streams_host_experts(gpt_oss_mxfp4_dir):
    from nexus.trainers import NexusConfig, get_nexus_model

    with pytest.raises(NexusError, match="NexusConfig: experts_on must be one of device, host"):
        NexusConfig(experts_on="disk")
    resident = get_nexus_model(load_model(gpt_oss_mxfp4_dir, device=DEVICE),
                               NexusConfig(seed=1, init_strategy="random"))
    host = get_nexus_model(load_model(gpt_oss_mxfp4_dir, device=DEVICE),
                           NexusConfig(seed=1, init_strategy="random", experts_on="host"))
    streamer = host.get_base_model()._nexus_streamer
    assert all(m.streamer is streamer for m in packed_modules(host).values())
    ids = input_ids(host.config, batch=2, seq=9).to(DEVICE)
    outs = []
    for model in (resident, host):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
    # Layer 0's inputs need no grad (token ids, frozen routers): it has no backward, nothing is fetched for it.
    assert streamer.ledger.fetches["backward"] == {1: 1, 2: 1}
    assert streamer.ledger.on_device == {}


@pytest.mark.slow
def test_ddp_processes_each_stream_their_own_copy(work, tmp_path):
    import sys
    from pathlib import Path

    from helpers_train import torchrun

    nexus = str(Path(sys.executable).parent / "nexus")
    common = ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]), "--data", str(work["data"]),
              "--seq-len", "32", "--batch-size", "1", "--max-steps", "3", "--lr", "3e-3", "--log-every", "1",
              "--save-every", "0", "--seed", "5", "--train-routers"]
    torchrun(nexus, *common, "--output", str(tmp_path / "resident"), no_python=True)
    run = torchrun(nexus, *common, "--experts-on", "host", "--output", str(tmp_path / "host"), no_python=True)
    assert "keep their packed experts in host memory" in run.stdout + run.stderr
    results = [types.SimpleNamespace(run_dir=tmp_path / name, final=tmp_path / name / "final")
               for name in ("resident", "host")]
    (m_r, a_r), (m_h, a_h) = (_outcome(r) for r in results)
    assert len(m_h) == 3 and m_h == m_r
    assert a_h.keys() == a_r.keys() and all(torch.equal(a_h[k], a_r[k]) for k in a_r)


@pytest.mark.slow
def test_zero2_with_host_experts_equals_resident(work, tmp_path):
    from pathlib import Path

    from helpers_train import torchrun

    script = str(Path(__file__).with_name("engine_train.py"))
    settings = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), seq_len=32,
                    batch_size=1, max_steps=3, lr=3e-3, log_every=1, save_every=0, seed=4, train_routers=True)
    for name, extra in (("resident", {}), ("host", {"experts_on": "host"})):
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({**settings, "output": str(tmp_path / name), **extra}))
        torchrun(script, "zero2", str(cfg), str(tmp_path / f"{name}-result.json"), timeout=400)
        assert json.loads((tmp_path / f"{name}-result.json").read_text())["frozen_identical"]
        recorded = json.loads((tmp_path / name / "run_config.json").read_text())["config"]
        assert recorded["experts_on"] == extra.get("experts_on", "device")
    results = [types.SimpleNamespace(run_dir=tmp_path / name, final=tmp_path / name / "final")
               for name in ("resident", "host")]
    (m_r, a_r), (m_h, a_h) = (_outcome(r) for r in results)
    assert len(m_h) == 3 and m_h == m_r
    assert a_h.keys() == a_r.keys() and all(torch.equal(a_h[k], a_r[k]) for k in a_r)

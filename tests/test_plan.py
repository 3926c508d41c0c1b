"""``nexus plan``: each component equals what the loaded model, the adapter and the optimizer hold; the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from nexus.cli import cli
from nexus.errors import NexusError
from nexus.plan import LOSS_BYTES_PER_ENTRY, PlanConfig, optimizer_bytes, parse_memory, plan


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _packed(model):
    from nexus.quant.packed_loading import packed_modules

    return packed_modules(model)


@pytest.mark.parametrize("bf16", [False, True])
def test_weights_equal_the_loaded_models(gpt_oss_mxfp4_dir, bf16):
    from nexus.loading import load_model

    model = load_model(gpt_oss_mxfp4_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    packed = _packed(model)
    stored = sum(m.stored_bytes() for m in packed.values())
    everything = _tensor_bytes([*model.parameters(), *model.buffers()])
    result = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), bf16=bf16))
    assert len(packed) == 3 and stored > 0
    assert result.components["packed experts"]["device"] == stored
    assert result.components["other weights"]["device"] == everything - stored
    assert result.details["from_headers"]


def test_packed_bytes_from_the_config_alone_equal_the_headers(gpt_oss_mxfp4_dir, tmp_path):
    shutil.copy(gpt_oss_mxfp4_dir / "config.json", tmp_path / "config.json")
    alone = plan(PlanConfig(model=str(tmp_path)))
    full = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir)))
    assert not alone.details["from_headers"]
    assert alone.components["packed experts"] == full.components["packed experts"]
    assert alone.device_bytes == full.device_bytes


def test_dequantize_keeps_no_experts_packed(gpt_oss_mxfp4_dir, gpt_oss_dequantized_model):
    result = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), dequantize=True))
    assert result.components["packed experts"]["device"] == 0
    m = gpt_oss_dequantized_model
    assert result.components["other weights"]["device"] == _tensor_bytes([*m.parameters(), *m.buffers()])


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_adapter_gradients_and_optimizer_state_equal_a_real_step(gpt_oss_mxfp4_dir, gpt_oss, optim):
    from nexus.loading import load_model
    from nexus.shared_expert import attach_shared_experts, is_shared_parameter

    model = load_model(gpt_oss_mxfp4_dir)
    attach_shared_experts(model, gpt_oss, 128, "scalar")  # 128 x 64 >= 4,096: 8-bit moments
    trainable = [p for n, p in model.named_parameters() if is_shared_parameter(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    from nexus.training.optimizers import build_optimizer

    optimizer = build_optimizer(optim, [{"params": trainable, "lr": 1e-3}], 1e-3, 0.0)
    model(input_ids=torch.arange(8)[None]).logits.float().square().mean().backward()
    optimizer.step()
    state = {t.data_ptr(): t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}.values()
    result = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), shared_intermediate_size=128, gate_mode="scalar",
                             optim=optim))
    assert result.details["trainable_parameters"] == sum(p.numel() for p in trainable)
    assert result.components["adapter"]["device"] == _tensor_bytes(trainable)
    assert result.components["gradients"]["device"] == _tensor_bytes(p.grad for p in trainable)
    assert result.components["optimizer state"]["device"] == _tensor_bytes(state)


def test_adapter_width_and_gate_are_read_from_an_adapter(gpt_oss_mxfp4_dir, tmp_path):
    from helpers_train import make_adapter

    adapter = make_adapter(gpt_oss_mxfp4_dir, tmp_path / "adapter", gate_mode="scalar", intermediate_size=16)
    from nexus.adapter import load_adapter
    from nexus.loading import load_model
    from nexus.shared_expert import is_shared_parameter

    model = load_model(gpt_oss_mxfp4_dir)
    load_adapter(model, adapter)
    numel = sum(p.numel() for n, p in model.named_parameters() if is_shared_parameter(n))
    result = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), adapter=str(adapter), shared_intermediate_size=999))
    assert result.details["trainable_parameters"] == numel


def test_eight_bit_state_is_about_a_quarter():
    sizes = [1 << 20, 100]
    assert optimizer_bytes(sizes, "adamw") == 8 * sum(sizes) + 8
    eight = optimizer_bytes(sizes, "adamw8bit")
    assert eight == 2 * (1 << 20) + 8 * (1 << 20) // 256 + 2048 + 8 * 100  # small tensors keep fp32 moments


def test_loss_workspace_is_chunk_by_vocabulary(gpt_oss_mxfp4_dir):
    from nexus.chunked_losses import chunk_tokens
    from nexus.loading import load_config

    vocab = load_config(gpt_oss_mxfp4_dir).vocab_size
    result = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), loss_chunk_tokens=8, seq_len=32, batch_size=1,
                             device="cpu"))
    assert result.details["chunk_tokens"] == chunk_tokens(vocab, 8) == 8
    workspace = 8 * vocab * LOSS_BYTES_PER_ENTRY
    assert result.details["loss_workspace"] == workspace
    # the loss and the backward never overlap: the peak holds the larger working set only
    at_peak = workspace if result.details["peak_phase"] == "loss" else 0
    assert result.components["loss workspace"]["device"] == at_peak
    big = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), loss_chunk_tokens=1024, seq_len=16, batch_size=64))
    assert big.components["loss workspace"]["device"] == 1024 * vocab * LOSS_BYTES_PER_ENTRY
    fewer = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), seq_len=4, batch_size=1, device="cpu"))
    assert fewer.details["chunk_tokens"] == 4  # never more tokens than the step has


def test_experts_on_host_move_the_packed_bytes_and_stream_two_layers(gpt_oss_mxfp4_dir):
    device = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir)))
    host = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), experts_on="host"))
    total = device.components["packed experts"]["device"]
    per_layer = device.details["packed_bytes_per_layer"]
    assert host.components["packed experts"] == {**host.components["packed experts"], "device": 0, "host": total}
    assert host.details["streaming_buffers"] == 2 * max(per_layer.values())
    assert host.host_bytes == total
    assert host.device_bytes < device.device_bytes


def test_experts_on_host_with_nothing_packed_is_refused_as_train_refuses_it(gpt_oss_float_dir):
    with pytest.raises(NexusError, match="--experts-on host"):
        plan(PlanConfig(model=str(gpt_oss_float_dir), experts_on="host"))
    # the search for a change that fits passes over it
    result = plan(PlanConfig(model=str(gpt_oss_float_dir), gpu_memory="1MiB"))
    assert result.fits is False and "shorten --seq-len" in result.suggestion


def test_teacher_self_cache_and_model(gpt_oss_mxfp4_dir, tmp_path):
    from nexus.constants import CACHE_METADATA_NAME

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_METADATA_NAME).write_text("{}")
    base = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir)))
    cached = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), teacher=str(tmp_path / "cache")))
    second = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), teacher=str(gpt_oss_mxfp4_dir)))
    assert base.components["teacher"]["device"] == cached.components["teacher"]["device"] == 0
    weights = base.components["packed experts"]["device"] + base.components["other weights"]["device"]
    assert second.components["teacher"]["device"] == weights


def test_gradient_checkpointing_keeps_fewer_activations(gpt_oss_mxfp4_dir):
    plain = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), seq_len=128, batch_size=2, device="cpu"))
    ckpt = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), seq_len=128, batch_size=2, device="cpu",
                           gradient_checkpointing=True))
    assert ckpt.device_bytes < plain.device_bytes


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5G", int(1.5 * 2**30)),
                                            ("512MiB", 512 * 2**20), ("1000", 1000)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_a_bad_memory_size_names_the_flag():
    with pytest.raises(NexusError, match="--gpu-memory '24 GiBs'"):
        parse_memory("24 GiBs")


def _cli(*args):
    return CliRunner().invoke(cli, ["plan", *map(str, args)])


def test_cli_json_and_table(gpt_oss_mxfp4_dir):
    doc = json.loads(_cli("--model", gpt_oss_mxfp4_dir, "--json").output)
    assert doc["device_bytes"] == sum(r["device"] for r in doc["components"].values())
    assert doc["fits"] is None and doc["options"]["batch_size"] == 4  # nexus train's default
    table = _cli("--model", gpt_oss_mxfp4_dir)
    assert table.exit_code == 0
    for name in ("packed experts", "other weights", "adapter", "gradients", "optimizer state", "activations",
                 "loss workspace", "streaming buffers", "teacher", "total"):
        assert name in table.output


def test_cli_fits_and_does_not_fit_with_the_cheapest_change(gpt_oss_mxfp4_dir):
    from nexus.plan import _CHANGES

    model = str(gpt_oss_mxfp4_dir)
    args = dict(model=model, seq_len=64, batch_size=2)
    base = plan(PlanConfig(**args)).device_bytes
    assert _cli("--model", model, "--seq-len", 64, "--batch-size", 2, "--gpu-memory", base).exit_code == 0
    single = {flag: plan(PlanConfig(**args, **{f: v})).device_bytes for f, v, flag in _CHANGES}
    limit = min(single.values())
    assert limit < base
    expected = next(flag for flag, need in single.items() if need <= limit)
    out = _cli("--model", model, "--seq-len", 64, "--batch-size", 2, "--gpu-memory", limit)
    assert out.exit_code == 3
    assert out.output.strip().splitlines()[-1].endswith(f"the cheapest change that fits: {expected}")
    tiny = _cli("--model", model, "--seq-len", 64, "--batch-size", 2, "--gpu-memory", "1MiB", "--json")
    assert tiny.exit_code == 3 and json.loads(tiny.output)["fits"] is False
    assert "shorten --seq-len" in json.loads(tiny.output)["suggestion"]


def test_cli_errors_are_one_line(tmp_path):
    bad = _cli("--model", tmp_path, "--gpu-memory", "lots")
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert bad.output.strip().splitlines()[-1].startswith("Error: ")
    assert "--gpu-memory 'lots'" in bad.output or "config.json" in bad.output


def test_decoded_cache_keeps_the_layers_that_fit_the_budget(gpt_oss_mxfp4_dir):
    from nexus.loading import load_config

    c = load_config(gpt_oss_mxfp4_dir)
    layer = 3 * c.num_local_experts * c.hidden_size * c.intermediate_size * 4  # fp32 values of every expert
    none = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir)))
    two = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), packed_cache_bytes=2 * layer + layer // 2))
    assert "decoded cache" not in none.components
    assert two.components["decoded cache"]["device"] == 2 * layer  # a layer keeps all of its experts or none
    assert two.device_bytes == none.device_bytes + 2 * layer


def test_cpu_plan_names_the_weights_left_mapped_from_the_checkpoint(gpt_oss_mxfp4_dir):
    from nexus.plan import read_headers

    floats = {n: h for n, h in read_headers(gpt_oss_mxfp4_dir).items() if not n.endswith(("_blocks", "_scales"))}
    stored = {h[0] for h in floats.values()}
    fp32 = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), device="cpu"))
    bf16 = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), device="cpu", bf16=True))
    packed = fp32.components["packed experts"]["device"]
    assert stored == {"F32"}  # floats read as stored stay mapped; a cast to bf16 makes a copy
    # every stored float; not the buffers the model computes (rotary frequencies)
    assert fp32.details["file_backed_bytes"] == packed + sum(h[2] for h in floats.values())
    assert fp32.details["file_backed_bytes"] < packed + fp32.components["other weights"]["device"]
    assert bf16.details["file_backed_bytes"] == packed
    assert fp32.host_bytes == 0 and "runtime" in fp32.components
    assert plan(PlanConfig(model=str(gpt_oss_mxfp4_dir))).details["file_backed_bytes"] == 0  # a GPU copies them


def test_cpu_verdict_is_on_the_one_memory(gpt_oss_mxfp4_dir):
    total = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), device="cpu")).device_bytes
    assert plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), device="cpu", host_memory=str(total))).fits
    assert not plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), device="cpu", host_memory=str(total - 1))).fits
    out = _cli("--model", gpt_oss_mxfp4_dir, "--device", "cpu")
    assert "stay mapped from the checkpoint files" in out.output and "memory" in out.output.splitlines()[0]


def test_trained_routers_are_trainable_parameters(gpt_oss_mxfp4_dir, gpt_oss_model, gpt_oss):
    from nexus.shared_expert import router_parameters

    routers = router_parameters(gpt_oss_model, gpt_oss, gpt_oss.moe_blocks(gpt_oss_model))
    base = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir)))
    trained = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), train_routers=True))
    extra = sum(p.numel() for p in routers.values())
    assert extra > 0
    assert trained.details["trainable_parameters"] == base.details["trainable_parameters"] + extra


def test_a_quantised_teacher_streams_its_experts_from_the_host_too(gpt_oss_mxfp4_dir):
    own = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), experts_on="host"))
    second = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), experts_on="host", teacher=str(gpt_oss_mxfp4_dir)))
    assert second.components["teacher"]["device"] == own.components["other weights"]["device"]
    assert second.components["teacher"]["host"] == own.components["packed experts"]["host"] > 0


def test_the_larger_of_the_two_streams_sets_the_step(gpt_oss_mxfp4_dir):
    one = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), batch_size=1, seq_len=64))
    four = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), batch_size=4, seq_len=64))
    kd = plan(PlanConfig(model=str(gpt_oss_mxfp4_dir), batch_size=1, kd_batch_size=4, seq_len=64))
    assert kd.device_bytes == four.device_bytes > one.device_bytes

"""Shared experts on a frozen GPT-OSS: exact identity at init, disable switch, gates, freezing."""

from __future__ import annotations

import pytest
import torch

from nexus.constants import SHARED_MODULE_NAME, SHARED_SCALE_NAME
from nexus.errors import NexusError
from nexus.shared_expert import (
    attach_shared_experts,
    detach_shared_experts,
    disable_shared_experts,
    freeze_base,
    is_shared_parameter,
)


@pytest.fixture
def input_ids():
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _randomise_shared(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_attach_builds_one_shared_expert_per_moe_block(gpt_oss, gpt_oss_model):
    blocks = attach_shared_experts(gpt_oss_model, gpt_oss, intermediate_size=32, gate_mode="scalar")
    assert [b.layer for b in blocks] == [0, 1, 2]
    for b in blocks:
        shared = getattr(b.module, SHARED_MODULE_NAME)
        assert shared.gate_proj.weight.shape == (32, 64) and shared.down_proj.weight.shape == (64, 32)
        assert shared.gate_proj.bias is not None  # GPT-OSS experts have biases
        assert getattr(b.module, SHARED_SCALE_NAME).weight.shape == (1,)
    names = [n for n, _ in gpt_oss_model.named_parameters() if is_shared_parameter(n)]
    assert "model.layers.0.mlp.nexus_shared.gate_proj.weight" in names
    assert "model.layers.2.mlp.nexus_shared_scale.weight" in names
    assert len(names) == 3 * (6 + 1)
    assert not is_shared_parameter("model.layers.0.mlp.experts.gate_up_proj")
    with pytest.raises(NexusError, match="already has a shared expert"):
        attach_shared_experts(gpt_oss_model, gpt_oss)
    detach_shared_experts(gpt_oss_model)
    assert not any(is_shared_parameter(n) for n, _ in gpt_oss_model.named_parameters())


def test_scalar_gate_at_zero_is_bit_identical_to_base(gpt_oss, gpt_oss_model, input_ids):
    base = _logits(gpt_oss_model, input_ids)
    attach_shared_experts(gpt_oss_model, gpt_oss, gate_mode="scalar")
    _randomise_shared(gpt_oss_model)
    with torch.no_grad():
        for m in gpt_oss_model.modules():
            if hasattr(m, SHARED_SCALE_NAME):
                getattr(m, SHARED_SCALE_NAME).weight.zero_()
    assert torch.equal(_logits(gpt_oss_model, input_ids), base)


def test_disable_restores_base_exactly_whatever_the_shared_weights(gpt_oss, gpt_oss_model, input_ids):
    base = _logits(gpt_oss_model, input_ids)
    attach_shared_experts(gpt_oss_model, gpt_oss, gate_mode="scalar")
    _randomise_shared(gpt_oss_model, seed=5)  # scales nonzero too
    adapted = _logits(gpt_oss_model, input_ids)
    assert (adapted - base).abs().max() > 1e-3
    with disable_shared_experts(gpt_oss_model):
        assert torch.equal(_logits(gpt_oss_model, input_ids), base)
        with disable_shared_experts(gpt_oss_model):  # nesting keeps it disabled
            pass
        assert torch.equal(_logits(gpt_oss_model, input_ids), base)
    assert torch.equal(_logits(gpt_oss_model, input_ids), adapted)
    with pytest.raises(RuntimeError), disable_shared_experts(gpt_oss_model):
        raise RuntimeError("boom")
    assert torch.equal(_logits(gpt_oss_model, input_ids), adapted)  # re-enabled after an exception


@pytest.mark.parametrize("mode", ["none", "token", "scalar", "scalar_token"])
def test_gate_modes_add_the_gated_shared_output(mode, gpt_oss, gpt_oss_model, input_ids):
    base = _logits(gpt_oss_model, input_ids)
    blocks = attach_shared_experts(gpt_oss_model, gpt_oss, gate_mode=mode)
    block = blocks[1].module
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with disable_shared_experts(gpt_oss_model):
            plain = block(x)[0]
        delta = block(x)[0] - plain
        shared = getattr(block, SHARED_MODULE_NAME)(x)
    if mode == "none":
        assert not hasattr(block, SHARED_SCALE_NAME)
        torch.testing.assert_close(delta, shared, rtol=1e-5, atol=1e-6)
        assert not torch.equal(_logits(gpt_oss_model, input_ids), base)
    elif mode == "token":
        # Zero-initialised token gate: sigmoid(0) = 0.5 for every token.
        torch.testing.assert_close(delta, 0.5 * shared, rtol=1e-5, atol=1e-6)
        assert not torch.equal(_logits(gpt_oss_model, input_ids), base)
    elif mode == "scalar":
        assert torch.equal(delta, torch.zeros_like(delta))
        with torch.no_grad():
            getattr(block, SHARED_SCALE_NAME).weight.fill_(0.25)
            delta = block(x)[0] - plain
        torch.testing.assert_close(delta, 0.25 * shared, rtol=1e-5, atol=1e-6)
    else:
        # Zero start like scalar; with w = 0 it is the scalar gate; w tilts it per token within [0, 2s].
        assert torch.equal(delta, torch.zeros_like(delta))
        assert torch.equal(_logits(gpt_oss_model, input_ids), base)
        gate = getattr(block, SHARED_SCALE_NAME)
        with torch.no_grad():
            gate.scale.fill_(0.25)
            torch.testing.assert_close(block(x)[0] - plain, 0.25 * shared, rtol=1e-5, atol=1e-6)
            w = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
            gate.weight.copy_(w)
            expected = 0.25 * 2 * torch.sigmoid(x @ w.t()) * shared
            torch.testing.assert_close(block(x)[0] - plain, expected, rtol=1e-5, atol=1e-6)


def test_zero_start_token_gate_learns_from_step_zero(gpt_oss, gpt_oss_model, input_ids):
    """At init s = 0 and w = 0: s gets a gradient at once (w only once s moves), so training starts."""
    attach_shared_experts(gpt_oss_model, gpt_oss, gate_mode="scalar_token")
    gpt_oss_model(input_ids=input_ids).logits.float().pow(2).mean().backward()
    gates = [m for m in gpt_oss_model.modules() if m.__class__.__name__ == "SharedScale"]
    assert gates and all(g.scale.grad.abs().item() > 0 for g in gates)
    assert all(not g.weight.grad.any() for g in gates)


def test_unknown_gate_mode_is_refused(gpt_oss, gpt_oss_model):
    with pytest.raises(NexusError, match="'sigmoid'.*none, scalar, token, scalar_token"):
        attach_shared_experts(gpt_oss_model, gpt_oss, gate_mode="sigmoid")
    assert not any(is_shared_parameter(n) for n, _ in gpt_oss_model.named_parameters())


def _train_step(model, input_ids, params) -> None:
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    logits = model(input_ids=input_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()


@pytest.mark.parametrize("train_routers", [False, True])
def test_optimiser_step_changes_only_trainable_parameters(train_routers, gpt_oss, gpt_oss_model, input_ids):
    model = gpt_oss_model
    blocks = attach_shared_experts(model, gpt_oss, gate_mode="none")
    model.train()  # freeze_base must put it back in eval mode
    routers = [gpt_oss.router_capture(b).module for b in blocks] if train_routers else []
    trainable = freeze_base(model, router_modules=routers)
    assert not model.training and not any(m.training for m in model.modules())
    router_names = {n for n, _ in model.named_parameters() if ".mlp.router." in n}
    expected = {n for n, _ in model.named_parameters() if is_shared_parameter(n)}
    if train_routers:
        expected |= router_names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert {id(p) for p in trainable} == {id(p) for n, p in model.named_parameters() if n in expected}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, input_ids, trainable)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in expected), name
    for name, p in model.named_parameters():
        if name not in expected:
            assert p.grad is None, name
    assert not model.training

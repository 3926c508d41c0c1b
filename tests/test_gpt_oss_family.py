"""The GPT-OSS family plugin against transformers' own GptOssExperts, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from nexus.checkpoint import CheckpointReader
from nexus.types import ExpertWeights


def _reference_activation(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU written element by element in Python floats (float64)."""
    out = torch.empty_like(gate, dtype=torch.float64)
    for i, (g, u) in enumerate(zip(gate.reshape(-1).tolist(), up.reshape(-1).tolist())):
        g = min(g, limit)
        u = max(-limit, min(u, limit))
        out.view(-1)[i] = (u + 1.0) * g / (1.0 + math.exp(-alpha * g))
    return out.reshape(gate.shape)


def _clamp_probe_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(64, generator=g, dtype=torch.float64) * 5
    up = torch.randn(64, generator=g, dtype=torch.float64) * 5
    # Explicitly beyond every clamp: gate > 7, up > 7, up < -7, and both at once.
    gate[:6] = torch.tensor([7.5, 12.0, 3.0, -9.0, 20.0, 7.0], dtype=torch.float64)
    up[:6] = torch.tensor([0.5, 9.0, -8.0, 10.0, -30.0, 7.0], dtype=torch.float64)
    return gate, up


def test_activation_matches_float64_reference_beyond_clamps(gpt_oss, gpt_oss_config):
    act = gpt_oss.activation(gpt_oss_config)
    gate, up = _clamp_probe_inputs()
    assert (gate > 7).any() and (up > 7).any() and (up < -7).any()
    got = act(gate, up)
    ref = _reference_activation(gate, up, alpha=1.702, limit=7.0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # Past the clamps the output no longer depends on the input.
    assert got[1] == act(torch.tensor([100.0], dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64))[0]


def test_activation_reads_alpha_and_limit_from_config(gpt_oss, gpt_oss_config):
    cfg = gpt_oss_config.__class__.from_dict(gpt_oss_config.to_dict())
    cfg.swiglu_alpha, cfg.swiglu_limit = 1.0, 3.0
    gate, up = _clamp_probe_inputs()
    torch.testing.assert_close(gpt_oss.activation(cfg)(gate, up), _reference_activation(gate, up, 1.0, 3.0),
                               rtol=1e-12, atol=1e-12)


def test_activation_equals_gpt_oss_apply_gate_on_interleaved_input(gpt_oss, gpt_oss_config):
    experts = GptOssExperts(gpt_oss_config)
    gate, up = _clamp_probe_inputs()
    gate, up = gate.reshape(4, 16), up.reshape(4, 16)
    interleaved = torch.stack([gate, up], dim=-1).reshape(4, 32)  # g0 u0 g1 u1 ...
    assert torch.equal(interleaved[..., 0::2], gate)
    expected = experts._apply_gate(interleaved)
    assert torch.equal(gpt_oss.activation(gpt_oss_config)(gate, up), expected)


def _recompute(weights: ExpertWeights, i: int, x: torch.Tensor, act) -> torch.Tensor:
    """``down(act(gate x + gb, up x + ub)) + db`` for expert ``i`` of ``weights`` in float64."""
    d = torch.float64
    g = x @ weights.gate[i].to(d).t() + weights.gate_bias[i].to(d)
    u = x @ weights.up[i].to(d).t() + weights.up_bias[i].to(d)
    return act(g, u) @ weights.down[i].to(d).t() + weights.down_bias[i].to(d)


@pytest.mark.parametrize("which", ["mxfp4", "float"])
def test_experts_from_disk_reproduce_gpt_oss_experts(which, gpt_oss, gpt_oss_config, gpt_oss_mxfp4_dir,
                                                     gpt_oss_float_dir, gpt_oss_dequantized_model):
    path = gpt_oss_mxfp4_dir if which == "mxfp4" else gpt_oss_float_dir
    reader = CheckpointReader(path)
    act = gpt_oss.activation(gpt_oss_config)
    model = gpt_oss_dequantized_model
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    model.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g, dtype=torch.float64) * 3  # big enough to reach the clamps
    saw_clamp = False
    for layer in (0, 2):
        wanted = [5, 2, 7]
        weights = gpt_oss.read_experts(reader, gpt_oss_config, layer, wanted)
        assert len(weights) == 3 and weights.has_bias
        assert weights.gate.dtype == torch.float32
        assert weights.gate.shape == (3, 64, 64) and weights.down.shape == (3, 64, 64)
        assert weights.gate_bias.shape == (3, 64) and weights.down_bias.shape == (3, 64)
        module = model.model.layers[layer].mlp.experts
        for i, e in enumerate(wanted):
            expected = module(x, torch.full((6, 1), e), torch.ones(6, 1, dtype=torch.float64))
            got = _recompute(weights, i, x, act)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
            pre = x @ weights.up[i].double().t() + weights.up_bias[i].double()
            saw_clamp |= bool((pre.abs() > 7).any())
        # The layout really matters: another expert's weights give another output.
        other = module(x, torch.full((6, 1), 0), torch.ones(6, 1, dtype=torch.float64))
        assert not torch.allclose(_recompute(weights, 0, x, act), other)
    assert saw_clamp, "inputs should exercise the clamp"


def test_read_experts_layout_against_in_memory_parameters(gpt_oss, gpt_oss_config, gpt_oss_float_dir,
                                                           gpt_oss_dequantized_model):
    weights = gpt_oss.read_experts(CheckpointReader(gpt_oss_float_dir), gpt_oss_config, 1, [4, 0])
    ex = gpt_oss_dequantized_model.model.layers[1].mlp.experts
    # In memory: gate_up_proj [E, H, 2I] interleaved (gate = 0::2), down_proj [E, I, H].
    for i, e in enumerate([4, 0]):
        assert torch.equal(weights.gate[i], ex.gate_up_proj[e][:, 0::2].t())
        assert torch.equal(weights.up[i], ex.gate_up_proj[e][:, 1::2].t())
        assert torch.equal(weights.down[i], ex.down_proj[e].t())
        assert torch.equal(weights.gate_bias[i], ex.gate_up_proj_bias[e][0::2])
        assert torch.equal(weights.up_bias[i], ex.gate_up_proj_bias[e][1::2])
        assert torch.equal(weights.down_bias[i], ex.down_proj_bias[e])


def test_example_config_is_tiny_and_mxfp4_compatible(gpt_oss):
    cfg = gpt_oss.example_config()
    assert cfg.model_type == "gpt_oss"
    assert cfg.hidden_size % 32 == 0 and cfg.intermediate_size % 32 == 0
    assert cfg.hidden_size <= 128 and cfg.num_local_experts <= 8
    assert cfg.num_experts_per_tok < cfg.num_local_experts

"""Decoded weights are finite or refused by name: NaN/inf FP8 scales, MXFP4 scale byte 0xFF (NaN in
E8M0) and overflowing blocks, NaN in plain stored weights; packed experts check their scales once at
load, never per forward."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_conformance import build_checkpoint
from nexus.checkpoint import CheckpointReader
from nexus.errors import NexusError
from nexus.quant.fp8 import FP8_DTYPE, decode_fp8, quantize_fp8
from nexus.quant.mxfp4 import decode_mxfp4, quantize_mxfp4
from nexus.quant.packed_experts import FP8Matrices, MXFP4Matrices

BAD_SCALE = "model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv"


def _packed(rows: int = 4, cols: int = 64):
    return quantize_mxfp4(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)))


def test_mxfp4_scale_byte_0xff_is_nan_in_e8m0_and_refused_by_name():
    blocks, scales = _packed()
    scales[1, 1] = 0xFF
    with pytest.raises(NexusError, match=r"MXFP4 scales ckpt: layer.w_scales hold 1 byte\(s\) 0xFF.*NaN"):
        decode_mxfp4(blocks, scales, name="ckpt: layer.w")


def test_mxfp4_top_scale_decodes_when_finite_and_is_refused_when_it_overflows():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    scales = torch.full((1, 1), 0xFE, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x3  # 1.5 * 2^127: the largest finite value at that scale
    assert decode_mxfp4(blocks, scales)[0, 0].item() == 1.5 * 2.0**127
    blocks[0, 0, 0] = 0x4  # 2 * 2^127 = 2^128 overflows float32
    with pytest.raises(NexusError, match="MXFP4 tensor ckpt: w_blocks decodes to NaN or infinite"):
        decode_mxfp4(blocks, scales, name="ckpt: w")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp8_non_finite_scale_is_refused_naming_the_scale_tensor(bad):
    q, s = quantize_fp8(torch.randn(130, 64))
    s[1, 0] = bad
    with pytest.raises(NexusError, match=r"FP8 scales ckpt: x.weight_scale_inv hold NaN or infinite"):
        decode_fp8(q, s, name="ckpt: x.weight")


def test_fp8_nan_code_is_refused_naming_the_weight():
    q, s = quantize_fp8(torch.randn(64, 64))
    q = q.view(torch.uint8).clone()
    q[3, 3] = 0x7F  # NaN in e4m3fn
    with pytest.raises(NexusError, match=r"FP8 tensor ckpt: x.weight decodes to NaN"):
        decode_fp8(q.view(FP8_DTYPE), s, name="ckpt: x.weight")


def test_reader_refuses_nan_in_plain_and_mxfp4_weights_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    plain = torch.randn(2, 8, 4)
    plain[1, 0, 0] = float("nan")
    blocks, scales = _packed(8, 64)
    blocks, scales = blocks.unsqueeze(0).repeat(2, 1, 1, 1), scales.unsqueeze(0).repeat(2, 1, 1)
    scales[1, 0, 0] = 0xFF
    save_file({"a.weight": plain[0].clone(), "b.weight": plain, "m.down_proj_blocks": blocks,
               "m.down_proj_scales": scales}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    assert torch.isfinite(reader.read_weight("a.weight")).all()
    assert torch.isfinite(reader.read_expert_matrices("b.weight", [0], transposed=False)).all()
    with pytest.raises(NexusError, match=f"{tmp_path}: b.weight holds NaN or infinite values"):
        reader.read_expert_matrices("b.weight", [1], transposed=False)
    assert torch.isfinite(reader.read_expert_matrices("m.down_proj", [0], transposed=False)).all()
    with pytest.raises(NexusError, match=f"MXFP4 scales {tmp_path}: m.down_proj_scales hold 1 byte"):
        reader.read_expert_matrices("m.down_proj", [1, 0], transposed=False)


def test_packed_matrices_check_their_scales_at_construction_and_not_per_decode():
    blocks, scales = _packed()
    bad = scales.clone()
    bad[0, 0] = 0xFF
    with pytest.raises(NexusError, match="MXFP4 scales L.gate_up_proj_scales hold"):
        MXFP4Matrices(blocks.unsqueeze(0), bad.unsqueeze(0), "L.gate_up_proj")
    packed = MXFP4Matrices(blocks.unsqueeze(0), scales.unsqueeze(0).clone(), "L.gate_up_proj")
    packed.scales[0, 0, 0] = 0xFF  # after load: the per-step decode does not look again
    assert torch.isnan(packed.decode(torch.tensor([0]), torch.float32)).any()

    q, s = quantize_fp8(torch.randn(1, 64, 64))
    nan = s.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(NexusError, match="FP8 scales L.down_proj_scale_inv hold NaN"):
        FP8Matrices(q, nan, (128, 128), "L.down_proj")
    packed = FP8Matrices(q, s, (128, 128), "L.down_proj")
    packed.scale_bits.copy_(nan.view(torch.int32))
    assert torch.isnan(packed.decode(torch.tensor([0]), torch.float32)).any()


@pytest.fixture(scope="module")
def nan_fp8_base(tmp_path_factory):
    """A tiny Qwen3-MoE block-scaled FP8 checkpoint whose expert 3 of layer 0 has a NaN gate scale."""
    from nexus.family import resolve_family

    path = build_checkpoint(resolve_family(name="qwen3_moe"), tmp_path_factory.mktemp("fp8") / "base", fmt="fp8")
    file = path / "model.safetensors"
    tensors = load_file(file)
    tensors[BAD_SCALE] = torch.full_like(tensors[BAD_SCALE], float("nan"))
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def test_convert_refuses_a_nan_fp8_scale_by_name_and_writes_nothing(nan_fp8_base, tmp_path):
    import nexus.engines.convert as conv

    with pytest.raises(NexusError, match=f"{BAD_SCALE} hold NaN or infinite values") as info:
        conv.convert(conv.ConvertConfig(model=nan_fp8_base, output=tmp_path / "adapter", strategy="mean_all"),
                     progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "adapter").exists()


def test_loading_refuses_a_nan_fp8_scale_packed_or_dequantised(nan_fp8_base):
    from nexus.loading import load_model

    with pytest.raises(NexusError, match=f"{BAD_SCALE} hold NaN or infinite values"):
        load_model(nan_fp8_base)
    with pytest.raises(NexusError, match=r"experts\.gate_up_proj \(dequantised\) decodes to NaN or infinite"):
        load_model(nan_fp8_base, dequantize=True)


def test_a_healthy_fp8_base_still_loads_and_converts(nan_fp8_base, tmp_path):
    import nexus.engines.convert as conv
    from nexus.loading import load_model

    healthy = tmp_path / "healthy"
    shutil.copytree(nan_fp8_base, healthy)
    tensors = load_file(healthy / "model.safetensors")
    tensors[BAD_SCALE] = torch.ones_like(tensors[BAD_SCALE])
    save_file(tensors, healthy / "model.safetensors", metadata={"format": "pt"})
    load_model(healthy)
    conv.convert(conv.ConvertConfig(model=healthy, output=tmp_path / "adapter", strategy="mean_all"), progress=False)
    assert torch.isfinite(torch.cat([t.flatten() for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
                                     .values()])).all()

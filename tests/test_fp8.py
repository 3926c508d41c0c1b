"""Block-scaled FP8 (nexus.quant.fp8): bit-exact decoding, refusals by name, and the checkpoint reader's decoding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

from helpers_fp8 import decode_fp8_reference
from nexus.checkpoint import CheckpointReader
from nexus.errors import NexusError
from nexus.quant.fp8 import FP8_DTYPE, block_size, decode_fp8, quantize_fp8


def _random_fp8(shape, seed=0):
    """Random finite e4m3 codes (every exponent and sign) and random positive fp32 block scales."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in e4m3fn
    return codes.view(FP8_DTYPE)


def _scales(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(shape, generator=g) * 4).float()


@pytest.mark.parametrize("rows,cols", [(256, 384), (200, 300), (32, 64), (129, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_is_bit_exact_against_float64_block_recomputation(rows, cols, dtype):
    w = _random_fp8((3, rows, cols))
    s = _scales((3, -(-rows // 128), -(-cols // 128)))
    ours = decode_fp8(w, s, (128, 128), dtype)
    # An e4m3 value (4 significant bits) times an fp32 scale is exact in float64; one rounding to fp32.
    assert torch.equal(ours, decode_fp8_reference(w, s, (128, 128), dtype))


@pytest.mark.parametrize("rows,cols", [(256, 384), (200, 300)])
def test_decode_is_bit_exact_against_transformers_backward_dequantisation(rows, cols):
    w, s = _random_fp8((rows, cols)), _scales((-(-rows // 128), -(-cols // 128)))
    assert torch.equal(decode_fp8(w, s), _dequantize_fp8_weight(w, s, [128, 128], torch.float32))


def test_decode_matches_transformers_load_time_dequantisation_on_whole_blocks():
    w, s = _random_fp8((2, 256, 384)), _scales((2, 2, 3))
    hf = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.float32)
    assert torch.equal(decode_fp8(w, s), hf)


def test_quantize_round_trip_is_close_and_stable():
    w = torch.randn(300, 200) * 0.1
    q, s = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and s.shape == (3, 2)
    d = decode_fp8(q, s)
    assert ((d - w).abs().max() / w.abs().max()) < 0.07  # e4m3: 3 mantissa bits
    q2, s2 = quantize_fp8(d)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)


def test_malformed_scale_tensor_is_refused_by_name():
    w = _random_fp8((256, 384))
    with pytest.raises(NexusError, match=r"weight_scale_inv have shape \[2, 2\], expected \[2, 3\]"):
        decode_fp8(w, _scales((2, 2)))


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size \\[64, 64\\] is not supported"),
    ({"quant_method": "fp8"}, "weight_block_size None is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "format 'e5m2' is not supported"),
])
def test_unsupported_block_size_or_format_is_refused_by_name(qc, match):
    with pytest.raises(NexusError, match=match):
        block_size(qc, "x/config.json")


def _checkpoint(path, tensors: dict, quantization_config: dict | None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    cfg = {"model_type": "qwen3_moe"}
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))
    return CheckpointReader(path)


FP8_QC = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
NAME = "model.layers.0.mlp.experts.0.gate_proj.weight"


def test_reader_decodes_fp8_weights(tmp_path):
    w = torch.randn(200, 64)
    q, s = quantize_fp8(w)
    reader = _checkpoint(tmp_path, {NAME: q, NAME + "_scale_inv": s}, FP8_QC)
    assert torch.equal(reader.read_weight(NAME), decode_fp8(q, s))


def test_reader_decodes_fused_fp8_expert_rows(tmp_path):
    w = torch.randn(4, 64, 32)
    q, s = quantize_fp8(w)
    name = "model.layers.0.mlp.experts.down_proj"
    reader = _checkpoint(tmp_path, {name: q, name + "_scale_inv": s}, FP8_QC)
    assert torch.equal(reader.read_expert_matrices(name, [2, 0], transposed=False), decode_fp8(q, s)[[2, 0]])


@pytest.mark.parametrize("case", ["unknown_method", "unknown_companion", "codes_without_scales",
                                  "scales_without_config", "malformed_scales"])
def test_reader_refuses_what_it_does_not_decode(tmp_path, case):
    q, s = quantize_fp8(torch.randn(64, 64))
    tensors, qc, match = {NAME: q, NAME + "_scale_inv": s}, FP8_QC, None
    if case == "unknown_method":
        tensors, qc, match = {NAME: torch.randn(64, 64)}, {"quant_method": "gptq"}, "quant_method 'gptq'"
    elif case == "unknown_companion":
        tensors, match = {NAME: torch.randn(64, 64), NAME[: -len("weight")] + "weight_scale": s}, "weight_scale that"
    elif case == "codes_without_scales":
        tensors, match = {NAME: q}, "float8_e4m3fn without the scales"
    elif case == "scales_without_config":
        qc, match = None, "no quantization_config with quant_method fp8"
    else:
        tensors, match = {NAME: q, NAME + "_scale_inv": torch.ones(2, 1)}, "gate_proj.weight_scale_inv have shape"
    reader = _checkpoint(tmp_path, tensors, qc)
    with pytest.raises(NexusError, match=match):
        reader.read_weight(NAME)


def test_dequantising_load_of_partial_fp8_blocks_is_refused(tmp_path):
    """transformers' dequantising load infers the block size from the scale grid and mis-decodes a
    partial last block (an attention o_proj [200, 64] by ~5e-3 here): refused, naming the tensor;
    the packed load decodes it exactly."""
    from helpers_conformance import build_checkpoint
    from nexus.family import resolve_family
    from nexus.loading import load_model

    family = resolve_family(name="qwen3_moe")
    config = family.example_config()
    config.hidden_size, config.moe_intermediate_size = 200, 300
    path = build_checkpoint(family, tmp_path / "fp8", config=config, fmt="fp8")
    with pytest.raises(NexusError, match=r"FP8 tensor model\.layers\.\d+\.\S+ \[\d+, \d+\] spans several "
                                         r"128x128 scale blocks, the last one partial.*without --dequantize"):
        load_model(path, dequantize=True)
    assert load_model(path) is not None

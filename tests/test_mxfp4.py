"""MXFP4 decoding and quantisation (nexus.quant.mxfp4) against transformers' reference and float64 brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers.integrations.mxfp4 import FP4_VALUES as HF_FP4_VALUES
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from nexus.checkpoint import CheckpointReader
from nexus.quant.mxfp4 import BLOCK, FP4_VALUES, decode_mxfp4, quantize_mxfp4


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor (so that -0.0 != +0.0 and NaN payloads count)."""
    return t.contiguous().view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _random_packed(experts: int, rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 bytes: every nibble value, scales spread around the bias (2^-20 .. 2^20)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(127 - 20, 127 + 21, (experts, rows, groups), dtype=torch.uint8, generator=g)
    return blocks, scales


def test_lookup_table_matches_transformers():
    assert list(FP4_VALUES) == [float(v) for v in HF_FP4_VALUES]
    # -0.0 must really be negative zero: its sign bit is the code's top bit.
    assert math.copysign(1.0, FP4_VALUES[8]) == -1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_is_bit_exact_against_transformers(dtype):
    blocks, scales = _random_packed(experts=3, rows=40, groups=4)
    ours = decode_mxfp4(blocks, scales, dtype=dtype)  # [E, rows, cols], rows = output features
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, cols, rows] (transposed)
    assert ours.shape == (3, 40, 4 * BLOCK)
    assert ref.shape == (3, 4 * BLOCK, 40)
    assert torch.equal(_bits(ours), _bits(ref.transpose(1, 2)))


def test_decode_every_byte_value_by_hand():
    # One row holding all 256 byte values (8 groups of 16 bytes), scale 2^(130-127) = 8.
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    scales = torch.full((1, 16), 130, dtype=torch.uint8)
    out = decode_mxfp4(blocks, scales).reshape(-1)
    for byte in range(256):
        lo, hi = FP4_VALUES[byte & 0xF] * 8, FP4_VALUES[byte >> 4] * 8
        assert _bits(out[2 * byte : 2 * byte + 1]).item() == _bits(torch.tensor([lo])).item()
        assert _bits(out[2 * byte + 1 : 2 * byte + 2]).item() == _bits(torch.tensor([hi])).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_every_byte_pair_under_every_scale_is_ldexp(dtype):
    """Every byte in both halves of a 16-bit pair (the decode reads two bytes at once) under every
    scale byte, sub- and overflowing ones included, decodes to the bits of ``ldexp(value, scale - 127)``."""
    pairs = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    rows = torch.cat([pairs, pairs.flip(-1)])  # each byte once low and once high in its pair
    blocks = rows.expand(256, -1, -1).reshape(256, 32, 1, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8)[:, None, None].expand(256, 32, 1).contiguous()
    out = decode_mxfp4(blocks, scales, dtype=dtype, check=False)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).reshape(256, 32, 32).long()
    ref = torch.ldexp(torch.tensor(FP4_VALUES, dtype=dtype)[codes], (scales.to(torch.int32) - 127).to(dtype))
    assert torch.equal(_bits(out), _bits(ref))


def test_decode_rejects_mismatched_shapes():
    blocks, scales = _random_packed(1, 4, 2)
    with pytest.raises(ValueError, match="do not match"):
        decode_mxfp4(blocks, scales[..., :1])


def test_checkpoint_experts_bit_exact_against_transformers(gpt_oss_mxfp4_dir):
    """Per-expert streaming decode through the reader == transformers' whole-tensor decode."""
    reader = CheckpointReader(gpt_oss_mxfp4_dir)
    file = gpt_oss_mxfp4_dir / "model.safetensors"
    experts = [5, 0, 7, 2]
    with safe_open(file, framework="pt") as f:
        for layer in range(3):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{proj}"
                ref = convert_moe_packed_tensors(f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales"),
                                                 dtype=torch.float32)  # [E, in, out]
                ours = reader.read_expert_matrices(name, experts, transposed=True)  # [k, out, in]
                assert ours.dtype == torch.float32
                assert torch.equal(_bits(ours), _bits(ref[experts].transpose(1, 2).contiguous()))
                # The same thing through the public per-expert decoder.
                blocks = f.get_slice(f"{name}_blocks")[2:3]
                scales = f.get_slice(f"{name}_scales")[2:3]
                assert torch.equal(_bits(decode_mxfp4(blocks, scales)), _bits(ref[2:3].transpose(1, 2).contiguous()))


def _reference_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 brute force: block exponent floor(log2(amax)) - 2, nearest FP4 value (ties to the
    smaller magnitude), sign kept. Returns (decoded values, scale bytes)."""
    mags = np.array(FP4_VALUES[:8], dtype=np.float64)
    rows, cols = w.shape
    out = np.empty_like(w, dtype=np.float64)
    scale_bytes = np.empty((rows, cols // BLOCK), dtype=np.int64)
    for r in range(rows):
        for g in range(cols // BLOCK):
            x = w[r, g * BLOCK : (g + 1) * BLOCK].astype(np.float64)
            amax = np.abs(x).max()
            e = math.floor(math.log2(amax)) - 2
            scale_bytes[r, g] = e + 127
            idx = np.abs(np.abs(x)[:, None] / 2.0**e - mags[None, :]).argmin(1)
            out[r, g * BLOCK : (g + 1) * BLOCK] = np.copysign(mags[idx] * 2.0**e, x)
    return out, scale_bytes


def test_quantize_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    # Blocks of very different magnitudes, so that the per-block exponent matters.
    w = torch.randn(12, 96, generator=g) * torch.logspace(-6, 3, 12).unsqueeze(1)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (12, 3, 16) and scales.shape == (12, 3)
    ref_values, ref_scales = _reference_quantize(w.numpy())
    assert np.array_equal(scales.numpy().astype(np.int64), ref_scales)
    decoded = decode_mxfp4(blocks, scales, dtype=torch.float32).double().numpy()
    assert np.array_equal(decoded, ref_values)
    # Largest magnitude of every block lands on 4 or 6 (scaled amax in [4, 8), saturating at 6).
    top = np.abs(decoded.reshape(12, 3, BLOCK)).max(-1) / 2.0 ** (ref_scales - 127)
    assert set(np.unique(top)) <= {4.0, 6.0}


def test_quantize_decode_round_trip_is_a_fixed_point():
    """Re-quantising decoded values gives identical bytes (negative zeros included)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 64, 128, generator=g) * 0.05
    w[0, 0, :32] = 0.0  # an all-zero block
    w[0, 1, 1] = -1e-6  # a tiny negative value in a block with a large max rounds to -0
    w[0, 1, 0] = 3.0
    blocks, scales = quantize_mxfp4(w)
    decoded = decode_mxfp4(blocks, scales)
    assert decoded.shape == w.shape
    assert math.copysign(1.0, decoded[0, 1, 1].item()) == -1.0
    assert torch.all(decoded[0, 0, :32] == 0)
    blocks2, scales2 = quantize_mxfp4(decoded)
    assert torch.equal(blocks, blocks2)
    assert torch.equal(scales, scales2)
    assert torch.equal(_bits(decode_mxfp4(blocks2, scales2)), _bits(decoded))
    # Error bound: at most one FP4 step (2 units at the top of the grid) times the block scale.
    step = (2.0 * torch.exp2(scales.float() - 127)).repeat_interleave(BLOCK, -1)
    assert torch.all((decoded - w).abs() <= step)


def test_quantize_rejects_unaligned_width():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(4, 40))

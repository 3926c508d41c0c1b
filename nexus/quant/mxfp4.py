"""MXFP4 (OCP microscaling FP4, E2M1 values with a shared power-of-two scale per 32 values).

Layout of a packed matrix ``W[rows, cols]`` (rows = output features):
``blocks`` uint8 ``[..., rows, cols/32, 16]`` (two values per byte, the low nibble is the even
element) and ``scales`` uint8 ``[..., rows, cols/32]`` (exponent with bias 127).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nexus.errors import NexusError
from nexus.quant import DAMAGED_HINT, check_finite

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
CHUNK_ROWS = 1 << 16
E8M0_NAN = 0xFF  # the scale byte E8M0 reserves for NaN
_E8M0_TOP = 0xFE  # 2^127: a value of magnitude 2 or more overflows float32 (and bfloat16)


def check_mxfp4_scales(blocks: torch.Tensor, scales: torch.Tensor, name: str = "MXFP4 tensor") -> None:
    """Refuse packed MXFP4 that cannot decode to finite values: a scale byte 0xFF (NaN in E8M0),
    or a block at scale 2^127 holding a value of magnitude 2 or more (2^128 overflows float32).

    One comparison over the scales; only blocks at the top scale (none in a sane checkpoint) are decoded.

    :param blocks: uint8 ``Tensor[..., G, 16]``; :param scales: uint8 ``Tensor[..., G]``.
    :param name: the stored stem, for ``{name}_scales`` / ``{name}_blocks`` in the message.
    :raises NexusError: naming the tensor.
    """
    top = scales >= _E8M0_TOP
    if not bool(top.any()):
        return
    nan = int((scales == E8M0_NAN).sum())
    if nan:
        raise NexusError(f"MXFP4 scales {name}_scales hold {nan} byte(s) 0xFF, which E8M0 defines as NaN; "
                         f"{DAMAGED_HINT}")
    check_finite(decode_mxfp4(blocks[top], scales[top], check=False), f"MXFP4 tensor {name}_blocks")


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                 name: str = "MXFP4 tensor", check: bool = True) -> torch.Tensor:
    """Decode packed MXFP4 to floats, keeping the row layout.

    :param blocks: uint8 ``Tensor[..., G, 16]``.
    :param scales: uint8 ``Tensor[..., G]``.
    :param name: the stored stem (``{name}_blocks``/``{name}_scales``), for error messages.
    :param check: refuse scales that do not decode to finite values and a non-finite result
        (:func:`check_mxfp4_scales`); off only where the scales were checked once at load
        (:class:`nexus.quant.packed_experts.MXFP4Matrices`).
    :return: ``Tensor[..., G * 32]`` of ``dtype`` (no transpose: rows stay output features).
    :raises NexusError: with ``check``, a scale byte 0xFF or a value ``dtype`` cannot hold, naming ``name``.
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    if check:
        check_mxfp4_scales(blocks, scales, name)
    pairs, powers = _decode_tables(dtype, blocks.device)
    # Two packed bytes (four values) per table row: one gather per 16 bits, then one multiply by
    # the block's power of two (what torch.ldexp computes, so the values are ldexp's to the bit).
    rows = blocks.contiguous().view(torch.uint16).reshape(-1, blocks.shape[-1] // 2)
    exps = scales.reshape(-1)
    out = torch.empty(rows.shape[0], rows.shape[1] * 4, dtype=dtype, device=blocks.device)
    # Row chunks bound the int32 index temporaries (2 bytes per packed byte) to a few MB.
    for r0 in range(0, rows.shape[0], CHUNK_ROWS):
        sub = out[r0 : r0 + CHUNK_ROWS]
        idx = rows[r0 : r0 + CHUNK_ROWS].to(torch.int32)
        torch.mul(F.embedding(idx, pairs).view(sub.shape), powers[exps[r0 : r0 + CHUNK_ROWS].long(), None], out=sub)
    if check:
        check_finite(out, f"MXFP4 tensor {name}_blocks")  # float16 overflows below 2^127
    return out.reshape(*blocks.shape[:-2], -1)


_TABLES: dict = {}


def _decode_tables(dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairs [65536, 4], powers [256])`` of ``dtype`` on ``device``, built once: the four values of
    two packed bytes read as one little-endian uint16, and ``2 ** (scale byte - 127)``."""
    key = (dtype, torch.device(device))
    if key not in _TABLES:
        lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
        code = torch.arange(65536, device=device)
        pairs = torch.stack([lut[(code >> shift) & 0x0F] for shift in (0, 4, 8, 12)], dim=1)
        powers = torch.pow(2.0, (torch.arange(256, device=device) - 127).to(dtype))
        _TABLES[key] = pairs, powers
    return _TABLES[key]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w[..., cols]`` (cols a multiple of 32) to MXFP4, round to nearest.

    The block exponent is ``floor(log2(amax)) - 2`` so the block's largest magnitude lands in
    [4, 8) and saturates at 6.

    :return: ``(blocks uint8 [..., cols/32, 16], scales uint8 [..., cols/32])``.
    """
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {w.shape[-1]}")
    x = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2, torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    scaled = x / torch.exp2(exp)
    mags = torch.tensor(FP4_VALUES[:8])
    idx = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1)  # nearest magnitude, ties to the smaller
    # signbit, not < 0: a negative value that rounds to zero keeps its sign (code 8 = -0), so
    # decode -> quantise reproduces the bytes exactly.
    codes = (idx | torch.where(torch.signbit(scaled), 8, 0)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


# transformers' MXFP4 quantizer warns, once per process, that it will dequantise (no Triton, no
# `kernels` package, CPU): NEXUS asks for exactly that when it loads through from_pretrained, so
# these lines only alarm users. Other warnings of the quantizer pass.
_FALLBACK_WARNINGS = (
    "MXFP4 quantization requires Triton",
    "MXFP4 quantization requires the `kernels` package",
    "MXFP4 inference on CPU requires use_kernels=True",
    "MXFP4 quantization is only supported on GPUs",
)
_QUANTIZER_LOGGER = "transformers.quantizers.quantizer_mxfp4"


def _not_a_fallback_warning(record) -> bool:
    return not str(record.msg).startswith(_FALLBACK_WARNINGS)


def silence_dequantization_warnings() -> None:
    """Drop transformers' "MXFP4 will be dequantised" warnings (idempotent; other messages pass)."""
    import logging

    logger = logging.getLogger(_QUANTIZER_LOGGER)
    if _not_a_fallback_warning not in logger.filters:
        logger.addFilter(_not_a_fallback_warning)

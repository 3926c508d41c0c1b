"""FP8 e4m3 with block scales (DeepSeek-V3/R1, Qwen3 FP8): the format, its decoder and a writer.

A matrix ``W[rows, cols]`` (rows = output features) is stored as ``weight`` float8_e4m3fn
``[rows, cols]`` plus ``weight_scale_inv`` float32 ``[ceil(rows/b0), ceil(cols/b1)]``, one
multiplier per ``b0 x b1`` block (128 x 128 in every released checkpoint):
``W[r, c] = float(weight[r, c]) * weight_scale_inv[r // b0, c // b1]``. The config says so with
``quantization_config = {quant_method: fp8, fmt: e4m3, weight_block_size: [b0, b1], ...}``.
"""

from __future__ import annotations

import math

import torch

from nexus.errors import NexusError
from nexus.quant import check_finite

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn magnitude
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv; X.gate_up_proj -> X.gate_up_proj_scale_inv
SUPPORTED_BLOCKS = ((128, 128),)


def block_size(quantization_config: dict | None, where: str = "config.json") -> tuple[int, int]:
    """The ``weight_block_size`` of an FP8 ``quantization_config``, validated.

    :raises NexusError: not e4m3, no block size (per-tensor scales), or a block size this reader does not decode.
    """
    qc = quantization_config or {}
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise NexusError(f"{where}: FP8 format {fmt!r} is not supported (only e4m3); dequantise the checkpoint first")
    size = qc.get("weight_block_size")
    if size is None or tuple(int(s) for s in size) not in SUPPORTED_BLOCKS:
        raise NexusError(
            f"{where}: FP8 weight_block_size {size!r} is not supported; NEXUS decodes "
            f"{' or '.join(f'{a}x{b}' for a, b in SUPPORTED_BLOCKS)} block scales only"
        )
    return int(size[0]), int(size[1])


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid of a ``[rows, cols]`` matrix: ``(ceil(rows/b0), ceil(cols/b1))``."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def check_scales(weight_shape, scale_shape_, block: tuple[int, int], name: str = "weight") -> None:
    """Refuse a scale tensor whose shape does not tile ``weight_shape`` with ``block``.

    :param weight_shape: ``(..., rows, cols)``; :param scale_shape_: ``(..., R, C)``.
    :raises NexusError: naming ``name`` and both shapes.
    """
    weight_shape, scale_shape_ = tuple(weight_shape), tuple(scale_shape_)
    want = (*weight_shape[:-2], *scale_shape(weight_shape[-2], weight_shape[-1], block))
    if len(weight_shape) < 2 or scale_shape_ != want:
        raise NexusError(
            f"FP8 tensor {name} has shape {list(weight_shape)} but its scales {name}{SCALE_SUFFIX} have shape "
            f"{list(scale_shape_)}, expected {list(want)} for {block[0]}x{block[1]} blocks: the checkpoint is malformed"
        )


def check_finite_scales(scale_inv: torch.Tensor, name: str = "weight") -> None:
    """Refuse a scale grid holding NaN or infinite values (one ``isfinite`` over the small grid).

    :param name: the weight's name; the message names ``{name}_scale_inv``.
    :raises NexusError: naming the scale tensor.
    """
    check_finite(scale_inv, f"FP8 scales {name}{SCALE_SUFFIX}", "hold")


def decode_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
    name: str = "weight",
    check: bool = True,
) -> torch.Tensor:
    """Decode block-scaled FP8 to floats, keeping the layout.

    The product is computed in fp32 (exact: an e4m3 value times an fp32 scale rounds once) and
    then cast to ``dtype``, as transformers' dequantisation does.

    :param weight: float8_e4m3fn (or its raw uint8 bytes) ``Tensor[..., rows, cols]``.
    :param scale_inv: float32 ``Tensor[..., ceil(rows/b0), ceil(cols/b1)]``.
    :param name: the tensor's name, for the error message.
    :param check: refuse non-finite scales and a non-finite result (NaN codes, overflow); off only
        where the scales were checked once at load (:class:`nexus.quant.packed_experts.FP8Matrices`).
    :return: ``Tensor[..., rows, cols]`` of ``dtype``.
    :raises NexusError: the scale grid does not match the weight; with ``check``, NaN or infinite
        scales (naming ``{name}_scale_inv``) or decoded values (naming ``name``).
    """
    if weight.dtype == torch.uint8:
        weight = weight.view(FP8_DTYPE)
    check_scales(weight.shape, scale_inv.shape, block, name)
    if check:
        check_finite_scales(scale_inv, name)
    rows, cols = weight.shape[-2:]
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    out = w.mul_(s).to(dtype)
    if check:
        check_finite(out, f"FP8 tensor {name}")
    return out


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w[..., rows, cols]`` to block-scaled FP8 e4m3 (scale = block amax / 448).

    :return: ``(weight float8_e4m3fn [..., rows, cols], weight_scale_inv float32 [..., R, C])``.
    """
    x = w.detach().float()
    rows, cols = x.shape[-2:]
    R, C = scale_shape(rows, cols, block)
    padded = x.new_zeros(*x.shape[:-2], R * block[0], C * block[1])
    padded[..., :rows, :cols] = x
    tiles = padded.unflatten(-1, (C, block[1])).unflatten(-3, (R, block[0]))  # [..., R, b0, C, b1]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous()
    return q, scale.contiguous()

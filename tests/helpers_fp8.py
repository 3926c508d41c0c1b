"""A block-scaled FP8 reference decoder for the tests, written block by block in float64 (independent of
:func:`nexus.quant.fp8.decode_fp8`)."""

from __future__ import annotations

import torch


def decode_fp8_reference(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W[..., r, c] = weight[..., r, c] * scale_inv[..., r // b0, c // b1]``, one block at a time.

    An e4m3 value (4 significant bits) times an fp32 scale is exact in float64, so the result has
    exactly one rounding, to ``dtype``.

    :param weight: float8_e4m3fn ``Tensor[..., rows, cols]``.
    :param scale_inv: ``Tensor[..., ceil(rows/b0), ceil(cols/b1)]``.
    :return: ``Tensor[..., rows, cols]`` of ``dtype``.
    """
    w64, s64 = weight.to(torch.float64), scale_inv.to(torch.float64)
    rows, cols = weight.shape[-2:]
    out = torch.empty(w64.shape, dtype=torch.float64)
    b0, b1 = block
    for r in range(0, rows, b0):
        for c in range(0, cols, b1):
            out[..., r : r + b0, c : c + b1] = w64[..., r : r + b0, c : c + b1] * s64[..., r // b0, c // b1, None, None]
    return out.float().to(dtype)

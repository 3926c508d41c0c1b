"""Tolerances derived from the number format, not from one machine's result.

Two computations that differ only in bf16 rounding (bf16 weights with fp32 masters against fp32
weights under bf16 autocast, another kernel, another summation order) agree only up to that
rounding, and which kernels run (so in which order they sum) depends on the CPU's instruction
set (AVX2, AVX-512, AMX). A tolerance read off one machine's result fails on the next; one that follows
from bf16's unit roundoff holds on every machine and still fails a real bug, which moves results
by a large factor (a loss scaled by the accumulation steps is off by 50% or more).
"""

from __future__ import annotations

import torch

# Unit roundoff of bfloat16 (8 significant bits): one rounding moves a value by at most this,
# relative. torch.finfo gives the spacing at 1, twice the roundoff.
BF16_UNIT_ROUNDOFF = torch.finfo(torch.bfloat16).eps / 2  # 2**-8 = 3.9e-3


def bf16_rtol(steps: int = 0) -> float:
    """Relative tolerance between a value computed with bf16 rounding and its counterpart computed
    with other rounding (fp32, or bf16 in another order), after ``steps`` optimizer steps.

    The value's own bf16 computation contributes one unit roundoff; each earlier optimizer step
    whose bf16 gradients or weights differed between the two runs adds at most one more (the runs
    drift apart by one rounding per update), so ``(steps + 1) * 2**-8``: 3.9e-3 for a first
    forward, 1.6e-2 after three updates.

    :param steps: optimizer steps taken before the compared value (0 for a loss of step 1).
    """
    return (steps + 1) * BF16_UNIT_ROUNDOFF

"""GPT-OSS's clamped SwiGLU, with alpha and limit read from the config."""

from __future__ import annotations

import torch


class ClampedSwiGLU:
    """``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``.

    Matches ``GptOssExperts._apply_gate`` applied to already de-interleaved gate/up.

    :param alpha: ``config.swiglu_alpha`` (1.702 in the released models).
    :param limit: ``config.swiglu_limit`` (7.0).
    """

    def __init__(self, alpha: float, limit: float):
        self.alpha = alpha
        self.limit = limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        # Same operation order as GptOssExperts._apply_gate, so results are bit-identical.
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu

    def describe(self) -> dict:
        """This activation as data (what ``nexus export --remote-code`` writes into the config)."""
        return {"kind": "clamped_swiglu", "alpha": self.alpha, "limit": self.limit}

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"

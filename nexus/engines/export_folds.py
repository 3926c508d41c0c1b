"""The tensor work of ``nexus export``: a trained shared expert written into the base's own tensors.

Two exact folds (the family declares which one applies, :class:`nexus.spec.ExportSpec`):

- **slot**: the block has an ungated shared-expert MLP; two SwiGLU MLPs side by side are the
  sum of their outputs, so the NEXUS units are concatenated to it along the intermediate
  dimension (gate/up rows, down columns).
- **routed**: the routing weights of each token sum to ``c``; appending the NEXUS units, down
  projection scaled by ``1/c``, to every routed expert gives
  ``sum_k w_k (E_k(x) + S(x)/c) = sum_k w_k E_k(x) + S(x)``. The down bias of each routed expert
  is added once per selected expert, weighted by ``w_k``, so the shared down bias is folded as
  ``b/c`` too. MXFP4 experts keep every original block byte-identical: new units are new rows of
  ``gate_up`` and new 32-wide block columns of ``down``.

A ``scalar`` gate multiplies the whole shared output, so it is folded into the down projection
(weight and bias); ``none`` is a factor of 1. Units are padded with zero units (zero weights and
biases contribute exactly 0 through any gated activation with ``act(0) * up = 0`` or GPT-OSS's
``(up + 1) * 0``) where a width must be a multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus.constants import SHARED_MODULE_NAME, SHARED_SCALE_NAME
from nexus.errors import NexusError
from nexus.quant.mxfp4 import BLOCK, decode_mxfp4, quantize_mxfp4


@dataclass
class SharedUnits:
    """One block's shared expert, ready to fold: gate/up ``Tensor[N, H]``, down ``Tensor[H, N]``
    (already multiplied by the gate scalar and ``1/c``), biases ``Tensor[N]``/``Tensor[H]`` or None;
    ``N`` includes the zero padding units.

    Attributes:
        trained: the adapter's width before padding.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    trained: int

    @property
    def units(self) -> int:
        return self.gate.shape[0]


def gate_factor(tensors: dict[str, torch.Tensor], block_path: str, gate_mode: str) -> float:
    """The constant the block's shared output is multiplied by: 1 (``none``) or the trained scalar.

    :raises NexusError: a ``token`` gate (input-dependent: no exact fold).
    """
    if gate_mode == "none":
        return 1.0
    if gate_mode == "scalar":
        return float(tensors[f"{block_path}.{SHARED_SCALE_NAME}.weight"].reshape(-1)[0])
    raise NexusError(f"gate mode {gate_mode!r} has no exact fold")


def shared_units(tensors: dict[str, torch.Tensor], block_path: str, factor: float, multiple: int = 1,
                 min_units: int = 0) -> SharedUnits:
    """The block's shared expert from the adapter's tensors, down scaled by ``factor``, padded with
    zero units to a multiple of ``multiple`` (and at least ``min_units``), fp32.

    :raises NexusError: the adapter's shared expert is not a gate/up/down MLP.
    """
    prefix = f"{block_path}.{SHARED_MODULE_NAME}."
    try:
        gate, up, down = (tensors[f"{prefix}{p}_proj.weight"].float() for p in ("gate", "up", "down"))
    except KeyError as exc:
        raise NexusError(f"the adapter's shared expert of {block_path} has no {exc.args[0]}: only gate/up/down "
                         f"MLPs fold into a checkpoint; export it with --remote-code") from None
    gb, ub, db = (tensors.get(f"{prefix}{p}_proj.bias") for p in ("gate", "up", "down"))
    n = gate.shape[0]
    width = max(-(-n // multiple) * multiple, min_units)
    pad = width - n

    def rows(t):
        return None if t is None else torch.cat([t.float(), t.new_zeros((pad, *t.shape[1:])).float()])

    down = torch.cat([down, down.new_zeros(down.shape[0], pad)], 1) * factor
    return SharedUnits(rows(gate), rows(up), down, rows(gb), rows(ub),
                       None if db is None else db.float() * factor, trained=n)


# -------------------------------------------------------------------------
# Appending units to stored tensors
# -------------------------------------------------------------------------


def _expand(t: torch.Tensor, experts: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(experts, *t.shape)


def append_gate_up_rows(rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Append units to fused gate/up rows ``Tensor[E, 2I, ...]`` (``[gate; up]`` or interleaved
    ``g0 u0 g1 u1 ...``); ``gate``/``up`` are ``Tensor[N, ...]``. :return: ``Tensor[E, 2(I+N), ...]``."""
    e = rows.shape[0]
    gate, up = _expand(gate.to(rows.dtype), e), _expand(up.to(rows.dtype), e)
    if interleaved:
        new = torch.stack([gate, up], dim=2).reshape(e, 2 * gate.shape[1], *gate.shape[2:])
        return torch.cat([rows, new], 1)
    half = rows.shape[1] // 2
    return torch.cat([rows[:, :half], gate, rows[:, half:], up], 1)


def append_rows(rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``Tensor[E, I, ...]`` + the same ``Tensor[N, ...]`` for every expert -> ``Tensor[E, I+N, ...]``."""
    return torch.cat([rows, _expand(new.to(rows.dtype), rows.shape[0])], 1)


def append_columns(down: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``Tensor[E, H, I, ...]`` + ``Tensor[H, N, ...]`` for every expert -> ``Tensor[E, H, I+N, ...]``."""
    return torch.cat([down, _expand(new.to(down.dtype), down.shape[0])], 2)


def to_rows(t: torch.Tensor, transposed: bool, flat: bool, experts: int) -> torch.Tensor:
    """A stored expert tensor in ``[E, out, in]`` (``nn.Linear``) form."""
    if flat:
        t = t.reshape(experts, -1, t.shape[-1])
    return t.transpose(1, 2) if transposed else t


def from_rows(t: torch.Tensor, transposed: bool, flat: bool) -> torch.Tensor:
    """Inverse of :func:`to_rows`."""
    if transposed:
        t = t.transpose(1, 2)
    t = t.contiguous()
    return t.reshape(-1, t.shape[-1]) if flat else t


@dataclass
class QuantizedUnits:
    """The shared units MXFP4-packed once (they are the same for every expert).

    Attributes:
        gate_up: ``(blocks [2N or N, H/32, 16], scales [.., H/32])`` rows in the stored order.
        down: ``(blocks [H, N/32, 16], scales [H, N/32])``.
        rel_error: ``||dequant(quant(W)) - W|| / ||W||`` over the three matrices.
    """

    gate: tuple[torch.Tensor, torch.Tensor]
    up: tuple[torch.Tensor, torch.Tensor]
    down: tuple[torch.Tensor, torch.Tensor]
    rel_error: float


def quantize_units(units: SharedUnits) -> QuantizedUnits:
    """MXFP4-pack ``units`` (rows = output features, as stored). :raises NexusError: H not a multiple of 32."""
    if units.gate.shape[1] % BLOCK or units.units % BLOCK:
        raise NexusError(f"MXFP4 needs widths that are multiples of {BLOCK}; export with --dequantize")
    packed = {n: quantize_mxfp4(getattr(units, n)) for n in ("gate", "up", "down")}
    err = sum(float((decode_mxfp4(*packed[n]) - getattr(units, n)).pow(2).sum()) for n in packed)
    ref = sum(float(getattr(units, n).pow(2).sum()) for n in packed)
    return QuantizedUnits(packed["gate"], packed["up"], packed["down"], (err / ref) ** 0.5 if ref else 0.0)

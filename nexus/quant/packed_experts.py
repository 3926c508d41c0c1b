"""Frozen routed experts kept as stored (MXFP4 or block-scaled FP8), decoded per step on demand.

:class:`PackedExperts` replaces a family's experts module (the one its MoE block calls as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``). It holds
the checkpoint's bytes as buffers and, per forward, decodes only the experts that received
tokens, a chunk of experts at a time, in the compute dtype. Backward re-decodes and returns
gradients for the hidden states and the routing weights only: by default nothing decoded outlives
the chunk that uses it, and the autograd graph keeps just the layer's inputs. A decode budget
shared by the model's layers (:func:`set_reuse_bytes`, ``--packed-cache-bytes``) lets a forward
that records a graph keep its layer's decoded experts for the backward instead, when they fit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nexus.errors import NexusError
from nexus.quant.fp8 import check_finite_scales, decode_fp8
from nexus.quant.mxfp4 import check_mxfp4_scales, decode_mxfp4

DEFAULT_DECODE_BYTES = 64 * 2**20  # decoded weights alive at once, per layer (at least one expert)


@dataclasses.dataclass
class ReuseBudget:
    """Bytes of decoded experts that forwards may keep for their backward, shared by a model's layers.

    :ivar limit: the budget; 0 keeps nothing (every backward decodes again).
    :ivar held: bytes kept now (reserved by a forward, released when its backward or graph is done).
    :ivar peak: most bytes kept at once.
    """

    limit: int = 0
    held: int = 0
    peak: int = 0

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` from the budget if they fit."""
        if nbytes <= 0 or self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        return True


class _Kept:
    """A layer's decoded chunks kept from forward to backward; gives its bytes back to the budget once
    dropped (after the backward, or with an autograd graph whose backward never runs)."""

    def __init__(self, budget: ReuseBudget, nbytes: int):
        self.budget, self.nbytes, self.chunks = budget, nbytes, []

    def release(self) -> None:
        self.chunks = []
        self.budget.held -= self.nbytes
        self.nbytes = 0

    def __del__(self):
        self.release()


class PackedMatrices(nn.Module):
    """``E`` matrices ``[out, in]`` (``nn.Linear`` layout) kept in a packed format.

    Subclasses hold the bytes as integer buffers, so ``model.to(dtype)`` never converts them.
    """

    fmt = ""
    streamed = False  # bytes kept in host memory by nexus.quant.streaming: ``.to(device)`` leaves them

    def _apply(self, fn, recurse=True):
        return self if self.streamed else super()._apply(fn, recurse)

    def decode(self, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Decode some experts' matrices.

        :param experts: ``LongTensor[n]`` expert ids.
        :return: ``Tensor[n, out, in]`` of ``dtype`` on the buffers' device.
        """
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(E, out, in)`` of the decoded matrices."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes held (the checkpoint's bytes for these matrices)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class MXFP4Matrices(PackedMatrices):
    """MXFP4: ``blocks`` uint8 ``[E, out, in/32, 16]`` and ``scales`` uint8 ``[E, out, in/32]``.

    The scales are checked once here (:func:`nexus.quant.mxfp4.check_mxfp4_scales`, naming
    ``name``), so the per-step decode skips the check.
    """

    fmt = "mxfp4"

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, name: str = "MXFP4 tensor"):
        super().__init__()
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales "
                             f"{tuple(scales.shape)} {scales.dtype}")
        check_mxfp4_scales(blocks, scales, name)
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @property
    def shape(self):
        E, out, groups, _ = self.blocks.shape
        return E, out, groups * 32

    def decode(self, experts, dtype):
        return decode_mxfp4(self.blocks[experts], self.scales[experts], dtype=dtype, check=False)


class FP8Matrices(PackedMatrices):
    """FP8 e4m3: ``weight`` ``[E, out, in]`` and ``weight_scale_inv`` float32 ``[E, ceil(out/b0), ceil(in/b1)]``.

    Both are kept as raw bits (uint8 / int32 views) so dtype casts of the model leave them alone.
    The scales are checked once here (finite, naming ``name``), so the per-step decode skips the check.
    """

    fmt = "fp8"

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight"):
        super().__init__()
        check_finite_scales(scale_inv, name)
        if weight.dtype != torch.uint8:
            weight = weight.view(torch.uint8)
        self.block = tuple(block)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scale_bits", scale_inv.to(torch.float32).view(torch.int32), persistent=False)

    @property
    def shape(self):
        return tuple(self.weight.shape)

    def decode(self, experts, dtype):
        return decode_fp8(self.weight[experts], self.scale_bits[experts].view(torch.float32), self.block, dtype,
                          check=False)


class PackedExperts(nn.Module):
    """Drop-in frozen experts module computing ``sum_k w_k * down(act(gate(x), up(x)))`` from packed weights.

    :param down: the down projections, ``(E, H, I)``.
    :param gate_up: fused gate/up projections ``(E, 2I, H)`` (``interleaved`` or ``[gate; up]``), or
    :param gate, up: separate ``(E, I, H)`` projections (per-expert checkpoints).
    :param activation: the family's ``(gate, up) -> h`` (:meth:`nexus.family.Family.activation`).
    :param gate_up_bias: ``Tensor[E, 2I]`` laid out like ``gate_up`` (or ``[gate; up]``), or None.
    :param down_bias: ``Tensor[E, H]`` or None.
    :param interleaved: gate and up rows alternate in ``gate_up`` (GPT-OSS).
    :param transposed: the family's own module computes ``x @ W + b`` with ``W`` laid out
        ``(in, out)`` (GPT-OSS).
    :param exact_layout: with ``transposed``, copy decoded weights into that layout so that results
        are bit-identical to the dequantised model's. The copy is a strided transpose that costs
        about as much as the decode on CPU, so by default (None: the class attribute, False) the
        experts multiply by the transposed view instead; results then differ from the dequantised
        model's by fp32 rounding (~4e-7 relative in fp32).
    :param decode_bytes: budget of decoded weights alive at once; experts are decoded in chunks under it.
    """

    streamer = None  # a nexus.quant.streaming.ExpertStreamer when the bytes stay in host memory
    exact_layout = False
    reuse = ReuseBudget()  # replaced by a model's own budget by set_reuse_bytes; this one keeps nothing

    def __init__(
        self,
        down: PackedMatrices,
        activation: Callable,
        gate_up: PackedMatrices | None = None,
        gate: PackedMatrices | None = None,
        up: PackedMatrices | None = None,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
        interleaved: bool = False,
        transposed: bool = False,
        exact_layout: bool | None = None,
        decode_bytes: int = DEFAULT_DECODE_BYTES,
    ):
        super().__init__()
        if (gate_up is None) == (gate is None or up is None):
            raise ValueError("PackedExperts needs either gate_up or both gate and up")
        self.gate_up, self.gate, self.up, self.down = gate_up, gate, up, down
        self.activation = activation
        self.interleaved, self.transposed = interleaved, transposed
        if exact_layout is not None:
            self.exact_layout = exact_layout
        self.decode_bytes = decode_bytes
        self.num_experts, self.hidden_size, self.intermediate_size = down.shape
        if gate_up_bias is not None:
            self.register_buffer("gate_up_bias", gate_up_bias, persistent=False)
            self.register_buffer("down_bias", down_bias, persistent=False)
        else:
            self.gate_up_bias = self.down_bias = None
        # Experts decoded so far (forward and backward), for tests and diagnostics.
        self.decoded = collections.Counter()

    @property
    def fmt(self) -> str:
        return self.down.fmt

    def stored_bytes(self) -> int:
        """Bytes of packed expert weights held (biases excluded)."""
        return sum(m.stored_bytes() for m in (self.gate_up, self.gate, self.up, self.down) if m is not None)

    def extra_repr(self) -> str:
        return (f"fmt={self.fmt}, num_experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, stored_bytes={self.stored_bytes()}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Route ``hidden_states[T, H]`` through experts ``top_k_index[T, k]`` weighted by ``top_k_weights[T, k]``.

        :return: ``Tensor[T, H]`` in ``hidden_states``' dtype.
        """
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad)
        with self._bytes_on(hidden_states.device, needs_grad=needs_grad):
            return _PackedExpertsFunction.apply(hidden_states, top_k_weights, top_k_index, self, needs_grad)

    def _bytes_on(self, device, needs_grad: bool = False, backward: bool = False):
        """Context in which the packed bytes are on ``device`` (streamed there when kept in host memory)."""
        if self.streamer is None:
            return contextlib.nullcontext()
        return self.streamer.on_device(self, device, needs_grad=needs_grad, backward=backward)

    # -- the pieces the autograd function runs --------------------------------

    def _groups(self, top_k_index: torch.Tensor):
        """Per hit expert ``(expert, token ids, top-k slots)``, experts ascending (ids >= E are skipped)."""
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        groups, start = [], 0
        for e, n in enumerate(counts):
            if n:
                sel = order[start : start + n]
                groups.append((e, sel // k, sel % k))
            start += n
        return groups

    def _expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's decoded matrices in ``dtype``."""
        return 3 * self.hidden_size * self.intermediate_size * torch.finfo(dtype).bits // 8

    def _chunks(self, groups, dtype: torch.dtype):
        """``groups`` split so that each chunk's decoded weights fit :attr:`decode_bytes`."""
        n = max(1, self.decode_bytes // max(self._expert_bytes(dtype), 1))
        return [groups[i : i + n] for i in range(0, len(groups), n)]

    def _decode(self, experts: list[int], dtype: torch.dtype, device):
        """Decoded ``(gate_up [n, 2I, H], down [n, H, I])`` of ``experts``."""
        self.decoded.update(experts)
        idx = torch.tensor(experts, dtype=torch.long, device=device)
        if self.gate_up is not None:
            gate_up = self.gate_up.decode(idx, dtype)
        else:
            gate_up = torch.cat([self.gate.decode(idx, dtype), self.up.decode(idx, dtype)], dim=1)
        down = self.down.decode(idx, dtype)
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            if self.exact_layout:
                gate_up, down = gate_up.contiguous(), down.contiguous()
        return gate_up, down

    def _expert(self, x: torch.Tensor, e: int, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens ``x[n, H]`` with decoded weights: ``Tensor[n, H]``."""
        h = self._linear(x, gate_up, self.gate_up_bias, e)
        if self.interleaved:
            g, u = h[..., 0::2], h[..., 1::2]
        else:
            g, u = h.chunk(2, dim=-1)
        return self._linear(self.activation(g, u), down, self.down_bias, e)

    def _linear(self, x, w, bias, e):
        if self.transposed:
            y = x @ w
            return y if bias is None else y + bias[e]
        return F.linear(x, w, None if bias is None else bias[e].to(x.dtype))


class _PackedExpertsFunction(torch.autograd.Function):
    """Forward and backward of :class:`PackedExperts`; saves only its inputs and re-decodes in backward,
    unless the module's :class:`ReuseBudget` lets a forward that records a graph keep its decoded chunks."""

    @staticmethod
    def forward(ctx, hidden, weights, index, module: PackedExperts, needs_grad: bool):
        kind = hidden.device.type
        # Backward recomputes under the same autocast state as this forward.
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        out = torch.zeros_like(hidden)
        groups = module._groups(index)
        kept = None
        if needs_grad:  # a no-grad pass (a teacher) has no backward to keep anything for
            nbytes = len(groups) * module._expert_bytes(hidden.dtype)
            if module.reuse.reserve(nbytes):
                kept = _Kept(module.reuse, nbytes)
        for chunk in module._chunks(groups, hidden.dtype):
            gate_up, down = module._decode([g[0] for g in chunk], hidden.dtype, hidden.device)
            if kept is not None:
                kept.chunks.append((gate_up, down))
            for j, (e, tok, pos) in enumerate(chunk):
                y = module._expert(hidden[tok], e, gate_up[j], down[j])
                out.index_add_(0, tok, (y * weights[tok, pos, None]).to(hidden.dtype))
        ctx.module, ctx.kept = module, kept
        ctx.save_for_backward(hidden, weights, index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weights, index = ctx.saved_tensors
        module: PackedExperts = ctx.module
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(hidden) if need_x else None
        grad_w = torch.zeros_like(weights) if need_w else None
        kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph) decodes again
        if not (need_x or need_w):
            return None, None, None, None, None
        kind, enabled, amp_dtype = ctx.autocast
        with module._bytes_on(hidden.device, backward=True):
            for c, chunk in enumerate(module._chunks(module._groups(index), hidden.dtype)):
                if kept is not None:
                    gate_up, down = kept.chunks[c]
                    kept.chunks[c] = None  # each chunk freed once its gradients are computed
                else:
                    gate_up, down = module._decode([g[0] for g in chunk], hidden.dtype, hidden.device)
                for j, (e, tok, pos) in enumerate(chunk):
                    go = grad_out[tok]
                    w = weights[tok, pos, None]
                    with torch.enable_grad(), torch.autocast(kind, dtype=amp_dtype, enabled=enabled):
                        x = hidden[tok].detach().requires_grad_(need_x)
                        y = module._expert(x, e, gate_up[j], down[j])
                    dt = torch.promote_types(y.dtype, weights.dtype)  # the dtype autograd of ``y * w`` works in
                    if need_w:
                        grad_w[tok, pos] = (go.to(dt) * y.detach().to(dt)).sum(-1).to(grad_w.dtype)
                    if need_x:
                        (gx,) = torch.autograd.grad(y, x, (go.to(dt) * w.to(dt)).to(y.dtype))
                        grad_x.index_add_(0, tok, gx.to(grad_x.dtype))
                del gate_up, down
        if kept is not None:
            kept.release()
        return grad_x, grad_w, None, None, None


def set_reuse_bytes(model: nn.Module, nbytes: int) -> ReuseBudget | None:
    """Let the packed experts of ``model`` keep up to ``nbytes`` of decoded weights from a forward that
    records a graph to its backward (``--packed-cache-bytes``), so that backward does not decode again.

    The budget is shared by the model's layers: a layer keeps all of its decoded experts (the hit ones,
    ``3 * H * I`` values each in the compute dtype) if they fit what earlier layers left, else none
    (it decodes again in backward, chunk by chunk, as with 0). Results are bit-identical either way.

    :return: the model's budget, or None when ``model`` holds no packed experts.
    :raises NexusError: a negative ``nbytes``.
    """
    if nbytes < 0:
        raise NexusError(f"packed_cache_bytes (--packed-cache-bytes) must be 0 or more, got {nbytes}")
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    if not modules:
        return None
    budget = ReuseBudget(limit=int(nbytes))
    for m in modules:
        m.reuse = budget
    return budget

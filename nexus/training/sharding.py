"""Whole tensors from sharded parameters, and back.

Under FSDP2 (accelerate's ``fsdp_version: 2``) every parameter is a ``DTensor`` of which each
process holds one shard; under DeepSpeed ZeRO-1/2 a trainable parameter's fp32 master copy is
partitioned (:mod:`nexus.training.zero`). Saving an adapter, checkpointing the SFA anchor and
restoring trained base weights for the self-teacher need whole tensors; these helpers give them
for both and are the identity for ordinary tensors (one process, DDP), so callers have one code
path.

Gathering is a collective: every process must call :func:`gather_full` with the same names in
the same order, even those that will not write anything.
"""

from __future__ import annotations

import torch

from nexus.training import zero


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded FSDP2 parameter or its gradient/state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole detached tensor behind ``t`` (all-gathered when sharded: a collective). For a
    ZeRO parameter, DeepSpeed's fp32 master copy rather than the module's (possibly bf16) weight."""
    if zero.is_zero_param(t):  # before detach(), which drops DeepSpeed's attributes
        return zero.read_full(t)
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def gather_full(named: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``name -> whole tensor`` on ``device`` for every entry of ``named``, in its order.

    :param named: ``name -> Tensor`` (parameters, DTensor shards or ordinary tensors of any shape).
    :return: new tensors that share no storage with the parameters.
    """
    return {name: full_tensor(t).to(device, copy=True) for name, t in named.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this process's shard when ``like`` is a DTensor, else ``full``
    itself on ``like``'s device and dtype. No communication: every process holds ``full``.

    :param full: the whole tensor, of ``like``'s global shape.
    """
    full = full.to(device=like.device, dtype=like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def to_float(value) -> float:
    """A Python float from a scalar tensor, DTensor (e.g. a gradient norm under FSDP2) or number."""
    if isinstance(value, torch.Tensor):
        return float(full_tensor(value))
    return float(value)

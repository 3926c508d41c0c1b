"""The parallelism strategies ``nexus train`` runs under (DDP, FSDP2, ZeRO), behind one small interface.

- :class:`Replicated`: one process, or DDP (every process holds the whole model);
- :class:`FSDP2`: accelerate's ``fsdp_version: 2``; every parameter, frozen or trainable, is a
  ``DTensor`` shard and each decoder layer is gathered for its own forward and backward;
- :class:`ZeRO`: DeepSpeed ZeRO-1/2 (:mod:`nexus.training.zero`); the base is replicated, the
  trainable parameters' fp32 master copies and optimizer state are partitioned.

The training loop calls the same methods whatever the strategy: :meth:`~Replicated.prepare` once,
then per optimizer step :meth:`~Replicated.accumulating` and :meth:`~Replicated.backward` for each
micro-batch and :meth:`~Replicated.step`; :meth:`~Replicated.optimizer_state` /
:meth:`~Replicated.load_optimizer_state` for checkpoints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from nexus.training import zero
from nexus.training.sharding import shard_like, to_float
from nexus.errors import NexusError

# Distributed types that own the model's layout in ways the checkpoints cannot read.
UNSUPPORTED = ("MEGATRON_LM",)


class Replicated:
    """One process or DDP: gradients are averaged over processes on the last backward of a window.

    :param accelerator: the run's ``accelerate.Accelerator``.
    :param max_grad_norm: clip the global gradient norm to this (0: no clipping).
    """

    kind = "ddp"
    # FSDP2 swaps the optimizer's parameters for the shards in place and DeepSpeed wraps the
    # optimizer, so both prepare it with the model (parameters taken before are stale after).
    prepares_optimizer = False

    def __init__(self, accelerator, max_grad_norm: float):
        self.accelerator, self.max_grad_norm = accelerator, max_grad_norm
        self.model = self.optimizer = self.student = None

    @property
    def load_device(self):
        """Where to load the base before :meth:`prepare`."""
        return self.accelerator.device

    def prepare(self, model, optimizer, base_originals: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Wrap ``model`` for the strategy (the wrapped model is ``self.student``).

        :param base_originals: ``name -> whole tensor`` of base weights the self-teacher swaps back.
        :return: ``(trainable name -> parameter, base_originals laid out like the parameters)``,
            read after wrapping (an engine may replace the parameters).
        """
        self.model, self.optimizer = model, optimizer
        self.student = self._wrap(model, optimizer)
        params = dict(model.named_parameters())
        trainable = {n: p for n, p in params.items() if p.requires_grad}
        return trainable, {n: shard_like(t, params[n]) for n, t in base_originals.items()}

    def _wrap(self, model, optimizer):
        if not self.prepares_optimizer:
            return self.accelerator.prepare_model(model)
        student, _ = self.accelerator.prepare(model, optimizer)
        return student

    def accumulating(self, last: bool):
        """Context for a micro-batch's backward: DDP's ``no_sync`` except on the window's last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.student)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss`` (already normalised; the engine must not rescale it)."""
        self.accelerator.backward(loss)

    def step(self, params: list[torch.nn.Parameter], check: Callable[..., None]) -> float:
        """Clip, call ``check(grad_norm)`` (which may raise to stop before the update), step, zero grads.

        :return: the global gradient norm before clipping.
        """
        if self.max_grad_norm > 0:
            norm = to_float(self.accelerator.clip_grad_norm_(params, self.max_grad_norm))
        else:
            norm = to_float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        check(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state(self, run_dir: Path, step: int) -> tuple[dict | None, Path | None]:
        """The optimizer state for a checkpoint (a collective).

        :return: ``(state for trainer_state.pt, or None; a directory of engine files to move into
            the checkpoint, or None)``. Here: the whole (gathered) state, no files.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options), None

    def load_optimizer_state(self, state: dict | None, checkpoint: Path) -> None:
        """Restore what :meth:`optimizer_state` saved in ``checkpoint``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def move_files(self, staged: Path | None, checkpoint_tmp: Path) -> None:
        """Move the engine files of :meth:`optimizer_state` into the checkpoint (main process)."""


class FSDP2(Replicated):
    """FSDP2: the base stays in host memory until ``fully_shard`` moves each layer's shard to the device."""

    kind = "fsdp2"
    prepares_optimizer = True

    @property
    def load_device(self):
        return "cpu"


class ZeRO(Replicated):
    """DeepSpeed ZeRO-1/2. The engine keeps the module's parameters and wraps AdamW, whose param
    groups (and so a LambdaLR built on it) it reuses; it accumulates locally until :meth:`step`."""

    kind = "deepspeed"
    prepares_optimizer = True

    def accumulating(self, last):
        return contextlib.nullcontext()

    def backward(self, loss):
        self.student.backward(loss, scale_wrt_gas=False)  # nexus normalised it already

    def step(self, params, check):
        """DeepSpeed reduces, clips, steps and zeroes in one call, so the gradient norm is known
        only inside it: :func:`nexus.training.zero.configure` makes it skip a step whose gradients
        hold NaN/inf (``check_grad_overflow``, also under bf16), and ``check`` then stops the run.
        Were the step applied anyway, ``check`` is told so (``applied=True``)."""
        self.student.step()
        norm = float(self.student.get_global_grad_norm())
        check(norm, applied=not zero.step_skipped(self.student))
        return norm

    def optimizer_state(self, run_dir, step):
        return None, zero.save_state(self.student, run_dir, step)

    def load_optimizer_state(self, state, checkpoint):
        zero.load_state(self.student, checkpoint)

    def move_files(self, staged, checkpoint_tmp):
        zero.move_into(staged, checkpoint_tmp)


def select_strategy(accelerator, batch_size: int, max_grad_norm: float) -> Replicated:
    """The strategy for ``accelerator``'s distributed type; DeepSpeed's config is completed with
    ``batch_size`` and ``max_grad_norm`` (:func:`nexus.training.zero.configure`).

    :raises NexusError: Megatron-LM, FSDP version 1, or a DeepSpeed setup nexus cannot checkpoint.
    """
    kind = accelerator.distributed_type.value
    if kind in UNSUPPORTED:
        raise NexusError(
            f"{kind} is not supported by nexus train: it partitions the model in its own format. Use FSDP2 to shard "
            f"the base (accelerate config: distributed_type FSDP, fsdp_version 2) or DDP (multi-GPU, or torchrun)"
        )
    if kind == "DEEPSPEED":
        zero.configure(accelerator, batch_size, max_grad_norm)
        return ZeRO(accelerator, max_grad_norm)
    if kind != "FSDP":
        return Replicated(accelerator, max_grad_norm)
    version = int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)
    if version != 2:
        raise NexusError(
            f"FSDP version {version} is not supported by nexus train: it flattens frozen and trainable weights "
            f"into one buffer. Set fsdp_version: 2 in the accelerate config (or FSDP_VERSION=2)"
        )
    return FSDP2(accelerator, max_grad_norm)


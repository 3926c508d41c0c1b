"""DeepSpeed ZeRO stages 1 and 2 under accelerate, for ``nexus train``.

ZeRO-1/2 keeps the frozen base whole on every process (like DDP) and partitions the trainable
parameters' fp32 master copies, AdamW state (and, stage 2, gradients) across processes. That
changes how the training loop reaches the weights:

- the optimizer steps on DeepSpeed's fp32 partitions and copies them back into the module's
  parameters, so writing a parameter in place (an SFA merge) must also write the master copy,
  or the next step undoes it: :func:`read_full` / :func:`write_full`;
- the optimizer state lives in per-process partitions: it is checkpointed with DeepSpeed's own
  ``save_checkpoint`` (one file per process, trainable parameters only) inside nexus's
  checkpoint directory, so a run resumes with the same number of processes;
- nexus owns the batch size, gradient accumulation, clipping, optimizer and schedule, so
  :func:`configure` writes those into the DeepSpeed config and refuses a config that sets its
  own optimizer or scheduler.

ZeRO-3 (which also partitions the frozen base, and makes transformers load models partitioned)
and optimizer/parameter offload are refused: FSDP2 is the engine for a base that does not fit
one device.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from nexus.training.train_state import CHECKPOINTS
from nexus.errors import NexusError

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"  # the subdirectory of a nexus checkpoint holding DeepSpeed's files
SUPPORTED_STAGES = (1, 2)


def configure(accelerator, batch_size: int, max_grad_norm: float) -> int:
    """Check the DeepSpeed config of ``accelerator`` and fill in what nexus owns.

    Sets the micro-batch (``batch_size`` rows per process), one DeepSpeed accumulation step with
    ``managed_gradient_accumulation: false`` (nexus accumulates and calls ``step()`` once per
    window), and gradient clipping at ``max_grad_norm`` (0: off).

    :return: the ZeRO stage.
    :raises NexusError: stage 0 or 3, offload, or an optimizer/scheduler in the config.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in SUPPORTED_STAGES:
        hint = "FSDP2 shards the frozen base (accelerate config: distributed_type FSDP, fsdp_version 2)" if stage == 3 else "use stage 2"
        raise NexusError(f"DeepSpeed ZeRO stage {stage} is not supported by nexus train (stages 1 and 2 are); {hint}")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") or "none"
        if device != "none":
            raise NexusError(
                f"DeepSpeed zero_optimization.{key} (device {device!r}) is not supported by nexus train; set it to 'none' "
                f"(the trainable adapter's optimizer state is small next to the base)"
            )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise NexusError(
                f"the DeepSpeed config sets its own {key!r}; nexus train builds AdamW and the LR schedule from its options "
                f"(--lr, --weight-decay, --warmup-steps, --schedule): remove the {key!r} section"
            )
    zero["compute_grad_norm"] = True  # logged every step and checked for NaN/inf
    bf16 = ds.get("bf16") or ds.get("bfloat16")
    if isinstance(bf16, dict):
        if bf16.get("check_grad_overflow") is False:
            log.warning("DeepSpeed config bf16.check_grad_overflow=false is replaced by true: nexus train never "
                        "applies a non-finite gradient")
        bf16["check_grad_overflow"] = True  # a step with NaN/inf gradients is skipped, never applied
    world = accelerator.num_processes
    owned = {  # key: (value, the nexus option that sets it)
        "train_micro_batch_size_per_gpu": (batch_size, "--batch-size"),
        "gradient_accumulation_steps": (1, "--grad-accum"),
        "train_batch_size": (batch_size * world, "--batch-size x processes"),
        "managed_gradient_accumulation": (False, "--grad-accum"),
        "gradient_clipping": (float(max_grad_norm), "--max-grad-norm"),
    }
    for key, (value, option) in owned.items():
        old = ds.get(key, "auto")
        if old not in ("auto", None, value):
            log.warning("DeepSpeed config %s=%s is replaced by %s (set by nexus train's %s)", key, old, value, option)
        ds[key] = value
    return stage


def step_skipped(engine) -> bool:
    """Whether DeepSpeed's last ``engine.step()`` skipped the update (NaN/inf gradients)."""
    return bool(getattr(getattr(engine, "optimizer", None), "overflow", False))


def is_zero_param(p) -> bool:
    """Whether ``p`` is a trainable parameter whose master copy DeepSpeed ZeRO-1/2 partitions
    (the attribute is None on a process that owns no piece of it; it still takes part in gathers)."""
    return hasattr(p, "_hp_mapping")


def read_full(p: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master copy of a ZeRO parameter (a collective over the data-parallel
    group), or ``p`` itself, detached, for any other tensor."""
    if is_zero_param(p):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return p.detach()


@torch.no_grad()
def write_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set ZeRO parameter ``p`` to the whole tensor ``value``: the piece of DeepSpeed's fp32
    master copy this process owns and the module's (whole, possibly bf16) weight. No
    communication: every process passes the same value."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value.float())
    p.copy_(value)


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where every process writes DeepSpeed's files for the checkpoint of ``step`` before the
    main process moves them into the checkpoint (a filesystem all processes share)."""
    return Path(run_dir) / CHECKPOINTS / f".step-{step}.{CHECKPOINT_TAG}.partial"


def save_state(engine, run_dir: str | Path, step: int) -> Path:
    """Write the optimizer partitions (and trainable weights) with DeepSpeed's ``save_checkpoint``
    under :func:`staging_dir`; a collective. :return: the directory holding the files."""
    root = staging_dir(run_dir, step)
    if engine.global_rank == 0 and root.exists():
        shutil.rmtree(root)
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True, save_latest=False)
    torch.distributed.barrier()
    return root / CHECKPOINT_TAG


def move_into(staged: Path, checkpoint_tmp: Path) -> None:
    """Move the staged DeepSpeed files into the checkpoint being written (main process)."""
    os.replace(staged, checkpoint_tmp / CHECKPOINT_TAG)
    shutil.rmtree(staged.parent, ignore_errors=True)


def load_state(engine, checkpoint: str | Path) -> None:
    """Restore the optimizer partitions and fp32 master weights from a nexus checkpoint.

    :raises NexusError: the checkpoint was not written under DeepSpeed.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / CHECKPOINT_TAG).is_dir():
        raise NexusError(f"{checkpoint} was not written under DeepSpeed; resume it with the engine it was trained with")
    loaded, _ = engine.load_checkpoint(str(checkpoint), tag=CHECKPOINT_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:  # DeepSpeed only logs a warning when it finds nothing to load
        raise NexusError(f"DeepSpeed could not load its state from {checkpoint / CHECKPOINT_TAG}; the checkpoint is incomplete")

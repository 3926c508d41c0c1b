"""The accelerate ``Accelerator`` the engines run under."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def make_accelerator(bf16: bool = False, **kwargs):
    """An ``Accelerator`` for this machine: bf16 mixed precision when asked, and on a machine
    without an accelerator the CPU, so that ``torchrun``/``accelerate launch`` processes form a
    gloo process group (accelerate only detects multi-CPU runs when told to use the CPU).

    :param kwargs: passed on to ``Accelerator`` (``log_with``, ``project_dir``...).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # One process calling several engines (tests, notebooks, ``nexus run``) with different
        # precisions: accelerate's state is a process-wide singleton, so start it afresh.
        AcceleratorState._reset_state()
    cpu = not torch.accelerator.is_available()
    if cpu:
        for engine in ("DEEPSPEED", "FSDP"):
            if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true":
                log.warning("accelerate enables %s only on accelerator devices; on this CPU-only machine the "
                            "processes run as DDP (gloo)", engine)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", **kwargs)

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
    wanted = "bf16" if bf16 else "no"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", wanted):
        log.warning("the launch config asks for mixed precision %s; nexus uses --bf16 (%s) instead",
                    launched, "on" if bf16 else "off")
    return Accelerator(cpu=cpu, mixed_precision=wanted, **kwargs)


def end_processes() -> None:
    """When several processes run (torchrun, accelerate launch): wait for all of them and destroy
    the process group. Call it last: exiting with a live gloo group can abort the interpreter
    ("terminate called without an active exception"), which launchers report as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


ENGINES = ("fsdp2", "zero1", "zero2")


def force_engine(accelerator, engine: str, bf16: bool = False):
    """Switch a CPU (gloo, MULTI_CPU) ``accelerator`` to FSDP2 or DeepSpeed ZeRO-1/2, in place.

    accelerate enables FSDP and DeepSpeed only on accelerator devices; with this, runs on a
    CPU-only machine (the test suite, benchmarks) go through the same ``Accelerator.prepare``
    path as ``accelerate launch`` with an FSDP2 or DeepSpeed config on GPUs.

    :param accelerator: from :func:`make_accelerator` (``bf16`` as given there).
    :param engine: one of :data:`ENGINES`.
    :return: ``accelerator``.
    """
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    state = accelerator.state
    if engine == "fsdp2":
        state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                           reshard_after_forward=True)
        state.distributed_type = DistributedType.FSDP
    elif engine in ("zero1", "zero2"):
        plugin = DeepSpeedPlugin(zero_stage=int(engine[-1]))
        plugin.set_mixed_precision("bf16" if bf16 else "no")
        state.deepspeed_plugins = plugin
        plugin.select(_from_accelerator_state=True)
        state.distributed_type = DistributedType.DEEPSPEED
        accelerator.deepspeed_engine_wrapped = None  # what Accelerator.__init__ sets up for DeepSpeed
    else:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return accelerator

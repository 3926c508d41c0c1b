"""The accelerate ``Accelerator`` the stages run under, and forcing a parallelism strategy on CPU."""

from __future__ import annotations

import functools
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

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _import_group_default_holders()
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


def _import_group_default_holders() -> None:
    """Import, before the process group exists, the modules that bind the default group into
    function defaults when first imported: ``torch.distributed.nn`` (imported lazily by
    ``torch.distributed.checkpoint``) and ``deepspeed.comm`` (imported by accelerate's
    ``prepare`` whenever DeepSpeed is installed). Imported later, they would keep the group
    alive past :func:`end_processes`."""
    import importlib.util

    import torch.distributed.nn  # noqa: F401

    if importlib.util.find_spec("deepspeed") is not None:
        quiet_deepspeed_on_cpu()
        import deepspeed.comm  # noqa: F401


def quiet_deepspeed_on_cpu() -> None:
    """Tell DeepSpeed it runs on the CPU when torch sees no GPU (``DS_ACCELERATOR=cpu``, unless
    set), which it would pick anyway, but after printing a warning to stdout on import."""
    if not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


_LRU_CACHED = type(functools.lru_cache(None)(lambda: None))  # what functools.lru_cache/cache return


def _clear_distributed_caches() -> None:
    """Empty the caches of torch.distributed (DTensor's sharding propagation and redistribution
    plans, mesh topologies...): their entries hold device meshes, and with them process groups,
    for the life of the process. They refill on use."""
    import sys

    from torch.distributed.tensor import _redistribute, debug

    debug._clear_sharding_prop_cache()  # per-thread and C++ caches, not module attributes
    _redistribute.clear_redistribute_planner_cache()
    for name, module in list(sys.modules.items()):
        if not name.startswith("torch.distributed") or module is None:
            continue
        for value in list(vars(module).values()):
            for candidate in [value, *(vars(value).values() if isinstance(value, type) else ())]:
                candidate = getattr(candidate, "__func__", candidate)  # staticmethod / classmethod
                if isinstance(candidate, _LRU_CACHED):
                    candidate.cache_clear()


def end_processes(accelerator=None) -> None:
    """When several processes run (torchrun, accelerate launch): wait for all of them, release
    what holds the process groups and destroy them. Call it last, after dropping the models and
    optimizers trained under ``accelerator``.

    A gloo group's worker threads are joined only when its last reference goes. Anything still
    holding one at interpreter exit (a DDP or DeepSpeed engine, DeepSpeed's own group cache) lets
    a late worker thread free a tensor while Python shuts down, which aborts the process
    ("terminate called without an active exception") and launchers report the run as failed.

    Every group is freed here, given that the caller dropped its models: torch.distributed's
    caches (DTensor's, under FSDP2), which hold device meshes and so their groups, are emptied too.

    :param accelerator: the ``Accelerator`` the work ran under; its prepared objects are freed.
    """
    import gc
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if accelerator is not None:
        accelerator.free_memory()  # the wrapped models/optimizers, DeepSpeed's engine
    if "torch.distributed.tensor" in sys.modules:
        _clear_distributed_caches()
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's cached groups
    else:
        dist.destroy_process_group()
    gc.collect()  # group references in reference cycles (modules, engines) go now


PARALLEL_STRATEGIES = ("ddp", "fsdp2", "zero1", "zero2")


def force_strategy(accelerator, strategy: str, bf16: bool = False):
    """Switch a CPU (gloo, MULTI_CPU) ``accelerator`` to FSDP2 or DeepSpeed ZeRO-1/2, in place
    (``ddp``: leave it as it is).

    accelerate enables FSDP and DeepSpeed only on accelerator devices; with this, runs on a
    CPU-only machine (the test suite, benchmarks) go through the same ``Accelerator.prepare``
    path as ``accelerate launch`` with an FSDP2 or DeepSpeed config on GPUs.

    :param accelerator: from :func:`make_accelerator` (``bf16`` as given there).
    :param strategy: one of :data:`PARALLEL_STRATEGIES`.
    :return: ``accelerator``.
    """
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    state = accelerator.state
    if strategy == "ddp":
        pass
    elif strategy == "fsdp2":
        state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                           reshard_after_forward=True)
        state.distributed_type = DistributedType.FSDP
    elif strategy in ("zero1", "zero2"):
        plugin = DeepSpeedPlugin(zero_stage=int(strategy[-1]))
        plugin.set_mixed_precision("bf16" if bf16 else "no")
        state.deepspeed_plugins = plugin
        plugin.select(_from_accelerator_state=True)
        state.distributed_type = DistributedType.DEEPSPEED
        accelerator.deepspeed_engine_wrapped = None  # what Accelerator.__init__ sets up for DeepSpeed
    else:
        raise ValueError(f"strategy must be one of {', '.join(PARALLEL_STRATEGIES)}, got {strategy!r}")
    return accelerator

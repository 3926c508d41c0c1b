"""``torchrun`` entry for the sharded-engine tests: ``nexus.engines.train.train`` under accelerate's
FSDP2 or DeepSpeed ZeRO preparation.

accelerate selects FSDP and DeepSpeed only on accelerator devices; on a CPU-only machine the
processes form a gloo group and ``nexus.training.distributed.force_strategy`` switches the
accelerator's state to the engine, so that ``Accelerator.prepare`` wraps the model as on GPUs.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_train.py ENGINE CONFIG.json RESULT.json

ENGINE is ``ddp``, ``fsdp2`` or ``zero1``/``zero2``. CONFIG.json holds ``TrainConfig`` keyword arguments.
RESULT.json (written by rank 0) says whether every frozen parameter, gathered from its shards,
is bit-identical to the checkpoint, and how many gloo threads outlived ``end_processes``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _poison_gradient_at(call: int) -> None:
    """From micro-batch ``call`` on, add ``sqrt(|w - w|^2)`` of a trainable weight to the CE: the loss
    stays finite while that weight's gradient becomes NaN (0 * inf)."""
    import nexus.engines.train as engine

    real, calls = engine.distill_losses, {"n": 0}

    def poisoned(student, *args, **kwargs):
        parts = real(student, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= call:
            w = next(p for p in student.parameters() if p.requires_grad)
            parts.ce = parts.ce + torch.sqrt((w - w.detach()).float().pow(2).sum())
        return parts

    engine.distill_losses = poisoned


def _trainable_after_failure(accelerator) -> dict:
    """Whether every trainable weight left in memory after a NonFiniteLossError is finite."""
    from nexus.training.zero import read_full

    model = accelerator._models[0]
    model = getattr(model, "module", model)
    finite = all(bool(torch.isfinite(read_full(p)).all()) for p in model.parameters() if p.requires_grad)
    return {"trainable_finite": finite}


def _check(engine: str, config, accelerator) -> dict:
    """Train under ``engine``; whether every frozen parameter is bit-identical to the checkpoint."""
    import os

    from nexus.training.distributed import force_strategy
    from nexus.training.sharding import full_tensor, is_sharded
    from nexus.engines.train import NonFiniteLossError, train
    from nexus.loading import load_model

    force_strategy(accelerator, engine, config.bf16)
    if os.environ.get("NEXUS_TEST_NAN_GRADIENT_AT"):
        _poison_gradient_at(int(os.environ["NEXUS_TEST_NAN_GRADIENT_AT"]))
        try:
            train(config, accelerator=accelerator)
        except NonFiniteLossError as exc:
            return {"error": str(exc), **_trainable_after_failure(accelerator)}
        return {"error": None}
    result = train(config, accelerator=accelerator)
    reference = dict(load_model(config.model, dtype=torch.bfloat16 if config.bf16 else torch.float32).named_parameters())
    frozen, sharded, identical = 0, 0, True
    for name, p in result.model.named_parameters():
        if p.requires_grad:
            continue
        frozen += 1
        sharded += is_sharded(p)
        identical &= torch.equal(full_tensor(p).cpu(), reference[name].detach())
    return {"frozen": frozen, "sharded": sharded, "frozen_identical": bool(identical), "step": result.step,
            "world": accelerator.num_processes, "interrupted": result.interrupted}


def gloo_threads() -> int:
    """This process's live gloo threads (worker run loops, TCP event loops)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum("gloo" in n for n in names)


def main(engine: str, config_path: str, result_path: str) -> None:
    from nexus.training.distributed import end_processes, make_accelerator
    from nexus.training.train_config import TrainConfig

    torch.set_num_threads(1)
    config = TrainConfig(**json.loads(open(config_path).read()))
    accelerator = make_accelerator(config.bf16)
    report = _check(engine, config, accelerator)  # the trained model and its engine are gone after this
    end_processes(accelerator)
    report["gloo_threads_after_end"] = gloo_threads()  # 0: every process group was freed
    if accelerator.is_main_process:
        with open(result_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])

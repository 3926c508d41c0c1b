"""``nexus train``: distil the base (or another teacher) into the shared experts.

Loss per optimizer step, over the whole gradient-accumulation window and every process::

    loss = ce_weight * CE + kd_weight * T^2 * KL(teacher || student) + router_kl_weight * router KL

CE and KL are summed over predicted tokens and divided by the number of predicted tokens of the
window on all processes; the router KL is summed over input tokens and layers and divided by
(input tokens x layers). With ``--kd-data`` distillation has its own stream: CE is computed on
the batches of ``--data`` (the domain), KL and router KL on batches of ``--kd-data`` (general
text), each term divided by the tokens of its own stream; the kd stream has its own seeded order
and its position is part of the checkpoint. Each micro-batch's backward therefore contributes its exact share of
the big-batch gradient (no 1/GA scaling, no 1/GA^2 bug, ranks with unequal token counts
weighted correctly), multiplied by the world size to undo DDP's gradient averaging.

The distributed engine is accelerate's: run under ``accelerate launch`` or ``torchrun`` for
DDP, ``accelerate launch`` with an FSDP2 config (``fsdp_version: 2``) to shard the frozen
base across devices when one device cannot hold it, or with a DeepSpeed ZeRO-1/2 config to
partition the adapter's optimizer state (:mod:`nexus.training.strategies`). Only the trainable
parameters (shared experts, optionally routers) are optimised, by AdamW (``--optim``: fp32 or
8-bit state); the base stays frozen and in ``eval()``. Adapters and the adapter in every
checkpoint hold whole tensors, gathered from shards or partitions, so a run saved under one
layout is an ordinary adapter for any other.

:func:`train` reads as the recipe: :func:`setup` (seed, student, strategy, teacher, data),
:func:`resume` (optimizer, scheduler, SFA, RNG and data position of the latest checkpoint),
:func:`open_records` (``run_config.json``, ``metrics.jsonl``, trackers), :func:`train_loop`
(one :func:`optimizer_step` per step, :func:`save` at checkpoints) and :func:`finish` (the final
adapter). The student, teacher and data it starts from are built by :mod:`nexus.training.run_inputs`,
the metrics arithmetic is :mod:`nexus.training.step_metrics`, the loss of a micro-batch
:mod:`nexus.training.train_step`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nexus import __version__
from nexus.adapter import adapter_state_dict, save_adapter
from nexus.constants import METRICS_NAME, RUN_CONFIG_NAME
from nexus.engines.average import SFA
from nexus.errors import Interrupted, NexusError
from nexus.interrupts import StopFlag, signal_name
from nexus.io import output_lock, write_json
from nexus.metrics_log import MetricsLog
from nexus.training.distributed import make_accelerator
from nexus.training.sharding import gather_full
from nexus.training.step_metrics import MetricsWindow, flat_scalars, stack_sums
from nexus.training.strategies import select_strategy
from nexus.training.run_record import data_fingerprints, find_resume_checkpoint
from nexus.training.train_config import TrainConfig
from nexus.training.train_state import (
    ADAPTER_SUBDIR,
    CHECKPOINTS,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nexus.training.run_inputs import build_teacher, load_kd_data, load_student, load_train_data
from nexus.training.train_step import distill_losses, loss_options, loss_to_backpropagate, micro_batches, token_counts

log = logging.getLogger(__name__)


class NonFiniteLossError(NexusError):
    """The loss or the gradient norm became NaN/inf; training stopped without an optimizer step."""


@dataclass
class TrainResult:
    """What :func:`train` leaves behind.

    Attributes:
        run_dir: the run directory.
        step: optimizer steps done in total.
        final: the final adapter directory, or None when the run stopped early.
        checkpoint: the last checkpoint written, or None.
        interrupted: stopped by SIGINT/SIGTERM or ``stop_after``.
        model: the trained (unwrapped) model, for in-process callers.
        optimizer: its optimizer (under DeepSpeed, AdamW over DeepSpeed's fp32 partitions), for inspection.
    """

    run_dir: Path
    step: int
    final: Path | None
    checkpoint: Path | None
    interrupted: bool
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


def train(config: TrainConfig, accelerator=None) -> TrainResult:
    """Run (or resume) a training run described by ``config``; see the module docstring.

    The run directory is locked for the duration (:func:`nexus.io.output_lock`, main process).

    :param accelerator: an ``accelerate.Accelerator``; default one built from ``config``.
    :return: a :class:`TrainResult` (``interrupted`` when ``stop_after`` stopped it).
    :raises NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    :raises Interrupted: SIGINT/SIGTERM stopped it after saving a checkpoint.
    :raises NexusError: ``--output`` holds another run and neither ``resume`` nor ``overwrite`` is set.
    """
    accelerator = accelerator or make_accelerator(config.bf16, log_with=config.report_to, project_dir=config.output)
    strategy = select_strategy(accelerator, config.batch_size, config.max_grad_norm)
    run_dir = Path(config.output)
    main = accelerator.is_main_process
    _existing_run(run_dir)  # refuses a file before the lock is taken beside it
    with output_lock(run_dir, enabled=main):
        _prepare_run_dir(run_dir, config, main)
        accelerator.wait_for_everyone()
        checkpoint = find_resume_checkpoint(config, run_dir, accelerator.num_processes, strategy.kind)
        run = setup(config, accelerator, strategy, run_dir, checkpoint)
        if checkpoint is not None:
            resume(run, checkpoint)
        open_records(run)
        stopped_by = train_loop(run)
        return finish(run, stopped_by)


@dataclass
class TrainRun:
    """A training run between :func:`setup` and :func:`finish`: what it trains with, and where it is."""

    config: TrainConfig
    accelerator: object
    strategy: object  # a nexus.training.strategies.Replicated (or subclass)
    run_dir: Path
    model: torch.nn.Module  # the unwrapped model; ``strategy.student`` is the wrapped one
    family: object
    blocks: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: dict[str, torch.nn.Parameter]  # read after the strategy wrapped the model
    sfa: SFA
    adapter_config: object  # written with every checkpoint and the final adapter
    teacher: object | None
    router_note: str | None  # why router metrics are unavailable, or None
    data: object
    collate: object
    step: int = 0
    next_batch: int = 0
    tokens_seen: int = 0
    checkpoint: Path | None = None  # the last checkpoint written (or resumed from)
    resumed: bool = False
    metrics: MetricsLog | None = None
    kd_data: object | None = None  # the --kd-data rows (a TokenData), or None when KD shares the domain batches
    kd_collate: object | None = None
    next_kd_batch: int = 0
    kd_tokens_seen: int = 0

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files."""
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        """The number of processes."""
        return self.accelerator.num_processes

    @property
    def n_layers(self) -> int:
        """The number of MoE layers the router KL is averaged over (at least 1)."""
        return max(1, len(self.blocks))

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every process (a collective when there are several)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")


# --- the run directory ---------------------------------------------------------------------------------------------


RUN_FILES = (RUN_CONFIG_NAME, METRICS_NAME, CHECKPOINTS, "final")  # what --overwrite deletes


def _existing_run(run_dir: Path) -> list[str]:
    """The files of a training run found in ``run_dir`` (empty when there is none)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NexusError(f"--output {run_dir} is a file; give a directory for the run")
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _prepare_run_dir(run_dir: Path, config: TrainConfig, main: bool) -> None:
    """Refuse a directory holding another run unless ``--resume`` or ``--overwrite``; with
    ``--overwrite`` delete that run's files (main process)."""
    found = _existing_run(run_dir)
    if not found or config.resume:
        return
    if not config.overwrite:
        raise NexusError(
            f"{run_dir} already holds a training run ({', '.join(found)}); use --resume to continue it, "
            f"--overwrite to delete it and start over, or another --output"
        )
    if main:
        log.warning("--overwrite: deleting the run in %s (%s)", run_dir, ", ".join(found))
        for name in found:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# --- setup -------------------------------------------------------------------------------------------------------


def setup(config: TrainConfig, accelerator, strategy, run_dir: Path, checkpoint: Path | None) -> TrainRun:
    """Seed, load the student (with the adapter of ``checkpoint`` when resuming), wrap it for the
    strategy, and open the teacher and the training rows."""
    from accelerate.utils import set_seed

    from nexus.data import load_tokenizer
    from nexus.teacher_cache import is_teacher_cache

    set_seed(config.seed)
    loaded = load_student(config, strategy, checkpoint)
    model, family, blocks, optimizer = loaded.model, loaded.family, loaded.blocks, loaded.optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    trainable, base_originals = strategy.prepare(model, optimizer, loaded.base_originals)
    sfa = SFA(trainable, config.sfa_interval, config.sfa_beta, config.sfa_anchor)
    adapter_config = loaded.save_config(config)

    tokenizer = load_tokenizer(config.tokenizer or config.model, model.config)
    teacher, cache, router_note = None, None, None
    if config.kd_weight > 0 or config.router_kl_weight > 0 or is_teacher_cache(config.teacher):
        # A teacher cache is also the data source, so it is opened even for CE-only training.
        teacher, cache, router_note = build_teacher(config, model, family, blocks, tokenizer, base_originals,
                                                     accelerator.device, accelerator.autocast)
        if config.kd_weight == 0 and config.router_kl_weight == 0:
            teacher, router_note = None, None
    if router_note and accelerator.is_main_process:
        log.warning("router drift and entropy metrics are unavailable: %s", router_note)
    if teacher is not None and config.kd_weight > 0 and not config.kd_data and accelerator.is_main_process:
        log.info("distilling on the domain batches; --kd-data GENERAL_TEXT costs far less domain quality (README)")
    # With --kd-data a teacher cache belongs to the kd stream, and --data is read as it is.
    data, collate = load_train_data(config, tokenizer, None if config.kd_data else cache)
    kd_data, kd_collate = load_kd_data(config, tokenizer, cache) if config.kd_data else (None, None)
    return TrainRun(config, accelerator, strategy, run_dir, model, family, blocks, optimizer, scheduler, trainable,
                    sfa, adapter_config, teacher, router_note, data, collate, kd_data=kd_data, kd_collate=kd_collate)


def lr_lambda(config: TrainConfig):
    """The learning-rate multiplier ``step -> factor`` (``torch.optim.lr_scheduler.LambdaLR``):
    linear warmup to 1 over ``warmup_steps`` (``(step+1)/warmup``), then constant or cosine
    down to ``min_lr_ratio`` at ``max_steps``."""
    return functools.partial(_lr_factor, config.warmup_steps, config.max_steps, config.min_lr_ratio, config.schedule)


def _lr_factor(warm: int, total: int, floor: float, schedule: str, step: int) -> float:
    """The multiplier of :func:`lr_lambda` at ``step``."""
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- resume (the checkpoint to resume from, and the checks on it: nexus.training.run_record) -----------------------


def resume(run: TrainRun, checkpoint: Path) -> None:
    """Restore the optimizer, scheduler, SFA, this process's RNG and the data position of
    ``checkpoint`` (its adapter was loaded by :func:`setup`)."""
    trainer_state, state = load_checkpoint(checkpoint)
    run.strategy.load_optimizer_state(trainer_state["optimizer"], checkpoint)
    run.scheduler.load_state_dict(trainer_state["scheduler"])
    run.sfa.load_state_dict(trainer_state["sfa"])
    # Each process restores its own RNG; a checkpoint of one process serves every process.
    rngs, rank = trainer_state["rng"], run.accelerator.process_index
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    run.step, run.next_batch, run.tokens_seen = state["step"], state["next_batch"], state["tokens"]
    run.next_kd_batch, run.kd_tokens_seen = state.get("next_kd_batch", 0), state.get("kd_tokens", 0)
    run.checkpoint, run.resumed = checkpoint, True
    log.info("resuming %s from step %d (next batch %d)", run.run_dir, run.step, run.next_batch)


# --- the run's records -------------------------------------------------------------------------------------------


def open_records(run: TrainRun) -> None:
    """Write ``run_config.json`` (main process; with the content fingerprints of the data, which a
    resume checks), open ``metrics.jsonl`` (cut back to the resumed step) and start the experiment
    trackers of ``--report-to``."""
    from nexus.fingerprint import config_fingerprint

    config = run.config
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / RUN_CONFIG_NAME, {
            "nexus_version": __version__, "family": run.family.name,
            "base_fingerprint": config_fingerprint(run.model.config), "world_size": run.world,
            "engine": run.strategy.kind, "global_batch_size": config.batch_size * run.world * config.grad_accum,
            "trainable_parameters": sum(p.numel() for p in run.trainable.values()),
            "teacher_kind": getattr(run.teacher, "kind", None), "router_metrics_unavailable": run.router_note,
            "num_rows": len(run.data.rows), "config": config.to_dict(),
            **({"kd_num_rows": len(run.kd_data.rows)} if run.kd_data is not None else {}), **data_fingerprints(config),
        })
    run.metrics = MetricsLog(run.run_dir, enabled=run.main, resume_step=run.step if run.resumed else None)
    if config.report_to:
        run.accelerator.init_trackers("nexus", config={k: v for k, v in config.to_dict().items() if v is not None})


# --- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class _StepOutcome:
    """One optimizer step, for the metrics."""

    sums: torch.Tensor  # the stack_sums vector of the window, summed over processes
    n_pred: float  # predicted tokens of the window on every process
    n_in: float  # input tokens of the window on every process
    grad_norm: float
    lrs: list[float]  # the learning rates the update used, one per param group
    merged: bool  # SFA merged the weights after the update
    kd_tokens: tuple[float, float] | None = None  # (n_pred, n_in) of the kd stream's window, with --kd-data


def train_loop(run: TrainRun) -> int | None:
    """Optimizer steps until ``max_steps``, a stop (``stop_after``, SIGINT/SIGTERM) or an error;
    metrics every ``log_every`` steps, a checkpoint every ``save_every`` steps, at the end and on a stop.

    :return: the signal that stopped the run, or None.
    :raises NonFiniteLossError: the loss or the gradient norm became NaN/inf.
    """
    from nexus.progress import progress_bar

    config = run.config
    batches = micro_batches(run.data, run.collate, config.batch_size, config.seed, run.next_batch,
                            run.accelerator.process_index, run.world)
    kd_batches = None
    if run.kd_data is not None:
        kd_batches = micro_batches(run.kd_data, run.kd_collate, config.kd_batch_size or config.batch_size, config.seed,
                                   run.next_kd_batch, run.accelerator.process_index, run.world)
    kd_stream = kd_batches is not None
    first_step, stopped_by, window = run.step, None, MetricsWindow(kd_stream)
    bar = progress_bar(total=config.max_steps, initial=run.step, desc="train", unit="step", enabled=run.main)
    bar_time = time.perf_counter()
    with StopFlag("training", "after this step, with a checkpoint") as stop, bar:
        while run.step < config.max_steps:
            domain = [next(batches) for _ in range(config.grad_accum)]
            outcome = optimizer_step(run, domain, [next(kd_batches) for _ in domain] if kd_stream else None)
            window.add(outcome.sums, outcome.n_pred, outcome.n_in, outcome.grad_norm, outcome.merged, run.step,
                       outcome.kd_tokens)
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{float(outcome.sums[0]):.4g}",
                            tok_s=f"{outcome.n_in / max(now - bar_time, 1e-9):.0f}", refresh=False)
            bar_time = now
            if run.step % config.log_every == 0 or run.step == config.max_steps:
                _log_metrics(run, window, outcome.lrs)
                window = MetricsWindow(kd_stream)
            stop_now, signum = _stop_requested(run, stop, run.step - first_step)
            stopped_by = signum or stopped_by
            if (config.save_every and run.step % config.save_every == 0) or run.step == config.max_steps or stop_now:
                run.checkpoint = save(run)
            if stop_now:
                break
    return stopped_by


def optimizer_step(run: TrainRun, window: list[tuple[int, dict]],
                   kd_window: list[tuple[int, dict]] | None = None) -> _StepOutcome:
    """Forward and backward every micro-batch of ``window`` (``(global batch index, batch)`` pairs),
    then one optimizer update, scheduler step and SFA merge check; advances ``run``'s position.

    :param kd_window: with ``--kd-data``, one kd batch per micro-batch of ``window``: CE is then
        computed on ``window``, KD and router KL on ``kd_window`` (:func:`_two_stream_pass`).
    """
    config, strategy = run.config, run.strategy
    # Normalisers first: every micro-batch's loss is divided by the token counts of the whole
    # window on every process, so the accumulated gradient is the one of the big batch.
    local = torch.tensor([token_counts(b) for _, b in window]).sum(0)
    if kd_window is not None:
        local = torch.cat([local, torch.tensor([token_counts(b) for _, b in kd_window]).sum(0)])
    counts = run.sum_over_processes(local).tolist()
    n_pred, n_in = counts[:2]
    kd_tokens = (counts[2], counts[3]) if kd_window is not None else None
    sums = None
    for i, (_, batch) in enumerate(window):
        if kd_window is not None:
            loss, parts, kd_parts = _two_stream_pass(run, batch, kd_window[i][1], i == len(window) - 1, n_pred,
                                                     kd_tokens)
            sums = stack_sums(sums, loss, parts, kd_parts)
            continue
        with strategy.accumulating(last=i == len(window) - 1):
            parts = distill_losses(
                strategy.student, batch, run.teacher, run.accelerator.device,
                kd=config.kd_weight > 0 and run.teacher is not None, **loss_options(run),
                blocks=run.blocks if run.teacher is not None else [],
                router_grad=config.router_kl_weight > 0,
            )
            # The one loss: back-propagated here, and (through stack_sums) the loss that is logged.
            loss = loss_to_backpropagate(config, parts.ce, parts.kd, parts.router_kl, n_pred, n_in, run.n_layers)
            strategy.backward(loss * run.world)  # DDP averages gradients over processes; the loss is a global sum
        sums = stack_sums(sums, loss, parts)
    reduced = run.sum_over_processes(sums)
    kd_pred, kd_in = kd_tokens or (n_pred, n_in)
    per = torch.tensor([max(n_pred, 1), max(kd_pred, 1), max(kd_in, 1) * run.n_layers], device=reduced.device)
    ce, kd, rkl = (reduced[1:4] / per).tolist()
    _stop_if_non_finite(run.step, "loss", (float(reduced[0]), ce, kd, rkl), run.checkpoint)
    lrs = [g["lr"] for g in run.optimizer.param_groups]
    grad_norm = strategy.step(list(run.trainable.values()),
                              check=functools.partial(_check_gradient_norm, run.step, run.checkpoint))
    run.scheduler.step()
    run.step, run.next_batch = run.step + 1, window[-1][0] + 1
    run.tokens_seen += int(n_in)
    if kd_window is not None:
        run.next_kd_batch = kd_window[-1][0] + 1
        run.kd_tokens_seen += int(kd_tokens[1])
    merged = run.sfa.maybe_merge(run.step)
    return _StepOutcome(reduced, n_pred, n_in, grad_norm, lrs, merged, kd_tokens)


def _two_stream_pass(run: TrainRun, batch: dict, kd_batch: dict, last: bool, n_pred: float,
                     kd_tokens: tuple[float, float]):
    """One micro-batch with ``--kd-data``: CE on the domain ``batch`` (no teacher pass), then KD
    and router KL on ``kd_batch``, each forward followed by its own backward (one graph alive at a
    time; gradients synchronised only after the window's last kd pass).

    :return: ``(loss, domain LossParts, kd LossParts)``; ``loss`` is the detached sum of the two
        back-propagated losses.
    """
    config, strategy, device = run.config, run.strategy, run.accelerator.device
    common = loss_options(run)
    with strategy.accumulating(last=False):
        parts = distill_losses(strategy.student, batch, None, device, kd=False, blocks=[], **common)
        ce_loss = loss_to_backpropagate(config, parts.ce, 0.0, 0.0, n_pred, 0.0, run.n_layers, kd_tokens=kd_tokens)
        strategy.backward(ce_loss * run.world)
    with strategy.accumulating(last=last):
        kd_parts = distill_losses(
            strategy.student, kd_batch, run.teacher, device, kd=config.kd_weight > 0 and run.teacher is not None,
            blocks=run.blocks if run.teacher is not None else [], router_grad=config.router_kl_weight > 0, **common,
        )
        kd_loss = loss_to_backpropagate(config, 0.0, kd_parts.kd, kd_parts.router_kl, n_pred, 0.0, run.n_layers,
                                        kd_tokens=kd_tokens)
        strategy.backward(kd_loss * run.world)
    return ce_loss.detach() + kd_loss.detach(), parts, kd_parts


def _log_metrics(run: TrainRun, window: MetricsWindow, lrs: list[float]) -> None:
    """Write the metrics line of ``window`` to ``metrics.jsonl``, the trackers and the log."""
    record = window.record(run.step, lrs, run.tokens_seen, run.sfa.merges, [b.layer for b in run.blocks],
                           run.n_layers, run.kd_tokens_seen)
    run.metrics.write(record)
    if run.config.report_to:
        run.accelerator.log(flat_scalars(record), step=run.step)
    log.info("step %d loss %.4f ce %.4f kd %.4f lr %.3g", run.step, record["loss"], record["ce"], record["kd"], lrs[0])


def _stop_requested(run: TrainRun, stop: StopFlag, steps_here: int) -> tuple[bool, int | None]:
    """Whether the run stops after this step (``stop_after`` steps done in this call, or a signal on
    any process), and the signal that asked, if any.

    Every process must take the same decision, or the others would wait forever in the next
    step's collectives; the flags are therefore summed over processes.
    """
    flags = torch.tensor([float(run.config.stop_after is not None and steps_here >= run.config.stop_after),
                          float(stop.signum == signal.SIGINT), float(stop.signum == signal.SIGTERM)])
    flags = run.sum_over_processes(flags).cpu()
    signum = signal.SIGINT if flags[1] > 0 else signal.SIGTERM if flags[2] > 0 else None
    return bool(flags.sum() > 0), signum


def _stop_if_non_finite(step, what, values, last_ckpt, applied: bool = False) -> None:
    """Raise :class:`NonFiniteLossError` when any of ``values`` is NaN/inf (before the update of
    step ``step + 1``; ``applied``: the strategy applied that update regardless)."""
    if all(math.isfinite(v) for v in values):
        return
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    outcome = "the optimizer applied that update" if applied else "stopped without updating the weights"
    raise NonFiniteLossError(
        f"the {what} became non-finite ({', '.join(f'{v:.4g}' for v in values)}) at step {step + 1}; {outcome}, "
        f"{where}. Lower --lr, check the data, or resume with --resume"
    )


def _check_gradient_norm(step: int, last_ckpt: Path | None, norm: float, applied: bool = False) -> None:
    """The ``check`` a strategy calls with the gradient norm before (or, under DeepSpeed, after) the update."""
    _stop_if_non_finite(step, "gradient norm", (norm,), last_ckpt, applied)


# --- save --------------------------------------------------------------------------------------------------------


def save(run: TrainRun) -> Path | None:
    """Write the checkpoint of ``run``'s current step (every process calls it; the main process
    writes). :return: the checkpoint directory on the main process, None on the others."""
    from accelerate.utils import gather_object

    # Collectives first, on every process: shards are gathered into whole tensors.
    rngs = gather_object([rng_state()]) if run.world > 1 else [rng_state()]
    tensors = gather_adapter(run)
    optimizer_state, staged = run.strategy.optimizer_state(run.run_dir, run.step)
    sfa_state = run.sfa.state_dict()
    path = None
    if run.main:
        path = save_checkpoint(
            run.run_dir, run.step, functools.partial(_write_checkpoint_files, run, tensors, staged),
            {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(), "sfa": sfa_state, "rng": rngs},
            {"step": run.step, "next_batch": run.next_batch, "tokens": run.tokens_seen, "world_size": run.world,
             "nexus_version": __version__,
             **({"next_kd_batch": run.next_kd_batch, "kd_tokens": run.kd_tokens_seen} if run.kd_data is not None
                else {})},
            run.config.keep_last,
        )
    run.accelerator.wait_for_everyone()
    return path


def gather_adapter(run: TrainRun) -> dict[str, torch.Tensor]:
    """The adapter's whole tensors, gathered from shards or partitions (a collective: every process calls it)."""
    params = dict(run.model.named_parameters())
    return gather_full({n: params[n] for n in adapter_state_dict(run.model, run.adapter_config.base_keys)})


def write_adapter(run: TrainRun, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (from :func:`gather_adapter`) as an adapter directory at ``path`` (main process)."""
    save_adapter(run.model, path, copy.deepcopy(run.adapter_config), tensors=tensors)


def _write_checkpoint_files(run: TrainRun, tensors: dict[str, torch.Tensor], staged: Path | None, tmp: Path) -> None:
    """Fill the checkpoint being assembled at ``tmp``: the adapter, and the strategy's staged files."""
    write_adapter(run, tensors, tmp / ADAPTER_SUBDIR)
    run.strategy.move_files(staged, tmp)


# --- finish ------------------------------------------------------------------------------------------------------


def finish(run: TrainRun, stopped_by: int | None) -> TrainResult:
    """Write the final adapter when every step is done, close the trackers, and report.

    :raises Interrupted: a signal stopped the run before ``max_steps`` (its checkpoint is saved).
    """
    config = run.config
    interrupted = run.step < config.max_steps
    final = None
    if not interrupted:
        final = run.run_dir / "final"
        tensors = gather_adapter(run)
        if run.main:
            write_adapter(run, tensors, final)
        run.accelerator.wait_for_everyone()
    if config.report_to:
        run.accelerator.end_training()
    if stopped_by is not None and interrupted:
        raise Interrupted(
            f"training stopped by {signal_name(stopped_by)} at step {run.step} of {config.max_steps}; checkpoint "
            f"{run.checkpoint} saved. Continue with the same command and --resume", stopped_by)
    return TrainResult(run.run_dir, run.step, final, run.checkpoint, interrupted, run.model, run.optimizer)

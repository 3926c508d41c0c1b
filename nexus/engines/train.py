"""``nexus train``: distil the base (or another teacher) into the shared experts.

Loss per optimizer step, over the whole gradient-accumulation window and every process::

    loss = ce_weight * CE + kd_weight * T^2 * KL(teacher || student) + router_kl_weight * router KL

CE and KL are summed over predicted tokens and divided by the number of predicted tokens of the
window on all processes; the router KL is summed over input tokens and layers and divided by
(input tokens x layers). Each micro-batch's backward therefore contributes its exact share of
the big-batch gradient (no 1/GA scaling, no 1/GA^2 bug, ranks with unequal token counts
weighted correctly), multiplied by the world size to undo DDP's gradient averaging.

The distributed engine is accelerate's: run under ``accelerate launch`` or ``torchrun`` for
DDP, ``accelerate launch`` with an FSDP2 config (``fsdp_version: 2``) to shard the frozen
base across devices when one device cannot hold it, or with a DeepSpeed ZeRO-1/2 config to
partition the adapter's optimizer state (:mod:`nexus.training.strategies`). Only the trainable
parameters (shared experts, optionally routers) are optimised, by AdamW; the base stays frozen
and in ``eval()``. Adapters and the adapter in every checkpoint hold whole tensors, gathered
from shards or partitions, so a run saved under one layout is an ordinary adapter for any other.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nexus import __version__
from nexus.adapter import adapter_family, adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from nexus.constants import METRICS_NAME, RUN_CONFIG_NAME
from nexus.engines.average import SFA
from nexus.training.distributed import make_accelerator
from nexus.training.train_state import (
    ADAPTER_SUBDIR,
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nexus.training.strategies import select_strategy
from nexus.training.sharding import gather_full
from nexus.training.train_config import RESUME_MUST_MATCH, TrainConfig
from nexus.training.train_step import distill_losses, micro_batches
from nexus.errors import Interrupted, NexusError
from nexus.interrupts import StopFlag, signal_name
from nexus.io import output_lock, write_json
from nexus.metrics_log import MetricsLog

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
        optimizer: its AdamW (under DeepSpeed, over DeepSpeed's fp32 partitions), for inspection.
    """

    run_dir: Path
    step: int
    final: Path | None
    checkpoint: Path | None
    interrupted: bool
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


def lr_lambda(config: TrainConfig):
    """The learning-rate multiplier ``step -> factor`` (``torch.optim.lr_scheduler.LambdaLR``):
    linear warmup to 1 over ``warmup_steps`` (``(step+1)/warmup``), then constant or cosine
    down to ``min_lr_ratio`` at ``max_steps``."""
    warm, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _check_resume(run_dir: Path, config: TrainConfig, world_size: int, engine: str) -> None:
    """Refuse to resume a run whose settings, number of processes or optimizer-state format differ.
    (DDP and FSDP2 checkpoints share one format; DeepSpeed's per-process partitions are their own.)"""
    import json

    path = run_dir / RUN_CONFIG_NAME
    if not path.exists():
        return
    old = json.loads(path.read_text())
    old_config = old.get("config", {})
    diff = [f"{k} ({old_config.get(k)!r} vs {getattr(config, k)!r})"
            for k in RESUME_MUST_MATCH if old_config.get(k) != getattr(config, k)]
    if old.get("world_size") != world_size:
        diff.append(f"world_size ({old.get('world_size')} vs {world_size})")
    old_engine = old.get("engine", "ddp")
    if "deepspeed" in (old_engine, engine) and old_engine != engine:
        diff.append(f"engine ({old_engine} vs {engine})")
    if diff:
        raise NexusError(
            f"cannot resume {run_dir}: these settings differ from the original run (old vs new): {', '.join(diff)}; "
            f"use the same arguments, or a new --output"
        )


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


def _enable_checkpointing(model) -> None:
    """Gradient checkpointing that works with the base in ``eval()``.

    transformers only checkpoints a decoder layer when ``layer.training`` is True. Setting that
    flag on the layer modules alone (not recursively) turns checkpointing on while every
    submodule (attention dropout, routers) stays in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def _build_teacher(config, model, family, blocks, tokenizer, base_originals, device, autocast):
    """The teacher for ``config.teacher``, the cache when it is one (its rows are the data), and
    why router metrics (router KL, drift, entropies) are unavailable with it (None when they are)."""
    from nexus.loading import load_config, load_model
    from nexus.teacher_cache import TeacherCache, is_teacher_cache
    from nexus.training.teachers import CacheTeacher, ModelTeacher, SelfTeacher, check_same_vocab, same_router_layout

    if config.teacher == "self":
        return SelfTeacher(model, family, blocks, base_originals, autocast), None, None
    if is_teacher_cache(config.teacher):
        cache = TeacherCache(config.teacher)
        cache.check(model.config, tokenizer, need_routers=config.router_kl_weight > 0)
        if cache.meta["temperature"] != config.temperature and config.kd_weight > 0:
            raise NexusError(
                f"teacher cache {config.teacher} holds log-probs at temperature {cache.meta['temperature']}, "
                f"but --temperature is {config.temperature}; train with --temperature {cache.meta['temperature']} or precompute again"
            )
        note = None if cache.has_router_logits else f"teacher cache {config.teacher} holds no router logits"
        return CacheTeacher(cache), cache, note
    teacher_config = load_config(config.teacher)
    check_same_vocab(model.config, tokenizer, config.teacher, teacher_config)
    teacher_model = load_model(config.teacher, dtype=torch.bfloat16 if config.bf16 else torch.float32, device=device,
                               dequantize=config.dequantize)
    teacher_model.requires_grad_(False)
    t_family, t_blocks, note = None, [], None
    try:
        from nexus.family import resolve_family

        t_family = resolve_family(teacher_model.config)
        t_blocks = t_family.moe_blocks(teacher_model)
        if not same_router_layout(blocks, t_blocks):
            note = (f"the MoE layers of teacher {config.teacher} (layer, experts: "
                    f"{[(b.layer, b.num_experts) for b in t_blocks]}) differ from the model's "
                    f"({[(b.layer, b.num_experts) for b in blocks]})")
            t_family, t_blocks = None, []
    except NexusError as exc:
        note = f"teacher {config.teacher} has no MoE layers nexus can read ({exc})"
        t_family, t_blocks = None, []
    if config.router_kl_weight > 0 and not t_blocks:
        raise NexusError(f"--router-kl-weight needs a teacher with the model's MoE layout; {config.teacher} differs. Set it to 0")
    return ModelTeacher(teacher_model, t_family, t_blocks, autocast), None, note


def _load_data(config, tokenizer, cache):
    """``(ordering TokenData, collate(indices) -> batch)`` for the training rows."""
    from nexus.data import TokenData, collate, load_token_data
    from nexus.fingerprint import rows_fingerprint

    if cache is not None:
        if config.data is not None:
            rows = load_token_data(config.data, tokenizer, cache.meta["seq_len"], config.text_column).rows
            if rows_fingerprint(rows) != cache.meta["data_fingerprint"]:
                raise NexusError(
                    f"--data {config.data} does not match the rows of teacher cache {config.teacher} "
                    f"(made from {cache.meta['data']} at seq_len {cache.meta['seq_len']}); omit --data to train on the cache's rows"
                )
        if cache.meta["seq_len"] != config.seq_len:
            log.info("training on the teacher cache's rows (seq_len %d; --seq-len is ignored)", cache.meta["seq_len"])
        return TokenData(cache.rows, cache.pad_id), cache.collate
    if config.data is None:
        raise NexusError("--data is required unless --teacher is a teacher cache")
    data = load_token_data(config.data, tokenizer, config.seq_len, config.text_column)
    return data, lambda idx: collate([data.rows[i] for i in idx], data.pad_id)


@dataclass
class _Student:
    """The base with its adapter loaded and the trainable parameters chosen, before the engine wraps it."""

    model: torch.nn.Module
    family: object
    blocks: list
    optimizer: torch.optim.Optimizer
    base_originals: dict[str, torch.Tensor]  # base weights an adapter replaces, as in the base
    adapter_config: object
    trained_base_keys: list[str]  # routers / native shared experts trained here (saved in the adapter)

    def save_config(self, config: TrainConfig):
        """The adapter config written with every checkpoint and the final adapter."""
        cfg = copy.deepcopy(self.adapter_config)
        cfg.base_keys = sorted(set(cfg.base_keys) | set(self.trained_base_keys))
        cfg.args = {"command": "train", **config.to_dict()}
        return cfg


def _load_student(config: TrainConfig, engine, checkpoint: Path | None) -> _Student:
    """Load the base on ``engine.load_device``, the adapter (or the checkpoint's), freeze the base
    except routers / native shared experts when trained, and build AdamW over the trainable
    parameters (routers in their own group, at ``--router-lr``)."""
    from nexus.shared_expert import base_parameters, router_parameters
    from nexus.loading import load_model
    from nexus.shared_expert import freeze_base, native_shared_modules

    adapter_cfg = read_adapter_config(config.adapter)
    model = load_model(config.model, dtype=torch.bfloat16 if config.bf16 else torch.float32, device=engine.load_device,
                       dequantize=config.dequantize)
    family = adapter_family(adapter_cfg, model, config.adapter)
    blocks = family.moe_blocks(model)
    routers = router_parameters(model, family, blocks)
    touched_base = config.train_routers or config.train_native_shared or bool(adapter_cfg.base_keys)
    base_originals = {n: p.detach().clone() for n, p in base_parameters(model, family, blocks).items()} if touched_base else {}
    load_adapter(model, checkpoint / ADAPTER_SUBDIR if checkpoint else config.adapter, family=family)
    router_modules = [family.router_capture(b).module for b in blocks] if config.train_routers else []
    native = native_shared_modules(blocks) if config.train_native_shared else []
    if config.train_native_shared and not native:
        raise NexusError(f"--train-native-shared: family {family.name!r} has no shared expert of its own")
    if config.bf16:
        for m in (*router_modules, *native):
            m.float()  # optimise fp32 copies; autocast feeds them bf16 activations
    freeze_base(model, router_modules, native)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    router_names = sorted(n for n in named if n in routers)
    native_names = sorted(n for n in named if n in base_originals and n not in routers)
    groups = [{"params": [p for n, p in named.items() if n not in routers], "lr": config.lr, "name": "shared"}]
    if router_names:
        groups.append({"params": [named[n] for n in router_names], "lr": config.router_lr or config.lr, "name": "routers"})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return _Student(model, family, blocks, optimizer, base_originals, adapter_cfg, router_names + native_names)


def loss_to_backpropagate(config: TrainConfig, ce, kd, router_kl, n_pred: float, n_in: float, n_layers: int):
    """The training loss of one micro-batch, as back-propagated and (summed over the window) logged.

    ``(ce_weight * CE + kd_weight * T^2 * KD) / n_pred + router_kl_weight * RKL / (n_in * n_layers)``
    with CE, KD, RKL the micro-batch's token sums (scalar tensors or floats) and ``n_pred`` /
    ``n_in`` the predicted / input tokens of the whole window on every process.
    """
    loss = (config.ce_weight * ce + config.kd_weight * config.temperature**2 * kd) / max(n_pred, 1.0)
    if config.router_kl_weight > 0:
        loss = loss + config.router_kl_weight * router_kl / (max(n_in, 1.0) * n_layers)
    return loss


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
    engine = select_strategy(accelerator, config.batch_size, config.max_grad_norm)
    run_dir = Path(config.output)
    main = accelerator.is_main_process
    _existing_run(run_dir)  # refuses a file before the lock is taken beside it
    with output_lock(run_dir, enabled=main):
        _prepare_run_dir(run_dir, config, main)
        accelerator.wait_for_everyone()
        return _train(config, accelerator, engine, run_dir)


def _train(config: TrainConfig, accelerator, engine, run_dir: Path) -> TrainResult:
    from accelerate.utils import gather_object, set_seed

    from nexus.data import load_tokenizer
    from nexus.teacher_cache import is_teacher_cache
    from nexus.fingerprint import config_fingerprint
    from nexus.progress import progress_bar

    main, world, rank, device = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index, accelerator.device
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    if config.resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
    if checkpoint is not None:
        _check_resume(run_dir, config, world, engine.kind)
    set_seed(config.seed)

    loaded = _load_student(config, engine, checkpoint)
    model, family, blocks, optimizer = loaded.model, loaded.family, loaded.blocks, loaded.optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    named, base_originals = engine.prepare(model, optimizer, loaded.base_originals)
    student = engine.student
    sfa = SFA(named, config.sfa_interval, config.sfa_beta, config.sfa_anchor)
    save_cfg = loaded.save_config(config)

    tokenizer = load_tokenizer(config.tokenizer or config.model, model.config)
    teacher, cache, router_note = None, None, None
    if config.kd_weight > 0 or config.router_kl_weight > 0 or is_teacher_cache(config.teacher):
        # A teacher cache is also the data source, so it is opened even for CE-only training.
        teacher, cache, router_note = _build_teacher(config, model, family, blocks, tokenizer, base_originals, device,
                                                     accelerator.autocast)
        if config.kd_weight == 0 and config.router_kl_weight == 0:
            teacher, router_note = None, None
    if router_note and main:
        log.warning("router drift and entropy metrics are unavailable: %s", router_note)
    data, collate = _load_data(config, tokenizer, cache)

    step, next_batch, tokens_seen = 0, 0, 0
    if checkpoint is not None:
        trainer_state, state = load_checkpoint(checkpoint)
        engine.load_optimizer_state(trainer_state["optimizer"], checkpoint)
        scheduler.load_state_dict(trainer_state["scheduler"])
        sfa.load_state_dict(trainer_state["sfa"])
        rngs = trainer_state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        step, next_batch, tokens_seen = state["step"], state["next_batch"], state["tokens"]
        log.info("resuming %s from step %d (next batch %d)", run_dir, step, next_batch)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_CONFIG_NAME, {
            "nexus_version": __version__, "family": family.name, "base_fingerprint": config_fingerprint(model.config),
            "world_size": world, "engine": engine.kind, "global_batch_size": config.batch_size * world * config.grad_accum,
            "trainable_parameters": sum(p.numel() for p in named.values()), "teacher_kind": getattr(teacher, "kind", None),
            "router_metrics_unavailable": router_note, "num_rows": len(data.rows), "config": config.to_dict(),
        })
    metrics = MetricsLog(run_dir, enabled=main, resume_step=step if checkpoint else None)
    if config.report_to:
        accelerator.init_trackers("nexus", config={k: v for k, v in config.to_dict().items() if v is not None})

    def adapter_writer():
        """Gather the adapter's whole tensors (a collective: every process calls it) and return
        ``path -> None`` writing them as an adapter directory (called on the main process)."""
        params = dict(model.named_parameters())
        tensors = gather_full({n: params[n] for n in adapter_state_dict(model, save_cfg.base_keys)})
        return lambda path: save_adapter(model, path, copy.deepcopy(save_cfg), tensors=tensors)

    def save(at_step: int, nb: int) -> Path | None:
        # Collectives first, on every process: shards are gathered into whole tensors.
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        write_adapter = adapter_writer()
        optim_state, staged = engine.optimizer_state(run_dir, at_step)
        sfa_state = sfa.state_dict()
        path = None
        if main:
            def write_files(tmp: Path) -> None:
                write_adapter(tmp / ADAPTER_SUBDIR)
                engine.move_files(staged, tmp)

            path = save_checkpoint(
                run_dir, at_step, write_files,
                {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "sfa": sfa_state, "rng": rngs},
                {"step": at_step, "next_batch": nb, "tokens": tokens_seen, "world_size": world, "nexus_version": __version__},
                config.keep_last,
            )
        accelerator.wait_for_everyone()
        return path

    batches = micro_batches(data, collate, config.batch_size, config.seed, next_batch, rank, world)
    params = list(named.values())
    n_layers = max(1, len(blocks))
    acc = _Accumulator()
    last_ckpt, stopped_by, steps_here = checkpoint, None, 0
    t_start = t_bar = time.perf_counter()
    bar = progress_bar(total=config.max_steps, initial=step, desc="train", unit="step", enabled=main)
    with StopFlag("training", "after this step, with a checkpoint") as stop, bar:
        while step < config.max_steps:
            window = [next(batches) for _ in range(config.grad_accum)]
            local = torch.tensor(
                [[float((b["labels"][:, 1:] != -100).sum()), 0.0 if b["empty"] else float(b["attention_mask"].sum())]
                 for _, b in window]
            ).sum(0)
            n_pred_g, n_in_g = (accelerator.reduce(local.to(device), reduction="sum") if world > 1 else local).tolist()
            sums = None
            for i, (_, batch) in enumerate(window):
                with engine.accumulating(last=i == len(window) - 1):
                    parts = distill_losses(
                        student, batch, teacher, device, kd=config.kd_weight > 0 and teacher is not None,
                        temperature=config.temperature, family=family, blocks=blocks if teacher is not None else [],
                        router_grad=config.router_kl_weight > 0, autocast=accelerator.autocast,
                    )
                    loss = loss_to_backpropagate(config, parts.ce, parts.kd, parts.router_kl, n_pred_g, n_in_g,
                                                 n_layers)
                    engine.backward(loss * world)
                sums = _add(sums, loss, parts)
            reduced = accelerator.reduce(sums.to(device), reduction="sum") if world > 1 else sums
            step_loss = float(reduced[0])
            per = torch.tensor([max(n_pred_g, 1), max(n_pred_g, 1), max(n_in_g, 1) * n_layers], device=reduced.device)
            ce, kd, rkl = (reduced[1:4] / per).tolist()
            _stop_if_non_finite(step, "loss", (step_loss, ce, kd, rkl), last_ckpt)
            lrs = [g["lr"] for g in optimizer.param_groups]
            grad_norm = engine.step(params, check=lambda norm, applied=False: _stop_if_non_finite(
                step, "gradient norm", (norm,), last_ckpt, applied))
            scheduler.step()
            step, steps_here, next_batch = step + 1, steps_here + 1, window[-1][0] + 1
            tokens_seen += int(n_in_g)
            merged = sfa.maybe_merge(step)
            acc.add(reduced, n_pred_g, n_in_g, grad_norm, merged, step)
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4g}", tok_s=f"{n_in_g / max(now - t_bar, 1e-9):.0f}", refresh=False)
            t_bar = now
            if step % config.log_every == 0 or step == config.max_steps:
                record = acc.record(step, config, lrs, tokens_seen, time.perf_counter() - t_start, sfa, [b.layer for b in blocks], n_layers)
                metrics.write(record)
                if config.report_to:
                    accelerator.log(_flat(record), step=step)
                log.info("step %d loss %.4f ce %.4f kd %.4f lr %.3g", step, record["loss"], record["ce"], record["kd"], lrs[0])
                acc, t_start = _Accumulator(), time.perf_counter()
            flags = torch.tensor([float(config.stop_after is not None and steps_here >= config.stop_after),
                                  float(stop.signum == signal.SIGINT), float(stop.signum == signal.SIGTERM)])
            if world > 1:
                flags = accelerator.reduce(flags.to(device), reduction="sum").cpu()
            stop_now = bool(flags.sum() > 0)
            if flags[1] > 0 or flags[2] > 0:
                stopped_by = signal.SIGINT if flags[1] > 0 else signal.SIGTERM
            if (config.save_every and step % config.save_every == 0) or step == config.max_steps or stop_now:
                last_ckpt = save(step, next_batch)
            if stop_now:
                break
    interrupted = step < config.max_steps
    final = None
    if step >= config.max_steps:
        final = run_dir / "final"
        write_adapter = adapter_writer()
        if main:
            write_adapter(final)
        accelerator.wait_for_everyone()
    if config.report_to:
        accelerator.end_training()
    if stopped_by is not None and interrupted:
        raise Interrupted(
            f"training stopped by {signal_name(stopped_by)} at step {step} of {config.max_steps}; checkpoint "
            f"{last_ckpt} saved. Continue with the same command and --resume", stopped_by)
    return TrainResult(run_dir, step, final, last_ckpt, interrupted, model, optimizer)


def _stop_if_non_finite(step, what, values, last_ckpt, applied: bool = False) -> None:
    """Raise :class:`NonFiniteLossError` when any of ``values`` is NaN/inf (before the update of
    step ``step + 1``; ``applied``: the engine applied that update regardless)."""
    if all(math.isfinite(v) for v in values):
        return
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    outcome = "the optimizer applied that update" if applied else "stopped without updating the weights"
    raise NonFiniteLossError(
        f"the {what} became non-finite ({', '.join(f'{v:.4g}' for v in values)}) at step {step + 1}; {outcome}, "
        f"{where}. Lower --lr, check the data, or resume with --resume"
    )


def _add(sums, loss, parts) -> torch.Tensor:
    """Stack a micro-batch's detached loss and sums into one vector:
    loss, ce, kd, router_kl, drift[L], ent_s[L], ent_t[L]."""
    vec = [loss.detach().float().reshape(1), parts.ce.detach().float().reshape(1), parts.kd.detach().float().reshape(1),
           parts.router_kl.detach().float().reshape(1)]
    if parts.drift is not None:
        vec += [parts.drift.float(), parts.ent_student.float(), parts.ent_teacher.float()]
    v = torch.cat(vec)
    return v if sums is None else sums + v


class _Accumulator:
    """Sums between two metrics lines."""

    def __init__(self):
        self.sums, self.n_pred, self.n_in, self.grad_norms, self.merge_steps, self.steps = None, 0.0, 0.0, [], [], 0

    def add(self, reduced, n_pred, n_in, grad_norm, merged, step):
        self.sums = reduced.detach().cpu() if self.sums is None else self.sums + reduced.detach().cpu()
        self.n_pred, self.n_in, self.steps = self.n_pred + n_pred, self.n_in + n_in, self.steps + 1
        self.grad_norms.append(grad_norm)
        if merged:
            self.merge_steps.append(step)

    def record(self, step, config, lrs, tokens, seconds, sfa, layers, n_layers) -> dict:
        """The metrics line: ``loss`` is the mean over the steps of the back-propagated loss; its
        parts are token-weighted over those steps."""
        s, n_pred, n_in = self.sums, max(self.n_pred, 1.0), max(self.n_in, 1.0)
        ce, kd, rkl = float(s[1]) / n_pred, float(s[2]) / n_pred, float(s[3]) / (n_in * n_layers)
        rec = {
            "step": step,
            "loss": float(s[0]) / self.steps,
            "ce": ce, "kd": kd, "router_kl": rkl,
            "lr": lrs[0], "router_lr": lrs[1] if len(lrs) > 1 else None,
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "tokens": tokens, "tokens_per_s": self.n_in / max(seconds, 1e-9),
            "sfa_merges": sfa.merges, "sfa_merge_steps": self.merge_steps,
        }
        if len(s) > 4:
            L = (len(s) - 4) // 3
            drift, ent_s, ent_t = s[4 : 4 + L] / n_in, s[4 + L : 4 + 2 * L] / n_in, s[4 + 2 * L :] / n_in
            rec.update(router_layers=layers[:L], router_drift=drift.tolist(),
                       router_entropy_student=ent_s.tolist(), router_entropy_teacher=ent_t.tolist())
        return rec


def _flat(record: dict) -> dict:
    """Scalars only, per-layer lists expanded (``router_drift/layer_3``), for trackers."""
    out = {}
    layers = record.get("router_layers", [])
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, list) and k.startswith("router_") and k != "router_layers":
            out.update({f"{k}/layer_{layer}": x for layer, x in zip(layers, v)})
    return out

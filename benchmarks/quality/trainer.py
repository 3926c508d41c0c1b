"""The adaptation loop of the baselines (LoRA, full fine-tuning of the experts); NEXUS runs train
through ``nexus.engines.train`` (:mod:`benchmarks.quality.nexus_path`).

It mirrors ``nexus.engines.train`` step for step, so every method sees the same batches in the
same order under the same optimisation: batches from :meth:`nexus.data.TokenData.batches`
(the engine's order), loss = CE over predicted tokens (:mod:`nexus.losses`, + ``kd_weight * T^2 * KL(teacher ||
student)`` when the method distils; the teacher is the same model under ``Prepared.teacher``; with
``kd_on="general"`` the KL is taken on batches of the general text, drawn as ``nexus train
--kd-data`` draws them, each term averaged over its own batch's predicted tokens),
AdamW without weight decay over the trainable parameters, linear warmup then cosine down to
``min_lr_ratio``, gradient clipping at 1.0, and SFA (arXiv 2501.05559) as the engine's: every
``sfa_every`` steps ``theta <- (1 - beta) theta + beta snapshot; snapshot <- theta``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.quality.evaluate import causal_ce, kd_loss
from benchmarks.quality.methods import Prepared
from benchmarks.quality.pretrain import warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """One run's optimisation settings.

    Attributes:
        steps, batch_size: the budget (rows of the shared sequence length).
        lr, warmup_frac: peak LR and warmup share of the steps.
        seed: data order and any random init.
        min_lr_ratio: the cosine floor (fraction of the peak LR).
        kd_weight, kd_temperature: distillation (0: CE only).
        kd_on: ``domain`` (KL on the domain batches) or ``general`` (on ``kd_data``'s batches).
        kd_batch_size: rows of the general text per step (default ``batch_size``).
        sfa_beta, sfa_every: SFA averaging (``sfa_every`` 0: off).
        eval_at: steps after which ``evaluate`` is called (the last should be ``steps``).
    """

    steps: int
    batch_size: int
    lr: float
    seed: int
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    kd_on: str = "domain"
    kd_batch_size: int | None = None
    sfa_beta: float = 0.0
    sfa_every: int = 0
    eval_at: tuple[int, ...] = ()


def eval_steps(steps: int, points: int) -> tuple[int, ...]:
    """Evaluation steps: every ``steps // points`` steps, and ``steps`` (a multiple, so the
    training engine's periodic checkpoints fall on them)."""
    every = max(1, steps // max(1, points))
    return tuple(sorted(set(range(every, steps + 1, every)) | {steps}))


def warmup_steps(s: TrainSettings) -> int:
    """Warmup length in steps (at least 1), the same for the loop and the training engine."""
    return max(1, round(s.warmup_frac * s.steps))


def train(prepared: Prepared, data, s: TrainSettings, evaluate: Callable[[int], dict], kd_data=None) -> dict:
    """Train ``prepared`` on ``data`` (a :class:`nexus.data.TokenData`) for ``s.steps`` steps.

    :param kd_data: the general text's :class:`nexus.data.TokenData` (``s.kd_on == "general"``).
    :param evaluate: called with the step number at each of ``s.eval_at``; returns a dict of
        metrics (not counted in the training time).
    :return: ``curve`` (per step: loss, ce, kd, lr, grad_norm), ``evals`` (``evaluate``'s dicts
        plus step and tokens), ``train_seconds``, ``tokens_per_second``, ``diverged``.
    """
    model, params = prepared.model, prepared.trainable
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = warmup_steps(s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, s.steps, warmup, s.min_lr_ratio))
    snapshot = [p.detach().clone() for p in params] if s.sfa_every else None
    stream = data.batches(s.batch_size, seed=s.seed)
    use_kd = s.kd_weight > 0 and prepared.teacher is not None
    if use_kd and s.kd_on == "general" and kd_data is None:
        raise ValueError("kd_on 'general' needs kd_data, the general text")
    kd_stream = kd_data.batches(s.kd_batch_size or s.batch_size, seed=s.seed) if use_kd and s.kd_on == "general" else None
    device = next(model.parameters()).device
    curve, evals = [], []
    train_seconds, diverged = 0.0, False
    tokens = 0
    for step in range(1, s.steps + 1):
        t0 = time.perf_counter()
        _, batch = next(stream)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits
        ce = causal_ce(logits, labels)
        loss = ce
        kd = None
        if use_kd:
            kd_ids, kd_mask, kd_labels, student = ids, mask, labels, logits
            if kd_stream is not None:
                _, kd_batch = next(kd_stream)
                kd_ids, kd_mask, kd_labels = (kd_batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                student = model(input_ids=kd_ids, attention_mask=kd_mask).logits
            with torch.no_grad(), prepared.teacher():
                teacher_logits = model(input_ids=kd_ids, attention_mask=kd_mask).logits
            kd = kd_loss(student, teacher_logits, kd_labels, s.kd_temperature)
            loss = ce + s.kd_weight * kd
        if not torch.isfinite(loss):
            diverged = True
            log.warning("loss is %s at step %d (lr %g): stopping this run", float(loss), step, s.lr)
            break
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        opt.zero_grad(set_to_none=True)
        if snapshot is not None and step % s.sfa_every == 0:
            with torch.no_grad():
                for p, snap in zip(params, snapshot):
                    p.mul_(1 - s.sfa_beta).add_(snap, alpha=s.sfa_beta)
                    snap.copy_(p)
        train_seconds += time.perf_counter() - t0
        tokens += int(mask.sum())  # domain tokens: the budget every method shares
        curve.append({
            "step": step,
            "loss": float(loss.detach()),
            "ce": float(ce.detach()),
            **({"kd": float(kd.detach())} if kd is not None else {}),
            "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
        })
        if step in s.eval_at:
            evals.append({"step": step, "tokens": tokens, **evaluate(step)})
    return {
        "curve": curve,
        "evals": evals,
        "train_seconds": round(train_seconds, 3),
        "tokens": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds else None,
        "diverged": diverged,
    }

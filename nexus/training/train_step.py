"""One distillation micro-step: teacher pass, student pass, the loss parts as token sums.

Kept apart from the training loop so that the loss can be tested on its own and reused (the
benchmark runs it on other layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from nexus import chunked_losses
from nexus.losses import IGNORE_INDEX, entropy_sum, l1_drift_sum, router_kl_sum, shift_for_next_token
from nexus.routing import RouterRecorder, router_probs


@dataclass
class LossParts:
    """Token sums of one micro-batch (``Tensor`` scalars) and its token counts.

    ``ce``, ``kd``: sums over predicted tokens (``n_pred`` of them); ``router_kl``: sum over
    input tokens (``n_in``) and MoE layers. ``drift``/``ent_student``/``ent_teacher``: per
    layer ``Tensor[L]`` sums over input tokens (detached, for metrics).
    """

    ce: torch.Tensor
    kd: torch.Tensor
    router_kl: torch.Tensor
    n_pred: torch.Tensor
    n_in: torch.Tensor
    drift: torch.Tensor | None = None
    ent_student: torch.Tensor | None = None
    ent_teacher: torch.Tensor | None = None
    layers: list[int] = field(default_factory=list)


def micro_batches(
    data, collate: Callable[[list[int]], dict], batch_size: int, seed: int, start: int = 0, rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(global_batch_index, batch)`` forever from ``start``, epochs reshuffled by ``seed``.

    The rows of global batch ``i`` are ``order[i*G:(i+1)*G]`` (``G = batch_size*world_size``,
    ``order = data.order(seed, epoch)``), rank ``r`` taking its ``batch_size`` slice, exactly as
    :meth:`nexus.data.TokenData.batches`. A rank whose slice of a short last batch is empty
    gets a placeholder row with nothing to predict (``batch["empty"] = True``), so that every
    process runs the same number of forward/backward passes (DDP needs it) while the loss, a
    global token sum, is the one a single process would compute.
    """
    n = len(data.rows)
    global_bs = batch_size * world_size
    per_epoch = max(1, -(-n // global_bs))
    index, epoch_cached, order = start, None, []
    while True:
        epoch, pos = divmod(index, per_epoch)
        if epoch != epoch_cached:
            order, epoch_cached = data.order(seed, epoch), epoch
        chunk = order[pos * global_bs : (pos + 1) * global_bs]
        mine = chunk[rank * batch_size : (rank + 1) * batch_size]
        if mine:
            batch = collate(mine)
            batch["empty"] = False
        else:
            batch = collate(chunk[:1])
            batch["labels"].fill_(IGNORE_INDEX)
            batch["empty"] = True
        yield index, batch
        index += 1


def distill_losses(
    student: torch.nn.Module,
    batch: dict,
    teacher,
    device,
    *,
    kd: bool,
    temperature: float,
    family=None,
    blocks=(),
    router_grad: bool = False,
    autocast=None,
    chunk_tokens: int = 0,
) -> LossParts:
    """Run the teacher and the student on ``batch`` and return the loss parts as token sums.

    :param student: the (possibly DDP-wrapped) adapted model; its forward carries the gradient.
    :param batch: ``input_ids``/``attention_mask``/``labels`` ``Tensor[B, S]`` (+ cached teacher tensors).
    :param teacher: a teacher from :mod:`nexus.training.teachers`, or None (CE only).
    :param kd: compute the distillation KL (needs a teacher).
    :param temperature: distillation temperature T (the KL sum is *not* multiplied by T^2 here).
    :param family, blocks: for recording the student's routers; empty to skip router terms.
    :param router_grad: keep the student's router logits in the graph (router KL weight > 0).
    :param autocast: a context-manager factory for mixed precision (default: none).
    :param chunk_tokens: tokens per chunk of the vocabulary losses, computed from the final hidden
        states (:mod:`nexus.chunked_losses`; 0: from its workspace budget).
    """
    import contextlib

    autocast = autocast or contextlib.nullcontext
    want_routers = bool(blocks) and teacher is not None
    tout = teacher.outputs(batch, device, want_routers=want_routers) if teacher is not None else None
    layers = [b.layer for b in blocks if tout is not None and b.layer in tout.router_probs]
    recorder = RouterRecorder(family, [b for b in blocks if b.layer in layers], detach=not router_grad)
    ids, mask_in = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with recorder, autocast():
        student_out = chunked_losses.forward_hidden(student, input_ids=ids, attention_mask=mask_in, use_cache=False)
    s_hidden, labels = shift_for_next_token(student_out.states, batch["labels"].to(device))
    head = student_out.head
    if kd and tout is not None and tout.topk_logprobs is None:
        t_states, t_head = (tout.hidden, tout.head) if tout.hidden is not None else (tout.logits, None)
        t_states, _ = shift_for_next_token(t_states.to(device), batch["labels"])
        ce, n_pred, kd_sum = chunked_losses.ce_and_kl_sums(
            s_hidden, head, labels, teacher=(t_states, t_head or chunked_losses.IDENTITY), temperature=temperature,
            chunk=chunk_tokens)
    elif kd and tout is not None:
        ce, n_pred, kd_sum = chunked_losses.ce_and_kl_sums(
            s_hidden, head, labels, teacher_topk=(tout.topk_logprobs, tout.topk_indices), temperature=temperature,
            chunk=chunk_tokens)
    else:
        ce, n_pred = chunked_losses.cross_entropy_sum(s_hidden, head, labels, chunk_tokens)
        kd_sum = ce.new_zeros(())
    zero = ce.new_zeros(())
    in_mask = mask_in.reshape(-1).bool()
    if batch.get("empty"):
        in_mask = torch.zeros_like(in_mask)
    parts = LossParts(ce=ce, kd=kd_sum, router_kl=zero, n_pred=n_pred, n_in=in_mask.sum(), layers=layers)
    if layers:
        rkl, drift, ent_s, ent_t = zero, [], [], []
        for layer in layers:
            p_t = tout.router_probs[layer]
            p_s = router_probs(recorder.logits[layer], recorder.scoring[layer])
            rkl = rkl + router_kl_sum(p_t, p_s, in_mask, recorder.scoring[layer])
            with torch.no_grad():
                drift.append(l1_drift_sum(p_t, p_s, in_mask))
                ent_s.append(entropy_sum(p_s, in_mask))
                ent_t.append(entropy_sum(p_t, in_mask))
        parts.router_kl = rkl
        parts.drift, parts.ent_student, parts.ent_teacher = torch.stack(drift), torch.stack(ent_s), torch.stack(ent_t)
    return parts


def loss_options(run) -> dict:
    """The keyword arguments of :func:`distill_losses` that a training run fixes: ``temperature``,
    ``family``, ``autocast`` and ``chunk_tokens`` (``--loss-chunk-tokens``).

    :param run: a :class:`nexus.engines.train.TrainRun` (its ``config``, ``family`` and ``accelerator``).
    """
    return {"temperature": run.config.temperature, "family": run.family, "autocast": run.accelerator.autocast,
            "chunk_tokens": run.config.loss_chunk_tokens}


def loss_to_backpropagate(config, ce, kd, router_kl, n_pred: float, n_in: float, n_layers: int,
                          kd_tokens: tuple[float, float] | None = None):
    """The training loss of one micro-batch, as back-propagated and (summed over the window) logged.

    ``(ce_weight * CE + kd_weight * T^2 * KD) / n_pred + router_kl_weight * RKL / (n_in * n_layers)``
    with CE, KD, RKL the micro-batch's token sums (scalar tensors or floats) and ``n_pred`` /
    ``n_in`` the predicted / input tokens of the whole window on every process.

    With a separate distillation stream (``--kd-data``), CE comes from the domain batches and KD,
    RKL from the kd batches, so each term is normalised by the tokens of its own stream:
    ``ce_weight * CE / n_pred + kd_weight * T^2 * KD / n_pred_kd + router_kl_weight * RKL /
    (n_in_kd * n_layers)``.

    :param config: a :class:`nexus.training.train_config.TrainConfig` (or anything with its
        ``ce_weight``, ``kd_weight``, ``temperature`` and ``router_kl_weight``).
    :param kd_tokens: ``(n_pred_kd, n_in_kd)`` of the kd stream's window, or None when KD shares
        the domain batches.
    """
    if kd_tokens is None:
        loss = (config.ce_weight * ce + config.kd_weight * config.temperature**2 * kd) / max(n_pred, 1.0)
        rkl_tokens = n_in
    else:
        n_pred_kd, rkl_tokens = kd_tokens
        loss = (config.ce_weight * ce / max(n_pred, 1.0)
                + config.kd_weight * config.temperature**2 * kd / max(n_pred_kd, 1.0))
    if config.router_kl_weight > 0:
        loss = loss + config.router_kl_weight * router_kl / (max(rkl_tokens, 1.0) * n_layers)
    return loss


def token_counts(batch: dict) -> list[float]:
    """``[predicted tokens, input tokens]`` of a batch (input tokens 0 for a placeholder batch)."""
    return [float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            0.0 if batch["empty"] else float(batch["attention_mask"].sum())]

"""Distillation losses, computed from logits (never a model's own ``loss``).

These are the definitions and the reference: ``train``, ``evaluate``, ``precompute`` and the
Trainer KD loss apply them a chunk of tokens at a time to logits projected from the final hidden
states (:mod:`nexus.chunked_losses`), so that no ``[tokens, vocab]`` tensor is held.

Every function returns a **sum over tokens** plus nothing else; the caller divides by the
token count of the whole accumulation window across all processes, so that gradient
accumulation and data parallelism give the same gradient as one big batch.

Conventions: ``N`` tokens (already flattened and shifted: position ``t`` predicts token
``t+1``), ``V`` vocabulary entries, ``E`` experts, ``k`` cached entries per token.
``mask`` is ``Tensor[N]`` bool: the tokens that count.

Top-k (cached) KL. The cache holds, per token, the teacher's ``k`` largest log-probabilities
``log p_i`` (at the cache temperature) and their vocabulary indices. The teacher is taken as
the distribution over ``k + 1`` outcomes: the ``k`` cached tokens and one *tail bucket* with
mass ``p_tail = 1 - sum_i p_i``. The student is projected onto the same outcomes: ``q_i`` for
the cached tokens and ``q_tail = 1 - sum_i q_i``. The loss is the exact KL between these two
``k+1``-outcome distributions::

    KL_k = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

It is a lower bound of the full KL (the tail is coarse-grained), exact when the tail is empty:
with ``k = V`` the tail term vanishes and ``KL_k`` equals the full KL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM logits with the tokens they predict.

    :param logits: ``Tensor[B, S, V]``.
    :param labels: ``Tensor[B, S]`` (``-100`` where nothing is predicted, e.g. padding).
    :return: ``(logits[B*(S-1), V], labels[B*(S-1)])``: position ``t`` paired with label ``t+1``.
    """
    v = logits.shape[-1]
    return logits[:, :-1, :].reshape(-1, v), labels[:, 1:].reshape(-1)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens.

    :param logits: ``Tensor[N, V]`` student logits (any float dtype; computed in fp32).
    :param labels: ``Tensor[N]`` target ids, ``-100`` to ignore.
    :return: ``(loss_sum, count)``: a scalar fp32 sum and the number of labelled tokens (long).
    """
    mask = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
    return (loss * mask).sum(), mask.sum()


def kl_div_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Summed ``KL(p_teacher || p_student)`` over the masked tokens, both softened by ``temperature``.

    :param teacher_logits: ``Tensor[N, V]`` (no gradient needed).
    :param student_logits: ``Tensor[N, V]``.
    :param mask: ``Tensor[N]`` bool.
    :param temperature: T; the caller multiplies by ``T**2`` to keep gradient scale.
    :return: scalar fp32 sum over masked tokens of ``sum_v p_v (log p_v - log q_v)``.
    """
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_token * mask).sum()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl_sum(
    teacher_logprobs: torch.Tensor,
    teacher_indices: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Summed top-k + tail-bucket KL (see the module docstring) over the masked tokens.

    :param teacher_logprobs: ``Tensor[N, k]`` cached teacher log-probabilities, already at ``temperature``.
    :param teacher_indices: ``Tensor[N, k]`` their vocabulary ids (long).
    :param student_logits: ``Tensor[N, V]``.
    :param mask: ``Tensor[N]`` bool.
    :param temperature: T applied to the student (the cache was written at the same T).
    :return: scalar fp32 sum; equals :func:`kl_div_sum` when ``k = V``.
    """
    log_q_all = F.log_softmax(student_logits.float() / float(temperature), dim=-1)
    log_p = teacher_logprobs.float()
    log_q = log_q_all.gather(-1, teacher_indices.long())
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    if teacher_indices.shape[-1] < student_logits.shape[-1]:
        # Tail bucket. Clamp the in-support log-masses below 0 so that log(1 - exp(.)) stays
        # finite (its gradient too) when the support holds (numerically) all the mass.
        tiny = -1e-7
        lse_p = torch.logsumexp(log_p, dim=-1).clamp(max=tiny)
        lse_q = torch.logsumexp(log_q, dim=-1).clamp(max=tiny)
        log_p_tail, log_q_tail = _log1mexp(lse_p), _log1mexp(lse_q)
        per_token = per_token + log_p_tail.exp() * (log_p_tail - log_q_tail)
    return (per_token * mask).sum()


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest log-probabilities of ``softmax(logits / T)`` and their ids.

    :param logits: ``Tensor[..., V]``.
    :return: ``(logprobs[..., k] fp32, indices[..., k] long)``, sorted descending.
    """
    log_p = F.log_softmax(logits.float() / float(temperature), dim=-1)
    values, indices = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    return values, indices


def router_kl_sum(teacher_probs: torch.Tensor, student_probs: torch.Tensor, mask: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """Summed router KL(teacher || student) over the masked tokens of one layer.

    ``softmax`` scoring: the categorical KL over the ``E`` experts. ``sigmoid`` scoring: each
    expert's score is its own Bernoulli, and the KL is the sum of the ``E`` Bernoulli KLs.

    :param teacher_probs: ``Tensor[N, E]`` router probabilities of the teacher.
    :param student_probs: ``Tensor[N, E]`` of the student (carries the gradient).
    :param mask: ``Tensor[N]`` bool (input tokens that are not padding).
    :return: scalar fp32.
    """
    eps = 1e-12
    p = teacher_probs.float().clamp_min(eps)
    q = student_probs.float().clamp_min(eps)
    per = (p * (p.log() - q.log())).sum(-1)
    if scoring == "sigmoid":
        p1 = (1 - teacher_probs.float()).clamp_min(eps)
        q1 = (1 - student_probs.float()).clamp_min(eps)
        per = per + (p1 * (p1.log() - q1.log())).sum(-1)
    return (per * mask).sum()


def entropy_sum(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed entropy (nats) of the rows of ``probs`` ``Tensor[N, E]`` over the masked tokens."""
    p = probs.float()
    per = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return (per * mask).sum()


def l1_drift_sum(teacher_probs: torch.Tensor, student_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed per-token mean absolute difference ``mean_e |p_student - p_teacher|`` over the masked tokens."""
    per = (student_probs.float() - teacher_probs.float()).abs().mean(-1)
    return (per * mask).sum()

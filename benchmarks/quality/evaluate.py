"""Held-out perplexity, distillation loss and router drift, for any causal MoE LM.

Every loss and perplexity is computed with :mod:`nexus.losses` (the functions ``nexus train``
and ``nexus evaluate`` use): next-token cross-entropy summed over the labelled tokens and
divided by their count, KL(teacher || student) likewise.
"""

from __future__ import annotations

import math

import torch

from nexus.losses import cross_entropy_sum, kl_div_sum, shift_for_next_token


def causal_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``logits[B, S, V]`` against ``labels[B, S]`` (positions
    0..S-2 predict 1..S-1; label ``-100`` marks padding and is ignored).

    :param reduction: ``mean`` over the labelled tokens or their ``sum``.
    :return: a scalar fp32 tensor.
    """
    total, count = cross_entropy_sum(*shift_for_next_token(logits, labels))
    return total if reduction == "sum" else total / count.clamp_min(1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` averaged over predicted tokens (``labels[:, 1:] != -100``).

    :param student, teacher: logits ``[B, S, V]``.
    :return: a scalar.
    """
    s_logits, shifted = shift_for_next_token(student, labels)
    t_logits, _ = shift_for_next_token(teacher, labels)
    mask = shifted != -100
    kl = kl_div_sum(t_logits, s_logits, mask, temperature)
    return kl / mask.sum().clamp_min(1) * temperature * temperature


def _device(model) -> torch.device:
    """The device of ``model``'s first parameter (its input embeddings' for every model here)."""
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over every predicted token of ``rows[N, S]`` (fp64 sum of
    :func:`nexus.losses.cross_entropy_sum` per batch, as ``nexus evaluate`` computes it).
    The rows are moved to the model's device batch by batch."""
    device = _device(model)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids = rows[i : i + batch_size].to(device)
        logits = model(input_ids=ids).logits
        s, n = cross_entropy_sum(*shift_for_next_token(logits, ids))
        total += float(s)
        count += int(n)
    return math.exp(total / count)


@torch.no_grad()
def router_probs(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Softmax router probabilities of every MoE layer: ``Tensor[L, N*S, E]`` (fp32).

    Read through transformers' ``output_router_logits`` (raw logits, one entry per MoE layer),
    which every MoE family supports; no labels are passed, so no auxiliary loss is involved.
    Computed on the model's device, returned on the CPU.
    """
    device = _device(model)
    per_batch = []
    for i in range(0, len(rows), batch_size):
        out = model(input_ids=rows[i : i + batch_size].to(device), output_router_logits=True)
        per_batch.append(torch.stack([torch.softmax(lg.float(), -1) for lg in out.router_logits]).cpu())
    return torch.cat(per_batch, dim=1)


def router_drift(probs: torch.Tensor, base: torch.Tensor, top_k: int) -> dict:
    """How far routing moved from the base model on the same tokens.

    :param probs, base: ``Tensor[L, T, E]`` router probabilities (adapted, base).
    :param top_k: experts per token.
    :return: ``tv`` mean total-variation distance ``0.5 * |p - p_base|_1`` (0..1) and
        ``topk_changed`` the fraction of (layer, token) pairs whose top-k expert set differs,
        each averaged over layers, plus ``tv_per_layer``.
    """
    tv = 0.5 * (probs - base).abs().sum(-1)  # [L, T]
    a = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(top_k, -1).indices, True)
    b = torch.zeros_like(base, dtype=torch.bool).scatter_(-1, base.topk(top_k, -1).indices, True)
    changed = (a != b).any(-1).float()
    return {
        "tv": float(tv.mean()),
        "topk_changed": float(changed.mean()),
        "tv_per_layer": [float(x) for x in tv.mean(1)],
    }

"""Held-out perplexity, distillation loss and router drift, for any causal MoE LM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``logits[B, S, V]`` against ``labels[B, S]`` (positions
    0..S-2 predict 1..S-1; label ``-100`` marks padding and is ignored)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), reduction=reduction)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` averaged over predicted tokens (``labels[:, 1:] != -100``).

    :param student, teacher: logits ``[B, S, V]``.
    :return: a scalar.
    """
    t = temperature
    s_logp = F.log_softmax(student[:, :-1].float() / t, dim=-1)
    t_logp = F.log_softmax(teacher[:, :-1].float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    mask = (labels[:, 1:] != -100).float()
    return (kl * mask).sum() / mask.sum().clamp_min(1.0) * t * t


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over every predicted token of ``rows[N, S]`` (fp64 sum)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids = rows[i : i + batch_size]
        logits = model(input_ids=ids).logits
        total += float(causal_ce(logits, ids, reduction="sum").double())
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def router_probs(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Softmax router probabilities of every MoE layer: ``Tensor[L, N*S, E]`` (fp32).

    Read through transformers' ``output_router_logits`` (raw logits, one entry per MoE layer),
    which every MoE family supports; no labels are passed, so no auxiliary loss is involved.
    """
    per_batch = []
    for i in range(0, len(rows), batch_size):
        out = model(input_ids=rows[i : i + batch_size], output_router_logits=True)
        per_batch.append(torch.stack([torch.softmax(lg.float(), -1) for lg in out.router_logits]))
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

"""The NEXUS method's pipeline for the benchmark: collect -> select -> convert (-> train).

A thin adapter over the engines in :mod:`nexus.engines`: each step uses the engine's Python API
when the engine is installed and falls back to a small local implementation otherwise, so the
benchmark runs whichever engines exist. :func:`engine_status` reports which path each step took
(recorded in the results).

Init strategies (the shared expert of each MoE layer):
- ``pca``: the mean of the K experts picked by PCA importance + diversity (the select engine).
- ``random``: the mean of K experts drawn at random (seeded).
- ``top1``: the single expert most often in the top-k on the domain data.
- ``mean_all``: the mean of all experts.
- ``zeros``: gate/up projections randomly initialised (``nn.Linear`` default), down projection
  and biases zero: the block output is unchanged at step 0 with any gate mode.

A shared expert narrower than the routed ones (``intermediate_size < I``) keeps the first
``intermediate_size`` rows of the averaged gate/up and columns of the averaged down.
"""

from __future__ import annotations

import logging

import torch

from nexus.checkpoint import CheckpointReader
from nexus.constants import SHARED_MODULE_NAME
from nexus.shared_expert import attach_shared_experts

log = logging.getLogger(__name__)

INIT_STRATEGIES = ("pca", "random", "top1", "mean_all", "zeros")


def engine_status() -> dict:
    """Which steps run through :mod:`nexus.engines` (``engine``) and which locally (``local``)."""
    status = {}
    for step, module, names in (
        ("collect", "nexus.engines.router_stats", ("collect_router_stats", "CollectArgs")),
        ("select", "nexus.engines.select", ("select_experts",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
            status[step] = "engine" if all(hasattr(mod, n) for n in names) else "local"
        except Exception:  # noqa: BLE001 - an engine mid-development must not break the benchmark
            status[step] = "local"
    status["convert"] = "local"
    status["train"] = "local"
    return status


def collect_stats(model, family, rows: torch.Tensor, batch_size: int = 8) -> dict:
    """Router statistics of the base ``model`` over ``rows[N, S]``.

    :return: ``{"layers": {layer: {"covariance": Tensor[E, E], "frequency": Tensor[E],
        "tokens": int}}, "engine_stats": RouterStats or None}`` (float64; ``frequency`` = share
        of tokens that have the expert in their top-k).
    """
    if engine_status()["collect"] == "engine":
        from nexus.data import TokenData
        from nexus.engines.router_stats import CollectArgs, collect_router_stats

        stats = collect_router_stats(
            model, family, TokenData(rows.tolist(), pad_id=0), CollectArgs(batch_size=batch_size), progress=False
        )
        layers = {
            layer: {"covariance": s.covariance(ddof=1), "frequency": s.topk_count / s.count, "tokens": s.tokens}
            for layer, s in stats.layers.items()
        }
        return {"layers": layers, "engine_stats": stats}
    from nexus.routing import record_routers

    blocks = family.moe_blocks(model)
    sums: dict[int, list] = {}
    with torch.no_grad(), record_routers(family, blocks) as rec:
        for i in range(0, len(rows), batch_size):
            model(input_ids=rows[i : i + batch_size])
            for b in blocks:
                p = rec.probs(b.layer).double()
                top = torch.zeros_like(p).scatter_(-1, p.topk(b.top_k, -1).indices, 1.0)
                s = sums.setdefault(b.layer, [0, 0.0, 0.0, 0.0])
                s[0] += p.shape[0]
                s[1] = s[1] + p.sum(0)
                s[2] = s[2] + p.T @ p
                s[3] = s[3] + top.sum(0)
    out = {}
    for layer, (n, sp, spp, top) in sums.items():
        mu = sp / n
        out[layer] = {"covariance": (spp - n * torch.outer(mu, mu)) / (n - 1), "frequency": top / n, "tokens": n}
    return {"layers": out, "engine_stats": None}


def _pca_pick(cov: torch.Tensor, k: int, diversity: float = 0.1) -> list[int]:
    """Local fallback of the select engine's rule (importance = sum_i |V_ei| r_i, greedy diversity)."""
    var, vec = torch.linalg.eigh(cov.double())
    var, vec = var.flip(0).clamp_min(0), vec.flip(1)
    ratio = var / var.sum().clamp_min(1e-300)
    imp = (vec.abs() * ratio).sum(1)
    load = vec * var.sqrt()
    norm = load / load.norm(dim=1, keepdim=True).clamp_min(1e-300)
    sim = norm @ norm.T
    imp = imp / imp.max()
    picked: list[int] = []
    for _ in range(k):
        score = imp.clone()
        if picked:
            score -= diversity * sim[:, picked].clamp_min(0).max(1).values
        score[picked] = -float("inf")
        picked.append(int(score.argmax()))
    return picked


def select(stats: dict, strategy: str, k: int, seed: int) -> dict[int, list[int]]:
    """Experts to average per layer for ``strategy`` (empty lists for ``zeros``).

    :param stats: from :func:`collect_stats`.
    :param k: experts for ``pca`` and ``random``.
    :param seed: draws of ``random``.
    """
    out = {}
    engine_doc = None
    if strategy == "pca" and stats["engine_stats"] is not None and engine_status()["select"] == "engine":
        from nexus.engines.select import select_experts

        engine_doc = {d["layer"]: d["experts"] for d in select_experts(stats["engine_stats"], top_k=k)["layers"]}
    for layer, s in stats["layers"].items():
        e = len(s["frequency"])
        if strategy == "pca":
            out[layer] = engine_doc[layer] if engine_doc else _pca_pick(s["covariance"], k)
        elif strategy == "random":
            g = torch.Generator().manual_seed(seed * 7919 + layer)
            out[layer] = sorted(torch.randperm(e, generator=g)[:k].tolist())
        elif strategy == "top1":
            out[layer] = [int(s["frequency"].argmax())]
        elif strategy == "mean_all":
            out[layer] = list(range(e))
        elif strategy == "zeros":
            out[layer] = []
        else:
            raise ValueError(f"unknown init strategy {strategy!r}; choose one of {INIT_STRATEGIES}")
    return out


@torch.no_grad()
def init_shared(model, family, base_path, blocks, selection: dict[int, list[int]]) -> None:
    """Set every attached shared expert from the mean of its layer's selected experts, read from
    the checkpoint on disk (MXFP4 decoded) through the family's ``read_experts``; an empty
    selection means the ``zeros`` init."""
    reader = CheckpointReader(base_path)
    for b in blocks:
        mlp = getattr(b.module, SHARED_MODULE_NAME)
        width = mlp.gate_proj.out_features
        experts = selection[b.layer]
        if not experts:
            mlp.down_proj.weight.zero_()
            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if lin.bias is not None:
                    lin.bias.zero_()
            continue
        w = family.read_experts(reader, model.config, b.layer, experts)
        mlp.gate_proj.weight.copy_(w.gate.mean(0)[:width])
        mlp.up_proj.weight.copy_(w.up.mean(0)[:width])
        mlp.down_proj.weight.copy_(w.down.mean(0)[:, :width])
        if w.has_bias and mlp.gate_proj.bias is not None:
            mlp.gate_proj.bias.copy_(w.gate_bias.mean(0)[:width])
            mlp.up_proj.bias.copy_(w.up_bias.mean(0)[:width])
            mlp.down_proj.bias.copy_(w.down_bias.mean(0))


def convert(model, family, base_path, selection: dict[int, list[int]], intermediate_size: int, gate_mode: str):
    """Attach shared experts of width ``intermediate_size`` with ``gate_mode`` and initialise
    them from ``selection`` (see :func:`init_shared`). :return: the MoE blocks."""
    blocks = attach_shared_experts(model, family, intermediate_size, gate_mode)
    init_shared(model, family, base_path, blocks, selection)
    return blocks

"""The NEXUS method's pipeline for the benchmark: collect -> select -> convert -> train.

A thin adapter over the engines in :mod:`nexus.engines`. When all four are installed
(:func:`engines_available`), a NEXUS run is exactly what a user gets: ``collect_router_stats``
and ``select_experts`` once per base model (:func:`selection_document`), then per run
``convert`` writes the initial adapter and ``nexus.engines.train.train`` trains it from the
checkpoint on disk (:func:`train_with_engines`). Otherwise small local stand-ins are used
(:func:`collect_stats`, :func:`select`, :func:`convert` here, and the benchmark's own loop);
:func:`engine_status` says which path each step took and is recorded in the results.

Init strategies (the shared expert of each MoE layer):
- ``pca``: the mean of the K experts picked by PCA importance + diversity (the select engine).
- ``random``: the mean of K experts drawn at random (seeded).
- ``top1``: the single expert most often in the top-k on the domain data.
- ``mean_all``: the mean of all experts.
- ``zeros``: gate/up projections randomly initialised (``nn.Linear`` default), down projection
  and biases zero: the block output is unchanged at step 0 with any gate mode.

Local stand-in only: a shared expert narrower than the routed ones keeps the first
``intermediate_size`` rows of the averaged gate/up and columns of the averaged down (the convert
engine keeps the units of largest norm instead).
"""

from __future__ import annotations

import logging

import torch

from nexus.checkpoint import CheckpointReader
from nexus.constants import SHARED_MODULE_NAME
from nexus.shared_expert import attach_shared_experts, is_shared_parameter

log = logging.getLogger(__name__)

INIT_STRATEGIES = ("pca", "random", "top1", "mean_all", "zeros")


ENGINES = (
    ("collect", "nexus.engines.collect", ("collect_router_stats", "CollectArgs")),
    ("select", "nexus.engines.select", ("select_experts", "save_selection")),
    ("convert", "nexus.engines.convert", ("convert",)),
    ("train", "nexus.engines.train", ("train", "NonFiniteLossError")),
)


def engine_status() -> dict:
    """Which steps can run through :mod:`nexus.engines` (``engine``) and which run locally (``local``)."""
    import importlib

    status = {}
    for step, module, names in ENGINES:
        try:
            mod = importlib.import_module(module)
            status[step] = "engine" if all(hasattr(mod, n) for n in names) else "local"
        except Exception:  # noqa: BLE001 - an engine mid-development must not break the benchmark
            status[step] = "local"
    return status


def engines_available() -> bool:
    """Whether the whole NEXUS pipeline can run through the engines."""
    return all(v == "engine" for v in engine_status().values())


def collect_stats(model, family, rows: torch.Tensor, batch_size: int = 8) -> dict:
    """Router statistics of the base ``model`` over ``rows[N, S]``.

    :return: ``{"layers": {layer: {"covariance": Tensor[E, E], "frequency": Tensor[E],
        "tokens": int}}, "engine_stats": RouterStats or None}`` (float64; ``frequency`` = share
        of tokens that have the expert in their top-k).
    """
    if engine_status()["collect"] == "engine":
        from nexus.data import TokenData
        from nexus.engines.collect import CollectArgs, collect_router_stats

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


# --------------------------------------------------------------------------- engine path


def selection_document(model, family, rows: torch.Tensor, k: int, path) -> dict:
    """``collect`` + ``select`` through the engines on ``rows[N, S]``; the selection JSON is
    written to ``path`` (for ``convert``). :return: the selection document."""
    from nexus.data import TokenData
    from nexus.engines.collect import CollectArgs, collect_router_stats
    from nexus.engines.select import save_selection, select_experts

    stats = collect_router_stats(model, family, TokenData(rows.tolist(), pad_id=0), CollectArgs(batch_size=8), progress=False)
    doc = select_experts(stats, top_k=k, source="benchmark domain training rows")
    save_selection(doc, path, plots=False)
    return doc


def _read_metrics(path) -> list[dict]:
    import json
    from pathlib import Path

    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_with_engines(
    base_path,
    data_path,
    selection_path,
    init: str,
    gate: str,
    train_router: bool,
    width: int,
    settings,
    seq_len: int,
    run_dir,
    evaluate,
) -> dict:
    """One NEXUS run through ``convert`` and ``nexus.engines.train.train``.

    :param data_path: the domain training documents (``.jsonl``); the engine tokenises and packs
        them exactly as :func:`nexus.data.load_token_data` does for the baselines.
    :param selection_path: the ``expert_selection.json`` (used by pca, top1 and random).
    :param settings: a :class:`benchmarks.quality.trainer.TrainSettings`; its ``eval_at`` steps
        are multiples of the checkpoint interval, so each evaluation reads a checkpoint.
    :param run_dir: scratch directory for the adapter and the run (deleted by the caller).
    :param evaluate: ``(model, step) -> dict`` of metrics.
    :return: ``model`` (the trained model, None when diverged), ``initial`` (``evaluate`` of the
        converted adapter before training), ``trainable``, ``curve``, ``evals``,
        ``train_seconds``, ``tokens``, ``tokens_per_second``, ``diverged``.
    """
    from pathlib import Path

    from benchmarks.quality.trainer import warmup_steps
    from nexus.adapter import load_adapter
    from nexus.training.train_state import ADAPTER_SUBDIR
    from nexus.engines.convert import ConvertConfig
    from nexus.engines.convert import convert as engine_convert
    from nexus.engines.train import NonFiniteLossError
    from nexus.engines.train import train as engine_train
    from nexus.training.train_config import TrainConfig
    from nexus.loading import load_model

    run_dir = Path(run_dir)
    adapter = engine_convert(ConvertConfig(
        model=base_path, output=run_dir / "adapter", selection=None if init in ("mean_all", "zeros") else str(selection_path),
        strategy=init, gate_mode=gate, shared_intermediate_size=width, seed=settings.seed,
    ), progress=False)
    start = load_adapter(load_model(base_path), adapter)
    initial = evaluate(start, 0)
    trainable = sum(p.numel() for n, p in start.named_parameters() if is_shared_parameter(n))
    if train_router:
        from nexus.family import resolve_family

        family = resolve_family(start.config)
        trainable += sum(p.numel() for b in family.moe_blocks(start) for p in family.router_capture(b).module.parameters())
    del start
    every = settings.eval_at[0]
    config = TrainConfig(
        model=str(base_path), adapter=str(adapter), output=str(run_dir / "run"), teacher="self", data=str(data_path),
        seq_len=seq_len, batch_size=settings.batch_size, max_steps=settings.steps, lr=settings.lr,
        train_routers=train_router, warmup_steps=warmup_steps(settings), schedule="cosine",
        min_lr_ratio=settings.min_lr_ratio, max_grad_norm=1.0, weight_decay=0.0, ce_weight=1.0,
        kd_weight=settings.kd_weight, temperature=settings.kd_temperature, sfa_interval=settings.sfa_every,
        sfa_beta=settings.sfa_beta if settings.sfa_every else 0.5, save_every=every, keep_last=0, log_every=1,
        seed=settings.seed,
    )
    diverged, model = False, None
    try:
        result = engine_train(config)
        model = result.model
    except NonFiniteLossError as exc:
        log.warning("NEXUS run at lr %g diverged: %s", settings.lr, exc)
        diverged = True
    metrics = _read_metrics(run_dir / "run" / "metrics.jsonl")
    curve, seconds, tokens, prev = [], 0.0, 0, 0
    for m in metrics:
        step_tokens = m["tokens"] - prev
        prev = m["tokens"]
        seconds += step_tokens / m["tokens_per_s"] if m.get("tokens_per_s") else 0.0
        tokens = m["tokens"]
        curve.append({"step": m["step"], "loss": m["loss"], "ce": m["ce"], **({"kd": m["kd"]} if settings.kd_weight else {}),
                      "lr": m["lr"], "grad_norm": m["grad_norm"]})
    evals = []
    if not diverged:
        for step in settings.eval_at:
            if step == settings.steps:
                evals.append({"step": step, "tokens": tokens, **evaluate(model, step)})
                continue
            ckpt = run_dir / "run" / "checkpoints" / f"step-{step}" / ADAPTER_SUBDIR
            at = load_adapter(load_model(base_path), ckpt)
            evals.append({"step": step, "tokens": next((m["tokens"] for m in metrics if m["step"] == step), None), **evaluate(at, step)})
            del at
    if model is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": model,
        "initial": initial,
        "trainable": trainable,
        "curve": curve,
        "evals": evals,
        "train_seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "diverged": diverged,
    }

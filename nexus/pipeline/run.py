"""``nexus run``: collect -> select -> convert -> train -> evaluate -> plot in one directory.

Layout of the run directory::

    stats/                 router statistics (collect)
    expert_selection.json  PCA selection (+ PNGs beside it)
    adapter_init/          the initialised adapter (convert)
    train/                 checkpoints, metrics.jsonl, final/ (train), plots/ (plot)
    eval.json              base vs adapted on held-out data (evaluate)
    stages/                one stamp per finished stage; a rerun skips stages whose inputs match

Every stage is resumable on its own (collect and train checkpoint as they go), so an
interrupted ``run`` continues where it stopped when rerun with the same arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from nexus.constants import DEFAULT_GATE_MODE, DEFAULT_STRATEGY
from nexus.errors import NexusError
from nexus.options import option as _f
from nexus.pipeline.stages import StageRunner

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """The arguments of ``nexus run`` (each stage gets the subset it needs)."""

    output: str = _f(None, "Run directory.", required=True)
    model: str | None = _f(None, "Base checkpoint directory (default: the family's demo checkpoint).")
    data: str | None = _f(None, "Training data (default with the demo: the shipped text sample).")
    eval_data: str | None = _f(None, "Held-out data for evaluate (default: --data, or the demo's held-out sample).")
    family: str | None = _f(None, "Family name (default: detected).")
    text_column: str | None = _f(None, "Text column of the data.")
    seq_len: int = _f(128, "Tokens per row.")
    batch_size: int = _f(8, "Rows per batch (collect, train, evaluate).")
    target_tokens: int | None = _f(None, "Tokens for router statistics (default: the whole data once).")
    top_k: int | None = _f(None, "Experts averaged per layer (default: min(24, E)).")
    diversity: float = _f(0.1, "Redundancy penalty of the selection.")
    strategy: str = _f(DEFAULT_STRATEGY, "Initialisation: pca, random, top1, mean_all, zeros.")
    gate_mode: str = _f(DEFAULT_GATE_MODE, "Shared-expert gate: none, scalar, token.")
    shared_intermediate_size: int | None = _f(None, "Shared expert width (default: the expert width).")
    max_steps: int = _f(100, "Training steps.")
    lr: float = _f(1e-3, "Peak learning rate.")
    warmup_steps: int = _f(10, "Warmup steps.")
    kd_weight: float = _f(1.0, "Distillation weight (teacher: the base itself).")
    ce_weight: float = _f(1.0, "Cross-entropy weight.")
    sfa_interval: int = _f(0, "SFA interval (0: off).")
    train_routers: bool = _f(False, "Train the routers too.")
    eval_batches: int | None = _f(None, "Limit evaluation to this many batches.")
    seed: int = _f(0, "Seed.")
    force: bool = _f(False, "Rerun every stage even when its artifact is up to date.")


def run_pipeline(cfg: RunConfig) -> dict:
    """Run every stage into ``cfg.output``; skip stages whose inputs did not change.

    :return: ``{"ran": [...], "skipped": [...], "eval": eval dict, "run_dir": path}``.
    """
    from nexus.demo import demo_checkpoint, demo_eval_path, demo_text_path
    from nexus.engines.convert import convert
    from nexus.engines.evaluate import evaluate
    from nexus.engines.plots import plot_run
    from nexus.engines.router_stats import CollectArgs, run_collect
    from nexus.engines.select import run_select
    from nexus.engines.train import train
    from nexus.engines.train_config import TrainConfig
    from nexus.family import resolve_family
    from nexus.io import write_json
    from nexus.loading import load_config

    if cfg.output is None:
        raise NexusError("give --output DIR for the run")
    out = Path(cfg.output)
    if cfg.model is None:
        if cfg.family is None:
            raise NexusError("give --model PATH, or --family NAME to run on that family's demo checkpoint "
                             "(e.g. nexus --family gpt_oss run --output runs/demo)")
        family = resolve_family(name=cfg.family)
        cfg.model = str(demo_checkpoint(family))
        cfg.data = cfg.data or str(demo_text_path())
        cfg.eval_data = cfg.eval_data or str(demo_eval_path())
        log.info("no --model: using the %s demo checkpoint %s", family.name, cfg.model)
    if cfg.data is None:
        raise NexusError("give --data (a .jsonl/.parquet/.txt file or directory) with --model")
    family = resolve_family(load_config(cfg.model), name=cfg.family)
    eval_data = cfg.eval_data or cfg.data
    stages = StageRunner(out, force=cfg.force)
    model_id = {"model": str(Path(cfg.model).resolve()), "family": family.name}
    data_id = {"data": str(cfg.data), "text_column": cfg.text_column, "seq_len": cfg.seq_len}

    stats_dir = out / "stats"
    collect_args = CollectArgs(target_tokens=cfg.target_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    stages.run(
        "collect", {**model_id, **data_id, **dataclasses.asdict(collect_args)}, stats_dir / "router_stats.json",
        lambda: run_collect(cfg.model, cfg.data, stats_dir, collect_args, family_name=family.name,
                            seq_len=cfg.seq_len, text_column=cfg.text_column, overwrite=True),
    )
    selection = out / "expert_selection.json"
    stages.run("select", {"top_k": cfg.top_k, "diversity": cfg.diversity}, selection,
               lambda: run_select(stats_dir, selection, top_k=cfg.top_k, diversity=cfg.diversity), after=("collect",))
    adapter_init = out / "adapter_init"
    stages.run(
        "convert",
        {**model_id, "strategy": cfg.strategy, "gate_mode": cfg.gate_mode, "size": cfg.shared_intermediate_size,
         "seed": cfg.seed},
        adapter_init,
        lambda: convert(cfg.model, adapter_init, selection=selection, strategy=cfg.strategy, gate_mode=cfg.gate_mode,
                        shared_intermediate_size=cfg.shared_intermediate_size, seed=cfg.seed, family_name=family.name),
        after=("select",),
    )
    train_dir = out / "train"
    tcfg = TrainConfig(
        model=cfg.model, adapter=str(adapter_init), output=str(train_dir), data=cfg.data, text_column=cfg.text_column,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_steps=cfg.max_steps, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight,
        sfa_interval=cfg.sfa_interval, train_routers=cfg.train_routers, seed=cfg.seed,
        save_every=max(1, cfg.max_steps // 4), log_every=max(1, min(10, cfg.max_steps // 20)),
        resume=(train_dir / "run_config.json").exists() and not (train_dir / "final").exists(),
    )
    train_inputs = {k: v for k, v in tcfg.to_dict().items() if k != "resume"}
    stages.run("train", train_inputs, train_dir / "final", lambda: train(tcfg), after=("convert",))
    eval_path = out / "eval.json"

    def _evaluate():
        result = evaluate(cfg.model, eval_data, adapter=train_dir / "final", seq_len=cfg.seq_len,
                          batch_size=cfg.batch_size, max_batches=cfg.eval_batches, text_column=cfg.text_column)
        write_json(eval_path, result)
        return result

    stages.run("evaluate", {"eval_data": str(eval_data), "max_batches": cfg.eval_batches}, eval_path, _evaluate,
               after=("train",))
    plots = train_dir / "plots"
    stages.run("plot", {}, plots, lambda: plot_run(train_dir), after=("train",))
    import json

    return {"run_dir": str(out), "ran": stages.ran, "skipped": stages.skipped,
            "eval": json.loads(eval_path.read_text())}

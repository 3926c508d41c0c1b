"""``nexus run``: collect -> select -> convert -> train -> evaluate -> plot in one directory.

Layout of the run directory::

    stats/                 router statistics (collect)
    expert_selection.json  PCA selection (+ PNGs beside it)
    adapter_init/          the initialised adapter (convert)
    train/                 checkpoints, metrics.jsonl, final/ (train), plots/ (plot)
    eval.json              base vs adapted on held-out data (evaluate), with the source of that data
    stages/                one stamp per finished stage; a rerun skips stages whose inputs match
    cache/                 tokenised data shared by the stages (nexus.data.token_cache)

Every argument of every stage is checked before the first stage starts. Stamps cover the
arguments with every path resolved (so ``../R``, ``R/`` and an absolute path are one run) and the
data's content. A rerun whose inputs differ from a stage's stamp (another argument, edited or
appended data) is refused before anything runs, naming what differs, unless ``--overwrite`` lets
it replace that stage and the ones after it (:mod:`nexus.engines.run_stages`). Without
``--eval-data``, a deterministic 10% of the documents of ``--data`` (by content hash, see
:mod:`nexus.data`) is held out: collect and train read ``DATA@train``, evaluate reads
``DATA@heldout``. Every stage is resumable on its own (collect and train checkpoint as they go):
an interrupted ``run`` stops after the interrupted stage (exit status 130 for SIGINT, 143 for
SIGTERM) and continues where it stopped when rerun with the same arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path

from nexus.config_fields import option as _f
from nexus.config_fields import same_as
from nexus.constants import GATE_MODES, HOLDOUT_FRACTION, INIT_STRATEGIES
from nexus.engines.collect_config import CollectArgs, CollectConfig
from nexus.engines.convert_config import ConvertConfig
from nexus.engines.evaluate_config import EvaluateConfig
from nexus.engines.run_stages import Stage, StageRunner
from nexus.engines.select_config import SelectConfig
from nexus.errors import Interrupted, NexusError
from nexus.training.train_config import TrainConfig, kd_data_errors

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """The arguments of ``nexus run``: the stage configs' fields that a run exposes, taken from those
    configs (:func:`nexus.config_fields.same_as`: same defaults, same checks), under the flag names
    the run has always had; each stage gets its config built from them (:func:`validate_run`).

    Two defaults differ from ``nexus train``'s on purpose. ``batch_size`` 8 is ``collect``'s: one
    batch size serves collect, train and evaluate in a run, and router statistics want many
    tokens per forward. ``warmup_steps`` 10 is a tenth of the run's default 100 steps, so the
    run's short schedule does not start at the peak rate from a freshly converted adapter;
    ``nexus train`` keeps 4 rows and no warmup, the values its users' runs were recorded with
    (``run_config.json``; a resume must match them). Changing either here would also rerun every
    stage of existing run directories (their stamps record the values).
    """

    output: str = _f(None, "Run directory.", required=True, path=True)
    model: str | None = _f(None, "Base checkpoint directory (default: the family's demo checkpoint).",
                              path=True)
    data: str | None = _f(None, "Training data (default with the demo: the shipped text sample).", data=True)
    eval_data: str | None = _f(None, f"Held-out data for evaluate (default: {HOLDOUT_FRACTION:.0%} of the documents "
                                     "of --data, picked by content hash and left out of collect and train; with the "
                                     "demo, its held-out sample).", data=True)
    family: str | None = _f(None, "Family name (default: detected).")
    text_column: str | None = same_as(TrainConfig, "text_column")
    seq_len: int = same_as(TrainConfig, "seq_len")
    batch_size: int = same_as(CollectArgs, "batch_size", "Rows per batch (collect, train, evaluate).")
    target_tokens: int | None = same_as(CollectArgs, "target_tokens", "Tokens for router statistics (default: the "
                                                                      "whole data once).")
    # Range checks of top_k, diversity and eval_batches are validate_run's (they know E, and name the flag).
    top_k: int | None = same_as(SelectConfig, "top_k", min=None)
    diversity: float = same_as(SelectConfig, "diversity", min=None)
    strategy: str = same_as(ConvertConfig, "strategy")
    gate_mode: str = same_as(ConvertConfig, "gate_mode")
    shared_intermediate_size: int | None = same_as(ConvertConfig, "shared_intermediate_size")
    max_steps: int = same_as(TrainConfig, "max_steps")
    lr: float = same_as(TrainConfig, "lr")
    warmup_steps: int = _f(10, "Linear warmup steps (a tenth of the default --max-steps).")
    kd_weight: float = same_as(TrainConfig, "kd_weight", "Distillation weight (teacher: the base itself).")
    kd_data: str | None = same_as(TrainConfig, "kd_data", "General text for distillation: train computes KD on "
                                                          "batches of it and CE on --data (default: both on --data).")
    kd_batch_size: int | None = same_as(TrainConfig, "kd_batch_size", "Rows of --kd-data per training batch "
                                                                      "(default: --batch-size).")
    kd_text_column: str | None = same_as(TrainConfig, "kd_text_column")
    ce_weight: float = same_as(TrainConfig, "ce_weight")
    sfa_interval: int = same_as(TrainConfig, "sfa_interval")
    train_routers: bool = same_as(TrainConfig, "train_routers")
    eval_batches: int | None = same_as(EvaluateConfig, "max_batches", "Limit evaluation to this many batches.",
                                       min=None)
    seed: int = same_as(TrainConfig, "seed", "Seed of collect's row order, convert's random picks and training.")
    force: bool = _f(False, "Rerun every stage even when its artifact is up to date (replacing it).")
    overwrite: bool = _f(False, "Replace the stages of --output made from other inputs (another argument, changed "
                                "data) and the stages after them; without it such a rerun is refused, naming what "
                                "differs.")
    dequantize: bool = same_as(TrainConfig, "dequantize")


@dataclass
class _Plan:
    """What :func:`validate_run` checked and resolved, for the stages to use."""

    family: object
    train_data: str  # --data, or its @train side
    eval_data: str
    eval_source: dict  # how eval_data relates to --data, recorded in eval.json
    collect: CollectConfig
    select: SelectConfig
    convert: ConvertConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    data_fingerprint: str
    eval_fingerprint: str
    kd_data_fingerprint: str | None = None


def validate_run(cfg: RunConfig) -> _Plan:
    """Check every argument of every stage before any stage starts (so a bad --lr or a missing
    evaluation file fails in seconds, not after collect), and resolve the defaults.

    Fills in ``cfg.model``/``cfg.data``/``cfg.eval_data`` from the family's demo when ``--model``
    is not given.

    :raises NexusError: the first argument that is wrong, naming it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from nexus.data import check_data, check_seq_len, heldout_counts, load_tokenizer
    from nexus.data_sources import data_fingerprint, resolved_spec, split_specs
    from nexus.demo import demo_checkpoint, demo_eval_path, demo_text_path
    from nexus.family import resolve_family
    from nexus.io import local_data_path, refuse_output_over_inputs
    from nexus.loading import load_config

    if cfg.output is None:
        raise NexusError("give --output DIR for the run")
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
    # Resolved once here, so that every stage and every stamp sees one spelling of each path.
    cfg.output = str(Path(cfg.output).expanduser().resolve())
    cfg.model = str(Path(cfg.model).expanduser().resolve())
    cfg.data = resolved_spec(cfg.data)
    cfg.eval_data = resolved_spec(cfg.eval_data) if cfg.eval_data is not None else None
    if cfg.kd_data is not None:
        with kd_data_errors(cfg.kd_data):
            cfg.kd_data = resolved_spec(cfg.kd_data)
    # the stages write inside --output: it must be apart from every input the user gave
    refuse_output_over_inputs(cfg.output, {"--model": cfg.model, **{flag: local_data_path(value) for flag, value in (
        ("--data", cfg.data), ("--eval-data", cfg.eval_data), ("--kd-data", cfg.kd_data))}})
    config = load_config(cfg.model)
    family = resolve_family(config, name=cfg.family)
    with torch.device("meta"):
        blocks = family.moe_blocks(AutoModelForCausalLM.from_config(config))
    smallest = min(b.num_experts for b in blocks)
    if cfg.top_k is not None and not 1 <= cfg.top_k <= smallest:
        raise NexusError(f"--top-k must be between 1 and {smallest} (the experts per layer of {cfg.model}), "
                         f"got {cfg.top_k}")
    if not math.isfinite(cfg.diversity) or cfg.diversity < 0:
        raise NexusError(f"--diversity must be a finite number >= 0, got {cfg.diversity}")
    if cfg.strategy not in INIT_STRATEGIES:
        raise NexusError(f"--strategy must be one of {', '.join(INIT_STRATEGIES)}, got {cfg.strategy!r}")
    if cfg.gate_mode not in GATE_MODES:
        raise NexusError(f"--gate-mode must be one of {', '.join(GATE_MODES)}, got {cfg.gate_mode!r}")
    for name in ("shared_intermediate_size", "eval_batches"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise NexusError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    tokenizer = load_tokenizer(cfg.model, config)
    check_seq_len(cfg.seq_len, tokenizer)
    check_data(cfg.data, tokenizer, cfg.text_column)
    if cfg.kd_data is not None:
        with kd_data_errors(cfg.kd_data):
            check_data(cfg.kd_data, tokenizer, cfg.kd_text_column)
    if cfg.eval_data is not None:
        check_data(cfg.eval_data, tokenizer, cfg.text_column)
        train_data, eval_data = cfg.data, cfg.eval_data
        eval_source = {"kind": "eval_data", "data": cfg.eval_data}
    else:
        held, total = heldout_counts(cfg.data, tokenizer, cfg.text_column)
        if held == 0 or held == total:
            raise NexusError(f"--data {cfg.data} has {total} documents, {held} of them in the {HOLDOUT_FRACTION:.0%} "
                             "held-out split: too few to hold some out; give more documents or --eval-data")
        train_data, eval_data = split_specs(cfg.data)
        eval_source = {"kind": "heldout_split", "data": cfg.data, "fraction": HOLDOUT_FRACTION,
                       "documents": held, "of_documents": total,
                       "rule": "documents of --data whose salted SHA-256 falls in the lowest fraction; "
                               "left out of collect and train"}
        log.info("no --eval-data: holding out %d of the %d documents of %s (%s) for evaluate; collect and train "
                 "read the other %d", held, total, cfg.data, eval_data, total - held)
    out = Path(cfg.output)
    train_dir = out / "train"
    collect = CollectConfig(model=cfg.model, data=train_data, output=str(out / "stats"),
                            target_tokens=cfg.target_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            text_column=cfg.text_column, seed=cfg.seed, dequantize=cfg.dequantize)
    select = SelectConfig(stats=collect.output, output=str(out / "expert_selection.json"), top_k=cfg.top_k,
                          diversity=cfg.diversity)
    convert = ConvertConfig(model=cfg.model, selection=select.output, output=str(out / "adapter_init"), overwrite=True,
                            strategy=cfg.strategy, gate_mode=cfg.gate_mode,
                            shared_intermediate_size=cfg.shared_intermediate_size, seed=cfg.seed)
    train = TrainConfig(
        model=cfg.model, adapter=convert.output, output=str(train_dir), data=train_data,
        text_column=cfg.text_column, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_steps=cfg.max_steps,
        lr=cfg.lr, warmup_steps=cfg.warmup_steps, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight,
        kd_data=cfg.kd_data, kd_batch_size=cfg.kd_batch_size, kd_text_column=cfg.kd_text_column,
        sfa_interval=cfg.sfa_interval, train_routers=cfg.train_routers, seed=cfg.seed, dequantize=cfg.dequantize,
        save_every=max(1, cfg.max_steps // 4), log_every=max(1, min(10, cfg.max_steps // 20)),
    )
    evaluate = EvaluateConfig(model=cfg.model, data=eval_data, adapter=str(train_dir / "final"), seq_len=cfg.seq_len,
                              batch_size=cfg.batch_size, max_batches=cfg.eval_batches, text_column=cfg.text_column,
                              dequantize=cfg.dequantize)
    return _Plan(family, train_data, eval_data, eval_source, collect, select, convert, train, evaluate,
                 data_fingerprint(cfg.data), data_fingerprint(eval_data),
                 data_fingerprint(cfg.kd_data) if cfg.kd_data is not None else None)


def run_pipeline(cfg: RunConfig) -> dict:
    """Validate every argument (:func:`validate_run`), then run every stage into ``cfg.output``;
    skip stages whose inputs (data content included) did not change.

    :return: ``{"ran": [...], "skipped": [...], "eval": eval dict, "run_dir": path}``.
    :raises Interrupted: SIGINT/SIGTERM stopped a stage (after it saved what it could); nothing
        after that stage ran.
    """
    import json

    from nexus.data import token_cache
    from nexus.engines.convert import convert
    from nexus.engines.evaluate import evaluate
    from nexus.engines.plots import plot_run
    from nexus.engines.collect import run_collect
    from nexus.engines.select import run_select
    from nexus.engines.train import train
    from nexus.io import write_json

    plan = validate_run(cfg)
    family = plan.family
    out = Path(cfg.output)
    stages = StageRunner(out, force=cfg.force, overwrite=cfg.overwrite)
    model_id = {"model": cfg.model, "family": family.name}
    data_id = {"data": plan.train_data, "data_fingerprint": plan.data_fingerprint, "text_column": cfg.text_column,
               "seq_len": cfg.seq_len}

    tcfg = plan.train
    train_dir = Path(tcfg.output)
    eval_path = out / "eval.json"

    def _train(resume: bool, replace: bool):
        result = train(dataclasses.replace(tcfg, resume=resume, overwrite=replace))
        if result.final is None:
            raise NexusError(f"training stopped at step {result.step} before --max-steps; rerun to continue")
        return result

    def _evaluate(resume: bool, replace: bool):
        result = evaluate(plan.evaluate)
        result["eval_source"] = plan.eval_source
        write_json(eval_path, result)
        return result

    try:
        with token_cache(out / "cache"), _SigtermInterrupts():
            stages.run_all([
                Stage("collect", {**model_id, **data_id, **dataclasses.asdict(plan.collect.args())},
                      Path(plan.collect.output) / "router_stats.json",
                      lambda resume, replace: run_collect(dataclasses.replace(plan.collect, overwrite=replace),
                                                          family.name),
                      resumable=True),
                Stage("select", {"top_k": cfg.top_k, "diversity": cfg.diversity}, Path(plan.select.output),
                      lambda resume, replace: run_select(plan.select), after=("collect",)),
                Stage("convert", {**model_id, "strategy": cfg.strategy, "gate_mode": cfg.gate_mode,
                                  "size": cfg.shared_intermediate_size, "seed": cfg.seed},
                      Path(plan.convert.output),
                      lambda resume, replace: convert(dataclasses.replace(plan.convert, overwrite=replace),
                                                      family.name),
                      after=("select",)),
                Stage("train", _train_inputs(plan), train_dir / "final", _train, after=("convert",), resumable=True),
                Stage("evaluate", {"eval_data": plan.eval_data, "eval_fingerprint": plan.eval_fingerprint,
                                   "max_batches": cfg.eval_batches, "eval_source": plan.eval_source},
                      eval_path, _evaluate, after=("train",)),
                Stage("plot", {}, train_dir / "plots", lambda resume, replace: plot_run(train_dir), after=("train",)),
            ])
    except Interrupted as exc:
        raise Interrupted(f"run stopped in stage {stages.current}: {exc}. Rerun the same `nexus run` command to "
                          "continue; the stages after it did not run", exc.signum) from exc
    except KeyboardInterrupt as exc:
        raise Interrupted(f"run aborted in stage {stages.current} by SIGINT; rerun the same `nexus run` command to "
                          "continue from the stage's last checkpoint", signal.SIGINT) from exc
    return {"run_dir": str(out), "ran": stages.ran, "skipped": stages.skipped,
            "eval": json.loads(eval_path.read_text())}


def _train_inputs(plan: _Plan) -> dict:
    """What the train stage's stamp covers: its arguments and the content of the data it reads.
    Its ``output`` and ``adapter`` are the run's own directories, already named by the run, how a
    rerun continues (``resume``, ``overwrite``, ``allow_data_change``) is no input, and without
    ``--kd-data`` the kd options are left out."""
    from nexus.training.train_config import KD_STREAM_FIELDS

    not_inputs = ("resume", "overwrite", "allow_data_change", "output", "adapter")
    inputs = {k: v for k, v in plan.train.to_dict().items()
              if k not in not_inputs and not (k in KD_STREAM_FIELDS and v is None)}
    inputs["data_fingerprint"] = plan.data_fingerprint
    if plan.kd_data_fingerprint is not None:
        inputs["kd_data_fingerprint"] = plan.kd_data_fingerprint
    return inputs


class _SigtermInterrupts:
    """Turn SIGTERM into ``Interrupted`` (exit status 143) in stages that install no handler of their
    own (SIGINT already raises ``KeyboardInterrupt``); a stage's own handlers take precedence."""

    def __enter__(self):
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    @staticmethod
    def _handle(signum, frame):
        raise Interrupted("received SIGTERM", signum)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

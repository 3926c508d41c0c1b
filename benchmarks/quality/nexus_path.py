"""The NEXUS methods of the benchmark: the product's stages, nothing else.

Once per base model, :func:`select_stage` runs ``collect`` and ``select``
(:func:`nexus.engines.collect.run_collect`, :func:`nexus.engines.select.run_select`) on the
domain training documents. Per run, :func:`nexus_configs` lays the variant over the run's
settings as a :class:`~nexus.engines.convert_config.ConvertConfig` and a
:class:`~nexus.training.train_config.TrainConfig`, and :func:`train_nexus` runs
``nexus.engines.convert.convert`` then ``nexus.engines.train.train`` from the checkpoint on disk,
exactly as ``nexus run`` chains them. Evaluations read the adapter checkpoints the training stage
writes (:func:`nexus.adapter.load_adapter`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Strategies that read no expert selection.
NO_SELECTION = ("mean_all", "zeros")


def select_stage(base_path, data_path, seq_len: int, target_tokens: int, top_k: int, work) -> Path:
    """``collect`` + ``select`` on the documents of ``data_path``, written under ``work``.

    :param target_tokens: tokens of router statistics (the first ones of the data).
    :param top_k: experts per layer (``select --top-k``).
    :return: the path of ``expert_selection.json`` (for ``convert``).
    """
    from nexus.engines.collect import run_collect
    from nexus.engines.collect_config import CollectConfig
    from nexus.engines.select import run_select
    from nexus.engines.select_config import SelectConfig

    work = Path(work)
    stats = work / "collect"
    run_collect(CollectConfig(model=str(base_path), data=str(data_path), output=str(stats), seq_len=seq_len,
                              target_tokens=target_tokens, batch_size=8, checkpoint_every=0, overwrite=True),
                progress=False)
    path = work / "expert_selection.json"
    run_select(SelectConfig(stats=str(stats), output=str(path), top_k=top_k, plots=False))
    return path


def nexus_configs(method, base_path, data_path, selection_path, width: int, settings, seq_len: int, run_dir,
                  general_path=None):
    """The ``convert`` and ``train`` configs of one NEXUS run.

    :param method: a NEXUS :class:`benchmarks.quality.methods.Method` (its ``convert``/``train`` overrides;
        ``kd_on="general"`` sets ``TrainConfig.kd_data`` to ``general_path``).
    :param settings: a :class:`benchmarks.quality.trainer.TrainSettings` (steps, batch, LR, schedule,
        seed, SFA interval, evaluation steps: the first is the checkpoint interval).
    :param run_dir: scratch directory: ``adapter/`` (convert) and ``run/`` (train).
    :param general_path: the general training documents (jsonl), the kd stream of ``kd_on="general"``.
    :return: ``(ConvertConfig, TrainConfig)``.
    :raises NexusError: ``kd_on="general"`` without ``general_path``.
    """
    from nexus.errors import NexusError
    from benchmarks.quality.trainer import warmup_steps
    from nexus.engines.convert_config import ConvertConfig
    from nexus.training.train_config import TrainConfig

    run_dir = Path(run_dir)
    kd_stream = {}
    if method.kd_on == "general":
        if general_path is None:
            raise NexusError(f"variant {method.name}: kd_on 'general' needs the general training text; "
                             "rebuild the benchmark context")
        kd_stream = {"kd_data": str(general_path)}
    strategy = method.init
    convert = ConvertConfig(
        model=str(base_path), output=str(run_dir / "adapter"),
        selection=None if strategy in NO_SELECTION else str(selection_path),
        shared_intermediate_size=width, seed=settings.seed, **method.convert,
    )
    train = TrainConfig(
        model=str(base_path), adapter=convert.output, output=str(run_dir / "run"), teacher="self",
        data=str(data_path), seq_len=seq_len, batch_size=settings.batch_size, max_steps=settings.steps,
        lr=settings.lr, warmup_steps=warmup_steps(settings), schedule="cosine", min_lr_ratio=settings.min_lr_ratio,
        max_grad_norm=1.0, weight_decay=0.0, sfa_interval=settings.sfa_every, save_every=settings.eval_at[0],
        keep_last=0, log_every=1, seed=settings.seed, **kd_stream, **method.train,
    )
    return convert, train


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_nexus(method, base_path, data_path, selection_path, width: int, settings, seq_len: int, run_dir,
                evaluate, general_path=None, device: str = "cpu") -> dict:
    """One NEXUS run: ``convert`` then ``train`` (:func:`nexus_configs`), evaluated at ``settings.eval_at``.

    The training stage picks its device itself (accelerate: CUDA whenever available); the
    models evaluated before training and at intermediate checkpoints are loaded on ``device``.

    :param general_path: the general training documents (jsonl), for ``kd_on="general"``.
    :param evaluate: ``(model, step) -> dict`` of metrics.
    :return: ``model`` (the trained model, None when diverged), ``initial`` (``evaluate`` of the
        converted adapter before training), ``trainable``, ``curve``, ``evals``,
        ``train_seconds``, ``tokens``, ``tokens_per_second``, ``diverged``, ``configs``.
    """
    import dataclasses

    from nexus.adapter import load_adapter
    from nexus.engines.convert import convert as run_convert
    from nexus.engines.train import NonFiniteLossError
    from nexus.engines.train import train as run_train
    from nexus.loading import load_model
    from nexus.shared_expert import is_shared_parameter
    from nexus.training.train_state import ADAPTER_SUBDIR

    run_dir = Path(run_dir)
    convert_cfg, train_cfg = nexus_configs(method, base_path, data_path, selection_path, width, settings, seq_len,
                                           run_dir, general_path)
    adapter = run_convert(convert_cfg, progress=False)
    start = load_adapter(load_model(base_path, device=device), adapter)
    initial = evaluate(start, 0)
    trainable = sum(p.numel() for n, p in start.named_parameters() if is_shared_parameter(n))
    del start
    diverged, model = False, None
    try:
        model = run_train(train_cfg).model
    except NonFiniteLossError as exc:
        log.warning("NEXUS run at lr %g diverged: %s", settings.lr, exc)
        diverged = True
    metrics = _read_metrics(run_dir / "run" / "metrics.jsonl")
    curve, seconds, tokens, prev = [], 0.0, 0, 0
    for m in metrics:
        seconds += (m["tokens"] - prev) / m["tokens_per_s"] if m.get("tokens_per_s") else 0.0
        prev = tokens = m["tokens"]
        curve.append({"step": m["step"], "loss": m["loss"], "ce": m["ce"],
                      **({"kd": m["kd"]} if "kd" in m and method.kd_weight else {}),
                      "lr": m["lr"], "grad_norm": m["grad_norm"]})
    evals = []
    if not diverged:
        for step in settings.eval_at:
            if step == settings.steps:
                evals.append({"step": step, "tokens": tokens, **evaluate(model, step)})
                continue
            at = load_adapter(load_model(base_path, device=device), run_dir / "run" / "checkpoints" / f"step-{step}" / ADAPTER_SUBDIR)
            step_tokens = next((m["tokens"] for m in metrics if m["step"] == step), None)
            evals.append({"step": step, "tokens": step_tokens, **evaluate(at, step)})
            del at
    if model is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    configs = {"convert": dataclasses.asdict(convert_cfg), "train": train_cfg.to_dict()}
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
        "configs": configs,
    }

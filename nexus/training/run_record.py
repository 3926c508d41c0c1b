"""What a training run records about its inputs (``run_config.json``) and what a resume checks
against that record: the settings that must not change (:data:`~nexus.training.train_config.RESUME_MUST_MATCH`),
the number of processes, the optimizer-state format, and the content of ``--data`` and ``--kd-data``.

The data's content fingerprints are :func:`nexus.data_sources.data_fingerprint`, the same values
``nexus run`` records in its train stage's stamp: editing a file in place (or appending to it)
changes them even though the path, and so every recorded setting, stays the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from nexus.constants import RUN_CONFIG_NAME
from nexus.errors import NexusError
from nexus.training.train_config import RESUME_MUST_MATCH, TrainConfig
from nexus.training.train_state import latest_checkpoint

log = logging.getLogger(__name__)

# run_config.json key -> the TrainConfig field whose data it fingerprints
FINGERPRINTED = {"data_fingerprint": "data", "kd_data_fingerprint": "kd_data"}


def data_fingerprints(config: TrainConfig) -> dict[str, str]:
    """The content fingerprints of the data the run reads, by ``run_config.json`` key
    (``data_fingerprint``, ``kd_data_fingerprint``); only for the data given (a teacher cache
    run without ``--data`` has none: the cache is the data, and ``--teacher`` is a recorded setting)."""
    from nexus.data_sources import data_fingerprint

    return {key: data_fingerprint(getattr(config, field)) for key, field in FINGERPRINTED.items()
            if getattr(config, field) is not None}


def find_resume_checkpoint(config: TrainConfig, run_dir: Path, world_size: int, strategy_kind: str) -> Path | None:
    """The checkpoint to resume from: the latest of ``run_dir`` under ``--resume``, else None.

    :raises NexusError: the run was started with other settings, processes or optimizer-state
        format, or on data whose content has changed since (unless ``--allow-data-change``).
    """
    if not config.resume:
        return None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
        return None
    check_resume(run_dir, config, world_size, strategy_kind)
    return checkpoint


def check_resume(run_dir: Path, config: TrainConfig, world_size: int, engine: str) -> None:
    """Refuse to resume a run whose settings, number of processes, optimizer-state format or data
    content differ from its ``run_config.json``. (DDP and FSDP2 checkpoints share one format;
    DeepSpeed's per-process partitions are their own.)

    :raises NexusError: naming each difference, old and new.
    """
    path = run_dir / RUN_CONFIG_NAME
    if not path.exists():
        return
    old = json.loads(path.read_text())
    old_config = old.get("config", {})
    # A setting added since the run started was recorded as nothing: the run had its default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    recorded = {k: old_config.get(k, defaults[k]) for k in RESUME_MUST_MATCH}
    diff = [f"{k} ({recorded[k]!r} vs {getattr(config, k)!r})"
            for k in RESUME_MUST_MATCH if recorded[k] != getattr(config, k)]
    if old.get("world_size") != world_size:
        diff.append(f"world_size ({old.get('world_size')} vs {world_size})")
    old_engine = old.get("engine", "ddp")
    if "deepspeed" in (old_engine, engine) and old_engine != engine:
        diff.append(f"engine ({old_engine} vs {engine})")
    if diff:
        raise NexusError(
            f"cannot resume {run_dir}: these settings differ from the original run (old vs new): {', '.join(diff)}; "
            f"use the same arguments, or a new --output"
        )
    _check_data_unchanged(run_dir, old, config)


def _check_data_unchanged(run_dir: Path, old: dict, config: TrainConfig) -> None:
    """Refuse (or, with ``--allow-data-change``, warn about) data whose content changed at the same path."""
    now = data_fingerprints(config)
    unrecorded = [FINGERPRINTED[k] for k in now if k not in old]
    if unrecorded:
        log.warning("%s records no content fingerprint of --%s (made by an older nexus): cannot check that the data "
                    "is unchanged", run_dir / RUN_CONFIG_NAME, ", --".join(f.replace("_", "-") for f in unrecorded))
    changed = [f"--{FINGERPRINTED[k].replace('_', '-')} {getattr(config, FINGERPRINTED[k])} (fingerprint {old[k]} "
               f"then, {now[k]} now)" for k in now if k in old and old[k] != now[k]]
    if not changed:
        return
    if config.allow_data_change:
        log.warning("--allow-data-change: resuming %s on changed data: %s; the remaining steps read the new content "
                    "from the saved data position", run_dir, "; ".join(changed))
        return
    raise NexusError(
        f"cannot resume {run_dir}: the content of the data changed since the run started: {'; '.join(changed)}; "
        f"restore the data, start a new --output, or pass --allow-data-change to continue on the new content"
    )

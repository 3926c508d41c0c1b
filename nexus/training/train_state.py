"""Training checkpoints and the run directory's files.

A checkpoint ``run/checkpoints/step-N/`` holds::

    adapter/             the adapter at step N (an ordinary adapter directory)
    trainer_state.pt     optimizer, scheduler, SFA snapshot, per-process RNG states
    deepspeed/           under DeepSpeed ZeRO only: its per-process optimizer partitions
    state.json           step, next batch index, tokens seen, world size (human-readable)

It is written through :func:`nexus.io.atomic_dir`, so it exists whole or not at all; a
checkpoint directory is therefore complete by construction, and "latest" is simply the
highest step.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from nexus.io import atomic_dir, save_torch, write_json

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER_SUBDIR = "adapter"
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA) as plain Python values
    (bytes, lists), so they pickle through ``all_gather_object`` and load with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every checkpoint of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, write_files, trainer_state: dict, state: dict, keep_last: int) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically, then delete all but the ``keep_last`` newest.

    :param write_files: ``dir -> None``; writes the adapter directory ``dir/adapter`` (and any
        files of the distributed engine) into the checkpoint being assembled at ``dir``.
    :param trainer_state: tensors and objects for ``trainer_state.pt`` (optimizer, scheduler, RNG, SFA).
    :param state: small JSON-able facts (step, next batch, tokens seen).
    :return: the checkpoint directory.
    """
    path = Path(run_dir) / CHECKPOINTS / f"step-{step}"
    with atomic_dir(path) as tmp:
        write_files(tmp)
        save_torch(trainer_state, tmp / TRAINER_STATE)
        write_json(tmp / STATE_JSON, state)
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Read a checkpoint's ``(trainer_state, state)``; its adapter is at ``path/adapter``."""
    path = Path(path)
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    state = json.loads((path / STATE_JSON).read_text())
    return trainer_state, state

"""The built-in demo: a tiny random checkpoint of a family, built once and cached on disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from nexus.fingerprint import config_fingerprint
from nexus.io import atomic_dir

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$NEXUS_CACHE`` or ``~/.cache/nexus``."""
    return Path(os.environ.get("NEXUS_CACHE", Path.home() / ".cache" / "nexus"))


def build_checkpoint(family, path: str | Path, config=None, seed: int = 0) -> Path:
    """Build a random model of ``family`` from ``config`` (default its example config) and
    write it to ``path`` in the family's native format (GPT-OSS: MXFP4).

    :return: ``path``.
    """
    from transformers import AutoModelForCausalLM

    config = config or family.example_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    family.write_checkpoint(model, path)
    return path


def demo_checkpoint(family) -> Path:
    """The cached demo checkpoint of ``family``, built on first use."""
    config = family.example_config()
    path = cache_root() / "demo" / f"{family.name}-{config_fingerprint(config)}"
    if not (path / "config.json").exists():
        log.info("building the %s demo checkpoint in %s", family.name, path)
        with atomic_dir(path) as tmp:
            build_checkpoint(family, tmp, config)
    return path

"""Opening user checkpoints with errors that say what is wrong and what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nexus.errors import NexusError

log = logging.getLogger(__name__)


def load_config(path: str | Path):
    """Load ``config.json`` of a checkpoint directory as a transformers config.

    :raises NexusError: ``path`` is missing or not a model directory.
    """
    from transformers import AutoConfig

    from nexus.plugins import get_plugin_manager

    # Plugins may register their own architectures with transformers' Auto classes on import.
    get_plugin_manager()
    path = Path(path)
    if not path.exists():
        raise NexusError(f"model path {path} does not exist")
    if not (path / "config.json").exists():
        raise NexusError(f"{path} is not a model directory (no config.json); pass a Hugging Face checkpoint directory")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise NexusError(f"cannot read {path / 'config.json'}: {exc}") from exc


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM for NEXUS: experts dequantised (MXFP4 on CPU), base in ``eval()``.

    :return: the ``*ForCausalLM`` model.
    """
    from transformers import AutoModelForCausalLM

    load_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    except (ValueError, KeyError, OSError) as exc:
        raise NexusError(f"cannot load model from {path}: {exc}") from exc
    model.to(device)
    model.eval()
    model._nexus_source = str(path)
    return model

"""Opening safetensors files with errors that name the file and say what to do."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nexus.errors import NexusError


def open_safetensors(path: str | Path, hint: str, device: str | torch.device = "cpu"):
    """``safetensors.safe_open(path)`` (a context manager over the lazily read file).

    :param hint: what the user should do when the file is unreadable, e.g. ``"run `nexus collect` again"``.
    :raises NexusError: the file is missing, truncated or not safetensors, naming it and ``hint``.
    """
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NexusError(f"{path} is not a readable safetensors file (truncated or corrupt: {reason}); {hint}") from exc


def load_safetensors(path: str | Path, hint: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, ``{name: Tensor}``; errors as :func:`open_safetensors`."""
    with open_safetensors(path, hint, device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}

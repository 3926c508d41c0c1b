"""Where a preset runs: the check that its device exists before anything is built."""

from __future__ import annotations

import torch

from nexus.errors import NexusError


def require_device(device: str, preset: str) -> str:
    """``device`` when this machine has it; a CUDA device without CUDA fails at once.

    :param device: ``cpu``, ``cuda`` or ``cuda:N`` (a :class:`benchmarks.quality.config.BenchConfig` ``device``).
    :param preset: the preset's name, for the message.
    :raises NexusError: CUDA asked for and ``torch.cuda.is_available()`` is False, or an unknown device.
    """
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise NexusError(f"preset {preset!r}: device {device!r} is not a torch device; use cpu or cuda") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise NexusError(f"preset {preset!r} needs a CUDA GPU and torch sees none here; on CPU use --preset full "
                         "(hours) or --quick")
    return device

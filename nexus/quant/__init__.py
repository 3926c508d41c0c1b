"""Quantized expert formats: decoders (MXFP4, block-scaled FP8) and frozen experts kept packed in them.

- :mod:`nexus.quant.mxfp4` and :mod:`nexus.quant.fp8`: decode (and encode) the on-disk formats.
- :mod:`nexus.quant.packed_experts`: ``PackedExperts``, expert matrices held as stored and decoded per step.
- :mod:`nexus.quant.packed_loading`: loading a model whose quantized experts stay packed.
- :mod:`nexus.quant.fp8_checkpoint`: writing a block-scaled FP8 checkpoint (tests, benchmarks).
"""

from __future__ import annotations

DAMAGED_HINT = "the checkpoint is damaged: download or save it again"


def check_finite(tensor, name: str, what: str = "decodes to") -> None:
    """Refuse a decoded (or read) weight holding NaN or infinite values, naming it.

    One ``isfinite().all()`` per tensor: cheap next to reading or decoding it.

    :param name: the checkpoint tensor, e.g. ``"ckpt/: model.layers.0.mlp.experts.3.gate_proj.weight"``.
    :param what: the verb of the message (``"decodes to"``, ``"holds"``).
    :raises NexusError: naming ``name``.
    """
    import torch

    from nexus.errors import NexusError

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NexusError(f"{name} {what} NaN or infinite values; {DAMAGED_HINT}")

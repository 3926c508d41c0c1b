"""Opening user checkpoints with errors that say what is wrong and what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

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
    path = Path(path).expanduser()
    if not path.exists():
        raise NexusError(f"model path {path} does not exist")
    if not (path / "config.json").exists():
        raise NexusError(f"{path} is not a model directory (no config.json); pass a Hugging Face checkpoint directory")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise NexusError(f"cannot read {path / 'config.json'}: {exc}") from exc


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dequantize: bool = False,
    family: str | None = None,
    experts_on: str = "device",
    embeddings_on: str = "device",
):
    """Load a causal LM for NEXUS, base in ``eval()``.

    Routed experts stored quantised on disk (MXFP4, block-scaled FP8) in a format the family
    declares stay packed in memory as stored (:mod:`nexus.quant.packed_loading`), unless
    ``dequantize``; everything else loads in ``dtype``.

    :param dequantize: load through ``from_pretrained``, which dequantises every expert to ``dtype``.
    :param family: the family name (``--family``); default: resolved from the config's ``model_type``.
    :param experts_on: ``"host"`` keeps the packed routed experts in host memory, streamed to
        ``device`` one MoE layer at a time (:mod:`nexus.quant.streaming`); ``"device"`` puts
        everything on ``device``.
    :param embeddings_on: ``"host"`` keeps the input embedding table in host memory, the lookup
        there (:mod:`nexus.host_embedding`).
    :return: the ``*ForCausalLM`` model.
    """
    from transformers import AutoModelForCausalLM

    from nexus.quant.streaming import check_experts_on, nothing_to_stream, stream_experts

    from nexus.host_embedding import check_embeddings_on, keep_embeddings_on_host

    host = check_experts_on(experts_on, "experts_on") == "host"
    host_embeddings = check_embeddings_on(embeddings_on, "embeddings_on") == "host"
    path = Path(path).expanduser()
    config = load_config(path)
    if not dequantize and getattr(config, "quantization_config", None) is not None:
        from nexus.errors import FamilyError
        from nexus.family import resolve_family
        from nexus.quant.packed_loading import load_packed_model

        try:
            fam = resolve_family(config, family)
        except FamilyError:  # not an MoE family (a dense teacher, say): nothing to keep packed
            fam = None
        on_host = host or host_embeddings
        model = load_packed_model(path, config, fam, dtype, "cpu" if on_host else device) if fam is not None else None
        if model is not None:
            if host:
                stream_experts(model, str(path))
            if host_embeddings:
                keep_embeddings_on_host(model, str(path))
            if on_host:
                model.to(device)  # all but what stays in host memory
            model.eval()
            model._nexus_source = str(path)
            return model
    from nexus.quant.mxfp4 import silence_dequantization_warnings

    if host:
        raise nothing_to_stream(str(path))
    if getattr(config, "quantization_config", None) is not None:
        _refuse_partial_fp8_blocks(path, dequantize)
    silence_dequantization_warnings()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    except (ValueError, KeyError, OSError, SafetensorError) as exc:
        from nexus.checkpoint import check_weight_files

        check_weight_files(path)  # transformers' message does not name a damaged shard: find it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NexusError(f"cannot load model from {path}: {reason}") from exc
    if getattr(config, "quantization_config", None) is not None:
        _cast_unquantised(model, dtype)
        _check_dequantised(model, path)
    if host_embeddings:
        keep_embeddings_on_host(model, str(path))
    model.to(device)
    model.eval()
    model._nexus_source = str(path)
    return model


def _refuse_partial_fp8_blocks(path: Path, dequantize: bool) -> None:
    """Refuse a dequantising load (transformers') of an FP8 checkpoint holding a matrix of several
    scale blocks whose last is partial: transformers infers the block size from the scale grid's
    shape (rows / grid rows), which is then wrong, and silently mis-decodes the matrix."""
    from nexus.checkpoint import CheckpointReader
    from nexus.quant.fp8 import SCALE_SUFFIX, block_size
    from nexus.quant.packed_loading import quant_method

    reader = CheckpointReader(path)
    if quant_method(reader.config) != "fp8":
        return
    block = block_size(reader.config.get("quantization_config"), str(path / "config.json"))
    for key in reader.keys():
        if not key.endswith(SCALE_SUFFIX) or key[: -len(SCALE_SUFFIX)] not in reader:
            continue
        shape = reader.shape(key[: -len(SCALE_SUFFIX)])
        # one partial block per dimension decodes right (the inferred size is the dimension itself)
        if any(n % b and n > b for n, b in zip(shape[-2:], block)):
            how = ("load it without --dequantize: NEXUS then decodes every FP8 tensor itself" if dequantize else
                   "its family does not keep these experts packed, so it cannot be loaded exactly")
            raise NexusError(
                f"checkpoint {path}: FP8 tensor {key[: -len(SCALE_SUFFIX)]} {list(shape)} spans several "
                f"{block[0]}x{block[1]} scale blocks, the last one partial, which transformers' dequantising load decodes wrongly; {how}")


def _check_dequantised(model, path: Path) -> None:
    """Refuse weights that transformers' dequantising load decoded to NaN or infinite values (a
    damaged scale), naming the parameter: one ``isfinite`` per tensor."""
    from nexus.quant import check_finite

    for name, t in model.named_parameters():
        check_finite(t.detach(), f"{path}: {name} (dequantised)")


def _cast_unquantised(model, dtype: torch.dtype) -> None:
    """Cast the floating parameters a dequantising load left in the checkpoint's dtype to ``dtype``.

    transformers' FP8 dequantisation decodes the quantised weights into ``dtype`` but leaves the
    others (embeddings, norms, routers) as stored, so a bf16 load of an fp32-stored checkpoint
    mixes dtypes and fails in forward. Tensors the model keeps in fp32 on purpose stay fp32.
    """
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in model.named_parameters():  # buffers (rotary frequencies, ...) keep the dtype the model chose
        if t.is_floating_point() and t.dtype != dtype and not any(k in name for k in keep):
            t.data = t.data.to(dtype)

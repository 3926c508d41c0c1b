"""Load a checkpoint whose routed experts are stored quantised with the experts kept as stored.

The model is built without weights (``accelerate.init_empty_weights``); every MoE block's experts
module is replaced by a :class:`nexus.quant.packed_experts.PackedExperts` holding the checkpoint's
bytes (as the family's ``nexus_expert_layout`` declares); every other tensor is then read one at a
time from the safetensors files, renamed as transformers renames it, cast to the parameter's
dtype and placed on the device. No dequantised copy of a layer's experts is ever made.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from nexus.checkpoint import CheckpointReader
from nexus.errors import NexusError
from nexus.quant.fp8 import SCALE_SUFFIX, block_size, check_finite_scales, check_scales, decode_fp8
from nexus.quant.packed_experts import FP8Matrices, MXFP4Matrices, PackedExperts

log = logging.getLogger(__name__)

PACKED_METHODS = ("mxfp4", "fp8")


def quant_method(config: dict) -> str | None:
    """``quantization_config.quant_method`` of a ``config.json`` dict, or None."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)


def _mxfp4(reader: CheckpointReader, name: str) -> MXFP4Matrices:
    return MXFP4Matrices(reader.read(f"{name}_blocks"), reader.read(f"{name}_scales"), f"{reader.path}: {name}")


def _fp8_stacked(reader: CheckpointReader, template: str, layer: int, num_experts: int, block) -> FP8Matrices:
    """Per-expert FP8 weights ``template.format(layer, e)`` stacked into one ``[E, out, in]`` byte buffer."""
    first = template.format(layer=layer, e=0)
    rows, cols = reader.shape(first)
    weight = torch.empty(num_experts, rows, cols, dtype=torch.uint8)
    scales = None
    for e in range(num_experts):
        name = template.format(layer=layer, e=e)
        w, s = reader.read(name), reader.read(name + SCALE_SUFFIX)
        if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (rows, cols):
            raise NexusError(f"checkpoint {reader.path}: {name} is {w.dtype} {list(w.shape)}, expected "
                             f"float8_e4m3fn {[rows, cols]} like expert 0")
        check_scales(w.shape, s.shape, block, f"{reader.path}: {name}")
        check_finite_scales(s, f"{reader.path}: {name}")  # per expert, so the message names it
        if scales is None:
            scales = torch.empty(num_experts, *s.shape, dtype=torch.float32)
        weight[e] = w.view(torch.uint8)
        scales[e] = s.float()
    return FP8Matrices(weight, scales, block)


def _fp8_fused(reader: CheckpointReader, name: str, block) -> FP8Matrices:
    w, s = reader.read(name), reader.read(name + SCALE_SUFFIX)
    check_scales(w.shape, s.shape, block, f"{reader.path}: {name}")
    return FP8Matrices(w, s, block, f"{reader.path}: {name}")


def _names(names, layer: int) -> list[str]:
    """A layout's name (or tuple of alternatives) filled with ``layer``."""
    return [n.format(layer=layer) for n in ((names,) if isinstance(names, str) else names)]


def install_packed_experts(reader: CheckpointReader, layout, block, activation) -> bool:
    """Replace ``block``'s experts module by a :class:`PackedExperts` read from ``reader`` following ``layout``.

    :param layout: the family's :class:`nexus.spec.ExpertLayout` (``packed_formats`` and
        ``packed_module`` say whether and where experts may stay packed).
    :param block: a :class:`nexus.types.MoEBlock` of a model built without weights.
    :return: True when installed; False when the family does not keep this format packed or the
        checkpoint stores this layer's experts otherwise (e.g. plain floats).
    :raises NexusError: packed tensors that are malformed (scale shapes, dtypes).
    """
    method = quant_method(reader.config)
    if method not in layout.packed_formats or layout.packed_module is None or layout.flat:
        return False
    layer, E = block.layer, block.num_experts
    gate_up = gate = up = None
    if method == "mxfp4":
        gu = next((n for n in _names(layout.gate_up, layer) if reader.is_mxfp4(n)), None)
        dn = next((n for n in _names(layout.down, layer) if reader.is_mxfp4(n)), None)
        if gu is None or dn is None or layout.up is not None:
            return False
        gate_up, down = _mxfp4(reader, gu), _mxfp4(reader, dn)
    else:
        block_ = block_size(reader.config.get("quantization_config"), f"{reader.path / 'config.json'}")
        per = layout.per_expert
        if per and per[0].format(layer=layer, e=0) + SCALE_SUFFIX in reader:
            gate, up, down = (_fp8_stacked(reader, t, layer, E, block_) for t in per)
        else:
            gu, dn = _names(layout.gate_up, layer)[0], _names(layout.down, layer)[0]
            if gu + SCALE_SUFFIX not in reader or dn + SCALE_SUFFIX not in reader or layout.transposed or layout.up:
                return False
            gate_up, down = _fp8_fused(reader, gu, block_), _fp8_fused(reader, dn, block_)
    gub = db = None
    if layout.gate_up_bias:
        gub = reader.read(layout.gate_up_bias.format(layer=layer))
        db = reader.read(layout.down_bias.format(layer=layer))
    module = PackedExperts(down, activation, gate_up=gate_up, gate=gate, up=up, gate_up_bias=gub, down_bias=db,
                           interleaved=layout.interleaved, transposed=layout.transposed)
    shapes = {(m.shape[0]) for m in (gate_up, gate, up, down) if m is not None}
    if shapes != {E} or module.hidden_size != block.hidden_size or module.intermediate_size != block.intermediate_size:
        raise NexusError(
            f"checkpoint {reader.path}: packed experts of layer {layer} hold {sorted(shapes)} experts of "
            f"H={module.hidden_size}, I={module.intermediate_size}; the config says E={E}, "
            f"H={block.hidden_size}, I={block.intermediate_size}"
        )
    owner, _, attr = layout.packed_module.rpartition(".")
    parent = block.module.get_submodule(owner) if owner else block.module
    setattr(parent, attr, module)
    return True


def packed_modules(model: nn.Module) -> dict[str, PackedExperts]:
    """``name -> PackedExperts`` of every packed experts module in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedExperts)}


def _load_dtype(model, name: str, target: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``from_pretrained`` would give tensor ``name``: float32 for the modules the model keeps
    in fp32 (``_keep_in_fp32_modules_strict`` always, e.g. DeepSeek-V3's ``e_score_correction_bias``;
    ``_keep_in_fp32_modules`` under fp16), else the meta model's dtype."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return torch.float32 if keep and keep & set(name.split(".")) else target.dtype


def _renamer(model):
    """Checkpoint key -> model key, applying transformers' renamings; None for keys a converter claims."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, apply_renamings

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> str | None:
        key = apply_renamings(key, renamings)
        for conv in converters:
            if conv.rename_source_key(key)[1] is not None:
                return None  # a fused/merged tensor: only routed experts use one in the packable families
        return key

    return rename


def _refuse_save(*args, **kwargs):
    raise NexusError("this model holds its routed experts packed and save_pretrained would drop them; "
                     "load it with load_model(..., dequantize=True) to save a float copy")


def load_packed_model(path: str | Path, config, family, dtype: torch.dtype, device) -> nn.Module | None:
    """Build the model of checkpoint ``path`` with its routed experts packed as stored.

    Each MoE block is packed by a plugin's ``nexus_pack_experts`` when one handles it, else by the
    family's declared ``nexus_expert_layout``.

    :param config: the checkpoint's config (as :func:`nexus.loading.load_config` reads it).
    :return: the ``*ForCausalLM`` (on ``device``, eval mode), or None when the checkpoint is not
        quantised in a format the family keeps packed (then load it the ordinary way).
    :raises NexusError: a tensor the model needs is missing, or packed tensors are malformed.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    reader = CheckpointReader(path)
    method = quant_method(reader.config)
    if method not in PACKED_METHODS:
        return None
    layout = family.expert_layout()
    activation = family.activation(config)
    if hasattr(config, "quantization_config"):
        config = copy.deepcopy(config)  # the caller's config keeps it
        del config.quantization_config  # as after transformers' dequantising load: the model holds no quantizer
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for block in family.moe_blocks(model):
        done = family.pack_experts(reader, config, block)
        if done is None:
            done = layout is not None and install_packed_experts(reader, layout, block, activation)
        if not done:
            log.info("%s: family %s does not keep layer %d's %s experts packed; dequantising", path, family.name,
                     block.layer, method)
            return None
        for m in block.module.modules():
            if isinstance(m, PackedExperts):
                m.to(device=device, dtype=dtype)  # moves the bytes, casts only the biases
    qc = reader.config.get("quantization_config")
    block_ = block_size(qc, str(Path(path) / "config.json")) if method == "fp8" else None
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    rename = _renamer(model)
    owner_of = dict(model.named_modules())
    loaded = set()
    for key in reader.keys():
        if key.endswith(SCALE_SUFFIX):
            continue
        name = rename(key)
        if name is None or name not in targets or name in loaded:
            continue
        target = targets[name]
        t = reader.read(key)
        if key + SCALE_SUFFIX in reader:
            t = decode_fp8(t, reader.read(key + SCALE_SUFFIX), block_, torch.float32, f"{reader.path}: {key}")
        elif t.dtype in (torch.uint8, torch.float8_e4m3fn) and target.dtype != t.dtype:
            raise NexusError(f"checkpoint {reader.path}: {key} is stored as {t.dtype} without the companion scales "
                             f"the loader decodes; dequantise the checkpoint or pass --dequantize")
        t = t.to(device=device, dtype=_load_dtype(model, name, target, dtype) if target.is_floating_point() else t.dtype)
        owner, _, attr = name.rpartition(".")
        module = owner_of[owner] if owner else model
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=target.requires_grad)
        else:
            module._buffers[attr] = t
        loaded.add(name)
    model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise NexusError(
            f"checkpoint {path} lacks {len(missing)} tensors the model needs ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}); load it with --dequantize, or check the checkpoint"
        )
    model.to(device)
    model.save_pretrained = _refuse_save  # would silently write a checkpoint without its routed experts
    packed = packed_modules(model)
    # The packed bytes are identical on every process: DDP must not broadcast them each step.
    model._ddp_params_and_buffers_to_ignore = [f"{n}.{b}" for n, m in packed.items() for b, _ in m.named_buffers()]
    log.info("%s: %d MoE layers keep their %s experts packed (%.1f MB)", path, len(packed), method,
             sum(m.stored_bytes() for m in packed.values()) / 2**20)
    return model

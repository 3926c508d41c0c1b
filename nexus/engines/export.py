"""``export``: a trained adapter written into a stock checkpoint that serves without NEXUS.

The output has the base's architecture and ``model_type`` and loads with
``AutoModelForCausalLM.from_pretrained`` (vLLM, SGLang, transformers). The family declares the
fold (:class:`nexus.spec.ExportSpec`); the tensor work is in :mod:`nexus.engines.export_folds`. The
checkpoint is rewritten file by file and tensor by tensor: untouched tensors are copied as raw
bytes, each changed tensor is read, extended and written before the next is read, so peak memory
is about one tensor. The directory appears whole or not at all (:func:`nexus.io.atomic_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nexus import __version__
from nexus.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, FOLDABLE_GATE_MODES, SHARED_MODULE_NAME
from nexus.errors import NexusError
from nexus.io import atomic_dir, locks_output, refuse_output_over_inputs, write_json

log = logging.getLogger(__name__)

EXPORT_INFO_NAME = "export_info.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", EXPORT_INFO_NAME}
METHODS = ("slot", "routed", "remote_code")


@dataclass
class Plan:
    """What the export writes: per stored tensor, a function producing its replacement(s).

    Attributes:
        method: ``slot``, ``routed`` or ``remote_code``.
        replace: stored name -> ``() -> [(name, tensor), ...]`` (an empty list drops the tensor).
        extra: new tensors, ``[(name, () -> tensor)]``, written into the last weights file.
        config: the new ``config.json``.
        details: what :data:`EXPORT_INFO_NAME` records about the fold.
        files: extra non-weight files to write, ``{name: text}``.
    """

    method: str
    replace: dict[str, Callable[[], list[tuple[str, torch.Tensor]]]] = field(default_factory=dict)
    extra: list[tuple[str, Callable[[], torch.Tensor]]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    extra_params: int = 0
    extra_flops: int = 0


def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        config = config[p]
    config[last] = value


def _get(config: dict, dotted: str):
    for p in dotted.split("."):
        config = config[p]
    return config


def adapter_fingerprint(path: Path) -> str:
    """16 hex chars: sha256 of the adapter's config and weights files."""
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        with open(path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _no_fold_options(reason: str) -> str:
    return (f"no exact fold: {reason}. Options: export with --remote-code (a trust_remote_code checkpoint: "
            f"transformers and vLLM/SGLang with --trust-remote-code), or serve base + adapter with NEXUS")


def choose_fold(spec, config: dict, gate_mode: str, quant_method: str | None):
    """The fold to use, or a :class:`NexusError` naming why there is none and the options.

    :return: the family's :class:`nexus.spec.SlotFold` or :class:`nexus.spec.RoutedFold`.
    """
    from nexus.spec import RoutedFold

    if gate_mode not in FOLDABLE_GATE_MODES:
        raise NexusError(_no_fold_options(
            f"the adapter's gate mode is {gate_mode!r} (a per-token sigmoid gate, which no stock block computes); "
            "to fold exactly, convert and train the adapter again with --gate-mode scalar (or none)"))
    if quant_method not in (None, "mxfp4"):
        raise NexusError(f"the base is quantised with {quant_method!r}, which export does not rewrite yet; export "
                         f"from a dequantised (bf16) copy of the base, or use --remote-code")
    fold = spec.fold
    if fold is None:
        raise NexusError(_no_fold_options(spec.no_fold))
    if isinstance(fold, RoutedFold) and fold.normalized_by is not None:
        value = _get(config, fold.normalized_by)
        if value != fold.normalized_when:
            raise NexusError(_no_fold_options(
                f"the routing weights are not normalised ({fold.normalized_by} = {value!r}), so they do not sum to "
                f"a constant"))
    return fold


def _disk_name(meta, name: str, names: set[str]) -> str:
    """The stored name of in-memory parameter ``name`` (transformers' reverse key renaming)."""
    if name in names:
        return name
    from transformers.core_model_loading import revert_weight_conversion

    stored = list(revert_weight_conversion(meta, {name: torch.zeros(1)}))
    if len(stored) == 1 and stored[0] in names:
        return stored[0]
    raise NexusError(f"cannot find how the base stores {name} (tried {', '.join(dict.fromkeys([name, *stored]))})")


def _expert_roles(layout, names: set[str], layer: int, experts: int) -> dict[str, tuple]:
    """Stored names of one layer's routed-expert tensors -> ``(role, detail)``.

    Roles: ``pe_gate``/``pe_up``/``pe_down`` with the expert id (one tensor per expert);
    ``gate_up``/``up``/``down`` with ``plain``/``blocks``/``scales`` (fused, maybe MXFP4);
    ``gate_up_bias``/``down_bias``.
    """
    roles: dict[str, tuple] = {}
    if layout.per_expert and layout.per_expert[0].format(layer=layer, e=0) in names:
        for e in range(experts):
            for role, tmpl in zip(("pe_gate", "pe_up", "pe_down"), layout.per_expert):
                roles[tmpl.format(layer=layer, e=e)] = (role, e)
        return roles
    for role, candidates in (("gate_up", layout.gate_up), ("up", layout.up), ("down", layout.down)):
        if candidates is None:
            continue
        for cand in ((candidates,) if isinstance(candidates, str) else candidates):
            name = cand.format(layer=layer)
            if name in names:
                roles[name] = (role, "plain")
                break
            if f"{name}_blocks" in names and f"{name}_scales" in names:
                roles[f"{name}_blocks"], roles[f"{name}_scales"] = (role, "blocks"), (role, "scales")
                break
        else:
            raise NexusError(f"the base stores none of {candidates} for the experts of layer {layer}")
    for role, tmpl in (("gate_up_bias", layout.gate_up_bias), ("down_bias", layout.down_bias)):
        if tmpl:
            roles[tmpl.format(layer=layer)] = (role, "plain")
    return roles


def _routed_layer(plan: Plan, reader, layout, block, units, quantized, dequantize_dtype, names: set[str]) -> None:
    from nexus.engines.export_folds import append_columns, append_gate_up_rows, append_rows, from_rows, to_rows
    from nexus.quant.mxfp4 import decode_mxfp4

    E = block.num_experts
    down_t = layout.transposed if layout.down_transposed is None else layout.down_transposed
    roles = _expert_roles(layout, names, block.layer, E)
    if any(f"{n}_scale_inv" in names for n in roles):
        raise NexusError("the base's experts are stored FP8, which export does not rewrite yet; export from a "
                         "dequantised (bf16) copy of the base, or use --remote-code")
    if units.gate_bias is not None and not layout.has_bias:
        raise NexusError(f"the shared expert of {block.path} has biases but the routed experts have none: "
                         f"the biases cannot be folded; use --remote-code")
    zeros = torch.zeros(units.units)
    gb = units.gate_bias if units.gate_bias is not None else zeros
    ub = units.up_bias if units.up_bias is not None else zeros
    db = units.down_bias if units.down_bias is not None else torch.zeros(units.down.shape[0])

    def grow(role: str, rows: torch.Tensor) -> torch.Tensor:  # rows in [E, out, in] form, float
        if role == "gate_up":
            return append_gate_up_rows(rows, units.gate, units.up, layout.interleaved) if layout.up is None \
                else append_rows(rows, units.gate)
        if role == "up":
            return append_rows(rows, units.up)
        return append_columns(rows, units.down)

    def make(name: str, role: str, detail):
        if role in ("pe_gate", "pe_up"):
            new = units.gate if role == "pe_gate" else units.up
            return lambda: [(name, torch.cat([t := reader.read(name), new.to(t.dtype)]))]
        if role == "pe_down":
            return lambda: [(name, torch.cat([t := reader.read(name), units.down.to(t.dtype)], 1))]
        if role == "gate_up_bias":
            return lambda: [(name, append_gate_up_rows(reader.read(name), gb, ub, layout.interleaved))]
        if role == "down_bias":
            return lambda: [(name, (reader.read(name).float() + db).to(reader.read(name).dtype))]
        transposed, flat = (down_t if role == "down" else layout.transposed), layout.flat
        if detail == "plain":
            return lambda: [(name, from_rows(grow(role, to_rows(reader.read(name), transposed, flat, E)),
                                             transposed, flat))]
        stem = name.rsplit("_", 1)[0]
        if dequantize_dtype is not None:
            if detail == "scales":
                return lambda: []
            return lambda: [(stem, from_rows(grow(role, decode_mxfp4(reader.read(name), reader.read(f"{stem}_scales"),
                                                                     dequantize_dtype, f"{reader.path}: {stem}")),
                                             transposed, flat))]
        index = 0 if detail == "blocks" else 1
        q = {"gate_up": (quantized.gate, quantized.up), "up": (quantized.up, quantized.up), "down": (quantized.down,)}
        new = [t[index] for t in q[role]]
        if role == "down":
            return lambda: [(name, append_columns(reader.read(name), new[0]))]
        if role == "gate_up" and layout.up is None:
            return lambda: [(name, append_gate_up_rows(reader.read(name), new[0], new[1], layout.interleaved))]
        return lambda: [(name, append_rows(reader.read(name), new[0]))]

    for name, (role, detail) in roles.items():
        plan.replace[name] = make(name, role, detail)


def _widen_mlp(plan: Plan, reader, meta, names: set[str], prefix: str, proj, units, zero: bool,
               sources: dict[str, torch.Tensor]) -> None:
    """Concatenate ``units`` (``zero``: as many zero units) to the stored MLP at in-memory ``prefix``
    along its intermediate dimension; ``sources`` overrides stored tensors (a trained native slot)."""
    new = {"gate": units.gate, "up": units.up, "down": units.down,
           "gate_bias": units.gate_bias, "up_bias": units.up_bias, "down_bias": units.down_bias}
    if zero:
        new = {k: None if v is None or k == "down_bias" else torch.zeros_like(v) for k, v in new.items()}
    for role, p in zip(("gate", "up", "down"), proj):
        for kind in ("weight", "bias"):
            try:
                name = _disk_name(meta, f"{prefix}.{p}.{kind}", names)
            except NexusError:
                if kind == "weight":
                    raise
                if role == "down" and new["down_bias"] is not None:
                    raise NexusError(f"the shared expert has a down bias but {prefix} has none: it cannot be folded; "
                                     f"use --remote-code") from None
                continue

            def run(name=name, role=role, kind=kind):
                t = sources.get(name)
                t = reader.read(name) if t is None else t
                if kind == "weight":
                    return [(name, torch.cat([t, new[role].to(t.dtype)], 1 if role == "down" else 0))]
                b = new[f"{role}_bias"]
                if role == "down":
                    return [(name, t if b is None else (t.float() + b).to(t.dtype))]
                b = torch.zeros(units.units) if b is None else b
                return [(name, torch.cat([t, b.to(t.dtype)]))]

            plan.replace[name] = run


def _new_mlp(plan: Plan, new_meta, prefix: str, proj, units, dtype: torch.dtype) -> None:
    """Create the MLP at ``prefix`` (absent from the base: a slot with zero shared experts) from ``units``."""
    params = dict(new_meta.named_parameters())
    for role, p in zip(("gate", "up", "down"), proj):
        weight = getattr(units, role)
        plan.extra.append((f"{prefix}.{p}.weight", lambda w=weight: w.to(dtype)))
        if f"{prefix}.{p}.bias" in params:
            b = getattr(units, f"{role}_bias")
            size = params[f"{prefix}.{p}.bias"].shape[0]
            plan.extra.append((f"{prefix}.{p}.bias",
                               lambda b=b, size=size: (torch.zeros(size) if b is None else b).to(dtype)))


def _base_key_sources(acfg, tensors, meta, names: set[str], reader) -> dict[str, torch.Tensor]:
    """Stored name -> trained tensor, for the base parameters the adapter replaces (routers, a
    trained native shared expert), in the stored dtype."""
    out = {}
    for key in acfg.base_keys:
        if key not in tensors:
            raise NexusError(f"the adapter lists base key {key} in {ADAPTER_CONFIG_NAME} but does not store it; "
                             f"train or convert it again")
        name = _disk_name(meta, key, names)
        stored = reader.read(name)
        if tuple(stored.shape) != tuple(tensors[key].shape):
            raise NexusError(f"the adapter's {key} has shape {tuple(tensors[key].shape)} but the base stores {name} "
                             f"as {tuple(stored.shape)}")
        out[name] = tensors[key].to(stored.dtype)
    return out


def _moe_costs(meta, family, blocks) -> tuple[int, int]:
    """``(parameters, per-token matmul FLOPs)`` of the base: ``2 x`` the parameters a token uses
    (routed experts counted ``top_k / E``, the input embedding not at all; attention over the context
    is left out)."""
    embed = meta.get_input_embeddings()
    skip = {id(p) for p in (embed.parameters() if embed is not None else ())}
    routed: dict[int, float] = {}
    for b in blocks:
        other = {id(p) for p in family.router_capture(b).module.parameters()}
        other |= {id(p) for path in b.native_shared for p in b.module.get_submodule(path).parameters()}
        for p in b.module.parameters():
            if id(p) not in other:
                routed[id(p)] = b.top_k / b.num_experts
    total, active = 0, 0.0
    for p in meta.parameters():
        total += p.numel()
        if id(p) not in skip:
            active += p.numel() * routed.get(id(p), 1.0)
    return total, int(2 * active)


def _config_object(config, data: dict):
    return type(config).from_dict({k: v for k, v in data.items() if k != "auto_map"})


def _check_only_blocks_change(meta, new_meta, blocks) -> None:
    """Refuse a config change that reshapes anything outside the MoE blocks (a dense MLP sharing the field)."""
    old = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    prefixes = tuple(f"{b.path}." for b in blocks)
    for name, p in new_meta.named_parameters():
        if old.get(name, tuple(p.shape)) != tuple(p.shape) and not name.startswith(prefixes):
            raise NexusError(f"folding would also reshape {name}, which is not in an MoE block (the family's config "
                             f"field is shared with it); use --remote-code")


def _plan_fold(fold, acfg, tensors, config, raw_config, meta, family, blocks, reader, names, dequantize, dtype):
    import copy

    from nexus.engines.convert import meta_model
    from nexus.engines.export_folds import gate_factor, quantize_units, shared_units
    from nexus.spec import RoutedFold

    spec = family.export_spec()
    mxfp4 = reader.quant_method == "mxfp4"
    new_config = copy.deepcopy(raw_config)
    deq_dtype = dtype if (dequantize and mxfp4) else None
    if deq_dtype is not None:
        new_config.pop("quantization_config", None)
    sources = _base_key_sources(acfg, tensors, meta, names, reader)
    width = acfg.shared_intermediate_size
    routed = isinstance(fold, RoutedFold)
    plan = Plan(method="routed" if routed else "slot")
    flops, rel_errors = 0, []
    if routed:
        c = fold.weight_sum
        c = float(c) if isinstance(c, (int, float)) else float(_get(raw_config, c))
        old = _get(raw_config, fold.width)
        if not isinstance(old, int):
            raise NexusError(f"{fold.width} = {old!r} is not one integer; this export cannot raise it; "
                             f"use --remote-code")
        multiple = 32 if mxfp4 and deq_dtype is None else 1
        units_width = -(-width // multiple) * multiple
        _set(new_config, fold.width, old + units_width)
        plan.details = {"weight_sum": c, fold.width: [old, old + units_width], "padding_units": units_width - width}
    else:
        unit = int(_get(raw_config, fold.unit))
        count = int(_get(raw_config, fold.count) or 0)
        new_count = count + -(-width // unit)
        units_width = (new_count - count) * unit
        _set(new_config, fold.count, new_count)
        plan.details = {fold.count: [count, new_count], "slot_width": [count * unit, new_count * unit],
                        "padding_units": units_width - width}
    new_meta = meta_model(_config_object(config, new_config))
    _check_only_blocks_change(meta, new_meta, blocks)
    for block in blocks:
        factor = gate_factor(tensors, block.path, acfg.gate_mode)
        if routed:
            units = shared_units(tensors, block.path, factor / c, multiple=units_width)
            quantized = quantize_units(units) if mxfp4 and deq_dtype is None else None
            if quantized is not None:
                rel_errors.append(quantized.rel_error)
            _routed_layer(plan, reader, spec.layout, block, units, quantized, deq_dtype, names)
            for tied in fold.tied:
                _widen_mlp(plan, reader, meta, names, f"{block.path}.{tied}", ("gate_proj", "up_proj", "down_proj"),
                           units, True, {})
            flops += 2 * 3 * block.hidden_size * units.units * (block.top_k + len(fold.tied))
        else:
            units = shared_units(tensors, block.path, factor, min_units=units_width)
            prefix = f"{block.path}.{fold.path}"
            if any(n.startswith(f"{prefix}.") for n, _ in meta.named_parameters()):
                _widen_mlp(plan, reader, meta, names, prefix, fold.proj, units, False, sources)
            else:
                _new_mlp(plan, new_meta, prefix, fold.proj, units, _stored_float_dtype(reader, names))
            flops += 2 * 3 * block.hidden_size * units.units
    for name, t in sources.items():
        plan.replace.setdefault(name, lambda name=name, t=t: [(name, t)])
    if rel_errors:
        plan.details["mxfp4_relative_error_of_shared_units"] = max(rel_errors)
    plan.config = new_config
    plan.extra_params = sum(p.numel() for p in new_meta.parameters()) - sum(p.numel() for p in meta.parameters())
    plan.extra_flops = flops
    return plan


def _stored_float_dtype(reader, names: set[str]) -> torch.dtype:
    """The dtype most floating tensors of the base are stored in (for tensors the export creates)."""
    from collections import Counter

    from nexus.engines.export_files import read_header

    counts: Counter = Counter()
    for file in dict.fromkeys(reader._file_of.values()):
        for raw in read_header(file)[0].values():
            if raw.dtype in ("F32", "BF16", "F16"):
                counts[raw.dtype] += 1
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[counts.most_common(1)[0][0]] \
        if counts else torch.float32


def _plan_remote(acfg, tensors, config, raw_config, meta, family, blocks, reader, names):
    from nexus.engines.export_remote import MODELING_FILE, remote_config
    from nexus.shared_expert import is_shared_parameter

    shared = {n: t for n, t in tensors.items() if is_shared_parameter(n)}
    bias = any(n.endswith(f"{SHARED_MODULE_NAME}.gate_proj.bias") for n in shared)
    new_config, source = remote_config(raw_config, type(meta), blocks, acfg.gate_mode, acfg.shared_intermediate_size,
                                       bias, family.activation(config))
    plan = Plan(method="remote_code", config=new_config, files={MODELING_FILE: source})
    plan.extra = [(n, lambda t=t: t) for n, t in shared.items()]
    for name, t in _base_key_sources(acfg, tensors, meta, names, reader).items():
        plan.replace[name] = lambda name=name, t=t: [(name, t)]
    plan.extra_params = sum(t.numel() for t in shared.values())
    plan.extra_flops = sum(2 * 3 * b.hidden_size * acfg.shared_intermediate_size for b in blocks)
    plan.details = {"trust_remote_code": True, "modeling_file": MODELING_FILE}
    return plan


def _write(plan: Plan, model_path: Path, tmp: Path) -> None:
    from nexus.checkpoint import INDEX_FILE
    from nexus.engines.export_files import StreamingWriter, iter_raw, source_files
    from nexus.progress import progress_bar

    weight_map: dict[str, str] = {}
    total = 0
    files = source_files(model_path)
    with progress_bar(len(files), desc="export", unit="file") as bar:
        for i, (file, raws, meta) in enumerate(iter_raw(files)):
            writer = StreamingWriter(tmp / file.name, meta or {"format": "pt"})
            for name, raw in raws.items():
                if name in plan.replace:
                    for new_name, t in plan.replace[name]():
                        writer.add(new_name, t)
                        del t
                else:
                    writer.copy_raw(name, raw)
            if i == len(files) - 1:  # new tensors go into the last file: a lone model.safetensors stays alone
                for name, make in plan.extra:
                    writer.add(name, make())
            writer.close()
            weight_map.update({n: file.name for n in writer.names()})
            total += writer.nbytes
            bar.update(1)
    if (model_path / INDEX_FILE).exists():
        write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(tmp / "config.json", plan.config)
    for f in sorted(model_path.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in _NOT_COPIED \
                and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, tmp / f.name)
    for name, text in plan.files.items():
        (tmp / name).write_text(text)


def _reference_logits(model_path: Path, adapter: Path, inputs: dict, family_name: str | None) -> dict:
    """Logits of base + adapter as NEXUS runs them (fp32)."""
    from nexus.adapter import load_adapter
    from nexus.loading import load_model

    model = load_model(model_path, family=family_name)
    load_adapter(model, adapter)
    with torch.no_grad():
        return {n: model(input_ids=ids).logits.float() for n, ids in inputs.items()}


def _check_output(arguments: dict) -> None:
    """Refuse, before the lock and any work, an ``--output`` that is or holds the model or the adapter
    (even with ``--overwrite``, which would delete it)."""
    refuse_output_over_inputs(arguments["output"], {"--model": arguments["model_path"], "--adapter": arguments["adapter"]})


@locks_output("output", before=_check_output)
def export(
    model_path: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    remote_code: bool = False,
    dequantize: bool = False,
    dtype: str = "bfloat16",
    check: bool = False,
    check_sequences: int = 4,
    check_length: int = 32,
    family_name: str | None = None,
) -> dict:
    """Write base + adapter as one checkpoint of the base's architecture into ``output``.

    :param model_path: the base checkpoint directory the adapter was made for.
    :param adapter: the adapter directory (``nexus_config.json`` + ``adapter_model.safetensors``).
    :param output: the directory to write (must not exist unless ``overwrite``).
    :param remote_code: write a ``trust_remote_code`` checkpoint (base tensors unchanged, shared
        experts added to the last weights file, a modeling file) instead of an exact fold.
    :param dequantize: MXFP4 bases: write every expert as float (``dtype``) instead of keeping the
        original blocks and quantising only the appended units.
    :param dtype: ``bfloat16`` or ``float32``, for experts written dequantised.
    :param check: load the result with stock transformers in a fresh process that never imports
        nexus and compare its logits with base + adapter on ``check_sequences`` random sequences of
        ``check_length`` tokens (recorded in ``export_info.json``).
    :param family_name: ``--family``; default the adapter's.
    :return: what ``export_info.json`` records.
    :raises AdapterMismatchError: the adapter was made for another base (both fingerprints named).
    :raises NexusError: no exact fold (the reason and the options), an existing output without
        ``overwrite``, an output that is or holds the model or the adapter, a damaged input. Nothing
        is left half-written.
    """
    import dataclasses

    from nexus.adapter import check_base, read_adapter_config, read_adapter_tensors
    from nexus.checkpoint import CheckpointReader
    from nexus.engines.convert import meta_model
    from nexus.engines.export_check import compare, sample_inputs, stock_logits
    from nexus.family import resolve_family
    from nexus.fingerprint import check_weights, config_fingerprint
    from nexus.loading import load_config

    model_path, adapter, output = (Path(p).expanduser() for p in (model_path, adapter, output))
    if dtype not in ("bfloat16", "float32"):
        raise NexusError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
    if output.exists() and not overwrite:
        raise NexusError(f"{output} exists; pass --overwrite to replace it, or choose another --output")
    config = load_config(model_path)
    acfg = read_adapter_config(adapter)
    check_base(acfg, config, what=f"adapter {adapter}")
    family = resolve_family(config, name=family_name or acfg.family)
    check_weights(acfg.base_weights_fingerprint, acfg.base_weights_tensors, model_path, f"adapter {adapter}")
    raw_config = json.loads((model_path / "config.json").read_text())
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if raw_config.get("model_type") not in CONFIG_MAPPING_NAMES:
        log.warning("model_type %r is not an architecture transformers ships: the export loads only where the "
                    "plugin that registers it is installed", raw_config.get("model_type"))
    reader = CheckpointReader(model_path)
    names = set(reader.keys())
    meta = meta_model(config)
    blocks = family.moe_blocks(meta)
    tensors = read_adapter_tensors(adapter, acfg, [b.path for b in blocks])
    if remote_code:
        plan = _plan_remote(acfg, tensors, config, raw_config, meta, family, blocks, reader, names)
    else:
        fold = choose_fold(family.export_spec(), raw_config, acfg.gate_mode, reader.quant_method)
        plan = _plan_fold(fold, acfg, tensors, config, raw_config, meta, family, blocks, reader, names,
                          dequantize, getattr(torch, dtype))
    base_params, base_flops = _moe_costs(meta, family, blocks)
    cost = {"base_parameters": base_params, "extra_parameters": plan.extra_params,
            "extra_parameters_ratio": plan.extra_params / base_params,
            "base_flops_per_token": base_flops, "extra_flops_per_token": plan.extra_flops,
            "extra_flops_ratio": plan.extra_flops / base_flops,
            "flops_note": "matmul FLOPs, 2 x parameters used per token; attention over the context not counted"}
    log.info("export by %s: +%s parameters (%.2f%% of the base), +%s FLOPs per token (%.2f%% of the base's %s)",
             plan.method, f"{plan.extra_params:,}", 100 * cost["extra_parameters_ratio"], f"{plan.extra_flops:,}",
             100 * cost["extra_flops_ratio"], f"{base_flops:,}")
    info = {
        "nexus_version": __version__, "family": family.name, "method": plan.method,
        "base_model": str(model_path), "base_fingerprint": config_fingerprint(config),
        "base_weights_fingerprint": acfg.base_weights_fingerprint, "model_type": raw_config.get("model_type"),
        "adapter": str(adapter), "adapter_fingerprint": adapter_fingerprint(adapter),
        "adapter_config": {k: v for k, v in dataclasses.asdict(acfg).items() if k in ("gate_mode",
                           "shared_intermediate_size", "layers", "base_keys")},
        "fold": plan.details, "dequantized": bool(dequantize and reader.quant_method == "mxfp4"), "cost": cost,
        "check": None,
    }
    with atomic_dir(output) as tmp:
        _write(plan, model_path, tmp)
        if check:
            inputs = sample_inputs(int(config.get_text_config().vocab_size), check_sequences, check_length)
            reference = _reference_logits(model_path, adapter, inputs, family.name)
            exported = stock_logits(tmp, inputs, trust_remote_code=plan.method == "remote_code")
            info["check"] = compare(reference, exported)
            log.info("check: max |logit difference| %.3g, KL(adapter || export) %.3g over %d tokens",
                     info["check"]["max_abs_logit_diff"], info["check"]["kl_adapter_to_export"],
                     info["check"]["tokens"])
        write_json(tmp / EXPORT_INFO_NAME, info)
    log.info("wrote %s (%s) to %s", raw_config.get("model_type"), plan.method, output)
    return info

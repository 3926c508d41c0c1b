"""Adapters: the trained shared experts (and routers, when trained) of one base model.

An adapter directory holds ``nexus_config.json`` (what it is, for which base) and
``adapter_model.safetensors`` (keys as in the adapted model, e.g.
``model.layers.0.mlp.nexus_shared.gate_proj.weight``). It is never a copy of the base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nexus import __version__
from nexus.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, GATE_MODES, SHARED_MODULE_NAME, SHARED_SCALE_NAME
from nexus.errors import AdapterMismatchError, NexusError
from nexus.fingerprint import check_weights, config_fingerprint, model_weights_fingerprint
from nexus.io import atomic_dir, write_json, write_safetensors
from nexus.shared_expert import attach_shared_experts, detach_shared_experts, is_shared_parameter
from nexus.tensor_files import load_safetensors

log = logging.getLogger(__name__)


@dataclass
class AdapterConfig:
    """What ``nexus_config.json`` records.

    Attributes:
        family: the family name the adapter was made with.
        base_fingerprint: :func:`nexus.fingerprint.config_fingerprint` of the base.
        base_weights_fingerprint: :func:`nexus.fingerprint.weights_fingerprint` of the base
            checkpoint ("" when unknown: a model built in memory, or an adapter from an older nexus).
        base_weights_tensors: the tensors that fingerprint was computed over.
        shared_intermediate_size: width of every shared expert.
        gate_mode: ``none``, ``scalar`` or ``token``.
        layers: decoder layer indices that carry a shared expert.
        base_keys: names of base-model parameters the adapter replaces (trained routers, a
            family's trained native shared expert); loading copies them over the base's.
        base_model: where the base was loaded from (informational).
        model_type: the base's ``config.model_type`` (informational).
        init: how the shared experts were initialised (strategy, selected experts).
        args: the arguments of the command that produced the adapter.
        nexus_version: the version that wrote the file.
    """

    family: str
    base_fingerprint: str
    shared_intermediate_size: int
    gate_mode: str = "scalar"  # what a config without the key means; convert writes the key
    base_weights_fingerprint: str = ""
    base_weights_tensors: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    base_keys: list[str] = field(default_factory=list)
    base_model: str = ""
    model_type: str = ""
    init: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    nexus_version: str = __version__

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "AdapterConfig":
        """Build from a dict; unknown keys (a newer NEXUS) warn with their names and are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{source or 'adapter config'} was written by nexus {data.get('nexus_version', '?')} "
                f"(this is {__version__}); ignoring unknown keys: {', '.join(unknown)}. "
                f"Upgrade nexus-moe to use them.",
                UserWarning,
                stacklevel=3,
            )
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        absent = [k for k in required if k not in data]
        if absent:
            raise NexusError(f"{source or 'adapter config'} lacks {', '.join(absent)}: it is not a complete NEXUS "
                             f"adapter config; convert or train the adapter again")
        return cls(**{k: v for k, v in data.items() if k in known})


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Read ``nexus_config.json`` from an adapter directory.

    :raises NexusError: no such file, or not a JSON object with the adapter's fields.
    """
    cfg_path = Path(path) / ADAPTER_CONFIG_NAME
    if not cfg_path.exists():
        raise NexusError(f"{path} is not a NEXUS adapter (no {ADAPTER_CONFIG_NAME})")
    try:
        data = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise NexusError(f"{cfg_path} is not valid JSON ({exc}); convert or train the adapter again") from exc
    if not isinstance(data, dict):
        raise NexusError(f"{cfg_path} is not a JSON object; convert or train the adapter again")
    return AdapterConfig.from_dict(data, source=str(cfg_path))


def adapter_state_dict(model: nn.Module, base_keys: list[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors: every shared-expert parameter plus the named base parameters."""
    wanted = set(base_keys)
    return {n: p.detach() for n, p in model.named_parameters() if is_shared_parameter(n) or n in wanted}


def save_adapter(model: nn.Module, path: str | Path, config: AdapterConfig,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s shared experts as an adapter directory, atomically.

    :param model: a model with shared experts attached.
    :param path: the adapter directory (replaced whole if it exists).
    :param config: the adapter's description; ``layers`` is filled in when empty, and the base
        weights fingerprint when empty and ``model`` was loaded from a checkpoint directory.
    :param tensors: the adapter's whole tensors when already gathered (a sharded model:
        :func:`adapter_state_dict` through :func:`nexus.training.sharding.gather_full`);
        default ``adapter_state_dict(model, config.base_keys)``.
    :return: ``path``.
    """
    tensors = adapter_state_dict(model, config.base_keys) if tensors is None else tensors
    if not any(is_shared_parameter(n) for n in tensors):
        raise NexusError("the model has no shared experts attached; nothing to save")
    if not config.layers:
        config.layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in tensors if ".layers." in n})
    if not config.base_weights_fingerprint and getattr(model, "_nexus_source", None) is not None:
        from nexus.family import resolve_family

        try:
            family = resolve_family(name=config.family)
            config.base_weights_fingerprint, config.base_weights_tensors = model_weights_fingerprint(model, family)
        except NexusError as exc:  # never lose a save over a fingerprint
            log.warning("no base weights fingerprint recorded in %s: %s", path, exc)
    config.nexus_version = __version__
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS_NAME, tensors, metadata={"format": "pt", "nexus_version": __version__})
        write_json(tmp / ADAPTER_CONFIG_NAME, dataclasses.asdict(config))
    return path


def check_base(config: AdapterConfig, model_config, what: str = "adapter") -> None:
    """Refuse a base model whose config fingerprint differs from the one ``config`` was made for."""
    fp = config_fingerprint(model_config)
    if fp != config.base_fingerprint:
        raise AdapterMismatchError(
            f"this {what} was made for base fingerprint {config.base_fingerprint} "
            f"({config.model_type or '?'} from {config.base_model or '?'}, family {config.family}), but the model has "
            f"fingerprint {fp} ({getattr(model_config, 'model_type', '?')}); use the base model it was made for"
        )


def adapter_family(config: AdapterConfig, model: nn.Module, path: str | Path):
    """The family of the adapter at ``path`` on ``model``, after checking that the adapter was
    made for this base (config fingerprint; an adapter of another family fails here).

    :return: a :class:`nexus.family.Family`.
    :raises AdapterMismatchError: the adapter was made for another base model.
    """
    from nexus.family import resolve_family

    check_base(config, model.config, what=f"adapter {path}")
    return resolve_family(model.config, name=config.family)


_REDO = "convert or train the adapter again"


def _gate_of(scale: dict[str, torch.Tensor]) -> str:
    """The gate mode a block's ``nexus_shared_scale`` tensors (``{"weight": ..., "scale": ...}``) encode."""
    if not scale:
        return "none"
    weight = scale.get("weight")
    if weight is not None and weight.dim() == 1:
        return "scalar"
    return "scalar_token" if "scale" in scale else "token"


def _fields_in_file(path: Path) -> set[str]:
    """The keys ``nexus_config.json`` at ``path`` really holds (defaults fill in the others)."""
    try:
        data = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def check_adapter(path: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                  block_paths: list[str] | None = None) -> None:
    """Refuse an adapter whose ``nexus_config.json`` disagrees with its tensors, naming the field.

    Every stage that reads an adapter calls it (``load_adapter``: train, evaluate, generate, the
    trainers wrapper; ``export``, which never attaches it to a model). Checked against the tensors
    alone: ``shared_intermediate_size`` (the width of every ``gate_proj``/``up_proj``/``down_proj``),
    ``gate_mode`` (which ``nexus_shared_scale`` tensors there are, and their shapes), ``layers``,
    ``base_keys``; the types of those fields; and every tensor is floating-point and finite. The
    base fields (``family``, the fingerprints) are checked against the model by :func:`check_base`
    and :func:`nexus.fingerprint.check_weights`.

    :param tensors: the adapter's tensors, ``{name: Tensor}`` (a shared expert's ``gate_proj.weight``
        is ``[N, H]``, ``down_proj.weight`` ``[H, N]``).
    :param block_paths: the MoE block paths of the base, when known without a model (export): the
        adapter must hold a shared expert for each, and for no other module.
    :raises NexusError: naming the adapter, the field and the tensor that disagree.
    """
    where = f"adapter {path}: {ADAPTER_CONFIG_NAME}"
    width, gate = config.shared_intermediate_size, config.gate_mode
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise NexusError(f"{where} has shared_intermediate_size {width!r}, not a positive integer; {_REDO}")
    if gate not in GATE_MODES:
        raise NexusError(f"{where} has gate_mode {gate!r}, not one of {', '.join(GATE_MODES)}; {_REDO}")
    for field_name in ("layers", "base_keys"):
        value = getattr(config, field_name)
        kind = int if field_name == "layers" else str
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise NexusError(f"{where} has {field_name} {value!r}, not a list of {kind.__name__}s; {_REDO}")
    for name, t in tensors.items():
        if not (t.is_floating_point() and torch.isfinite(t).all()):
            what = "is not a floating-point tensor" if not t.is_floating_point() else "holds NaN or infinite values"
            raise NexusError(f"adapter {path}: tensor {name} {what}; {_REDO}")
    mlp, scales, other = {}, {}, []
    for name, t in tensors.items():
        for marker, into in ((f".{SHARED_MODULE_NAME}.", mlp), (f".{SHARED_SCALE_NAME}.", scales)):
            if marker in f".{name}":
                block, _, rest = f".{name}".partition(marker)
                into.setdefault(block[1:], {})[rest] = t
                break
        else:
            other.append(name)
    if not mlp:
        raise NexusError(f"adapter {path} holds no shared-expert tensors ({SHARED_MODULE_NAME}.*); {_REDO}")
    if block_paths is not None and set(mlp) | set(scales) != set(block_paths):
        extra = sorted((set(mlp) | set(scales)) - set(block_paths))
        missing = sorted(set(block_paths) - set(mlp))
        raise NexusError(f"adapter {path} has shared experts for {', '.join(extra[:2]) or 'no other block'} and none "
                         f"for {', '.join(missing[:2]) or 'no block'} of the model's MoE blocks: it was made for "
                         f"another model; {_REDO}")
    for block, parts in mlp.items():
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            t = parts.get(f"{proj}.weight")
            name = f"{block}.{SHARED_MODULE_NAME}.{proj}.weight"
            if t is None or t.dim() != 2:
                raise NexusError(f"adapter {path}: tensor {name} is {'missing' if t is None else 'not a matrix'}; "
                                 f"{_REDO}")
            if t.shape[dim] != width:
                raise NexusError(f"{where} has shared_intermediate_size {width}, but tensor {name} has width "
                                 f"{t.shape[dim]} (shape {tuple(t.shape)}): the config and the weights disagree; "
                                 f"{_REDO}, or set the width the weights have")
        found = _gate_of(scales.get(block, {}))
        if found != gate:
            if "gate_mode" not in _fields_in_file(Path(path)):
                raise NexusError(f"{where} has no gate_mode field (read as {gate!r}), but the tensors of {block} are "
                                 f"those of gate {found!r}: add \"gate_mode\": \"{found}\" to it, or {_REDO}")
            raise NexusError(f"{where} has gate_mode {gate!r}, but the tensors of {block} are those of gate "
                             f"{found!r} ({SHARED_SCALE_NAME} tensors: {sorted(scales.get(block, {})) or 'none'}); "
                             f"{_REDO}, or set the gate the weights have")
    in_tensors = sorted({int(b.split(".layers.")[1].split(".")[0]) for b in mlp if ".layers." in f"{b}."})
    if config.layers and in_tensors and in_tensors != sorted(config.layers):
        raise NexusError(f"{where} has layers {config.layers}, but its tensors hold shared experts for layers "
                         f"{in_tensors}; {_REDO}")
    unlisted = sorted(set(other) - set(config.base_keys))
    absent = sorted(set(config.base_keys) - set(other))
    if unlisted or absent:
        raise NexusError(f"{where} has base_keys that disagree with its tensors ("
                         + "; ".join(([f"not listed: {', '.join(unlisted[:2])}"] if unlisted else [])
                                     + ([f"listed but absent: {', '.join(absent[:2])}"] if absent else []))
                         + f"); {_REDO}")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    missing = [n for n in params if is_shared_parameter(n) and n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensors (e.g. {', '.join(missing[:2])})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})"] if unexpected else [])
        raise NexusError(f"adapter {path} does not fit the model: {'; '.join(parts)}; "
                         f"it is incomplete or was made for another model: convert or train it again")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise NexusError(
                f"adapter {path}: tensor {name} has shape {tuple(t.shape)} but the model expects "
                f"{tuple(params[name].shape)}; the weights do not match {ADAPTER_CONFIG_NAME}: "
                f"convert or train it again"
            )


def read_adapter_tensors(path: str | Path, config: AdapterConfig | None = None,
                         block_paths: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the adapter at ``path``, checked against its config by :func:`check_adapter`.

    :param config: its :class:`AdapterConfig` when already read; default read from ``path``.
    :param block_paths: passed to :func:`check_adapter`.
    :raises NexusError: no weights file, a damaged one, or tensors that disagree with the config.
    """
    config = read_adapter_config(path) if config is None else config
    weights = Path(path) / ADAPTER_WEIGHTS_NAME
    if not weights.exists():
        raise NexusError(f"adapter {path} has no {ADAPTER_WEIGHTS_NAME}; {_REDO}")
    tensors = load_safetensors(weights, _REDO)
    check_adapter(path, config, tensors, block_paths)
    return tensors


def load_adapter(model: nn.Module, path: str | Path, family=None) -> nn.Module:
    """Attach the adapter at ``path`` to ``model`` (in place) and return ``model``.

    The base is checked first: its config fingerprint, then (when ``model`` was loaded from a
    checkpoint directory by :func:`nexus.loading.load_model`) its weights fingerprint. An adapter
    whose weights are missing, truncated, mis-shaped or disagree with its ``nexus_config.json``
    (:func:`check_adapter`) is refused with the model left unchanged.

    :param model: the base model the adapter was made for.
    :param path: an adapter directory written by :func:`save_adapter`.
    :param family: a :class:`nexus.family.Family`; default the one the adapter names.
    :raises AdapterMismatchError: the adapter was made for another base (config or weights).
    :raises NexusError: the adapter's files are missing, damaged or do not fit the model.
    """
    config = read_adapter_config(path)
    family = adapter_family(config, model, path) if family is None else family
    check_base(config, model.config, what=f"adapter {path}")
    check_weights(config.base_weights_fingerprint, config.base_weights_tensors,
                  getattr(model, "_nexus_source", None), f"adapter {path}")
    tensors = read_adapter_tensors(path, config)
    attach_shared_experts(model, family, config.shared_intermediate_size, config.gate_mode)
    params = dict(model.named_parameters())
    try:
        _check_tensors(Path(path), tensors, params)
    except NexusError:
        detach_shared_experts(model)
        raise
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    model._nexus_adapter = config
    return model

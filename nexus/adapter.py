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
from nexus.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
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
        if not (t.is_floating_point() and torch.isfinite(t).all()):
            what = "is not a floating-point tensor" if not t.is_floating_point() else "holds NaN or infinite values"
            raise NexusError(f"adapter {path}: tensor {name} {what}; convert or train the adapter again")


def load_adapter(model: nn.Module, path: str | Path, family=None) -> nn.Module:
    """Attach the adapter at ``path`` to ``model`` (in place) and return ``model``.

    The base is checked first: its config fingerprint, then (when ``model`` was loaded from a
    checkpoint directory by :func:`nexus.loading.load_model`) its weights fingerprint. An adapter
    whose weights are missing, truncated or mis-shaped is refused with the model left unchanged.

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
    weights = Path(path) / ADAPTER_WEIGHTS_NAME
    if not weights.exists():
        raise NexusError(f"adapter {path} has no {ADAPTER_WEIGHTS_NAME}; convert or train the adapter again")
    tensors = load_safetensors(weights, "convert or train the adapter again")
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

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
from safetensors.torch import load_file
from torch import nn

from nexus import __version__
from nexus.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from nexus.errors import AdapterMismatchError, NexusError
from nexus.fingerprint import config_fingerprint
from nexus.io import atomic_dir, write_json, write_safetensors
from nexus.shared_expert import attach_shared_experts, is_shared_parameter

log = logging.getLogger(__name__)


@dataclass
class AdapterConfig:
    """What ``nexus_config.json`` records.

    Attributes:
        family: the family name the adapter was made with.
        base_fingerprint: :func:`nexus.fingerprint.config_fingerprint` of the base.
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
        return cls(**{k: v for k, v in data.items() if k in known})


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Read ``nexus_config.json`` from an adapter directory."""
    cfg_path = Path(path) / ADAPTER_CONFIG_NAME
    if not cfg_path.exists():
        raise NexusError(f"{path} is not a NEXUS adapter (no {ADAPTER_CONFIG_NAME})")
    return AdapterConfig.from_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))


def adapter_state_dict(model: nn.Module, base_keys: list[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors: every shared-expert parameter plus the named base parameters."""
    wanted = set(base_keys)
    return {n: p.detach() for n, p in model.named_parameters() if is_shared_parameter(n) or n in wanted}


def save_adapter(model: nn.Module, path: str | Path, config: AdapterConfig,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s shared experts as an adapter directory, atomically.

    :param model: a model with shared experts attached.
    :param path: the adapter directory (replaced whole if it exists).
    :param config: the adapter's description; ``layers`` is filled in when empty.
    :param tensors: the adapter's whole tensors when already gathered (a sharded model:
        :func:`adapter_state_dict` through :func:`nexus.engines.sharding.gather_full`);
        default ``adapter_state_dict(model, config.base_keys)``.
    :return: ``path``.
    """
    tensors = adapter_state_dict(model, config.base_keys) if tensors is None else tensors
    if not any(is_shared_parameter(n) for n in tensors):
        raise NexusError("the model has no shared experts attached; nothing to save")
    if not config.layers:
        config.layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in tensors if ".layers." in n})
    config.nexus_version = __version__
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS_NAME, tensors, metadata={"format": "pt", "nexus_version": __version__})
        write_json(tmp / ADAPTER_CONFIG_NAME, dataclasses.asdict(config))
    return path


def check_base(config: AdapterConfig, model_config, what: str = "adapter") -> None:
    """Refuse a base model whose fingerprint differs from the one ``config`` was made for."""
    fp = config_fingerprint(model_config)
    if fp != config.base_fingerprint:
        raise AdapterMismatchError(
            f"this {what} was made for base fingerprint {config.base_fingerprint} "
            f"({config.model_type or '?'} from {config.base_model or '?'}), but the model has fingerprint {fp} "
            f"({getattr(model_config, 'model_type', '?')}); use the base model it was made for"
        )


def load_adapter(model: nn.Module, path: str | Path, family=None) -> nn.Module:
    """Attach the adapter at ``path`` to ``model`` (in place) and return ``model``.

    :param model: the base model the adapter was made for (checked by fingerprint).
    :param path: an adapter directory written by :func:`save_adapter`.
    :param family: a :class:`nexus.family.Family`; default the one the adapter names.
    """
    from nexus.family import resolve_family

    config = read_adapter_config(path)
    check_base(config, model.config)
    family = family or resolve_family(model.config, name=config.family)
    attach_shared_experts(model, family, config.shared_intermediate_size, config.gate_mode)
    tensors = load_file(Path(path) / ADAPTER_WEIGHTS_NAME)
    params = dict(model.named_parameters())
    missing = [n for n in params if is_shared_parameter(n) and n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if missing or unexpected:
        raise NexusError(
            f"adapter {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    model._nexus_adapter = config
    return model

"""The family handle: resolves a model or config to exactly one family and wraps its hooks.

Engines never call ``pm.hook`` themselves; they hold a :class:`Family` and ask it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pluggy
from torch import nn

from nexus.errors import FamilyError
from nexus.plugins import get_plugin_manager
from nexus.types import ExpertWeights, MoEBlock, RouterCapture

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class FamilyInfo:
    """What a plugin registered for one family."""

    name: str
    model_types: tuple[str, ...]
    description: str
    plugin: str


def registered_families(pm: pluggy.PluginManager | None = None) -> dict[str, FamilyInfo]:
    """Every registered family by name.

    Each plugin's ``nexus_register_families`` is called with its own ``register`` callback, so
    a name or model type claimed twice is refused with both plugins named.
    """
    pm = pm or get_plugin_manager()
    families: dict[str, FamilyInfo] = {}
    owners: dict[str, str] = {}  # model_type -> family
    for impl in pm.hook.nexus_register_families.get_hookimpls():

        def register(name: str, model_types=(), description: str = "", _plugin=impl.plugin_name) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise FamilyError(f"plugin {_plugin!r} registered an invalid family name {name!r}: use a lowercase identifier")
            if name in families:
                raise FamilyError(
                    f"family {name!r} is registered by two plugins: {families[name].plugin!r} and {_plugin!r}; "
                    f"uninstall one or exclude it with NEXUS_LOAD_PLUGINS"
                )
            types = (model_types,) if isinstance(model_types, str) else tuple(model_types)
            for mt in types:
                if mt in owners:
                    raise FamilyError(
                        f"model_type {mt!r} is claimed by families {owners[mt]!r} ({families[owners[mt]].plugin}) "
                        f"and {name!r} ({_plugin})"
                    )
            for mt in types:
                owners[mt] = name
            families[name] = FamilyInfo(name, types, description, _plugin)

        impl.function(register=register)
    return families


def _model_type(config) -> str | None:
    return getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)


def resolve_family(config=None, name: str | None = None, pm: pluggy.PluginManager | None = None) -> Family:
    """Return the family for ``--family name`` or for ``config.model_type``.

    :param config: a ``PretrainedConfig``, a config dict or a model (its ``.config`` is used).
    :param name: the family name the user gave; validated against the registry and, when a
        config is given, against the model types the family declares.
    :raises FamilyError: unknown name, a family that does not declare the config's model type,
        or a model type no family claims (a dense model).
    """
    pm = pm or get_plugin_manager()
    families = registered_families(pm)
    known = ", ".join(sorted(families)) or "none (is nexus-moe installed?)"
    if config is not None and hasattr(config, "config") and isinstance(config, nn.Module):
        config = config.config
    model_type = _model_type(config)
    if name is not None:
        if name not in families:
            raise FamilyError(f"unknown family {name!r}; registered families: {known}")
        info = families[name]
        if model_type is not None and model_type not in info.model_types:
            owner = next((f.name for f in families.values() if model_type in f.model_types), None)
            fix = (f"drop --family to use family {owner!r}" if owner else
                   f"install a plugin whose family declares model_type {model_type!r}")
            raise FamilyError(
                f"family {name!r} handles model types {', '.join(info.model_types) or 'none'}, not the "
                f"model's {model_type!r}: its layout would be read wrongly; {fix}"
            )
        return Family(info, pm)
    for info in families.values():
        if model_type in info.model_types:
            return Family(info, pm)
    raise FamilyError(
        f"model_type {model_type!r} has no MoE family; registered families: {known}. "
        f"Install a plugin whose family declares it"
    )


class Family:
    """One resolved family; every method asks the plugins, first non-None answer wins."""

    def __init__(self, info: FamilyInfo, pm: pluggy.PluginManager):
        self.info = info
        self.pm = pm

    @property
    def name(self) -> str:
        return self.info.name

    def __repr__(self) -> str:
        return f"Family({self.name!r}, plugin={self.info.plugin!r})"

    def _call(self, hook: str, **kwargs):
        result = getattr(self.pm.hook, hook)(family=self.name, **kwargs)
        if result is None:
            raise FamilyError(f"family {self.name!r} (plugin {self.info.plugin!r}) does not implement {hook}")
        return result

    def moe_blocks(self, model: nn.Module) -> list[MoEBlock]:
        """The model's MoE blocks in layer order; raises when there are none."""
        blocks = self._call("nexus_moe_blocks", model=model)
        if not blocks:
            raise FamilyError(
                f"no MoE blocks found in a {_model_type(model.config)!r} model with family {self.name!r}: "
                f"is it a dense model, or the wrong --family?"
            )
        return blocks

    def router_capture(self, block: MoEBlock) -> RouterCapture:
        return self._call("nexus_router_capture", block=block)

    def activation(self, config) -> Callable:
        return self._call("nexus_activation", config=config)

    def read_experts(self, reader, config, layer: int, experts: list[int]) -> ExpertWeights:
        return self._call("nexus_read_experts", reader=reader, config=config, layer=layer, experts=list(experts))

    def pack_experts(self, reader, config, block: MoEBlock) -> bool | None:
        """Let a ``nexus_pack_experts`` implementation replace ``block``'s experts by a packed module.

        :return: True once replaced, False when the block cannot stay packed, None when no plugin
            packs it itself (the loader then packs by :meth:`expert_layout`).
        """
        return self.pm.hook.nexus_pack_experts(
            family=self.name, reader=reader, config=config, block=block, activation=self.activation(config)
        )

    def expert_layout(self):
        """The family's declared on-disk expert layout (:class:`nexus.expert_layout.ExpertLayout`), or None."""
        return self.pm.hook.nexus_expert_layout(family=self.name)

    def build_shared_expert(self, config, block: MoEBlock, intermediate_size: int) -> nn.Module:
        return self._call(
            "nexus_build_shared_expert",
            config=config,
            block=block,
            intermediate_size=intermediate_size,
            activation=self.activation(config),
        )

    def export_spec(self):
        """How a trained shared expert folds into a stock checkpoint (:class:`nexus.spec.ExportSpec`)."""
        spec = self.pm.hook.nexus_export_spec(family=self.name)
        if spec is None:
            from nexus.spec import ExportSpec

            return ExportSpec(no_fold=f"family {self.name!r} declares no fold (hook nexus_export_spec)")
        return spec

    def example_config(self):
        return self._call("nexus_example_config")

    def write_checkpoint(self, model: nn.Module, path: str) -> None:
        self._call("nexus_write_checkpoint", model=model, path=str(path))

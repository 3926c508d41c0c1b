"""Declarative families: a :class:`FamilySpec` plus :class:`SpecFamily` is a whole plugin.

Most MoE families in transformers differ only in names: where the blocks live, what the router
is called, which config fields hold E/k/I, and how experts are laid out on disk. A family plugin
declares those in a ``FamilySpec`` and exposes ``SpecFamily(SPEC)`` (or a subclass overriding
one hook) as its entry point; all the logic lives here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from nexus.hookspecs import hookimpl
from nexus.types import ExpertWeights, MoEBlock, RouterCapture, Scoring


@dataclass(frozen=True)
class ExpertLayout:
    """Where one MoE layer's routed experts are stored on disk.

    Names are templates filled with ``layer`` (and ``e`` for per-expert names).

    Attributes:
        gate_up: fused ``[E, 2I, H]`` tensor (``[E, H, 2I]`` when ``transposed``); may be MXFP4-packed.
        down: fused ``[E, H, I]`` tensor (``[E, I, H]`` when ``transposed``).
        transposed: fused tensors are used as ``x @ W`` (GPT-OSS, Llama4).
        interleaved: gate and up alternate along the 2I axis (GPT-OSS) instead of ``[gate; up]``.
        gate_up_bias, down_bias: fused bias tensors ``[E, 2I]`` / ``[E, H]``, or None.
        per_expert: ``(gate, up, down)`` per-expert ``nn.Linear`` weight names, the form
            ``save_pretrained`` writes for families with a conversion mapping; tried first.
    """

    gate_up: str = "model.layers.{layer}.mlp.experts.gate_up_proj"
    down: str = "model.layers.{layer}.mlp.experts.down_proj"
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    per_expert: tuple[str, str, str] | None = None

    @property
    def has_bias(self) -> bool:
        return self.gate_up_bias is not None


def _split(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``t[k, 2I, ...]`` into gate and up halves along dim 1."""
    if interleaved:
        return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()
    half = t.shape[1] // 2
    return t[:, :half].contiguous(), t[:, half:].contiguous()


def read_experts_from_layout(reader, layout: ExpertLayout, layer: int, experts: list[int]) -> ExpertWeights:
    """Read ``experts`` of ``layer`` as fp32 :class:`ExpertWeights` following ``layout``."""
    if layout.per_expert and layout.per_expert[0].format(layer=layer, e=experts[0] if experts else 0) in reader:
        g, u, d = (
            torch.stack([reader.read(name.format(layer=layer, e=e)).float() for e in experts])
            for name in layout.per_expert
        )
        return ExpertWeights(gate=g, up=u, down=d)
    gu = reader.read_expert_matrices(layout.gate_up.format(layer=layer), experts, layout.transposed)
    gate, up = _split(gu, layout.interleaved)
    down = reader.read_expert_matrices(layout.down.format(layer=layer), experts, layout.transposed)
    weights = ExpertWeights(gate=gate, up=up, down=down)
    if layout.gate_up_bias:
        gub = reader.read_rows(layout.gate_up_bias.format(layer=layer), experts).float()
        weights.gate_bias, weights.up_bias = _split(gub, layout.interleaved)
        weights.down_bias = reader.read_rows(layout.down_bias.format(layer=layer), experts).float()
    return weights


def _all_layers(config, layer: int) -> bool:
    return True


@dataclass(frozen=True)
class FamilySpec:
    """Everything the core needs to know about a family with a standard block.

    Attributes:
        name: the ``--family`` name.
        model_types: ``config.model_type`` values that auto-detect this family.
        description: one line for ``nexus families``.
        num_experts, top_k, intermediate_size, hidden_size: config field names.
        layers: module path of the decoder-layer ``ModuleList``.
        block: attribute of a decoder layer holding the MoE block.
        router: path of the router inside the block.
        logits_index: where the logits are in the router's output (None: the output itself).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        is_moe_layer: ``(config, layer_index) -> bool``; default every layer.
        experts: the on-disk :class:`ExpertLayout`.
        example_config: zero-argument callable returning a tiny config.
    """

    name: str
    model_types: tuple[str, ...]
    description: str
    num_experts: str
    top_k: str
    intermediate_size: str
    example_config: Callable[[], object]
    hidden_size: str = "hidden_size"
    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "gate"
    logits_index: int | None = 0
    scoring: Scoring = "softmax"
    is_moe_layer: Callable[[object, int], bool] = _all_layers
    experts: ExpertLayout = field(default_factory=ExpertLayout)


class SpecFamily:
    """A plugin object implementing every per-model hook from a :class:`FamilySpec`.

    Subclass it and override a method (keeping ``@hookimpl``) for what the spec cannot say.
    """

    def __init__(self, spec: FamilySpec):
        self.spec = spec
        self.__name__ = f"nexus-family-{spec.name}"

    def _mine(self, family: str) -> bool:
        return family == self.spec.name

    def config_value(self, config, field_name: str):
        """Read ``field_name`` (a dotted path such as ``ffn_config.moe_top_k``) from ``config``."""
        value = config
        for part in field_name.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        return value

    @hookimpl
    def nexus_register_families(self, register):
        register(self.spec.name, model_types=self.spec.model_types, description=self.spec.description)

    @hookimpl
    def nexus_example_config(self, family):
        return self.spec.example_config() if self._mine(family) else None

    @hookimpl
    def nexus_moe_blocks(self, family, model):
        if not self._mine(family):
            return None
        s, config = self.spec, model.config
        layers = model.get_submodule(s.layers)
        blocks = []
        for i, layer in enumerate(layers):
            if not s.is_moe_layer(config, i):
                continue
            blocks.append(
                MoEBlock(
                    layer=i,
                    path=f"{s.layers}.{i}.{s.block}",
                    module=layer.get_submodule(s.block),
                    num_experts=int(self.config_value(config, s.num_experts)),
                    top_k=int(self.config_value(config, s.top_k)),
                    hidden_size=int(self.config_value(config, s.hidden_size)),
                    intermediate_size=int(self.config_value(config, s.intermediate_size)),
                    expert_bias=s.experts.has_bias,
                )
            )
        return blocks

    @hookimpl
    def nexus_router_capture(self, family, block):
        if not self._mine(family):
            return None
        idx = self.spec.logits_index
        extract = (lambda out: out) if idx is None else (lambda out: out[idx])
        return RouterCapture(module=block.module.get_submodule(self.spec.router), extract=extract, scoring=self.spec.scoring)

    @hookimpl
    def nexus_read_experts(self, family, reader, config, layer, experts):
        if not self._mine(family):
            return None
        return read_experts_from_layout(reader, self.spec.experts, layer, experts)

"""Declarative families: a :class:`FamilySpec` plus :class:`SpecFamily` is a whole plugin.

Most MoE families in transformers differ only in names: where the blocks live, what the router
is called, which config fields hold E/k/I, which layers are MoE, and how experts are laid out on
disk. A family plugin declares those in a ``FamilySpec`` and exposes ``SpecFamily(SPEC)`` (or a
subclass overriding one hook) as its entry point; all the logic lives here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from nexus.errors import FamilyError
from nexus.hookspecs import hookimpl
from nexus.expert_layout import ExpertLayout, Names, read_experts_from_layout
from nexus.types import MoEBlock, RouterCapture, Scoring

def config_value(config, field_name: str):
    """Read ``field_name`` from a config object or dict.

    :param field_name: a dotted path such as ``ffn_config.moe_top_k`` (each part an attribute or
        a dict key).
    """
    value = config
    for part in field_name.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _per_layer(value, layer: int):
    """A config value that is either one number or one number per layer (HunYuan ``num_experts``)."""
    return value[layer] if isinstance(value, (list, tuple)) else value


# -------------------------------------------------------------------------
# Which layers are MoE: rules over the config, ``(config, layer_index) -> bool``
# -------------------------------------------------------------------------


def all_layers(config, layer: int) -> bool:
    """Every decoder layer is an MoE layer (Mixtral, OLMoE, GPT-OSS, ...)."""
    return True


def sparse_step_layers(mlp_only: str = "mlp_only_layers", step: str = "decoder_sparse_step"):
    """Qwen2/Qwen3-MoE: MoE unless listed in ``mlp_only``, and only every ``step``-th layer."""

    def rule(config, layer: int) -> bool:
        dense = config_value(config, mlp_only) or ()
        return layer not in dense and (layer + 1) % int(config_value(config, step)) == 0

    return rule


def dense_prefix_layers(first_k: str = "first_k_dense_replace"):
    """DeepSeek-V3/GLM-4-MoE: the first ``first_k`` layers are dense, the rest MoE."""

    def rule(config, layer: int) -> bool:
        return layer >= int(config_value(config, first_k) or 0)

    return rule


def interval_layers(interval: str, start: str, end: str, num_layers: str = "num_hidden_layers"):
    """ERNIE-4.5: every ``interval``-th layer from ``start`` to ``end`` inclusive (-1: the last)."""

    def rule(config, layer: int) -> bool:
        last = int(config_value(config, end))
        last = int(config_value(config, num_layers)) - 1 if last < 0 else last
        return (layer + 1) % int(config_value(config, interval)) == 0 and int(config_value(config, start)) <= layer <= last

    return rule


def listed_layers(layers: str):
    """Llama 4: the layers listed in config field ``layers`` (``moe_layers``)."""

    def rule(config, layer: int) -> bool:
        return layer in (config_value(config, layers) or ())

    return rule


# -------------------------------------------------------------------------
# How a trained shared expert folds into a stock checkpoint (``nexus export``)
# -------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotFold:
    """The block has an ungated shared-expert MLP (``SwiGLU``) whose width is ``unit * count``:
    the NEXUS units are concatenated to it along the intermediate dimension (DeepSeek-V3, GLM-4-MoE).

    Attributes:
        path: the slot's path inside the block.
        count: config field of the number of shared experts (raised; 0 means no slot yet).
        unit: config field of the width of one shared expert (the slot is ``unit * count`` wide).
        proj: the slot's ``(gate, up, down)`` linear names.
    """

    path: str = "shared_experts"
    count: str = "n_shared_experts"
    unit: str = "moe_intermediate_size"
    proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RoutedFold:
    """The routing weights of each token sum to a constant ``c``: the NEXUS units, down projection
    scaled by ``1/c``, are appended to every routed expert (``sum_k w_k (E_k + S/c) = sum_k w_k E_k + S``).

    Attributes:
        width: config field of the routed expert width I (raised).
        normalized_by: config field that says whether the weights are normalised (``norm_topk_prob``);
            None: they always are.
        normalized_when: the value of ``normalized_by`` meaning normalised (DBRX: p-norm ``1``).
        weight_sum: ``c``, a number or a config field.
        tied: paths, inside the block, of other MLPs whose width is the same config field (HunYuan's
            ``shared_mlp``); they are padded with zero units.
    """

    width: str
    normalized_by: str | None = None
    normalized_when: object = True
    weight_sum: str | float = 1.0
    tied: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportSpec:
    """What ``nexus export`` needs of a family.

    Attributes:
        fold: the exact fold the family's architecture admits, or None.
        no_fold: why there is none (shown when an export is refused).
        layout: the on-disk expert layout (filled from the family's :class:`ExpertLayout`).
    """

    fold: SlotFold | RoutedFold | None = None
    no_fold: str = "the family declares no exact fold"
    layout: ExpertLayout | None = None


# -------------------------------------------------------------------------
# The spec and the plugin built from it
# -------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySpec:
    """Everything the core needs to know about a family with a standard block.

    Attributes:
        name: the ``--family`` name.
        model_types: ``config.model_type`` values that auto-detect this family.
        description: one line for ``nexus families``.
        num_experts, intermediate_size, hidden_size: config field names (dotted paths allowed,
            e.g. ``ffn_config.moe_num_experts``); a field holding one value per layer is indexed
            by layer.
        top_k: config field name of k, or an ``int`` when the family fixes it whatever the
            config says (PhiMoE always routes to 2).
        layers: module path of the decoder-layer ``ModuleList``.
        block: attribute of a decoder layer holding the MoE block.
        router: path of the router inside the block.
        logits_index: where the logits are in the router's output (None: the output itself).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        is_moe_layer: ``(config, layer_index) -> bool``; default every layer. Ready-made rules:
            :func:`sparse_step_layers`, :func:`dense_prefix_layers`, :func:`interval_layers`,
            :func:`listed_layers`.
        experts: the on-disk :class:`ExpertLayout`.
        example_config: zero-argument callable returning a tiny config.
        activation_field: config field naming the expert activation (``ffn_config.ffn_act_fn.name``
            for DBRX); None: the core default reads ``hidden_act``/``activation_function``.
        native_shared: paths, inside the block, of shared-expert modules the family already has
            (missing ones are skipped, e.g. ERNIE with ``moe_num_shared_experts=0``).
        selection_bias: path, inside the block, of a bias added to the router probabilities for
            choosing experts only (DeepSeek-V3 ``gate.e_score_correction_bias``).
        export: how a trained shared expert folds into a stock checkpoint (:class:`ExportSpec`).
    """

    name: str
    model_types: tuple[str, ...]
    description: str
    num_experts: str
    top_k: str | int
    intermediate_size: str
    example_config: Callable[[], object]
    hidden_size: str = "hidden_size"
    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "gate"
    logits_index: int | None = 0
    scoring: Scoring = "softmax"
    is_moe_layer: Callable[[object, int], bool] = all_layers
    experts: ExpertLayout = field(default_factory=ExpertLayout)
    activation_field: str | None = None
    native_shared: Names = ()
    selection_bias: str | None = None
    export: ExportSpec = field(default_factory=ExportSpec)


def _has_submodule(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _get_tensor(module, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


class SpecFamily:
    """A plugin object implementing every per-model hook from a :class:`FamilySpec`.

    Subclass it and override a method (keeping ``@hookimpl``) for what the spec cannot say.
    """

    def __init__(self, spec: FamilySpec):
        self.spec = spec
        self.__name__ = f"nexus-family-{spec.name}"

    def _mine(self, family: str) -> bool:
        return family == self.spec.name

    def top_k(self, config, layer: int) -> int:
        """k for ``layer``: the fixed ``spec.top_k`` or the config's value."""
        if isinstance(self.spec.top_k, int):
            return self.spec.top_k
        return int(_per_layer(config_value(config, self.spec.top_k), layer))

    def num_experts(self, config, layer: int) -> int:
        """E for ``layer``."""
        return int(_per_layer(config_value(config, self.spec.num_experts), layer))

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
        shared = (s.native_shared,) if isinstance(s.native_shared, str) else tuple(s.native_shared)
        blocks = []
        for i, layer in enumerate(layers):
            if not s.is_moe_layer(config, i):
                continue
            module = layer.get_submodule(s.block)
            if not _has_submodule(module, s.router):
                raise FamilyError(
                    f"{s.layers}.{i}.{s.block} ({type(module).__name__}) has no router {s.router!r}, but family "
                    f"{s.name!r} expects layer {i} to be MoE: the config and the model disagree, or the family is wrong"
                )
            blocks.append(
                MoEBlock(
                    layer=i,
                    path=f"{s.layers}.{i}.{s.block}",
                    module=module,
                    num_experts=self.num_experts(config, i),
                    top_k=self.top_k(config, i),
                    hidden_size=int(config_value(config, s.hidden_size)),
                    intermediate_size=int(_per_layer(config_value(config, s.intermediate_size), i)),
                    expert_bias=s.experts.has_bias,
                    native_shared=tuple(p for p in shared if _has_submodule(module, p) and module.get_submodule(p) is not None),
                )
            )
        return blocks

    @hookimpl
    def nexus_router_capture(self, family, block):
        if not self._mine(family):
            return None
        idx = self.spec.logits_index
        extract = (lambda out: out) if idx is None else (lambda out: out[idx])
        bias = _get_tensor(block.module, self.spec.selection_bias) if self.spec.selection_bias else None
        return RouterCapture(
            module=block.module.get_submodule(self.spec.router),
            extract=extract,
            scoring=self.spec.scoring,
            selection_bias=bias,
        )

    @hookimpl
    def nexus_activation(self, family, config):
        if not self._mine(family) or self.spec.activation_field is None:
            return None
        from nexus.defaults import gated_activation

        return gated_activation(str(config_value(config, self.spec.activation_field)))

    @hookimpl
    def nexus_expert_layout(self, family):
        if not self._mine(family):
            return None
        return self.spec.experts

    @hookimpl
    def nexus_export_spec(self, family):
        if not self._mine(family):
            return None
        import dataclasses

        return dataclasses.replace(self.spec.export, layout=self.spec.experts)

    @hookimpl
    def nexus_read_experts(self, family, reader, config, layer, experts):
        if not self._mine(family):
            return None
        num_experts = self.num_experts(config, layer) if self.spec.experts.flat else None
        return read_experts_from_layout(reader, self.spec.experts, layer, experts, num_experts)

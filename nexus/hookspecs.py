"""The NEXUS plugin contract.

Every model family is a plugin: an object or module carrying ``@nexus.hookimpl`` functions,
found through the ``nexus`` entry-point group (see ``nexus/plugins.py``).

Most families implement none of these hooks by hand: they declare a
:class:`nexus.spec.FamilySpec` (where the blocks, router and config fields are, which layers are
MoE, an :class:`nexus.expert_layout.ExpertLayout` saying where the experts are on disk) and expose
``SpecFamily(SPEC)``, which implements every per-model hook from it. ``nexus/spec.py`` is
therefore part of this contract; the hooks below are what a family overrides when its block is
not standard (subclass ``SpecFamily`` and re-implement one hook) or writes from scratch.

Per-model hooks use the claim pattern: they are ``firstresult`` and every call carries the
resolved family name (``family``), so an implementation returns ``None`` unless the call is for
its family. Because every plugin sees every call, a plugin can override a single concern of
another family (a faster MXFP4 decoder for ``gpt_oss``, say) by implementing that one hook with
``tryfirst=True``.

Implementations may accept fewer arguments than the spec names (pluggy passes only what they
ask for), so specs can grow without breaking plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click
    from torch import nn
    from transformers import PretrainedConfig

    from nexus.checkpoint import CheckpointReader
    from nexus.expert_layout import ExpertLayout
    from nexus.spec import ExportSpec
    from nexus.types import ExpertWeights, MoEBlock, RouterCapture

hookspec = pluggy.HookspecMarker("nexus")
hookimpl = pluggy.HookimplMarker("nexus")


# -------------------------------------------------------------------------
# Discovery hooks
# -------------------------------------------------------------------------


@hookspec
def nexus_register_families(register: Callable[..., None]) -> None:
    """Declare the model families this plugin provides.

    Called once per process, when the family registry is first built (``nexus families``,
    resolving ``--family`` or a model's ``model_type``).

    :param register:
        Call it once per family: ``register(name, model_types=("gpt_oss",), description="...")``.
        ``name`` is the value users pass to ``--family``; ``model_types`` are the
        ``config.model_type`` values auto-detected as this family. The host validates names
        (lowercase identifiers) and refuses a name or model type claimed by two plugins.
    """


@hookspec(firstresult=True)
def nexus_example_config(family: str) -> PretrainedConfig | None:
    """Return a tiny random-initialisable config of ``family`` (hidden ~64, a few experts).

    Called by the demo (``nexus run`` without ``--model``) and by the conformance tests, which
    build a model from it, write it to disk and run every engine on it. Dimensions should be
    multiples of 32 where the family's checkpoint format needs it (MXFP4).

    :param family: the resolved family name; return ``None`` unless it is yours.
    :return: a ``transformers.PretrainedConfig``. First non-None result wins.
    """


@hookspec
def nexus_register_commands(cli: click.Group) -> None:
    """Add click commands or groups to the ``nexus`` command line.

    Called once when the CLI is built, after the built-in commands.

    :param cli: the top-level ``nexus`` click group; call ``cli.add_command(...)``.
    """


# -------------------------------------------------------------------------
# Model surgery hooks
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def nexus_moe_blocks(family: str, model: nn.Module) -> list[MoEBlock] | None:
    """Locate the MoE blocks of a loaded model.

    Called whenever an engine needs the blocks: attaching shared experts, capturing router
    logits, evaluating. Return only the layers that ARE MoE (dense layers interleaved with MoE
    ones must be left out), ordered by layer.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param model: the loaded ``transformers`` model (a ``*ForCausalLM``).
    :return: a list of :class:`nexus.types.MoEBlock`. First non-None result wins.
    """


@hookspec(firstresult=True)
def nexus_router_capture(family: str, block: MoEBlock) -> RouterCapture | None:
    """Say how to read one block's router logits.

    Called by ``collect``, ``train`` (router drift) and ``evaluate``, once per block per run.
    The core installs a forward hook on ``capture.module`` and calls ``capture.extract`` on its
    output; it never relies on ``output_router_logits``.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param block: a block returned by :func:`nexus_moe_blocks`.
    :return: a :class:`nexus.types.RouterCapture`. First non-None result wins.
    """


@hookspec(firstresult=True)
def nexus_build_shared_expert(
    family: str, config: PretrainedConfig, block: MoEBlock, intermediate_size: int, activation: Callable
) -> nn.Module | None:
    """Build the (untrained) shared expert MLP for one block.

    Called by ``convert`` and ``load_adapter``, once per block. The module maps
    ``Tensor[..., H]`` to ``Tensor[..., H]`` and must expose ``gate_proj``, ``up_proj`` and
    ``down_proj`` (``nn.Linear``) so initialisation from routed experts can copy weights into
    it. The core default is a SwiGLU with ``activation`` and biases when ``block.expert_bias``.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param config: the base model's config.
    :param block: the block the expert will be attached to.
    :param intermediate_size: the requested width of the shared expert.
    :param activation: the family's :func:`nexus_activation` for ``config``, already resolved.
    :return: an ``nn.Module``. First non-None result wins.
    """


@hookspec(firstresult=True)
def nexus_activation(family: str, config: PretrainedConfig) -> Callable | None:
    """Return the family's gated activation, ``(gate, up) -> h``, all ``Tensor[..., I]``.

    Called when building shared experts and when a test recomputes routed experts. The core
    default is ``act(gate) * up`` with ``act`` from ``config.hidden_act``.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param config: the base model's config (read constants such as clamp limits from it).
    :return: a callable. First non-None result wins.
    """


# -------------------------------------------------------------------------
# Checkpoint hooks
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def nexus_read_experts(
    family: str, reader: CheckpointReader, config: PretrainedConfig, layer: int, experts: list[int]
) -> ExpertWeights | None:
    """Read some routed experts of one layer from the checkpoint on disk, as fp32.

    Called by ``convert``, once per MoE layer, with only the experts it needs. Implementations
    must read just those experts' slices through ``reader`` (never the whole model). Decoding
    quantised storage is the core's: ``reader`` returns fp32 values of MXFP4 (``*_blocks`` /
    ``*_scales``) and block-scaled FP8 tensors; an implementation only says which tensors hold
    the experts and how they are laid out (usually through
    :func:`nexus.expert_layout.read_experts_from_layout`).

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param reader: a lazy reader over the checkpoint's safetensors files.
    :param config: the base model's config.
    :param layer: the decoder layer index of an MoE block.
    :param experts: expert ids, in the order the result must have.
    :return: :class:`nexus.types.ExpertWeights` in ``nn.Linear`` layout. First non-None result wins.
    """


@hookspec(firstresult=True)
def nexus_expert_layout(family: str) -> ExpertLayout | None:
    """Declare where and how the family stores its routed experts on disk.

    Called by the loader (:func:`nexus.quant.packed_loading.load_packed_model`) for a quantised
    checkpoint, once per MoE block that no ``nexus_pack_experts`` implementation handled: the core
    then keeps the experts packed as the layout says (its ``packed_formats`` and ``packed_module``).
    The contract only declares the format; decoding and loading are the core's (:mod:`nexus.quant`).

    :param family: the resolved family name; return ``None`` unless it is yours.
    :return: a :class:`nexus.expert_layout.ExpertLayout`. First non-None result wins; a family that
        returns none keeps no experts packed (its quantised checkpoints load dequantised).
    """


@hookspec(firstresult=True)
def nexus_pack_experts(
    family: str, reader: CheckpointReader, config: PretrainedConfig, block: MoEBlock, activation: Callable
) -> bool | None:
    """Replace one block's routed experts by a module holding the checkpoint's packed bytes.

    Called by :func:`nexus.loading.load_model` (unless ``dequantize=True``) for every MoE block
    of a model built without weights, when the checkpoint's ``quantization_config`` names a
    quantised format. The replacement (usually :class:`nexus.quant.packed_experts.PackedExperts`, built
    by :func:`nexus.quant.packed_loading.install_packed_experts`) must compute exactly what the
    family's experts module computes, decoding on the fly; the loader then loads every other
    tensor. Returning ``False`` for any block makes the loader dequantise the whole model instead.
    Most families implement :func:`nexus_expert_layout` instead and let the core pack by it; this
    hook is for a family or third party that packs some other way.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param reader: a lazy reader over the checkpoint's safetensors files.
    :param config: the base model's config.
    :param block: the block (its ``module`` holds the experts module to replace).
    :param activation: the family's :func:`nexus_activation` for ``config``, already resolved.
    :return: ``True`` once replaced, ``False`` when this block's stored format cannot stay packed.
        First non-None result wins.
    """


@hookspec(firstresult=True)
def nexus_write_checkpoint(family: str, model: nn.Module, path: str) -> bool | None:
    """Write a base model to ``path`` in the family's native on-disk format.

    Called when the demo and the conformance tests write a checkpoint (GPT-OSS: the MXFP4
    format of the released weights). The core default is ``model.save_pretrained(path)``.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :param model: a freshly built base model.
    :param path: an existing directory to write into.
    :return: ``True`` once written. First non-None result wins.
    """


@hookspec(firstresult=True)
def nexus_export_spec(family: str) -> ExportSpec | None:
    """Declare how a trained shared expert folds exactly into a stock checkpoint of the family.

    Called by ``nexus export`` once per export. The fold is data: an ungated native shared-expert
    slot to widen (:class:`nexus.spec.SlotFold`), or routing weights summing to a constant so that
    the shared units can be appended to every routed expert (:class:`nexus.spec.RoutedFold`), with
    the config fields that say whether it applies; the core does the tensor work.

    :param family: the resolved family name; return ``None`` unless it is yours.
    :return: a :class:`nexus.spec.ExportSpec` (``fold`` None, with ``no_fold`` saying why, when the
        architecture admits no exact fold). First non-None result wins.
    """

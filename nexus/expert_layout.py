"""Where a family's routed experts are stored on disk, and reading them back as fp32 matrices.

An :class:`ExpertLayout` names the tensors of one MoE layer's experts in a checkpoint;
:func:`read_experts_from_layout` reads the requested experts through a
:class:`nexus.checkpoint.CheckpointReader`, which decodes quantized storage (MXFP4, block-scaled FP8)
itself. This is what a :class:`nexus.spec.FamilySpec` family answers ``nexus_read_experts`` with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus.errors import NexusError
from nexus.types import ExpertWeights

Names = str | tuple[str, ...]




@dataclass(frozen=True)
class ExpertLayout:
    """Where one MoE layer's routed experts are stored on disk.

    Names are templates filled with ``layer`` (and ``e`` for per-expert names). A name may be a
    tuple of alternatives: the first one the checkpoint holds is read (GraniteMoE writes
    ``input_linear.weight`` but a checkpoint saved with ``save_original_format=False`` holds
    ``experts.gate_up_proj``).

    Attributes:
        gate_up: fused ``[E, 2I, H]`` tensor (``[E, H, 2I]`` when ``transposed``); may be
            MXFP4-packed. With ``up`` set it holds the gate only (``[E, I, H]``).
        down: fused ``[E, H, I]`` tensor (``[E, I, H]`` when ``down_transposed``).
        transposed: fused tensors are used as ``x @ W`` (GPT-OSS, Llama 4).
        interleaved: gate and up alternate along the 2I axis (GPT-OSS) instead of ``[gate; up]``.
        gate_up_bias, down_bias: fused bias tensors ``[E, 2I]`` / ``[E, H]``, or None.
        per_expert: ``(gate, up, down)`` per-expert ``nn.Linear`` weight names, the form
            ``save_pretrained`` writes for families with a conversion mapping; tried first.
        up: a separate up-projection tensor, stored like the gate (DBRX ``v1``).
        down_transposed: the down tensor's orientation when it differs from ``transposed``
            (DBRX stores gate/up as ``(I, H)`` rows but down as ``(I, H)`` too, i.e. transposed).
        flat: tensors are 2-D ``(E * rows, cols)``; expert ``e`` is rows ``e*rows:(e+1)*rows``
            (DBRX ``w1``/``v1``/``w2``).
        packed_formats: quantised formats this family's checkpoints ship in and that load
            packed (:mod:`nexus.quant.packed_experts`): ``"mxfp4"`` (``*_blocks``/``*_scales``, GPT-OSS),
            ``"fp8"`` (``weight`` + ``weight_scale_inv`` block-scaled e4m3, DeepSeek-V3, Qwen3).
        packed_module: path, inside the MoE block, of the experts module that the block calls as
            ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``
            and that a packed module replaces; None: experts never load packed.
    """

    gate_up: Names = "model.layers.{layer}.mlp.experts.gate_up_proj"
    down: Names = "model.layers.{layer}.mlp.experts.down_proj"
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    per_expert: tuple[str, str, str] | None = None
    up: Names | None = None
    down_transposed: bool | None = None
    flat: bool = False
    packed_formats: tuple[str, ...] = ()
    packed_module: str | None = "experts"

    @property
    def has_bias(self) -> bool:
        return self.gate_up_bias is not None


def per_expert_names(prefix: str = "model.layers.{layer}.mlp.experts.{e}",
                     names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> tuple[str, str, str]:
    """``(gate, up, down)`` weight-name templates of experts saved one by one under ``prefix``."""
    return tuple(f"{prefix}.{n}.weight" for n in names)


# What save_pretrained writes for the families with a per-expert conversion mapping (families.md §7).
PER_EXPERT_PROJ = ExpertLayout(per_expert=per_expert_names())
# The same, for families whose checkpoints also ship as block-scaled FP8 (DeepSeek-V3, Qwen3-MoE).
PER_EXPERT_FP8 = ExpertLayout(per_expert=per_expert_names(), packed_formats=("fp8",))
PER_EXPERT_W1_W3_W2 = ExpertLayout(
    per_expert=per_expert_names("model.layers.{layer}.block_sparse_moe.experts.{e}", ("w1", "w3", "w2"))
)


def _split(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``t[k, 2I, ...]`` into gate and up halves along dim 1."""
    if interleaved:
        return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()
    half = t.shape[1] // 2
    return t[:, :half].contiguous(), t[:, half:].contiguous()


def _resolve(reader, names: Names, layer: int) -> str:
    """The first of ``names`` (filled with ``layer``) that the checkpoint holds."""
    candidates = [n.format(layer=layer) for n in ((names,) if isinstance(names, str) else names)]
    for name in candidates:
        if reader.has(name):
            return name
    raise NexusError(
        f"checkpoint {reader.path} holds none of {', '.join(candidates)} for the experts of layer {layer}: "
        f"is it a checkpoint of this family (check --family), or saved in an unusual format?"
    )


def _read_matrices(reader, name: str, experts: list[int], transposed: bool, flat: bool, num_experts: int | None):
    """Expert matrices of one stored tensor as fp32 ``Tensor[k, out, in]``."""
    if not flat:
        return reader.read_expert_matrices(name, experts, transposed)
    if not num_experts:
        raise NexusError(f"reading flat expert tensor {name} needs the number of experts")
    rows = reader.shape(name)[0] // num_experts
    w = torch.stack([reader.read_row_range(name, e * rows, (e + 1) * rows) for e in experts]).float()
    return w.transpose(1, 2).contiguous() if transposed else w


def read_experts_from_layout(
    reader, layout: ExpertLayout, layer: int, experts: list[int], num_experts: int | None = None
) -> ExpertWeights:
    """Read ``experts`` of ``layer`` as fp32 :class:`ExpertWeights` following ``layout``.

    :param reader: a :class:`nexus.checkpoint.CheckpointReader`.
    :param num_experts: E, needed only for ``layout.flat``.
    :return: gate/up ``Tensor[k, I, H]``, down ``Tensor[k, H, I]`` (and biases when the layout has them).
    """
    if layout.per_expert and layout.per_expert[0].format(layer=layer, e=experts[0] if experts else 0) in reader:
        g, u, d = (
            torch.stack([reader.read_weight(name.format(layer=layer, e=e)) for e in experts])
            for name in layout.per_expert
        )
        return ExpertWeights(gate=g, up=u, down=d)
    down_t = layout.transposed if layout.down_transposed is None else layout.down_transposed
    gu = _read_matrices(reader, _resolve(reader, layout.gate_up, layer), experts, layout.transposed, layout.flat, num_experts)
    if layout.up is not None:
        gate = gu
        up = _read_matrices(reader, _resolve(reader, layout.up, layer), experts, layout.transposed, layout.flat, num_experts)
    else:
        gate, up = _split(gu, layout.interleaved)
    down = _read_matrices(reader, _resolve(reader, layout.down, layer), experts, down_t, layout.flat, num_experts)
    weights = ExpertWeights(gate=gate, up=up, down=down)
    if layout.gate_up_bias:
        gub = reader.read_rows(layout.gate_up_bias.format(layer=layer), experts).float()
        weights.gate_bias, weights.up_bias = _split(gub, layout.interleaved)
        weights.down_bias = reader.read_rows(layout.down_bias.format(layer=layer), experts).float()
    return weights

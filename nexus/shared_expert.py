"""Shared experts: attach one always-active trainable MLP to every MoE block of a frozen model.

Attachment adds a child ``nexus_shared`` (the MLP) to the block, optionally a gate
``nexus_shared_scale``, and a forward hook that adds ``scale * nexus_shared(x)`` to the block's
output (to ``out[0]`` for tuple outputs, reshaped to its shape). Names avoid a ``gate`` suffix:
transformers' key-rename regexes treat ``*.gate.weight`` specially in several families.

Gate modes:
- ``none``: plain add.
- ``scalar``: a learnable per-layer scalar, zero at init, so the adapted model equals the base
  exactly at step 0.
- ``token``: ``sigmoid(w . x)`` per token (as Qwen2-MoE's shared expert), ``w`` zero at init,
  so each token starts at 0.5.
- ``scalar_token``: ``s * 2 * sigmoid(w . x)``, ``s`` and ``w`` zero at init: the zero start of
  ``scalar`` with a per-token factor in ``[0, 2s]`` (``w = 0`` is exactly the scalar gate).

Only ``none`` and ``scalar`` fold into a stock checkpoint (``nexus export``); the per-token gates
need ``--remote-code``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from nexus.constants import DEFAULT_GATE_MODE, GATE_MODES, SHARED_MODULE_NAME, SHARED_SCALE_NAME
from nexus.errors import NexusError
from nexus.types import MoEBlock


class SwiGLU(nn.Module):
    """``down(act(gate(x), up(x)))``: maps ``Tensor[..., H]`` to ``Tensor[..., H]``.

    :param hidden_size: H.
    :param intermediate_size: I.
    :param activation: ``(gate, up) -> h`` on ``Tensor[..., I]``.
    :param bias: give the three projections biases.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Callable, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


class SharedScale(nn.Module):
    """The gate of a shared expert: ``scalar`` (``weight[1]``), ``token`` (``sigmoid(x @ weight.T)``)
    or ``scalar_token`` (``scale[1] * 2 * sigmoid(x @ weight.T)``); every parameter zero at init."""

    def __init__(self, mode: str, hidden_size: int):
        super().__init__()
        self.mode = mode
        shape = (1,) if mode == "scalar" else (1, hidden_size)
        self.weight = nn.Parameter(torch.zeros(shape))
        if mode == "scalar_token":
            self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``Tensor[..., H]``. :return: a scale broadcastable against ``Tensor[..., H]``."""
        if self.mode == "scalar":
            return self.weight
        gate = torch.sigmoid(x @ self.weight.t())
        return self.scale * 2 * gate if self.mode == "scalar_token" else gate


def _block_hook(block: nn.Module):
    def hook(module, args, kwargs, output):
        if getattr(module, "_nexus_disabled", False):
            return output
        x = args[0] if args else kwargs["hidden_states"]
        shared = module.nexus_shared
        dtype = next(shared.parameters()).dtype
        xs = x.to(dtype)
        delta = shared(xs)
        scale = getattr(module, SHARED_SCALE_NAME, None)
        if scale is not None:
            delta = delta * scale(xs)
        if isinstance(output, tuple):
            first = output[0]
            return (first + delta.reshape(first.shape).to(first.dtype), *output[1:])
        return output + delta.reshape(output.shape).to(output.dtype)

    return hook


def attach_shared_experts(
    model: nn.Module,
    family,
    intermediate_size: int | None = None,
    gate_mode: str = DEFAULT_GATE_MODE,
    dtype: torch.dtype = torch.float32,
) -> list[MoEBlock]:
    """Attach a freshly built shared expert to every MoE block of ``model``.

    :param model: a loaded base model of ``family``.
    :param family: a :class:`nexus.family.Family`.
    :param intermediate_size: width of each shared expert; default the routed expert width.
    :param gate_mode: one of :data:`nexus.constants.GATE_MODES`; default
        :data:`nexus.constants.DEFAULT_GATE_MODE`, as ``nexus convert``.
    :param dtype: parameter dtype of the shared experts (fp32 by default, whatever the base's).
    :return: the blocks, each now carrying ``nexus_shared``.
    """
    if gate_mode not in GATE_MODES:
        raise NexusError(f"unknown gate mode {gate_mode!r}; choose one of {', '.join(GATE_MODES)}")
    from nexus.host_embedding import compute_device

    blocks = family.moe_blocks(model)
    device = compute_device(model)
    for block in blocks:
        if hasattr(block.module, SHARED_MODULE_NAME):
            raise NexusError(f"{block.path} already has a shared expert; detach it first or load the base model again")
        size = intermediate_size or block.intermediate_size
        mlp = family.build_shared_expert(model.config, block, size).to(device=device, dtype=dtype)
        block.module.add_module(SHARED_MODULE_NAME, mlp)
        if gate_mode != "none":
            block.module.add_module(SHARED_SCALE_NAME, SharedScale(gate_mode, block.hidden_size).to(device=device, dtype=dtype))
        block.module._nexus_hook = block.module.register_forward_hook(_block_hook(block.module), with_kwargs=True)
    return blocks


def shared_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` that carries an attached shared expert."""
    return (m for m in model.modules() if hasattr(m, "_nexus_hook"))


def detach_shared_experts(model: nn.Module) -> None:
    """Remove every shared expert and its hook, leaving the base model as loaded."""
    for block in list(shared_blocks(model)):
        block._nexus_hook.remove()
        del block._nexus_hook
        delattr(block, SHARED_MODULE_NAME)
        if hasattr(block, SHARED_SCALE_NAME):
            delattr(block, SHARED_SCALE_NAME)


@contextlib.contextmanager
def disable_shared_experts(model: nn.Module):
    """Run ``model`` as the base inside the block: every shared-expert hook becomes identity.

    This is the self-distillation teacher: the same weights, no second copy in memory.
    """
    blocks = list(shared_blocks(model))
    previous = [getattr(b, "_nexus_disabled", False) for b in blocks]
    for b in blocks:
        b._nexus_disabled = True
    try:
        yield model
    finally:
        for b, p in zip(blocks, previous):
            b._nexus_disabled = p


def is_shared_parameter(name: str) -> bool:
    """Whether a ``named_parameters`` name belongs to a shared expert or its gate."""
    return f".{SHARED_MODULE_NAME}." in f".{name}" or f".{SHARED_SCALE_NAME}." in f".{name}"


def native_shared_modules(blocks: list[MoEBlock]) -> list[nn.Module]:
    """The shared experts the base model already has (Qwen2-MoE, DeepSeek-V3, Llama 4, ...).

    :param blocks: blocks from :meth:`nexus.family.Family.moe_blocks`; each lists its native
        shared modules in ``MoEBlock.native_shared`` (paths relative to the block).
    :return: those modules, block by block (empty for families without one). Pass them as
        ``extra_trainable_modules`` to :func:`freeze_base` to train them beside NEXUS's own.
    """
    return [b.module.get_submodule(path) for b in blocks for path in b.native_shared]


def freeze_base(
    model: nn.Module, router_modules: list[nn.Module] = (), extra_trainable_modules: list[nn.Module] = ()
) -> list[nn.Parameter]:
    """Freeze everything but the shared experts (and ``router_modules``, ``extra_trainable_modules``);
    put the base in eval mode.

    The base stays in ``eval()`` even while training: several families' routers add jitter or
    sample experts in train mode.

    :param router_modules: routers to train as well.
    :param extra_trainable_modules: any other base modules to train, e.g. the family's native
        shared experts from :func:`native_shared_modules`.
    :return: the trainable parameters.
    """
    router_params = {id(p) for m in (*router_modules, *extra_trainable_modules) for p in m.parameters()}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_shared_parameter(name) or id(p) in router_params)
        if p.requires_grad:
            trainable.append(p)
    model.eval()
    return trainable


# Parameter partition: what an adapter may hold besides the shared experts.


def router_parameters(model: nn.Module, family, blocks) -> dict[str, nn.Parameter]:
    """The routers' parameters by ``named_parameters`` name (the ones ``--train-routers`` trains)."""
    ids = {id(p) for b in blocks for p in family.router_capture(b).module.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def native_shared_parameters(model: nn.Module, blocks) -> dict[str, nn.Parameter]:
    """The family's own shared experts' parameters by name (``--train-native-shared``); empty if none."""
    ids = {id(p) for m in native_shared_modules(blocks) for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def base_parameters(model: nn.Module, family, blocks) -> dict[str, nn.Parameter]:
    """Every base parameter an adapter may replace: routers and native shared experts."""
    return {**router_parameters(model, family, blocks), **native_shared_parameters(model, blocks)}


@contextlib.contextmanager
def base_view(model: nn.Module, base_originals: dict[str, torch.Tensor] | None = None):
    """Run ``model`` as its base: shared experts disabled and, when base parameters were trained
    (routers, native shared experts) or loaded from an adapter, the originals swapped in for the duration.

    :param base_originals: ``name -> tensor`` of those base parameters, from :func:`base_parameters`
        before any training; None or empty when they are untouched.
    """
    params = dict(model.named_parameters()) if base_originals else {}
    saved = {}
    with torch.no_grad():
        for name, original in (base_originals or {}).items():
            saved[name] = params[name].detach().clone()
            params[name].copy_(original)
    try:
        with disable_shared_experts(model):
            yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)

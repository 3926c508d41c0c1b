"""Plain data types exchanged between the core and family plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

Scoring = Literal["softmax", "sigmoid"]


@dataclass
class MoEBlock:
    """One Mixture-of-Experts block of a loaded model.

    Attributes:
        layer: decoder layer index (0-based) the block sits in.
        path: dotted module path of the block inside the model, e.g. ``"model.layers.3.mlp"``.
        module: the block module itself; the shared expert is attached to it.
        num_experts: routed experts E.
        top_k: experts each token is routed to.
        hidden_size: H, the width of the block's input and output.
        intermediate_size: I, the width of one routed expert.
        expert_bias: the routed experts have biases (the shared expert then gets them too).
    """

    layer: int
    path: str
    module: nn.Module = field(repr=False)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    expert_bias: bool = False


@dataclass
class RouterCapture:
    """How to read a block's router logits with a forward hook.

    Attributes:
        module: the submodule whose forward output carries the logits (usually the router).
        extract: maps that module's forward output to the logits, a ``Tensor[T, E]``
            (T = tokens of the batch, flattened; raw pre-activation scores).
        scoring: how the family turns logits into probabilities: ``"softmax"`` or ``"sigmoid"``.
    """

    module: nn.Module = field(repr=False)
    extract: Callable[[object], torch.Tensor] = field(repr=False)
    scoring: Scoring = "softmax"


@dataclass
class ExpertWeights:
    """Weights of k routed experts in ``nn.Linear`` layout (out_features, in_features), fp32.

    Attributes:
        gate: ``Tensor[k, I, H]``.
        up: ``Tensor[k, I, H]``.
        down: ``Tensor[k, H, I]``.
        gate_bias, up_bias: ``Tensor[k, I]`` or None when the family has no expert biases.
        down_bias: ``Tensor[k, H]`` or None.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None

    def __len__(self) -> int:
        return self.gate.shape[0]

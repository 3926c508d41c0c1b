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
        native_shared: paths, relative to ``module``, of a shared expert the family already has
            (Qwen2-MoE ``shared_expert`` and ``shared_expert_gate``, DeepSeek-V3
            ``shared_experts``, ...); empty when it has none. NEXUS keeps them frozen unless the
            training code passes :func:`nexus.shared_expert.native_shared_modules` to
            :func:`nexus.shared_expert.freeze_base`.
    """

    layer: int
    path: str
    module: nn.Module = field(repr=False)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    expert_bias: bool = False
    native_shared: tuple[str, ...] = ()


@dataclass
class RouterCapture:
    """How to read a block's router logits with a forward hook.

    Attributes:
        module: the submodule whose forward output carries the logits (usually the router).
        extract: maps that module's forward output to the logits, a ``Tensor[T, E]``
            (T = tokens of the batch, flattened; raw pre-activation scores).
        scoring: how the family turns logits into probabilities: ``"softmax"`` or ``"sigmoid"``.
        selection_bias: ``Tensor[E]`` added to the probabilities **for choosing** the top-k
            experts only (DeepSeek-V3/GLM-4-MoE ``e_score_correction_bias``, ERNIE-4.5
            ``moe_statics``); the routing weights stay the unbiased probabilities. None: no bias.
    """

    module: nn.Module = field(repr=False)
    extract: Callable[[object], torch.Tensor] = field(repr=False)
    scoring: Scoring = "softmax"
    selection_bias: torch.Tensor | None = field(default=None, repr=False)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities from raw logits: ``Tensor[T, E]`` -> ``Tensor[T, E]`` (fp32)."""
        from nexus.routing import router_probs

        return router_probs(logits, self.scoring)

    def select(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` experts each token is routed to: ``Tensor[T, E]`` -> indices ``Tensor[T, k]``.

        Top-k of the probabilities plus :attr:`selection_bias`. Group-limited routing
        (DeepSeek-V3 ``n_group > 1``) is not applied: with it, the family's own choice can differ.
        """
        scores = self.probabilities(logits)
        if self.selection_bias is not None:
            scores = scores + self.selection_bias.to(scores).reshape(-1)
        return scores.topk(k, dim=-1).indices


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

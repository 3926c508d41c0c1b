"""Capturing router logits with forward hooks, for any family."""

from __future__ import annotations

import contextlib

import torch

from nexus.types import MoEBlock


def router_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Turn router logits ``Tensor[T, E]`` into probabilities (fp32) with the family's scoring."""
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


class RouterRecorder:
    """Records each MoE block's router logits during forward passes.

    After a forward, ``logits[layer]`` is ``Tensor[T, E]`` (T = batch*seq, flattened in the
    model's token order) and ``scoring[layer]`` the family's scoring. Use as a context manager;
    the hooks are removed on exit.
    """

    def __init__(self, family, blocks: list[MoEBlock], detach: bool = True):
        self.family = family
        self.blocks = blocks
        self.detach = detach
        self.logits: dict[int, torch.Tensor] = {}
        self.scoring: dict[int, str] = {}
        self._handles = []

    def __enter__(self) -> "RouterRecorder":
        for block in self.blocks:
            cap = self.family.router_capture(block)
            self.scoring[block.layer] = cap.scoring

            def hook(module, args, output, _layer=block.layer, _extract=cap.extract):
                t = _extract(output)
                t = t.reshape(-1, t.shape[-1])
                self.logits[_layer] = t.detach() if self.detach else t

            self._handles.append(cap.module.register_forward_hook(hook))
        return self

    def clear(self) -> None:
        self.logits.clear()

    def probs(self, layer: int) -> torch.Tensor:
        """Probabilities ``Tensor[T, E]`` of ``layer`` from the last forward."""
        return router_probs(self.logits[layer], self.scoring[layer])

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def record_routers(family, blocks: list[MoEBlock], detach: bool = True):
    """``with record_routers(family, blocks) as rec: model(ids); rec.logits[layer]``."""
    with RouterRecorder(family, blocks, detach) as rec:
        yield rec

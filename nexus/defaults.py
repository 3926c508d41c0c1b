"""Core defaults for the per-model hooks a family may leave out.

Registered after every entry-point plugin and marked ``trylast``, so any family's own
implementation wins. They answer for every family name.
"""

from __future__ import annotations

from transformers.activations import ACT2FN

from nexus.hookspecs import hookimpl
from nexus.shared_expert import SwiGLU


class _GatedAct:
    """``act(gate) * up`` with a named transformers activation (picklable, printable)."""

    def __init__(self, name: str):
        self.name = name
        self.act = ACT2FN[name]

    def __call__(self, gate, up):
        return self.act(gate) * up

    def __repr__(self) -> str:
        return f"{self.name}(gate) * up"


def gated_activation(name: str):
    """``(gate, up) -> act(gate) * up`` with the transformers activation called ``name`` (``ACT2FN``)."""
    return _GatedAct(name)


@hookimpl(trylast=True)
def nexus_activation(family, config):
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or "silu"
    return _GatedAct(name)


@hookimpl(trylast=True)
def nexus_build_shared_expert(family, config, block, intermediate_size, activation):
    return SwiGLU(block.hidden_size, intermediate_size, activation, bias=block.expert_bias)


@hookimpl(trylast=True)
def nexus_write_checkpoint(family, model, path):
    model.save_pretrained(path)
    return True

"""``nexus export --remote-code``: a ``trust_remote_code`` checkpoint for adapters with no exact fold.

The base's tensors are copied unchanged; the adapter's shared experts are added to the
last weights file under their in-memory names; ``config.json`` gains an ``auto_map`` pointing at
a small modeling file that subclasses the family's transformers ``*ForCausalLM`` and attaches
the shared experts exactly as NEXUS does (``scale * shared(x)`` added to each MoE block's
output). The modeling file needs only torch and transformers.
"""

from __future__ import annotations

from nexus.errors import NexusError

MODELING_FILE = "modeling_nexus_shared.py"
CONFIG_KEY = "nexus_shared_expert"

_TEMPLATE = '''"""{base_name} with one always-active shared expert added to each MoE block's output.

Written by `nexus export --remote-code`; needs only torch and transformers. Each block listed in
`config.{config_key}["blocks"]` gets a child `nexus_shared` (a gated MLP in the base's own
activation) and, unless the gate mode is "none", `nexus_shared_scale`: a scalar, a per-token
sigmoid(w . x), or s * 2 * sigmoid(w . x). A forward hook adds `scale * nexus_shared(x)` to the block's output.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from {base_module} import {base_name} as _Base


class _Activation:
    def __init__(self, spec):
        self.spec = dict(spec)
        if self.spec["kind"] == "gated":
            self.act = ACT2FN[self.spec["name"]]

    def __call__(self, gate, up):
        if self.spec["kind"] == "clamped_swiglu":
            gate = gate.clamp(max=self.spec["limit"])
            up = up.clamp(-self.spec["limit"], self.spec["limit"])
            return (up + 1) * (gate * torch.sigmoid(gate * self.spec["alpha"]))
        return self.act(gate) * up


class NexusSharedExpert(nn.Module):
    def __init__(self, hidden_size, intermediate_size, activation, bias):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation = activation

    def forward(self, x):
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


class NexusSharedScale(nn.Module):
    def __init__(self, mode, hidden_size):
        super().__init__()
        self.mode = mode
        self.weight = nn.Parameter(torch.zeros((1,) if mode == "scalar" else (1, hidden_size)))
        if mode == "scalar_token":
            self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if self.mode == "scalar":
            return self.weight
        gate = torch.sigmoid(x @ self.weight.t())
        return self.scale * 2 * gate if self.mode == "scalar_token" else gate


def _add_shared(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    shared = module.nexus_shared
    xs = x.to(shared.down_proj.weight.dtype)
    delta = shared(xs)
    scale = getattr(module, "nexus_shared_scale", None)
    if scale is not None:
        delta = delta * scale(xs)
    if isinstance(output, tuple):
        first = output[0]
        return (first + delta.reshape(first.shape).to(first.dtype), *output[1:])
    return output + delta.reshape(output.shape).to(output.dtype)


class {class_name}(_Base):
    def __init__(self, config):
        super().__init__(config)
        spec = getattr(config, "{config_key}")
        activation = _Activation(spec["activation"])
        for path in spec["blocks"]:
            block = self.get_submodule(path)
            block.add_module("nexus_shared", NexusSharedExpert(
                spec["hidden_size"], spec["intermediate_size"], activation, spec["bias"]))
            if spec["gate_mode"] != "none":
                block.add_module("nexus_shared_scale", NexusSharedScale(spec["gate_mode"], spec["hidden_size"]))
            block.register_forward_hook(_add_shared, with_kwargs=True)
'''


def activation_description(activation) -> dict:
    """The family's activation as data the modeling file rebuilds: ``{"kind": "gated", "name": act}``
    (``act(gate) * up`` with a transformers activation) or the activation's own ``describe()``.

    :raises NexusError: an activation that cannot be described.
    """
    describe = getattr(activation, "describe", None)
    if callable(describe):
        return describe()
    name = getattr(activation, "name", None)
    if isinstance(name, str):
        return {"kind": "gated", "name": name}
    raise NexusError(f"the family's activation {activation!r} cannot be written into a remote-code checkpoint "
                     f"(it has neither a transformers activation name nor describe())")


def modeling_source(base_class: type) -> tuple[str, str]:
    """The modeling file for ``base_class`` (the family's ``*ForCausalLM``) and its class name."""
    class_name = f"NexusShared{base_class.__name__}"
    source = _TEMPLATE.format(base_module=base_class.__module__, base_name=base_class.__name__,
                              class_name=class_name, config_key=CONFIG_KEY)
    return source, class_name


def remote_config(config: dict, base_class: type, blocks, gate_mode: str, width: int, bias: bool,
                  activation) -> tuple[dict, str]:
    """``config`` (a ``config.json`` dict) with ``auto_map`` and the shared-expert description, and the
    modeling file's source."""
    source, class_name = modeling_source(base_class)
    config = dict(config)
    config["auto_map"] = {**config.get("auto_map", {}),
                          "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{class_name}"}
    config[CONFIG_KEY] = {
        "blocks": [b.path for b in blocks], "gate_mode": gate_mode, "hidden_size": blocks[0].hidden_size,
        "intermediate_size": width, "bias": bias, "activation": activation_description(activation),
    }
    return config, source

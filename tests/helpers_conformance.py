"""Helpers for the family conformance matrix: tiny checkpoints, router-call recording, and each
family's own expert forward (the independent reference for ``read_experts``)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from pathlib import Path

import torch


def registered_family_names() -> list[str]:
    """Every family the installed plugins register (entry points included), sorted."""
    from nexus.family import registered_families

    return sorted(registered_families())


def perturb_moe_blocks(family, model, seed: int = 0, std: float = 0.1) -> None:
    """Give every parameter and float buffer of the MoE blocks random values (in place).

    Fresh models initialise some router weights and correction biases to zero; random values
    make experts and routing distinguishable, so a wrong index or layout cannot pass.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in family.moe_blocks(model):
            tensors = [*block.module.parameters(), *block.module.buffers()]
            for t in tensors:
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std).to(t.dtype))


def packed_variants() -> list[str]:
    """``"name@fp8"`` for every family whose spec declares block-scaled FP8 checkpoints (its native
    writer writes float, so the FP8 form is a variant of its own in the matrix)."""
    from nexus.family import registered_families
    from nexus.plugins import get_plugin_manager

    pm = get_plugin_manager()
    out = []
    for name, info in sorted(registered_families(pm).items()):
        spec = getattr(pm.get_plugin(info.plugin), "spec", None)
        if "fp8" in getattr(getattr(spec, "experts", None), "packed_formats", ()):
            out.append(f"{name}@fp8")
    return out


def build_checkpoint(family, path: Path, config=None, seed: int = 0, fmt: str | None = None) -> Path:
    """Build ``family``'s tiny example model (random, perturbed MoE blocks) and write it to ``path``
    with ``family.write_checkpoint`` (``fmt="fp8"``: as a block-scaled FP8 checkpoint). :return: ``path``."""
    from transformers import AutoModelForCausalLM

    config = config or family.example_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    perturb_moe_blocks(family, model, seed)
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "fp8":
        from nexus.quant.fp8_checkpoint import save_fp8_checkpoint

        save_fp8_checkpoint(model, path, family)
    else:
        family.write_checkpoint(model, path)
    return path


def input_ids(config, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    """Random token ids ``LongTensor[batch, seq]`` within the vocabulary, avoiding ids 0-2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, seq), generator=gen)


@contextlib.contextmanager
def record_outputs(modules: dict[str, torch.nn.Module], extract):
    """Record ``(name, extract(output))`` for every forward of ``modules``, in call order.

    :param modules: name -> module.
    :param extract: name -> callable mapping the module output to a tensor.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out, _n=n: calls.append((_n, extract[_n](out).detach().clone())))
        for n, m in modules.items()
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def layer_prefix(block_path: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.3``: the decoder layer a block sits in."""
    return block_path.rsplit(".", 1)[0]


def own_expert_forward(block: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The family's own computation of routed expert ``expert`` on tokens ``x[T, H]`` (routing
    weight 1, no other expert), through the family's experts module: ``Tensor[T, H]``.

    Decorated experts modules (``use_experts_implementation``) run their original eager forward.
    """
    experts = getattr(block, "experts", None)
    T, H = x.shape
    if experts is not None and callable(getattr(experts, "forward", None)):
        fwd = type(experts).forward
        fwd = getattr(fwd, "__wrapped__", fwd)
        params = list(inspect.signature(fwd).parameters)
        if len(params) >= 4:  # forward(self, hidden, top_k_index, top_k_weights): the common signature
            index = torch.full((T, 1), expert, dtype=torch.long)
            weights = torch.ones(T, 1, dtype=x.dtype)
            return fwd(experts, x, index, weights).reshape(T, H)
        if len(params) == 2 and hasattr(experts, "num_experts"):  # Llama 4: all experts on (E*T, H) rows
            rows = torch.zeros(experts.num_experts, T, H, dtype=x.dtype)
            rows[expert] = x
            return fwd(experts, rows.reshape(-1, H)).reshape(experts.num_experts, T, H)[expert]
    if hasattr(block, "input_linear") and hasattr(block, "output_linear"):  # JetMoE: per-expert grouped linears
        sizes = [0] * block.input_linear.num_experts
        sizes[expert] = T
        gate, up = block.input_linear(x, sizes).chunk(2, dim=-1)
        return block.output_linear(block.activation(gate) * up, sizes)
    raise AssertionError(f"no known way to run one expert of {type(block).__name__}; extend own_expert_forward")


def swiglu_from_weights(weights, i: int, x: torch.Tensor, activation) -> torch.Tensor:
    """Recompute expert ``i`` of :class:`nexus.types.ExpertWeights` on ``x[T, H]`` in ``x``'s dtype."""
    g, u, d = (w[i].to(x.dtype) for w in (weights.gate, weights.up, weights.down))
    gate, up = x @ g.T, x @ u.T
    if weights.has_bias:
        gate = gate + weights.gate_bias[i].to(x.dtype)
        up = up + weights.up_bias[i].to(x.dtype)
    out = activation(gate, up) @ d.T
    if weights.down_bias is not None:
        out = out + weights.down_bias[i].to(x.dtype)
    return out


def double_block(block: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``block`` (the model is untouched)."""
    return copy.deepcopy(block).double()

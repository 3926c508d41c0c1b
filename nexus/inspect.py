"""Describe a checkpoint without loading its weights: family, MoE layers, sizes, quantisation."""

from __future__ import annotations

from pathlib import Path

import torch

from nexus.checkpoint import CheckpointReader
from nexus.fingerprint import config_fingerprint
from nexus.loading import load_config


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _routed_expert_params(family, block) -> int:
    """Parameters of one block that belong to routed experts: all but the router and native shared experts."""
    excluded = {id(p) for p in family.router_capture(block).module.parameters()}
    for path in block.native_shared:
        excluded |= {id(p) for p in block.module.get_submodule(path).parameters()}
    return sum(p.numel() for p in block.module.parameters() if id(p) not in excluded)


def describe_checkpoint(path: str | Path, family=None, shared_intermediate_size: int | None = None) -> dict:
    """Summarise the checkpoint at ``path``; the model is built on the meta device only.

    :param family: a :class:`nexus.family.Family`; default resolved from the config.
    :param shared_intermediate_size: width for the shared-expert parameter count (default I).
    :return: a JSON-serialisable dict (see ``nexus inspect --json``).
    """
    from transformers import AutoModelForCausalLM

    from nexus.family import resolve_family

    config = load_config(path)
    family = family or resolve_family(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = family.moe_blocks(model)
    reader = CheckpointReader(path)
    quant = (getattr(config, "quantization_config", None) or {})
    quant = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant is None and any(k.endswith("_blocks") for k in reader.keys()):
        quant = "mxfp4"
    shared_params = 0
    for block in blocks:
        with torch.device("meta"):
            shared = family.build_shared_expert(config, block, shared_intermediate_size or block.intermediate_size)
        shared_params += _count(shared)
    expert_params = sum(_routed_expert_params(family, b) for b in blocks)
    disk = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {
        "path": str(path),
        "family": family.name,
        "model_type": config.model_type,
        "fingerprint": config_fingerprint(config),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "moe_layers": [
            {
                "layer": b.layer,
                "path": b.path,
                "num_experts": b.num_experts,
                "top_k": b.top_k,
                "hidden_size": b.hidden_size,
                "intermediate_size": b.intermediate_size,
            }
            for b in blocks
        ],
        "num_experts": blocks[0].num_experts,
        "top_k": blocks[0].top_k,
        "hidden_size": blocks[0].hidden_size,
        "intermediate_size": blocks[0].intermediate_size,
        "total_parameters": _count(model),
        "routed_expert_parameters": expert_params,
        "quantization": quant or "none",
        "checkpoint_bytes": disk,
        "shared_intermediate_size": shared_intermediate_size or blocks[0].intermediate_size,
        "shared_expert_parameters": shared_params,
    }

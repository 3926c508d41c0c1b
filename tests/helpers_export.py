"""Helpers for the export tests: a tiny base checkpoint of a family and a trained (non-zero) adapter for it."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers_conformance import build_checkpoint
from nexus.adapter import AdapterConfig, save_adapter
from nexus.family import resolve_family
from nexus.fingerprint import config_fingerprint
from nexus.loading import load_config, load_model
from nexus.shared_expert import attach_shared_experts, is_shared_parameter


def base_and_adapter(root: Path, family_name: str, gate_mode: str = "scalar", width: int | None = None,
                     config=None, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/base`` (the family's tiny example checkpoint, plus a tokenizer file) and
    ``root/adapter``: shared experts and gates filled with random values (a trained adapter)."""
    family = resolve_family(name=family_name)
    base = build_checkpoint(family, root / "base", config=config, seed=seed)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    model = load_model(base)
    blocks = attach_shared_experts(model, family, width, gate_mode)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    cfg = AdapterConfig(family=family.name, base_fingerprint=config_fingerprint(load_config(base)),
                        shared_intermediate_size=width or blocks[0].intermediate_size, gate_mode=gate_mode)
    save_adapter(model, root / "adapter", cfg)
    return base, root / "adapter"


def base_logits(base: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits of the base alone (NEXUS loader), per input sequence."""
    model = load_model(base)
    with torch.no_grad():
        return {n: model(input_ids=ids).logits.float() for n, ids in inputs.items()}

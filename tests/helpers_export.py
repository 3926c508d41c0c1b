"""Helpers for the export tests: a tiny base checkpoint of a family, a trained (non-zero) adapter for
it, and that adapter as an MXFP4 export stores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers_conformance import build_checkpoint
from nexus.adapter import AdapterConfig, read_adapter_config, save_adapter
from nexus.constants import ADAPTER_WEIGHTS_NAME, SHARED_MODULE_NAME, SHARED_SCALE_NAME
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


def _mxfp4_rounded(w: torch.Tensor) -> torch.Tensor:
    """``w[rows, cols]`` MXFP4-quantised and decoded along ``cols`` (zero columns pad it to a multiple of
    32; zeros never change a block's scale)."""
    from nexus.quant.mxfp4 import BLOCK, decode_mxfp4, quantize_mxfp4

    cols = w.shape[1]
    padded = torch.cat([w, w.new_zeros(w.shape[0], -cols % BLOCK)], 1)
    return decode_mxfp4(*quantize_mxfp4(padded))[:, :cols]


def mxfp4_rounded_adapter(adapter: Path, out: Path, weight_sum: float = 1.0) -> Path:
    """Write to ``out`` the adapter an MXFP4 export (original blocks kept) computes: each shared expert's
    gate and up rows and its down projection times the gate scalar and ``1 / weight_sum`` MXFP4-rounded,
    the down projection then multiplied back by ``weight_sum`` (the routing weights' sum), the scalar
    gate set to 1 (folded into down) and the down bias times the gate scalar. Built from the codec
    alone, so it checks the fold, not the fold against itself. :return: ``out``."""
    gate_mode = read_adapter_config(adapter).gate_mode
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS_NAME))
    new = dict(tensors)
    suffix = f".{SHARED_MODULE_NAME}.gate_proj.weight"
    for key in [k for k in tensors if k.endswith(suffix)]:
        block = key[: -len(suffix)]
        scale_key = f"{block}.{SHARED_SCALE_NAME}.weight"
        factor = float(tensors[scale_key].reshape(-1)[0]) if gate_mode == "scalar" else 1.0
        if gate_mode == "scalar":
            new[scale_key] = torch.ones_like(tensors[scale_key])
        shared = f"{block}.{SHARED_MODULE_NAME}"
        for proj in ("gate_proj", "up_proj"):
            new[f"{shared}.{proj}.weight"] = _mxfp4_rounded(tensors[f"{shared}.{proj}.weight"].float())
        down = tensors[f"{shared}.down_proj.weight"].float() * (factor / weight_sum)
        new[f"{shared}.down_proj.weight"] = _mxfp4_rounded(down) * weight_sum
        if f"{shared}.down_proj.bias" in tensors:
            new[f"{shared}.down_proj.bias"] = tensors[f"{shared}.down_proj.bias"].float() * factor
    shutil.copytree(adapter, out)
    save_file(new, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def mxfp4_export_error(base: Path, adapter: Path, exported: Path, scratch: Path, weight_sum: float = 1.0) -> float:
    """Max |logit difference| between ``exported`` (loaded by stock transformers in a fresh process)
    and base + :func:`mxfp4_rounded_adapter` of ``adapter`` (written to ``scratch``), fp32."""
    from nexus.engines.export import _reference_logits
    from nexus.engines.export_check import sample_inputs, stock_logits

    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    inputs = sample_inputs(vocab, 2, 16)
    rounded = mxfp4_rounded_adapter(adapter, scratch, weight_sum)
    reference, got = _reference_logits(base, rounded, inputs, None), stock_logits(exported, inputs, False)
    return max(float((reference[n] - got[n]).abs().max()) for n in inputs)

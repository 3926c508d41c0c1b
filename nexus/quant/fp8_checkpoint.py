"""Write a model as a block-scaled FP8 checkpoint, the way DeepSeek-V3/R1 and Qwen3 FP8 releases ship.

Every linear weight of the decoder layers (attention, dense MLPs, shared and routed experts, the
latter under their per-expert on-disk names) is stored as float8_e4m3fn ``X.weight`` plus float32
``X.weight_scale_inv``; embeddings, the LM head, norms and routers stay in their dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from nexus.quant.fp8 import SCALE_SUFFIX, quantize_fp8


def _kept_prefixes(model, family) -> list[str]:
    """Module-name prefixes whose weights stay unquantised: embeddings, LM head, routers."""
    names = {id(m): n for n, m in model.named_modules()}
    keep = [names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]]
    keep += [names[id(family.router_capture(b).module)] for b in family.moe_blocks(model)]
    return keep


def save_fp8_checkpoint(model, path: str | Path, family, block: tuple[int, int] = (128, 128)) -> None:
    """Save ``model`` to ``path`` with its linear weights quantised to FP8 e4m3 with ``block`` scales.

    :param family: the model's :class:`nexus.family.Family` (locates the routers to keep).
    :param block: the ``weight_block_size`` written to ``quantization_config``.
    """
    path = Path(path)
    model.save_pretrained(path)  # original format: routed experts one by one, as the releases store them
    keep = _kept_prefixes(model, family)
    index = path / "model.safetensors.index.json"
    index_data = json.loads(index.read_text()) if index.exists() else None
    weight_map = index_data["weight_map"] if index_data else None
    for file in sorted(path.glob("*.safetensors")):
        out = {}
        for name, t in load_file(file).items():
            quantize = (name.endswith(".weight") and t.dim() == 2 and t.is_floating_point()
                        and ".layers." in name and not any(name.startswith(k + ".") for k in keep))
            if quantize:
                out[name], out[name + SCALE_SUFFIX] = quantize_fp8(t, block)
                if weight_map is not None:
                    weight_map[name + SCALE_SUFFIX] = file.name
            else:
                out[name] = t
        save_file(out, file, metadata={"format": "pt"})
    if weight_map is not None:
        index.write_text(json.dumps(index_data, indent=2))
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": keep,
    }
    cfg_path.write_text(json.dumps(cfg, indent=2))

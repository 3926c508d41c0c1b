"""Write a GPT-OSS model in the released on-disk format: experts MXFP4-packed, the rest as is."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from nexus.quant.mxfp4 import quantize_mxfp4

PACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def save_mxfp4_checkpoint(model, path: str | Path) -> None:
    """Save ``model`` to ``path`` with its expert matrices as ``*_blocks``/``*_scales``.

    In memory ``gate_up_proj`` is ``[E, H, 2I]`` and ``down_proj`` ``[E, I, H]`` (used as
    ``x @ W``); on disk the packed rows are output features, so each is transposed before
    quantising. Biases and the router stay unquantised, as in the released checkpoints.
    """
    path = Path(path)
    model.save_pretrained(path, save_original_format=False)
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        out = {}
        for name, t in tensors.items():
            if name.endswith(PACKED):
                blocks, scales = quantize_mxfp4(t.transpose(1, 2).contiguous())
                out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
            else:
                out[name] = t
        save_file(out, file, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        wm = {}
        for k, f in data["weight_map"].items():
            if k.endswith(PACKED):
                wm[f"{k}_blocks"] = wm[f"{k}_scales"] = f
            else:
                wm[k] = f
        data["weight_map"] = wm
        index.write_text(json.dumps(data, indent=2))
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    cfg_path.write_text(json.dumps(cfg, indent=2))

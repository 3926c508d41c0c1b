"""The packed-experts benchmark: its checkpoint writers (released layouts, random weights) and a quick run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import layouts  # noqa: E402
from helpers_tolerance import bf16_rtol  # noqa: E402

TINY_OSS = dict(layers=2, experts=4, vocab=512, hidden=64, heads=2, kv_heads=1, top_k=2)


def _stored(path: Path) -> dict[str, tuple[torch.dtype, tuple]]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(path / file, "pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                out[k] = (t.get_dtype(), tuple(t.get_shape()))
    assert set(out) == set(index["weight_map"])
    return out


def test_gpt_oss_20b_config_is_the_release():
    cfg = layouts.gpt_oss_config()
    assert cfg == layouts.GPT_OSS_20B
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (24, 32, 4)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (2880, 2880, 201088)
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    shapes = layouts._meta_shapes(cfg)
    experts = sum(math.prod(s) for n, s in shapes.items() if n.endswith(layouts.GPT_OSS_PACKED))
    rest = sum(math.prod(s) for n, s in shapes.items()) - experts
    disk = experts * 17 / 32 + rest * 2  # MXFP4: 16 bytes of nibbles + 1 scale byte per 32 values
    assert 12.5e9 < disk < 14e9  # the release: 13.8 GB


def test_gpt_oss_layout_is_the_released_format(tmp_path):
    from nexus.loading import load_model
    from nexus.quant.packed_loading import packed_modules

    cfg = layouts.gpt_oss_config(**TINY_OSS)
    info = layouts.write_gpt_oss(tmp_path, cfg)
    stored = _stored(tmp_path)
    meta = layouts._meta_shapes(cfg)
    for name, shape in meta.items():
        if name.endswith(layouts.GPT_OSS_PACKED):
            e, n_in, n_out = shape
            assert stored[f"{name}_blocks"] == ("U8", (e, n_out, n_in // 32, 16))
            assert stored[f"{name}_scales"] == ("U8", (e, n_out, n_in // 32))
        else:
            assert stored[name] == ("BF16", shape)
    assert info["expert_bytes"] == sum(math.prod(s) for n, (d, s) in stored.items() if d == "U8")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["modules_to_not_convert"] == layouts.GPT_OSS_20B["quantization_config"][
        "modules_to_not_convert"]

    model = load_model(tmp_path)  # packed by default
    assert sum(m.stored_bytes() for m in packed_modules(model).values()) == info["expert_bytes"]
    logits = model(input_ids=torch.tensor([[5, 9, 100, 7]])).logits
    assert torch.isfinite(logits).all()
    dense = load_model(tmp_path, dequantize=True)
    w = dense.model.layers[0].mlp.experts.down_proj
    assert 0.005 < float(w.detach().std()) < 0.05  # scale bytes 118-120: weights like an initialised model


def test_deepseek_v3_fp8_layout_per_expert_block_scaled(tmp_path):
    from nexus.quant.fp8 import decode_fp8

    cfg = {**layouts.deepseek_v3_config(layers=1, experts=4, vocab=256, top_k=2, groups=1, topk_group=1),
           "hidden_size": 256, "moe_intermediate_size": 192, "q_lora_rank": 32, "kv_lora_rank": 32,
           "num_attention_heads": 2, "num_key_value_heads": 2, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
           "v_head_dim": 16}
    info = layouts.write_deepseek_v3_fp8(tmp_path, cfg)
    stored = _stored(tmp_path)
    h, i = 256, 192
    for e in range(4):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            name = f"model.layers.0.mlp.experts.{e}.{proj}.weight"
            assert stored[name] == ("F8_E4M3", shape)
            assert stored[name.replace("weight", "weight_scale_inv")] == (
                "F32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
    assert stored["model.layers.0.mlp.gate.e_score_correction_bias"][0] == "F32"
    assert not any(".mlp.experts.gate_up_proj" in k for k in stored)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["weight_block_size"], qc["fmt"]) == ("fp8", [128, 128], "e4m3")
    assert info["expert_bytes"] == 4 * 3 * (h * i + 2 * 2 * 4)
    # Experts are distinct, and each decodes to the N(0, 0.02) it was quantised from.
    with safe_open(tmp_path / "model-00002-of-00003.safetensors", "pt") as f:
        w = [decode_fp8(f.get_tensor(f"model.layers.0.mlp.experts.{e}.down_proj.weight"),
                        f.get_tensor(f"model.layers.0.mlp.experts.{e}.down_proj.weight_scale_inv"), (128, 128),
                        torch.float32) for e in range(4)]
    assert all(0.015 < float(x.std()) < 0.025 for x in w)
    assert not torch.equal(w[0], w[1])


def test_quantize_fp8_blocks_round_trips():
    from nexus.quant.fp8 import decode_fp8

    w = torch.randn(300, 200) * 0.05
    q, s = layouts.quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = decode_fp8(q, s, (128, 128), torch.float32)
    assert float((back - w).abs().max() / w.abs().max()) < 0.07  # e4m3: 3 mantissa bits


@pytest.mark.slow
def test_bench_packed_quick_end_to_end(tmp_path):
    from benchmarks import bench_packed

    res = bench_packed.main(["--quick", "--parts", "real,fp8,full", "--fp8-pipeline", "--results-dir", str(tmp_path)])
    saved = json.loads(Path(res["path"]).read_text())
    real = saved["real"]
    assert real["ratios"]["bf16"]["experts_memory"] > 3.5  # 2 bytes vs 17/32 of a byte per value
    assert real["ratios"]["fp32"]["experts_memory"] > 7
    for dtype in ("bf16", "fp32"):
        p, d = real["variants"][f"packed_{dtype}"], real["variants"][f"dequantised_{dtype}"]
        assert p["packed_layers"] == 2 and d["packed_layers"] == 0
        assert p["expert_bytes"] == real["disk_expert_bytes"]
        tolerance = dict(abs=1e-4) if dtype == "fp32" else dict(rel=bf16_rtol(steps=0))  # the first step's loss
        assert p["losses"][0] == pytest.approx(d["losses"][0], **tolerance)
    assert saved["fp8"]["ratios"]["bf16"]["experts_memory"] > 1.9
    assert len(saved["fp8"]["stages"]["train"]["metrics"]) == 2
    assert set(saved["full"]["stages"]) == {"inspect", "collect", "select", "convert", "train"}
    assert len(saved["full"]["stages"]["train"]["metrics"]) == 2
    assert saved["projection"]["models"]["gpt-oss-20b"]["dequantised_bf16_gib"] > 38


def test_measure_step_with_a_decode_cache_trains_identically(tmp_path):
    """The packed step under ``--packed-cache-bytes`` keeps decoded experts for backward (its peak is
    reported) and gives the same losses as without."""
    from benchmarks import bench_packed

    layouts.write_gpt_oss(tmp_path, layouts.gpt_oss_config(**TINY_OSS))
    threads = torch.get_num_threads()
    try:
        runs = [bench_packed.measure_step(str(tmp_path), dequantize=False, bf16=False, batch=1, seq=8, steps=1,
                                          threads=1, shared_size=None, cache_bytes=cache) for cache in (0, 2**30)]
    finally:
        torch.set_num_threads(threads)
    assert runs[0]["cache_peak_bytes"] == 0 < runs[1]["cache_peak_bytes"] <= 2**30
    assert runs[1]["cache_bytes"] == 2**30 and runs[0]["losses"] == runs[1]["losses"]

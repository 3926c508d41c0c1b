"""Full-size random checkpoints in released on-disk layouts, written straight to disk shard by shard.

No float model is ever built: the tensor names and shapes come from the model built on the meta
device (so they are exactly what transformers loads), and each shard's tensors are drawn, saved
and freed before the next. Peak memory is about one shard (one decoder layer, or the embedding).

- :func:`write_gpt_oss`: the released gpt-oss layout (``config.json`` fields of
  ``openai/gpt-oss-20b``, MXFP4 ``*_blocks``/``*_scales`` experts, bf16 for the rest); the
  defaults are gpt-oss-20b's dimensions (24 layers, 32 experts, H = I = 2880, vocabulary 201,088),
  ~13 GB.
- :func:`write_deepseek_v3_fp8`: DeepSeek-V3's expert dimensions (H = 7168, I = 2048) with the
  routed experts stored per expert as FP8 e4m3 ``weight`` + fp32 ``weight_scale_inv`` 128x128
  blocks, as in the released checkpoint; fewer layers and experts than the release.
- :func:`write_tokenizer`: a BPE tokenizer trained on the demo text, ids below the vocabulary.

Random values are chosen so that a forward pass stays finite: MXFP4 scale bytes 118-120 (scales
2^-9..2^-7: decoded experts of std ~0.015, like an initialised model), bf16 weights of std 0.02,
norms 1, FP8 blocks quantised from N(0, 0.02).

    python -m benchmarks.layouts gpt_oss /work/bigckpt/gpt-oss-20b            # the full 20B layout
    python -m benchmarks.layouts gpt_oss /tmp/oss4 --layers 4 --vocab 8192
    python -m benchmarks.layouts deepseek_v3_fp8 /tmp/dsv3 --layers 2 --experts 32
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# https://huggingface.co/openai/gpt-oss-20b/raw/main/config.json (layer_types: 12 x [sliding, full]).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}

# gpt-oss-120b differs only in these (https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json).
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18}

GPT_OSS_PACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

# https://huggingface.co/deepseek-ai/DeepSeek-V3/raw/main/config.json, the fields transformers reads.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}

FP8_BLOCK = 128
FP8_MAX = 448.0


def _meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of ``config``'s model, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def _fill_bf16(name: str, shape: tuple[int, ...], g: torch.Generator, std: float) -> torch.Tensor:
    """A bf16 tensor: ones for norm weights, N(0, std) otherwise, drawn in place (no fp32 copy)."""
    t = torch.empty(shape, dtype=torch.bfloat16)
    if "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
        return t.fill_(1.0)
    flat = t.view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):  # chunked: N(0,1) in fp32 for one chunk at a time
        flat[i:i + step] = torch.randn(min(step, flat.numel() - i), generator=g).mul_(std)
    return t


def _save_shards(path: Path, shards: list[tuple[str, dict[str, tuple]]], make) -> dict:
    """Write each shard's tensors (made by ``make(name, shape)`` -> {key: tensor}) to its own file,
    then the index. :return: ``{"bytes", "files", "weight_map"}``."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for i, (_, names) in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in names.items():
            tensors.update(make(name, shape))
        save_file(tensors, path / file, metadata={"format": "pt"})
        total += (path / file).stat().st_size
        weight_map.update({k: file for k in tensors})
        log.info("wrote %s (%d tensors, %.2f GB so far)", file, len(tensors), total / 1e9)
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "files": len(shards), "weight_map": weight_map}


def _by_layer(shapes: dict[str, tuple]) -> list[tuple[str, dict[str, tuple]]]:
    """Shards: the embedding, one per decoder layer, then norm + lm_head (about 1.2 GB each at 20B)."""
    groups: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        key = f"layer-{int(name.split('.')[2]):04d}" if name.startswith("model.layers.") else (
            "embed" if "embed_tokens" in name else "head")
        groups.setdefault(key, {})[name] = shape
    order = ["embed"] + sorted(k for k in groups if k.startswith("layer-")) + ["head"]
    return [(k, groups[k]) for k in order if k in groups]


def gpt_oss_config(layers: int = 24, experts: int = 32, vocab: int = 201088, hidden: int = 2880,
                   heads: int = 64, kv_heads: int = 8, head_dim: int = 64, top_k: int = 4) -> dict:
    """The released gpt-oss ``config.json`` (20B) with the given dimensions changed (with a smaller
    vocabulary the special ids become those of :func:`write_tokenizer`: pad 0, eos 2)."""
    ids = {} if vocab > GPT_OSS_20B["pad_token_id"] else {"pad_token_id": 0, "eos_token_id": 2}
    return {**GPT_OSS_20B, **ids, "num_hidden_layers": layers, "num_local_experts": experts, "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "experts_per_token": top_k,
            "num_experts_per_tok": top_k, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)
            + ["sliding_attention"] * (layers % 2)}


def write_gpt_oss(path: str | Path, config: dict | None = None, seed: int = 0, std: float = 0.02,
                  scale_bytes: tuple[int, int] = (118, 121)) -> dict:
    """Write a random gpt-oss checkpoint in the released layout to ``path``.

    Experts: ``mlp.experts.{gate_up,down}_proj_blocks`` uint8 ``[E, out, in/32, 16]`` (random
    nibbles) and ``*_scales`` uint8 ``[E, out, in/32]`` (bytes in ``scale_bytes``, i.e. scales
    2^(b-127)); everything else (attention with sinks and biases, router, expert biases, norms,
    embeddings, lm_head) bf16.

    :param config: a ``config.json`` dict (default :data:`GPT_OSS_20B`); written as given.
    :return: ``{"bytes", "expert_bytes", "files", "config"}``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config or GPT_OSS_20B
    g = torch.Generator().manual_seed(seed)
    expert_bytes = 0

    def make(name, shape):
        nonlocal expert_bytes
        if not name.endswith(GPT_OSS_PACKED):
            return {name: _fill_bf16(name, shape, g, std)}
        e, n_in, n_out = shape  # in memory [E, in, out]; on disk rows are output features
        blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(*scale_bytes, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        expert_bytes += blocks.numel() + scales.numel()
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}

    out = _save_shards(path, _by_layer(_meta_shapes(config)), make)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if config["vocab_size"] == GPT_OSS_20B["vocab_size"]:  # the release's generation_config.json
        ids = {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}
        (path / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    return {"bytes": out["bytes"], "expert_bytes": expert_bytes, "files": out["files"], "config": config}


def deepseek_v3_config(layers: int = 2, experts: int = 256, vocab: int = 129280, dense_layers: int = 0,
                       top_k: int = 8, groups: int = 8, topk_group: int = 4) -> dict:
    """DeepSeek-V3's ``config.json`` with fewer layers (the first ``dense_layers`` dense) and, if
    asked, fewer routed experts or a smaller vocabulary; expert and attention dimensions as released."""
    return {**DEEPSEEK_V3, "num_hidden_layers": layers, "n_routed_experts": experts, "vocab_size": vocab,
            "first_k_dense_replace": dense_layers, "num_experts_per_tok": top_k, "n_group": groups,
            "topk_group": topk_group}


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 block quantisation of a 2D weight ``[rows, cols]``: ``(weight fp8 [rows, cols],
    weight_scale_inv fp32 [ceil(rows/block), ceil(cols/block)])`` with ``w ~ weight * scale_inv``
    per block (each block's absolute max maps to 448)."""
    rows, cols = w.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(rb * block, cb * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(rb, block, cb, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).view(rb * block, cb * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def write_deepseek_v3_fp8(path: str | Path, config: dict | None = None, seed: int = 0, std: float = 0.02) -> dict:
    """Write a random DeepSeek-V3 checkpoint whose routed experts are FP8 e4m3 with 128x128 block
    scales, under the released per-expert names ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``
    (+ ``.weight_scale_inv``). Everything else is bf16 (the release also stores attention and the
    dense/shared MLPs in FP8; here only the routed experts are, which is what the packed path keeps
    packed). ``quantization_config`` lists the bf16 modules in ``modules_to_not_convert``.

    :param config: a ``config.json`` dict (default :func:`deepseek_v3_config`).
    :return: ``{"bytes", "expert_bytes", "files", "config"}``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config or deepseek_v3_config())
    g = torch.Generator().manual_seed(seed)
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    expert_bytes = 0
    # One N(0, std) matrix per shape, quantised once; each expert rolls it by whole 128-blocks
    # (rows and columns, scales alike): a valid, distinct block-scaled tensor per expert, drawn fast.
    base = {(r, c): quantize_fp8_blocks(torch.randn(r, c, generator=g) * std) for r, c in ((i, h), (h, i))}

    def expert(name: str, rows: int, cols: int) -> dict:
        nonlocal expert_bytes
        q, s = base[(rows, cols)]
        dr = int(torch.randint(0, s.shape[0], (1,), generator=g))
        dc = int(torch.randint(0, s.shape[1], (1,), generator=g))
        q = torch.roll(q.view(torch.uint8), (dr * FP8_BLOCK, dc * FP8_BLOCK), (0, 1)).view(torch.float8_e4m3fn)
        s = torch.roll(s, (dr, dc), (0, 1)).contiguous()
        expert_bytes += q.numel() + s.numel() * 4
        return {f"{name}.weight": q, f"{name}.weight_scale_inv": s}

    def make(name, shape):
        if name.endswith("e_score_correction_bias"):  # fp32 in the release
            return {name: torch.randn(shape, generator=g) * 1e-3}
        if ".mlp.experts." not in name:
            return {name: _fill_bf16(name, shape, g, std)}
        prefix = name.rsplit(".", 1)[0]  # model.layers.{l}.mlp.experts
        out = {}
        for e in range(shape[0]):
            if name.endswith("gate_up_proj"):
                out.update(expert(f"{prefix}.{e}.gate_proj", i, h))
                out.update(expert(f"{prefix}.{e}.up_proj", i, h))
            else:
                out.update(expert(f"{prefix}.{e}.down_proj", h, i))
        return out

    out = _save_shards(path, _by_layer(_meta_shapes(config)), make)
    config["quantization_config"] = {**DEEPSEEK_V3["quantization_config"], "modules_to_not_convert": [
        "model.embed_tokens", "lm_head", "model.layers.*.self_attn", "model.layers.*.mlp.gate",
        "model.layers.*.mlp.shared_experts", "model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj",
        "model.layers.*.mlp.down_proj"]}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"bytes": out["bytes"], "expert_bytes": expert_bytes, "files": out["files"], "config": config}


def write_tokenizer(path: str | Path, vocab_size: int = 8192) -> int:
    """A byte-fallback-free BPE tokenizer trained on the demo text (ids < ``vocab_size``), saved
    to ``path``. :return: its length."""
    from nexus.demo import demo_paragraphs, train_tokenizer

    tok = train_tokenizer(demo_paragraphs(), vocab_size)
    tok.save_pretrained(path)
    return len(tok)


def main(argv=None) -> None:
    """Command line: write one layout (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layout", choices=("gpt_oss", "deepseek_v3_fp8"))
    p.add_argument("path", type=Path)
    p.add_argument("--layers", type=int, default=None, help="Decoder layers (gpt_oss 24, deepseek_v3_fp8 2).")
    p.add_argument("--experts", type=int, default=None, help="Experts per layer (gpt_oss 32, deepseek_v3_fp8 256).")
    p.add_argument("--vocab", type=int, default=None, help="Vocabulary (default: the release's).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.layout == "gpt_oss":
        cfg = gpt_oss_config(args.layers or 24, args.experts or 32, args.vocab or 201088)
        info = write_gpt_oss(args.path, cfg, seed=args.seed)
    else:
        cfg = deepseek_v3_config(args.layers or 2, args.experts or 256, args.vocab or 129280)
        info = write_deepseek_v3_fp8(args.path, cfg, seed=args.seed)
    n = write_tokenizer(args.path, min(8192, cfg["vocab_size"]))
    log.info("%s: %.2f GB (%.2f GB experts), %d files, tokenizer of %d ids", args.path, info["bytes"] / 1e9,
             info["expert_bytes"] / 1e9, info["files"], n)


if __name__ == "__main__":
    main()

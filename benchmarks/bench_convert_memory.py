"""Convert peak memory on a real-dimension GPT-OSS MXFP4 checkpoint vs loading the dequantised model.

The benchmark writes a GPT-OSS checkpoint with the real expert dimensions (H = I = 2880, 32
experts, 2 layers; a small vocabulary to save disk) directly in the released on-disk format:
random MXFP4 ``*_blocks``/``*_scales`` for the experts and random bf16 for the rest, without
ever building the model in float. Then, each in a fresh process (peak RSS = ``VmHWM``):

- floor: the imports and the meta-device model convert builds (no weights);
- NEXUS convert, ``pca`` with K = 24 selected experts per layer, and ``mean_all`` (all 32);
  ``pca`` once more with ``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc hands freed blocks back at
  once), which separates the algorithm's peak from the allocator's retention;
- baseline: ``AutoModelForCausalLM.from_pretrained`` of the same checkpoint in bf16 (transformers
  dequantises every expert: what the original NEXUS does before averaging).

Convert reads one expert at a time, so its peak above the floor is about one dequantised expert
plus one fp32 accumulator, whatever L, E and K: the projection to gpt-oss-120b (36 layers, 128
experts, K = 24, same H and I) is the measured convert peak, against the bf16 size of the whole
120B model for loading it.

    python benchmarks/bench_convert_memory.py [--quick] [--layers 2] [--experts 32] [--keep]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_parser, parse_bench_args, print_ratio, run_child, thread_env, write_results,
)

PRELUDE = r"""
import json, time
import torch
torch.set_num_threads({threads})
from benchmarks.common import peak_rss_mb as rss
"""

FLOOR = PRELUDE + r"""
from transformers import AutoModelForCausalLM
import nexus.engines.convert as conv
from nexus.loading import load_config
conv.meta_model(load_config({path!r}))
print(json.dumps({{"peak_mb": rss()}}))
"""

CONVERT = PRELUDE + r"""
from nexus.engines.convert import ConvertConfig, convert
t = time.perf_counter()
convert(ConvertConfig(model={path!r}, output={out!r}, selection={selection!r}, strategy={strategy!r}), progress=False)
print(json.dumps({{"peak_mb": rss(), "seconds": time.perf_counter() - t}}))
"""

LOAD = PRELUDE + r"""
from transformers import AutoModelForCausalLM
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16)
n = sum(p.numel() for p in model.parameters())
print(json.dumps({{"peak_mb": rss(), "seconds": time.perf_counter() - t, "parameters": n}}))
"""


def gpt_oss_config(hidden: int, layers: int, experts: int, heads: int, vocab: int):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_local_experts=experts, num_experts_per_tok=4, num_attention_heads=heads, num_key_value_heads=8,
        head_dim=64, sliding_window=128, max_position_embeddings=4096,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0}, dtype="bfloat16",
    )


def write_mxfp4_checkpoint(config, path: Path, seed: int = 0) -> int:
    """Write ``config``'s model to ``path`` in the released GPT-OSS format, one shard per layer,
    from random tensors (never a float model). :return: bytes written."""
    import torch
    from safetensors.torch import save_file

    from nexus.engines.convert import meta_model

    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(p.shape) for n, p in meta_model(config).named_parameters()}
    packed = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    shards: dict[str, dict] = {}
    for name, shape in shapes.items():
        shard = f"layer-{name.split('.')[2]}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(shard, {})[name] = shape
    weight_map, total = {}, 0
    for shard, names in shards.items():
        tensors = {}
        for name, shape in names.items():
            if name.endswith(packed):  # in memory [E, in, out] -> on disk rows = out features
                e, n_in, n_out = shape
                tensors[f"{name}_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
                tensors[f"{name}_scales"] = torch.randint(118, 124, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
            else:
                tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        file = f"model-{shard}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        total += (path / file).stat().st_size
        weight_map.update({k: file for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def write_selection(config, path: Path, top_k: int) -> Path:
    """An expert selection for ``config`` from synthetic router statistics (the engine's own select)."""
    import torch

    from nexus.router_stats import LayerStats, RouterStats
    from nexus.engines.select import save_selection, select_experts
    from nexus.fingerprint import config_fingerprint

    g = torch.Generator().manual_seed(0)
    e = config.num_local_experts
    stats = RouterStats({}, {"family": "gpt_oss", "base_fingerprint": config_fingerprint(config), "complete": True})
    for layer in range(config.num_hidden_layers):
        s = LayerStats.zeros(layer, e, 4, "softmax")
        s.update(torch.softmax(torch.randn(2000, e, generator=g) * torch.linspace(0.5, 2, e), -1))
        stats.layers[layer] = s
    return save_selection(select_experts(stats, top_k=top_k), path, plots=False)[0]


def parameters_of(config) -> int:
    from nexus.engines.convert import meta_model

    return sum(p.numel() for p in meta_model(config).parameters())


def main(argv: list[str] | None = None) -> None:
    """Write the checkpoint, measure convert and the baseline load, print the ratios and write the results."""
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=None, help="Experts per layer (default 32; --quick 8).")
    p.add_argument("--top-k", type=int, default=None, help="Experts averaged by pca (default 24; --quick 4).")
    p.add_argument("--workdir", type=Path, default=None, help="Where the checkpoint is written (default a temp dir).")
    p.add_argument("--keep", action="store_true", help="Keep the checkpoint and adapters.")
    args = parse_bench_args(p, argv)
    if args.workdir is not None and not args.workdir.is_dir():
        p.error(f"--workdir {args.workdir} is not a folder; give an existing folder for the checkpoint")

    from nexus.loading import load_config

    hidden, heads, vocab = (512, 8, 1024) if args.quick else (2880, 64, 8192)
    experts = args.experts or (8 if args.quick else 32)
    top_k = args.top_k or (4 if args.quick else 24)
    work = Path(tempfile.mkdtemp(prefix="nexus-bench-convert-", dir=args.workdir))
    try:
        ckpt = work / "ckpt"
        ckpt.mkdir()
        config = gpt_oss_config(hidden, args.layers, experts, heads, vocab)
        size = write_mxfp4_checkpoint(config, ckpt)
        selection = write_selection(load_config(ckpt), work / "selection.json", top_k)
        print(f"GPT-OSS MXFP4 checkpoint: H=I={hidden}, {experts} experts, {args.layers} layers, "
              f"{size / 2**30:.2f} GiB on disk; K={top_k}")
        fmt = dict(path=str(ckpt), threads=args.threads, selection=str(selection))
        env = thread_env(args.threads)
        floor = run_child(FLOOR.format(**fmt), env=env)
        pca = run_child(CONVERT.format(**fmt, out=str(work / "pca"), strategy="pca"), env=env)
        mean_all = run_child(CONVERT.format(**fmt, out=str(work / "mean_all"), strategy="mean_all"), env=env)
        # The same pca conversion with glibc returning every freed block over 1 MiB to the OS at
        # once: what is left is the algorithm's own peak, without allocator retention.
        trimmed = run_child(CONVERT.format(**fmt, out=str(work / "pca_trim"), strategy="pca"),
                            env={**env, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        load = run_child(LOAD.format(**fmt), env=env)
        adapter_mb = (work / "pca" / "adapter_model.safetensors").stat().st_size / 2**20

        above = lambda r: r["peak_mb"] - floor["peak_mb"]  # noqa: E731
        print(f"floor (imports + meta model): {floor['peak_mb']:.0f} MiB; adapter written: {adapter_mb:.0f} MiB")
        r_pca = print_ratio("peak RSS, whole: load bf16 vs convert pca", load["peak_mb"], pca["peak_mb"], "MiB")
        r_above = print_ratio("peak RSS above the floor: load vs convert pca", above(load), above(pca), "MiB")
        print_ratio("peak RSS above the floor: load vs convert mean_all", above(load), above(mean_all), "MiB")
        print_ratio("peak RSS above the floor, MALLOC_MMAP_THRESHOLD_=1MiB", above(load), above(trimmed), "MiB")
        print_ratio("time: load bf16 vs convert pca", load["seconds"], pca["seconds"], "s")
        print("ratio = baseline / NEXUS: above 1 means NEXUS uses less")

        # gpt-oss-120b: same H and I, so convert's peak does not change; loading scales with the model.
        big = gpt_oss_config(2880, 36, 128, 64, 201088)
        n_big = parameters_of(big)
        per_param = above(load) * 2**20 / load["parameters"]
        expert_fp32_mb = 3 * hidden * hidden * 4 / 2**20
        proj = {
            "model": "gpt-oss-120b (36 layers, 128 experts, K=24, H=I=2880)",
            "parameters": n_big,
            "load_bf16_gib_weights": n_big * 2 / 2**30,
            "load_gib_scaled_from_measured": per_param * n_big / 2**30,
            "convert_peak_mib": pca["peak_mb"] if not args.quick else None,
            "convert_peak_above_floor_mib": above(pca) if not args.quick else None,
            "one_expert_fp32_mib": 3 * 2880 * 2880 * 4 / 2**20,
        }
        print(f"gpt-oss-120b projection: loading needs >= {proj['load_bf16_gib_weights']:.0f} GiB (bf16 weights; "
              f"{proj['load_gib_scaled_from_measured']:.0f} GiB at the measured load peak per parameter); convert's peak "
              + (f"stays ~{pca['peak_mb']:.0f} MiB" if not args.quick else "is measured at H=I=2880 without --quick")
              + f" (one expert in fp32 is {proj['one_expert_fp32_mib']:.0f} MiB)")
        payload = {
            "threads": args.threads,
            "checkpoint": {"hidden": hidden, "intermediate": hidden, "experts": experts, "layers": args.layers,
                           "top_k": top_k, "vocab": vocab, "bytes": size},
            "floor": floor, "convert_pca": pca, "convert_mean_all": mean_all, "load_bf16": load,
            "convert_pca_malloc_mmap_threshold_1mib": trimmed,
            "adapter_mib": adapter_mb, "one_expert_fp32_mib_here": expert_fp32_mb,
            "ratio_whole": r_pca, "ratio_above_floor": r_above, "projection_120b": proj,
        }
        path = write_results("convert_memory" + ("-quick" if args.quick else ""), payload, args.results_dir, args)
        print(f"results: {path}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark 6: frozen experts kept packed as stored (MXFP4, FP8) vs dequantised, up to gpt-oss-20b.

Parts (``--parts``, default ``real,fp8``; ``full`` needs ~13 GB of disk and ~30 minutes):

- ``real``: a GPT-OSS checkpoint with the real dimensions (H = I = 2880, 32 experts, top-4,
  ``--layers`` decoder layers, vocabulary 8192 to save disk) written by
  :mod:`benchmarks.layouts`. One train step (self-distillation: teacher = the base with the
  adapter off, CE + KL, AdamW on the shared experts) in a fresh process per variant: packed
  (``load_model``'s default) vs dequantised (``dequantize=True``), each in bf16 (bf16 weights,
  bf16 autocast, fp32 adapter, as ``nexus train --bf16``) and fp32, on the same batch. Reported:
  the experts' bytes in memory, RSS after loading, peak RSS, tokens/s, and the activation bytes
  the student's forward saves for backward (split into per-layer and vocabulary-sized tensors).
- ``fp8``: the same at DeepSeek-V3's expert dimensions (H = 7168, I = 2048, FP8 e4m3 with 128x128
  block scales under the release's per-expert names), ``--fp8-layers`` MoE layers of
  ``--fp8-experts`` routed experts (the release has 256; fewer keep the dequantised baseline
  inside this machine's memory), packed vs dequantised bf16; with ``--fp8-pipeline`` also the
  command-line stages below on that checkpoint.
- ``full``: the full gpt-oss-20b layout (24 layers, 32 experts, vocabulary 201,088, ~13 GB; written
  once to ``--full-path`` if absent) through the command line, each stage a fresh process
  with its peak RSS and seconds: ``nexus inspect``, ``collect`` (``--full-tokens``), ``select``,
  ``convert``, ``train --max-steps 2 --teacher self --bf16``. What the dequantised path would
  need is computed from the parameter counts (it cannot load here).
- ``projection`` (always, from what was measured): memory on one GPU for gpt-oss-20b and -120b:
  weights (packed experts at the measured bytes per expert, the rest bf16), adapter + AdamW,
  activations at ``--proj-batch`` x ``--proj-seq`` from the measured saved bytes per token
  (``--reproject RESULTS.json`` recomputes it alone from an earlier run's measurements).

Peak RSS is ``VmHWM`` of a fresh process (a command-line stage writes its own at exit). ``--quick``: tiny dimensions, seconds, for the smoke test.

    python benchmarks/bench_packed.py                        # real + fp8 + projection (~15 min, ~12 GB RAM)
    python benchmarks/bench_packed.py --parts full --full-path ~/ckpt/gpt-oss-20b   # ~13 GB written once, kept
    python benchmarks/bench_packed.py --quick --parts real,fp8,full --fp8-pipeline   # the smoke test
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ROOT, bench_parser, machine, parse_bench_args, run_child, thread_env, write_results,
)

GIB, MIB = 2**30, 2**20
PARTS = ("real", "fp8", "full")
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # the fused routed experts in memory


def _status_mb(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB (``VmRSS``, ``RssAnon``, ``RssFile``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


_rss_mb = _status_mb


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_step(path: str, dequantize: bool, bf16: bool, batch: int, seq: int, steps: int, threads: int,
                 shared_size: int | None, cache_bytes: int = 0) -> dict:
    """Child process: load ``path`` (packed or dequantised), attach shared experts, run 1 warm-up
    and ``steps`` timed self-distillation train steps on a fixed random batch ``[batch, seq]``.
    ``cache_bytes``: the packed experts' decode budget (:func:`nexus.quant.packed_experts.set_reuse_bytes`).

    :return: bytes of the experts / the rest of the base / the adapter, RSS after imports, after
        loading and peak (MiB), load seconds, tokens/s of the median step, losses, and the bytes
        saved for backward by the student's forward (``saved_*``).
    """
    import contextlib

    import torch
    import transformers.models.deepseek_v3.modeling_deepseek_v3  # noqa: F401 - imports outside the measurement
    import transformers.models.gpt_oss.modeling_gpt_oss  # noqa: F401

    from benchmarks.common import peak_rss_mb
    from nexus.family import resolve_family
    from nexus.loading import load_model
    from nexus.quant.packed_experts import set_reuse_bytes
    from nexus.quant.packed_loading import packed_modules
    from nexus.shared_expert import attach_shared_experts, freeze_base
    from nexus.training.teachers import SelfTeacher
    from nexus.training.train_step import distill_losses

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype, dequantize=dequantize)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    # safetensors tensors are private file mappings: bytes never written stay file-backed (page cache)
    rss_split = {"rss_anon_loaded_mb": _status_mb("RssAnon"), "rss_file_loaded_mb": _status_mb("RssFile")}
    packed = packed_modules(model)
    budget = set_reuse_bytes(model, cache_bytes)
    if packed:  # the stored bytes (blocks + scales); the experts' biases count with the rest, as below
        expert_bytes = sum(m.stored_bytes() for m in packed.values())
    else:
        expert_bytes = _tensor_bytes(p for n, p in model.named_parameters() if n.endswith(EXPERT_WEIGHTS))
    rest_bytes = _tensor_bytes((*model.parameters(), *model.buffers())) - expert_bytes
    family = resolve_family(model.config)
    blocks = attach_shared_experts(model, family, intermediate_size=shared_size, gate_mode="scalar")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "nexus_shared" in n:
                p.normal_(0, 0.02)
    params = freeze_base(model)
    adapter_bytes = _tensor_bytes(params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    teacher = SelfTeacher(model, family, blocks, autocast=autocast)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "empty": False}
    vocab = model.config.vocab_size
    saved = {"total": 0, "vocab": 0, "count": 0}

    def pack_hook(t):
        if saved["on"]:
            saved["total"] += t.numel() * t.element_size()
            saved["count"] += 1
            if t.dim() and t.shape[-1] == vocab:
                saved["vocab"] += t.numel() * t.element_size()
        return t

    times, losses = [], []
    for i in range(steps + 1):
        saved["on"] = i == 0
        t = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            parts = distill_losses(model, data, teacher, "cpu", kd=True, temperature=1.0, autocast=autocast)
        loss = (parts.ce + parts.kd) / parts.n_pred.clamp_min(1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    saved.pop("on")
    return {
        "dequantize": dequantize, "dtype": str(dtype).replace("torch.", ""), "packed_layers": len(packed),
        "expert_bytes": expert_bytes, "rest_bytes": rest_bytes, "adapter_bytes": adapter_bytes,
        "rss_imports_mb": rss0, "rss_loaded_mb": rss_loaded, **rss_split, "peak_rss_mb": peak_rss_mb(),
        "rss_anon_end_mb": _status_mb("RssAnon"), "rss_file_end_mb": _status_mb("RssFile"),
        "load_seconds": load_s, "step_seconds": times, "median_step_seconds": statistics.median(times),
        "tokens_per_s": batch * seq / statistics.median(times), "losses": losses,
        "saved_bytes": saved["total"], "saved_vocab_bytes": saved["vocab"], "saved_tensors": saved["count"],
        "tokens": batch * seq, "layers": model.config.num_hidden_layers, "vocab": vocab,
        "cache_bytes": cache_bytes, "cache_peak_bytes": budget.peak if budget is not None else 0,
    }


STEP_CHILD = r"""
import json
from benchmarks.bench_packed import measure_step
print(json.dumps(measure_step(**{kwargs!r})))
"""


def run_variants(path: Path, variants: list[tuple], args, env: dict) -> dict:
    """Measure each ``(name, dequantize, bf16[, cache bytes])`` variant of ``path`` in its own process
    (packed ones without a cache bytes under ``--packed-cache-bytes``)."""
    out = {}
    for name, dequantize, bf16, *cache in variants:
        cache_bytes = cache[0] if cache else (0 if dequantize else args.packed_cache_bytes)
        kwargs = dict(path=str(path), dequantize=dequantize, bf16=bf16, batch=args.batch, seq=args.seq,
                      steps=args.steps, threads=args.threads, shared_size=args.shared_size, cache_bytes=cache_bytes)
        r = run_child(STEP_CHILD.format(kwargs=kwargs), env=env)
        out[name] = r
        print(f"  {name:<18} experts {r['expert_bytes'] / MIB:>9.1f} MiB  rest {r['rest_bytes'] / MIB:>8.1f} MiB  "
              f"loaded +{r['rss_loaded_mb'] - r['rss_imports_mb']:>8.0f} MiB  peak {r['peak_rss_mb']:>8.0f} MiB  "
              f"{r['tokens_per_s']:>8.1f} tok/s  load {r['load_seconds']:>6.1f} s  "
              f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}", flush=True)
    return out


def compare(results: dict, packed: str, dequantised: str) -> dict:
    """Ratios dequantised / packed (memory: above 1 means packed uses less) and packed / dequantised speed."""
    p, d = results[packed], results[dequantised]
    return {
        "experts_memory": d["expert_bytes"] / p["expert_bytes"],
        "loaded_rss_above_imports": (d["rss_loaded_mb"] - d["rss_imports_mb"])
        / (p["rss_loaded_mb"] - p["rss_imports_mb"]),
        "peak_rss": d["peak_rss_mb"] / p["peak_rss_mb"],
        "speed_packed_over_dequantised": p["tokens_per_s"] / d["tokens_per_s"],
        "first_loss_abs_diff": abs(p["losses"][0] - d["losses"][0]),
    }


def part_real(work: Path, args, env) -> dict:
    """Real-dimension GPT-OSS: packed vs dequantised, bf16 and fp32."""
    from benchmarks.layouts import gpt_oss_config, write_gpt_oss

    dims = dict(layers=2, experts=4, vocab=1024, hidden=256, heads=4, kv_heads=2, top_k=2) if args.quick else \
        dict(layers=args.layers, experts=32, vocab=8192, hidden=2880)
    config = gpt_oss_config(**dims)
    ckpt = work / "gpt_oss"
    info = write_gpt_oss(ckpt, config)
    print(f"[real] GPT-OSS MXFP4: H=I={dims['hidden']}, {dims['experts']} experts, {dims['layers']} layers, "
          f"vocab {dims['vocab']}: {info['bytes'] / GIB:.2f} GiB on disk "
          f"({info['expert_bytes'] / GIB:.2f} GiB experts); "
          f"batch {args.batch} x {args.seq}", flush=True)
    variants = [("packed_bf16", False, True), ("dequantised_bf16", True, True),
                ("packed_fp32", False, False), ("dequantised_fp32", True, False)]
    if args.packed_cache_bytes:  # the packed step without the cache too, for comparison
        variants[2:2] = [("packed_bf16_cache0", False, True, 0)]
        variants.append(("packed_fp32_cache0", False, False, 0))
    res = run_variants(ckpt, variants, args, env)
    ratios = {"bf16": compare(res, "packed_bf16", "dequantised_bf16"),
              "fp32": compare(res, "packed_fp32", "dequantised_fp32")}
    if args.packed_cache_bytes:
        ratios.update({f"{d}_cache0": compare(res, f"packed_{d}_cache0", f"dequantised_{d}") for d in ("bf16", "fp32")})
    for k, r in ratios.items():
        print(f"  {k}: experts {r['experts_memory']:.2f}x smaller packed, peak RSS {r['peak_rss']:.2f}x, "
              f"speed packed/dequantised {r['speed_packed_over_dequantised']:.2f}x")
    return {"dims": dims, "disk_bytes": info["bytes"], "disk_expert_bytes": info["expert_bytes"],
            "variants": res, "ratios": ratios}


def part_fp8(work: Path, args, env) -> dict:
    """DeepSeek-V3 expert dimensions, FP8 block-scaled: packed vs dequantised bf16."""
    from benchmarks.layouts import deepseek_v3_config, write_deepseek_v3_fp8

    if args.quick:
        config = {**deepseek_v3_config(layers=2, experts=4, vocab=1024, top_k=2, groups=1, topk_group=1),
                  "hidden_size": 256, "moe_intermediate_size": 128, "q_lora_rank": 64, "kv_lora_rank": 32,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                  "v_head_dim": 32}
    else:
        config = deepseek_v3_config(layers=args.fp8_layers, experts=args.fp8_experts, vocab=8192)
    ckpt = work / "deepseek_v3_fp8"
    info = write_deepseek_v3_fp8(ckpt, config)
    dims = {k: config[k] for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_hidden_layers",
                                   "num_experts_per_tok", "vocab_size")}
    print(f"[fp8] DeepSeek-V3 FP8: {dims}: {info['bytes'] / GIB:.2f} GiB on disk "
          f"({info['expert_bytes'] / GIB:.2f} GiB experts)", flush=True)
    variants = [("packed_bf16", False, True), ("dequantised_bf16", True, True)]
    res = run_variants(ckpt, variants, args, env)
    ratios = {"bf16": compare(res, "packed_bf16", "dequantised_bf16")}
    r = ratios["bf16"]
    print(f"  bf16: experts {r['experts_memory']:.2f}x smaller packed, peak RSS {r['peak_rss']:.2f}x, "
          f"speed packed/dequantised {r['speed_packed_over_dequantised']:.2f}x")
    out = {"dims": dims, "disk_bytes": info["bytes"], "disk_expert_bytes": info["expert_bytes"],
           "variants": res, "ratios": ratios}
    if args.fp8_pipeline:
        from benchmarks.layouts import write_tokenizer

        write_tokenizer(ckpt, min(8192, config["vocab_size"]))
        print("[fp8] the command line on it:", flush=True)
        quick = args.quick
        out["stages"] = pipeline(ckpt, work / "fp8_runs", env, tokens=256 if quick else args.full_tokens,
                                 seq=64 if quick else 512, top_k=2 if quick else config["num_experts_per_tok"],
                                 shared=64 if quick else config["moe_intermediate_size"],
                                 train_seq=64 if quick else args.full_train_seq)
    return out


# The command line, recording its own VmHWM at exit: wait4's ru_maxrss would also count the RSS this
# (parent) process had when it forked, since ru_maxrss survives execve.
CLI = """
import atexit, sys
from benchmarks.common import peak_rss_mb
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(repr(peak_rss_mb())))
from nexus.cli import main
sys.argv[0] = "nexus"
main()
"""


def run_stage(name: str, argv: list[str], log_dir: Path, env: dict) -> dict:
    """Run one ``nexus`` command as a fresh process; return its seconds and its own peak RSS (VmHWM)."""
    log, hwm = log_dir / f"{name}.log", log_dir / f"{name}.peak_rss_mb"
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", CLI, str(hwm), *argv], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"nexus {name} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    r = {"argv": argv, "seconds": seconds, "peak_rss_mb": float(hwm.read_text()),
         "ru_maxrss_mb": usage.ru_maxrss / 1024}
    print(f"  {name:<8} {seconds:>8.1f} s  peak RSS {r['peak_rss_mb'] / 1024:>6.2f} GiB", flush=True)
    return r


def param_counts(config: dict) -> dict:
    """Parameters of ``config``'s model by kind: routed experts (weights), the rest, total."""
    from benchmarks.layouts import _meta_shapes

    shapes = _meta_shapes(config)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    experts = sum(v for n, v in numel.items() if n.endswith(EXPERT_WEIGHTS))
    return {"experts": experts, "rest": sum(numel.values()) - experts, "total": sum(numel.values())}


def pipeline(ckpt: Path, runs: Path, env: dict, tokens: int, seq: int, top_k: int, shared: int,
             train_seq: int) -> dict:
    """``nexus inspect``, ``collect``, ``select``, ``convert``, ``train`` (2 steps, self teacher, bf16)
    on ``ckpt``, each a fresh process. :return: ``{stage: {argv, seconds, peak_rss_mb}}`` (+ train metrics)."""
    from nexus.demo import demo_text_path

    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    data, m = str(demo_text_path()), str(ckpt)
    stages = {
        "inspect": ["inspect", "--model", m, "--json"],
        "collect": ["collect", "--model", m, "--data", data, "--target-tokens", str(tokens), "--batch-size", "1",
                    "--seq-len", str(seq), "--dtype", "bfloat16", "--checkpoint-every", "0",
                    "--output", str(runs / "stats")],
        "select": ["select", "--stats", str(runs / "stats"), "--top-k", str(top_k),
                   "--output", str(runs / "selection.json")],
        "convert": ["convert", "--model", m, "--selection", str(runs / "selection.json"), "--shared-intermediate-size",
                    str(shared), "--output", str(runs / "adapter")],
        "train": ["train", "--model", m, "--adapter", str(runs / "adapter"), "--data", data, "--teacher", "self",
                  "--max-steps", "2", "--batch-size", "1", "--seq-len", str(train_seq), "--bf16", "--log-every", "1",
                  "--save-every", "0", "--output", str(runs / "train")],
    }
    res = {name: run_stage(name, argv, runs, env) for name, argv in stages.items()}
    metrics = (runs / "train" / "metrics.jsonl").read_text().splitlines()
    res["train"]["metrics"] = [json.loads(line) for line in metrics if line.strip()]
    return res


def part_full(work: Path, args, env) -> dict:
    """The full gpt-oss-20b layout through the command line, stage by stage."""
    from benchmarks.layouts import gpt_oss_config, write_gpt_oss, write_tokenizer

    if args.quick:
        ckpt, config = work / "full", gpt_oss_config(layers=2, experts=4, vocab=1024, hidden=256, heads=4, kv_heads=2)
    else:
        ckpt, config = Path(args.full_path or work / "gpt-oss-20b"), gpt_oss_config()
    if not (ckpt / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        write_gpt_oss(ckpt, config)
        print(f"[full] wrote {ckpt} in {time.perf_counter() - t:.0f} s", flush=True)
    if not (ckpt / "tokenizer.json").exists():
        write_tokenizer(ckpt, min(8192, config["vocab_size"]))
    disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    counts = param_counts(config)
    print(f"[full] {ckpt}: {disk / GIB:.2f} GiB on disk; {counts['total'] / 1e9:.2f} B parameters "
          f"({counts['experts'] / 1e9:.2f} B in experts)", flush=True)
    tokens, seq = (256, 64) if args.quick else (args.full_tokens, 512)
    res = pipeline(ckpt, work / "full_runs", env, tokens=tokens, seq=seq, top_k=4 if args.quick else 24,
                   shared=64 if args.quick else args.full_shared_size,
                   train_seq=64 if args.quick else args.full_train_seq)
    need = {"bf16_weights_gib": counts["total"] * 2 / GIB, "fp32_weights_gib": counts["total"] * 4 / GIB}
    print(f"  dequantised path: {need['bf16_weights_gib']:.1f} GiB of bf16 weights alone "
          f"({need['fp32_weights_gib']:.1f} GiB fp32, the default dtype); machine: {machine()['memory_gib']} GiB")
    return {"checkpoint": str(ckpt), "disk_bytes": disk, "parameters": counts, "stages": res,
            "dequantised_would_need": need}


def projection(real: dict | None, full: dict | None, args) -> dict | None:
    """Memory on one GPU for gpt-oss-20b and -120b from the per-component bytes measured in ``real``."""
    if real is None:
        return None
    from benchmarks.layouts import GPT_OSS_20B, GPT_OSS_120B

    p = real["variants"]["packed_bf16"]
    d = real["dims"]
    n_expert_matrices = d["layers"] * d["experts"]
    per_expert = p["expert_bytes"] / n_expert_matrices  # bytes of one packed expert (gate_up + down + scales)
    tokens, layers_m, vocab_m = p["tokens"], p["layers"], p["vocab"]
    per_layer_token = (p["saved_bytes"] - p["saved_vocab_bytes"]) / (tokens * layers_m)
    per_vocab_token = p["saved_vocab_bytes"] / (tokens * vocab_m)
    h = d["hidden"]
    out = {"batch": args.proj_batch, "seq": args.proj_seq, "measured_at": {"tokens": tokens, "seq": args.seq},
           "packed_bytes_per_expert": per_expert, "saved_bytes_per_layer_token": per_layer_token,
           "saved_bytes_per_vocab_token": per_vocab_token, "models": {}}
    for name, cfg in (("gpt-oss-20b", GPT_OSS_20B), ("gpt-oss-120b", GPT_OSS_120B)):
        counts = param_counts(cfg)
        L, E, V = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["vocab_size"]
        if h != cfg["hidden_size"]:  # --quick: scale the per-expert bytes by the matrix sizes
            per_expert_here = per_expert * (cfg["hidden_size"] / h) ** 2
        else:
            per_expert_here = per_expert
        experts_gib = per_expert_here * L * E / GIB
        rest_gib = counts["rest"] * 2 / GIB
        row = {"packed_experts_gib": experts_gib, "rest_bf16_gib": rest_gib,
               "dequantised_bf16_gib": counts["total"] * 2 / GIB}
        tok = args.proj_batch * args.proj_seq
        # activations: what the student keeps for backward, plus the teacher's logits (bf16) during the step
        act_layers, act_vocab = tok * L * per_layer_token, tok * V * (per_vocab_token + 2)
        act = act_layers + act_vocab
        row.update(activations_gib=act / GIB, activations_layers_gib=act_layers / GIB,
                   activations_logits_gib=act_vocab / GIB)
        for width in (cfg["intermediate_size"], cfg["intermediate_size"] // 4):
            shared = L * (3 * cfg["hidden_size"] * width + 2 * width + cfg["hidden_size"] + 1)
            row[f"adapter_adamw_I{width}_gib"] = shared * 16 / GIB  # fp32 weights + grads + 2 AdamW moments
            row[f"total_packed_I{width}_gib"] = experts_gib + rest_gib + shared * 16 / GIB + act / GIB
            row[f"total_dequantised_I{width}_gib"] = counts["total"] * 2 / GIB + shared * 16 / GIB + act / GIB
        out["models"][name] = row
    return out


def print_tables(results: dict) -> None:
    """The markdown tables of the README."""
    real, fp8, full, proj = (results.get(k) for k in ("real", "fp8", "full", "projection"))
    for title, part in (("Real-dimension GPT-OSS (MXFP4)", real), ("DeepSeek-V3 expert dims (FP8)", fp8)):
        if part is None:
            continue
        print(f"\n{title}: {part['dims']}\n")
        print("| variant | experts in memory | rest of the base | RSS after load | peak RSS | tokens/s | first loss |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in part["variants"].items():
            print(f"| {name} | {r['expert_bytes'] / MIB:,.0f} MiB | {r['rest_bytes'] / MIB:,.0f} MiB | "
                  f"{(r['rss_loaded_mb'] - r['rss_imports_mb']):,.0f} MiB | {r['peak_rss_mb']:,.0f} MiB | "
                  f"{r['tokens_per_s']:.1f} | {r['losses'][0]:.4f} |")
    for title, part in (("Full gpt-oss-20b layout", full), ("DeepSeek-V3 FP8 through the command line", fp8)):
        if not part or "stages" not in part:
            continue
        print(f"\n{title} ({part['disk_bytes'] / GIB:.1f} GiB on disk)\n")
        print("| stage | seconds | peak RSS |")
        print("|---|---:|---:|")
        for name, r in part["stages"].items():
            print(f"| {name} | {r['seconds']:,.0f} | {r['peak_rss_mb'] / 1024:.2f} GiB |")
    if proj:
        print(f"\nProjection, one GPU, batch {proj['batch']} x {proj['seq']} tokens, bf16\n")
        print("| model | packed experts | rest (bf16) | adapter + AdamW, I = 2880 / 720 | activations: layers + "
              "logits/loss | total packed, I = 2880 / 720 | dequantised: weights (bf16) / total, I = 2880 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in proj["models"].items():
            print(f"| {name} | {r['packed_experts_gib']:.1f} GiB | {r['rest_bf16_gib']:.1f} GiB | "
                  f"{r['adapter_adamw_I2880_gib']:.1f} / {r['adapter_adamw_I720_gib']:.1f} GiB | "
                  f"{r['activations_layers_gib']:.1f} + {r['activations_logits_gib']:.1f} GiB | "
                  f"{r['total_packed_I2880_gib']:.1f} / {r['total_packed_I720_gib']:.1f} GiB | "
                  f"{r['dequantised_bf16_gib']:.1f} / {r['total_dequantised_I2880_gib']:.1f} GiB |")


def main(argv=None) -> dict:
    p = bench_parser(__doc__.splitlines()[0], threads_help="Torch threads per child.")
    p.add_argument("--parts", default="real,fp8", help=f"Comma-separated, of {', '.join(PARTS)} (projection always).")
    p.add_argument("--layers", type=int, default=2, help="Decoder layers of the real-dimension GPT-OSS.")
    p.add_argument("--fp8-layers", type=int, default=2, help="MoE layers of the DeepSeek-V3 FP8 checkpoint.")
    p.add_argument("--fp8-experts", type=int, default=32, help="Routed experts per layer of the FP8 checkpoint.")
    p.add_argument("--fp8-pipeline", action="store_true",
                   help="Also run inspect/collect/select/convert/train on the FP8 checkpoint (as --parts full does).")
    p.add_argument("--batch", type=int, default=1, help="Rows per train step.")
    p.add_argument("--seq", type=int, default=None, help="Tokens per row (default 512; --quick 32).")
    p.add_argument("--steps", type=int, default=2, help="Timed train steps after one warm-up.")
    p.add_argument("--packed-cache-bytes", type=int, default=0,
                   help="Decoded expert bytes a packed forward may keep for its backward (0: none); when set, "
                        "the real part also measures the packed steps without it.")
    p.add_argument("--shared-size", type=int, default=None, help="Shared expert width (default: the expert width).")
    p.add_argument("--full-path", type=Path, default=None,
                   help="Where the 20B layout is, written there if absent (default: in the work directory).")
    p.add_argument("--full-tokens", type=int, default=2048, help="Tokens collect reads on the 20B layout.")
    p.add_argument("--full-train-seq", type=int, default=256, help="Tokens per train row on the 20B layout.")
    p.add_argument("--full-shared-size", type=int, default=720, help="Shared expert width on the 20B layout.")
    p.add_argument("--proj-batch", type=int, default=2, help="Projection rows per step.")
    p.add_argument("--proj-seq", type=int, default=None, help="Projection sequence length (default: --seq).")
    p.add_argument("--workdir", type=Path, default=None, help="Where checkpoints are written (default a temp dir).")
    p.add_argument("--keep", action="store_true", help="Keep the written checkpoints.")
    p.add_argument("--reproject", type=Path, default=None,
                   help="Only recompute the projection (--proj-batch) from the measurements of this results JSON.")
    args = parse_bench_args(p, argv)
    args.seq = args.seq or (32 if args.quick else 512)
    if args.reproject:
        source = json.loads(args.reproject.read_text())
        args.seq = source["args"]["seq"]
        args.proj_seq = args.proj_seq or args.seq
        results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "measured_in": args.reproject.name, "projection": projection(source.get("real"), None, args)}
        print_tables(results)
        path = write_results("packed-projection", results, args.results_dir, args)
        print(f"\nresults: {path}")
        return {**results, "path": str(path)}
    args.proj_seq = args.proj_seq or args.seq
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    env = {**thread_env(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    work = Path(tempfile.mkdtemp(prefix="nexus-bench-packed-", dir=args.workdir))
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        if "real" in parts:
            results["real"] = part_real(work, args, env)
        if "fp8" in parts:
            results["fp8"] = part_fp8(work, args, env)
        if "full" in parts:
            results["full"] = part_full(work, args, env)
        results["projection"] = projection(results.get("real"), results.get("full"), args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(results)
    name = "packed" + ("-quick" if args.quick else "") + ("-" + "-".join(parts) if parts != ["real", "fp8"] else "")
    path = write_results(name, results, args.results_dir, args)
    print(f"\nresults: {path}")
    results["path"] = str(path)
    return results


if __name__ == "__main__":
    main()

"""Benchmark 4: one distillation train step, three layouts, same model and batch.

- ``nexus``: NEXUS self-distillation. One copy of the base; the teacher is the same model
  with its shared experts disabled (``disable_shared_experts``).
- ``two_model``: the original NEXUS layout. A second, separate copy of the base is the teacher.
- ``lora``: PEFT LoRA on the fused expert weights (``target_parameters``) at (about) the same
  trainable parameter count, self-distilled the same way (teacher = ``disable_adapter()``).

Every variant runs the same loss (CE + KL to the base teacher, through
``nexus.training.train_step.distill_losses``) and AdamW over its trainable parameters, in its own
subprocess; memory is the peak RSS (``VmHWM``) minus the RSS before the model was
loaded (and, separately, the RSS after setup: weights + optimizer, before any activation).
Throughput is tokens per second of the median step; variants run interleaved ``--repeats``
times and the fastest run of each is kept, so that other load on the machine counts less. Ratios are printed
and the results written to ``<results-dir>/train_step-<timestamp>.json``.

    python benchmarks/bench_train_step.py            # hidden 512, 8 experts, 4 layers
    python benchmarks/bench_train_step.py --quick    # tiny, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_parser, parse_bench_args, peak_rss_mb, rss_mb, write_results  # noqa: E402

VARIANTS = ("nexus", "two_model", "lora")
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def model_config(quick: bool):
    """The benchmark's GPT-OSS config: H=I=512, 8 experts top-2, 4 layers (``quick``: H=I=64, 2 layers)."""
    from transformers import GptOssConfig

    h, layers, vocab = (64, 2, 256) if quick else (512, 4, 4096)
    return GptOssConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=h, num_hidden_layers=layers, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, head_dim=h // 8, sliding_window=128,
        max_position_embeddings=2048, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def lora_rank(nexus_params: int, layers: int, experts: int, hidden: int, inter: int) -> int:
    """The LoRA rank whose trainable count ``r*E*(2H+3I)`` per layer is nearest ``nexus_params``."""
    per_rank = layers * experts * ((hidden + 2 * inter) + (inter + hidden))
    return max(1, round(nexus_params / per_rank))


class _LoraTeacher:
    """The LoRA model with its adapter disabled, under no_grad: the base, as NEXUS's self teacher."""

    kind = "lora_self"

    def __init__(self, model):
        self.model = model

    def outputs(self, batch, device, want_routers=False):
        from nexus.training.teachers import TeacherOutput

        with self.model.disable_adapter(), __import__("torch").no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return TeacherOutput(logits=logits)


def run_variant(variant: str, model_dir: str, batch_size: int, seq_len: int, steps: int, lora_r: int | None,
                threads: int = 1) -> dict:
    """Set up one layout, run 1 warm-up + ``steps`` timed optimizer steps on ``threads`` torch threads;
    return its measurements."""
    import torch

    from nexus.training.teachers import ModelTeacher, SelfTeacher
    from nexus.training.train_step import distill_losses
    from nexus.family import resolve_family
    from nexus.loading import load_model
    from nexus.shared_expert import attach_shared_experts, freeze_base

    import peft  # noqa: F401 - imported by every variant, so that imports are outside the measured memory
    import transformers.models.gpt_oss.modeling_gpt_oss  # noqa: F401

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    rss0 = rss_mb()
    # Dequantised experts for every variant: LoRA on the experts needs them as float parameters,
    # and the variants stay comparable (bench_packed.py measures the packed path).
    model = load_model(model_dir, dequantize=True)
    family = resolve_family(model.config)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        student = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=[], target_parameters=EXPERT_TARGETS))
        student.eval()
        teacher = _LoraTeacher(student)
    else:
        blocks = attach_shared_experts(model, family, gate_mode="scalar")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "nexus_shared" in n:
                    p.normal_(0, 0.02)
        freeze_base(model)
        student = model
        if variant == "nexus":
            teacher = SelfTeacher(model, family, blocks)
        else:
            copy = load_model(model_dir, dequantize=True)
            copy.requires_grad_(False)
            teacher = ModelTeacher(copy)
    params = [p for p in student.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "empty": False}
    rss_setup = rss_mb()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        parts = distill_losses(student, batch, teacher, "cpu", kd=True, temperature=1.0)
        n = parts.n_pred.clamp_min(1)
        ((parts.ce + parts.kd) / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    return {
        "variant": variant,
        "trainable_parameters": trainable,
        "base_parameters": sum(p.numel() for n, p in model.named_parameters() if "nexus_shared" not in n and "lora_" not in n),
        "lora_rank": lora_r if variant == "lora" else None,
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times),
        "rss_before_model_mb": rss0,
        "rss_after_setup_mb": rss_setup,
        "peak_rss_mb": peak_rss_mb(),
        "peak_over_baseline_mb": peak_rss_mb() - rss0,
        "setup_over_baseline_mb": rss_setup - rss0,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every variant ``--repeats`` times, print the ratios, write the results; return them."""
    ap = bench_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 4, quick 2)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved; the fastest is kept")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--lora-r", type=int, help=argparse.SUPPRESS)
    args = parse_bench_args(ap, argv)
    for flag in ("steps", "batch_size", "seq_len", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give 1 or more")
    steps = args.steps or (2 if args.quick else 4)
    batch_size = args.batch_size or (2 if args.quick else 4)
    seq_len = args.seq_len or (32 if args.quick else 256)
    if args.variant:  # child process: one variant, JSON on the last stdout line
        print(json.dumps(run_variant(args.variant, args.model_dir, batch_size, seq_len, steps, args.lora_r, args.threads)))
        return {}

    from nexus.demo import build_checkpoint
    from nexus.family import resolve_family

    config = model_config(args.quick)
    h, i, e, layers = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_hidden_layers
    nexus_params = layers * (3 * h * i + 2 * i + h + 1)  # SwiGLU with biases + scalar gate, at I_shared = I
    r = lora_rank(nexus_params, layers, e, h, i)
    results = {"device": "cpu", "threads": args.threads, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
               "repeats": args.repeats, "load_average_at_start": os.getloadavg(),
               "config": {"hidden": h, "intermediate": i, "experts": e, "top_k": config.num_experts_per_tok,
                          "layers": layers, "vocab": config.vocab_size},
               "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # The released GPT-OSS format (MXFP4 experts): loading dequantises into memory, so the
        # weights count in RSS from the start (a float checkpoint would be mmapped and paged in lazily).
        build_checkpoint(resolve_family(name="gpt_oss"), tmp, config, seed=0)
        # Variants interleaved, each run `repeats` times; the fastest run (median step) of each is kept,
        # which filters out slowdowns caused by other load on the machine.
        for rep in range(args.repeats):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", tmp, "--lora-r", str(r),
                       "--steps", str(steps), "--batch-size", str(batch_size), "--seq-len", str(seq_len),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                if proc.returncode != 0:
                    raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["repeat"] = rep
                best = results["variants"].get(variant)
                runs = (best or {}).get("all_runs_tokens_per_s", []) + [res["tokens_per_s"]]
                if best is None or res["tokens_per_s"] > best["tokens_per_s"]:
                    best = res
                best["all_runs_tokens_per_s"] = runs
                results["variants"][variant] = best
                print(f"{variant:>10} #{rep}: {res['tokens_per_s']:8.1f} tokens/s, peak +{res['peak_over_baseline_mb']:7.1f} MB "
                      f"(weights+optimizer +{res['setup_over_baseline_mb']:6.1f} MB), "
                      f"{res['trainable_parameters']:,} trainable of {res['base_parameters']:,}", flush=True)
    v = results["variants"]
    results["ratios"] = {
        "two_model_over_nexus_memory": v["two_model"]["peak_over_baseline_mb"] / v["nexus"]["peak_over_baseline_mb"],
        "lora_over_nexus_memory": v["lora"]["peak_over_baseline_mb"] / v["nexus"]["peak_over_baseline_mb"],
        "nexus_over_two_model_speed": v["nexus"]["tokens_per_s"] / v["two_model"]["tokens_per_s"],
        "nexus_over_lora_speed": v["nexus"]["tokens_per_s"] / v["lora"]["tokens_per_s"],
        "two_model_over_nexus_setup_memory": v["two_model"]["setup_over_baseline_mb"] / v["nexus"]["setup_over_baseline_mb"],
        "lora_over_nexus_trainable": v["lora"]["trainable_parameters"] / v["nexus"]["trainable_parameters"],
    }
    results["base_weights_mb_fp32"] = v["nexus"]["base_parameters"] * 4 / 2**20
    results["load_average_at_end"] = os.getloadavg()
    for k, val in results["ratios"].items():
        print(f"{k:>30}: {val:.3f}")
    out = write_results("train_step" + ("-quick" if args.quick else ""), results, args.results_dir, args)
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()

"""Benchmark: routed experts resident on the GPU vs kept in host memory and streamed per layer
(``--experts-on host``), on one CUDA device.

A random GPT-OSS checkpoint with the real expert dimensions (H = I = 2880, 32 experts, top-4,
``--layers`` decoder layers, vocabulary 8192) written by :mod:`benchmarks.layouts`. For each
variant (resident, host), in bf16 with a shared expert per layer (fp32, under bf16 autocast, as
``nexus train --bf16``), one train-like step: the self-teacher's forward (no grad, adapter off),
the student's forward, a KL loss and backward; with and without gradient checkpointing.
Reported: GPU memory held after loading, peak GPU memory of a step, step seconds (median of
``--steps`` after a warm-up step), the ledger's peak layers and fetches, and whether the
student's logits and the shared experts' gradients are bit-identical to the resident variant's.

    python benchmarks/bench_streaming.py                 # 8 layers (~3.4 GB of packed experts)
    python benchmarks/bench_streaming.py --quick         # 2 layers, a smoke run
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_parser, parse_bench_args, write_results  # noqa: E402

GIB = 2**30


def _step(model, ids, torch, disable_shared_experts):
    """Teacher forward (no grad, adapter off), student forward, KL, backward: the student's logits."""
    import torch.nn.functional as F

    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad(), disable_shared_experts(model):
            teacher = model(ids).logits.float()
        student = model(ids).logits.float()
    loss = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    loss.backward()
    return student.detach()


def measure(path: Path, experts_on: str, checkpointing: bool, args) -> dict:
    """Load, run ``args.steps + 1`` steps, report memory and time (first step's outputs on the CPU)."""
    import torch

    from nexus.family import resolve_family
    from nexus.loading import load_model
    from nexus.shared_expert import attach_shared_experts, disable_shared_experts, is_shared_parameter
    from nexus.training.run_inputs import enable_checkpointing

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(path, dtype=torch.bfloat16, device="cuda", experts_on=experts_on)
    family = resolve_family(model.config)
    torch.manual_seed(0)
    attach_shared_experts(model, family, 256, "scalar")
    for name, p in model.named_parameters():
        p.requires_grad_(is_shared_parameter(name))
        if is_shared_parameter(name):
            p.data = p.data.float()
    if checkpointing:
        enable_checkpointing(model)
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated() - base
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.cuda()
    logits = _step(model, ids, torch, disable_shared_experts).cpu()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    streamer = getattr(model, "_nexus_streamer", None)
    if streamer is not None:
        streamer.ledger.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        _step(model, ids, torch, disable_shared_experts)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = {"experts_on": experts_on, "checkpointing": checkpointing, "loaded_gib": loaded / GIB,
           "peak_step_gib": (torch.cuda.max_memory_allocated() - base) / GIB, "step_s": statistics.median(times),
           "tokens_per_s": args.batch * args.seq / statistics.median(times)}
    if streamer is not None:
        out.update(peak_layers=streamer.ledger.peak_layers, host_gib=streamer.host_bytes() / GIB,
                   peak_device_expert_gib=streamer.ledger.peak_bytes / GIB,
                   fetches_per_step={k: {str(i): n / args.steps for i, n in sorted(c.items())}
                                     for k, c in streamer.ledger.fetches.items()})
    del model
    torch.cuda.empty_cache()
    return out, logits, grads


def main(argv=None) -> dict:
    p = bench_parser(__doc__.splitlines()[0], threads=None)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint (default: a temporary one).")
    args = parse_bench_args(p, argv)
    if args.quick:
        args.layers, args.seq, args.steps = 2, 256, 1
    import torch

    from benchmarks.layouts import gpt_oss_config, write_gpt_oss

    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = Path(tmp) / "gpt_oss"
        start = time.perf_counter()
        written = write_gpt_oss(path, gpt_oss_config(layers=args.layers, vocab=8192))
        print(f"checkpoint: {written['expert_bytes'] / GIB:.2f} GiB of packed experts, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for checkpointing in (False, True):
            ref = None
            for experts_on in ("device", "host"):
                row, logits, grads = measure(path, experts_on, checkpointing, args)
                if ref is None:
                    ref = logits, grads
                else:
                    row["identical_to_resident"] = bool(torch.equal(logits, ref[0]) and grads.keys() == ref[1].keys()
                                                        and all(torch.equal(grads[k], ref[1][k]) for k in grads))
                rows.append(row)
                print(row, flush=True)
    figures = {"config": {"layers": args.layers, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                          "gpu": torch.cuda.get_device_name()}, "rows": rows}
    write_results("streaming", figures, args.results_dir, args)
    return figures


if __name__ == "__main__":
    main()

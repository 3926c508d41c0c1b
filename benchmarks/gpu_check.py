"""The GPU check: one command that measures, on one CUDA device, what the CPU cannot tell.

Three parts, each on a random GPT-OSS checkpoint with the real dimensions (H = I = 2880, 32
experts, top-4, MXFP4 experts, the real 201,088-entry vocabulary) and ``--layers`` decoder layers,
written by :mod:`benchmarks.layouts`; bf16 base, fp32 shared experts under bf16 autocast, as
``nexus train --bf16``:

1. ``packed``: forward + backward of the experts kept packed vs the dequantised model
   (``load_model(dequantize=True)``): step seconds and ``torch.cuda.max_memory_allocated``.
2. ``train``: one train step (the self-teacher's forward with the adapter off, the student's
   forward, chunked CE + KL, backward, AdamW) under each memory option: experts resident or in
   host memory (``--experts-on host``), with and without gradient checkpointing, and the
   full-logit loss of before for comparison; peak memory, step seconds, tokens/s.
3. ``losses``: the chunked vocabulary losses vs the full-logit reference at GPT-OSS's vocabulary
   (loss, input-gradient agreement, peak memory, seconds). No fused kernel is installed: the
   torch path is what runs.

Results go to ``<results-dir>/gpu_check-<timestamp>.json``. Without CUDA, ``--quick`` runs every
part at tiny sizes on the CPU (memory figures 0), which the tests do so the script never rots::

    python benchmarks/gpu_check.py                      # on a CUDA machine, a few minutes
    python benchmarks/gpu_check.py --quick              # a smoke run, CPU or GPU

On a machine whose transformers differs from the project's pin and that cannot download, bring
the pinned wheels (``pip download --no-deps -d .whl transformers==5.23.0``; ``pip wheel --no-deps
-w .whl .`` for nexus and its entry points) and put them first on the path::

    pip install --no-deps .whl/nexus_moe-*.whl
    python -m zipfile -e .whl/transformers-5.23.0-py3-none-any.whl /tmp/tf
    PYTHONPATH=/tmp/tf:$PWD python benchmarks/gpu_check.py

(a transformers wheel cannot be imported as a zip, and ``pip install`` of it into a read-only
environment's site-packages may leave the older copy first on the path).
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


class Device:
    """The compute device and its memory counters (zeros on the CPU)."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda
        self.name = "cuda" if cuda else "cpu"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> int:
        """Empty the cache, reset the peak and return the bytes allocated now."""
        self.sync()
        if not self.cuda:
            return 0
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def peak(self, base: int) -> float:
        """GiB allocated at the peak since :meth:`reset`, above ``base``."""
        self.sync()
        return (self.torch.cuda.max_memory_allocated() - base) / GIB if self.cuda else 0.0

    def held(self, base: int) -> float:
        return (self.torch.cuda.memory_allocated() - base) / GIB if self.cuda else 0.0


def _timed(dev: Device, fn, steps: int) -> tuple[float, object]:
    """Median seconds of ``steps`` calls of ``fn`` after a warm-up call; the warm-up's result."""
    first = fn()
    times = []
    for _ in range(steps):
        dev.sync()
        start = time.perf_counter()
        fn()
        dev.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def _load(path: Path, dev: Device, **kwargs):
    import torch

    from nexus.family import resolve_family
    from nexus.loading import load_model
    from nexus.shared_expert import attach_shared_experts, is_shared_parameter

    model = load_model(path, dtype=torch.bfloat16, device=dev.name, **kwargs)
    torch.manual_seed(0)
    attach_shared_experts(model, resolve_family(model.config), 720)
    for name, p in model.named_parameters():
        p.requires_grad_(is_shared_parameter(name))
        if is_shared_parameter(name):
            p.data = p.data.float()
    return model


def part_packed(path: Path, dev: Device, ids, steps: int) -> list[dict]:
    """Forward + backward (a sum of the final hidden states) packed vs dequantised."""
    import torch

    rows = []
    for dequantize in (False, True):
        base = dev.reset()
        model = _load(path, dev, dequantize=dequantize)
        loaded = dev.held(base)
        dev.reset()

        def step():
            with torch.autocast(dev.name, dtype=torch.bfloat16):
                out = model.model(input_ids=ids).last_hidden_state
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        seconds, _ = _timed(dev, step, steps)
        rows.append({"experts": "dequantised" if dequantize else "packed", "loaded_gib": loaded,
                     "peak_step_gib": dev.peak(base), "step_s": seconds, "tokens_per_s": ids.numel() / seconds})
        print(rows[-1], flush=True)
        del model
    return rows


def _train_step(model, ids, optimizer, full_logits: bool, dev: Device):
    """The self-distillation step of ``nexus train``: teacher (adapter off), student, CE + KL, AdamW."""
    import torch

    from nexus import chunked_losses, losses
    from nexus.shared_expert import disable_shared_experts

    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)
    mask = labels != -100
    with torch.autocast(dev.name, dtype=torch.bfloat16):
        with torch.no_grad(), disable_shared_experts(model):
            teacher = chunked_losses.forward_hidden(model, input_ids=ids)
        student = chunked_losses.forward_hidden(model, input_ids=ids)
    h, th = student.states.reshape(-1, student.states.shape[-1]), teacher.states.reshape(-1, teacher.states.shape[-1])
    if full_logits:
        logits = student.head.logits(h)
        with torch.no_grad():
            t_logits = teacher.head.logits(th)
        ce, kd = losses.cross_entropy_sum(logits, labels)[0], losses.kl_div_sum(t_logits, logits, mask, 1.0)
    else:
        ce, _, kd = chunked_losses.ce_and_kl_sums(h, student.head, labels, teacher=(th, teacher.head))
    ((ce + kd) / mask.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def part_train(path: Path, dev: Device, ids, steps: int) -> list[dict]:
    """One train step per memory option."""
    import torch

    from nexus.training.run_inputs import enable_checkpointing

    options = [("device", False, True), ("device", False, False), ("device", True, False), ("host", False, False),
               ("host", True, False)]
    rows = []
    for experts_on, checkpointing, full_logits in options:
        base = dev.reset()
        model = _load(path, dev, experts_on=experts_on)
        if checkpointing:
            enable_checkpointing(model)
        loaded = dev.held(base)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        seconds, _ = _timed(dev, lambda: _train_step(model, ids, optimizer, full_logits, dev), steps)
        row = {"experts_on": experts_on, "gradient_checkpointing": checkpointing,
               "loss": "full logits" if full_logits else "chunked", "loaded_gib": loaded,
               "peak_step_gib": dev.peak(base), "step_s": seconds, "tokens_per_s": ids.numel() / seconds}
        streamer = getattr(model, "_nexus_streamer", None)
        if streamer is not None:
            row.update(peak_layers_on_device=streamer.ledger.peak_layers,
                       peak_device_expert_gib=streamer.ledger.peak_bytes / GIB)
        rows.append(row)
        print(row, flush=True)
        del model, optimizer
    return rows


def part_losses(dev: Device, tokens: int, vocab: int, hidden: int) -> dict:
    """Chunked CE + KL vs the full-logit reference: agreement, peak memory, seconds."""
    import torch

    from nexus import chunked_losses, losses

    g = torch.Generator(device=dev.name).manual_seed(0)
    w = (torch.randn(vocab, hidden, generator=g, device=dev.name) * 0.02).to(torch.bfloat16)
    h0 = torch.randn(tokens, hidden, generator=g, device=dev.name).to(torch.bfloat16)
    th = torch.randn(tokens, hidden, generator=g, device=dev.name).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=dev.name)
    labels[::7] = -100
    mask = labels != -100
    head = chunked_losses.OutputHead(w)
    out = {}
    for mode in ("full", "chunked"):
        h = h0.clone().requires_grad_(True)
        base = dev.reset()
        start = time.perf_counter()
        if mode == "full":
            logits = head.logits(h)
            loss = losses.cross_entropy_sum(logits, labels)[0] + losses.kl_div_sum(head.logits(th), logits, mask, 2.0)
        else:
            ce, _, kd = chunked_losses.ce_and_kl_sums(h, head, labels, teacher=(th, head), temperature=2.0)
            loss = ce + kd
        loss.backward()
        dev.sync()
        out[mode] = {"loss": float(loss.detach()), "peak_gib": dev.peak(base), "seconds": time.perf_counter() - start,
                     "grad": h.grad.float()}
    ref = out["full"].pop("grad")
    grad = out["chunked"].pop("grad")
    out["chunked"]["loss_rel_diff"] = abs(out["chunked"]["loss"] - out["full"]["loss"]) / abs(out["full"]["loss"])
    out["chunked"]["grad_rel_diff"] = float((grad - ref).abs().max() / ref.abs().max())
    out.update(tokens=tokens, vocab=vocab, hidden=hidden, chunk_tokens=chunked_losses.chunk_tokens(vocab),
               fused_kernel="none installed: the torch path")
    print(out, flush=True)
    return out


def main(argv=None) -> dict:
    p = bench_parser(__doc__.splitlines()[0], threads=None)
    p.add_argument("--layers", type=int, default=4, help="Decoder layers of the checkpoint (default 4).")
    p.add_argument("--seq", type=int, default=1024, help="Tokens per step, one row (default 1024).")
    p.add_argument("--steps", type=int, default=2, help="Timed steps after a warm-up (default 2).")
    p.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint (default: a temporary one).")
    args = parse_bench_args(p, argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        p.error("the GPU check needs a CUDA device; --quick runs it at tiny sizes on the CPU")
    from benchmarks.layouts import gpt_oss_config, write_gpt_oss

    if args.quick:
        config = gpt_oss_config(layers=2, experts=4, vocab=512, hidden=64, heads=4, kv_heads=2, head_dim=16, top_k=2)
        args.seq, args.steps, loss_sizes = 32, 1, (64, 512, 64)
    else:
        config = gpt_oss_config(layers=args.layers)
        loss_sizes = (4096, config["vocab_size"], config["hidden_size"])
    dev = Device(torch, cuda)
    figures = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
               "config": {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
                          "experts": config["num_local_experts"], "vocab": config["vocab_size"], "seq": args.seq,
                          "steps": args.steps, "shared_intermediate_size": 720}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = Path(tmp) / "gpt_oss"
        start = time.perf_counter()
        written = write_gpt_oss(path, config)
        figures["checkpoint"] = {"expert_gib": written["expert_bytes"] / GIB, "gib": written["bytes"] / GIB,
                                 "write_s": time.perf_counter() - start}
        print(figures["checkpoint"], flush=True)
        ids = torch.randint(3, min(config["vocab_size"], 200_000), (1, args.seq),
                            generator=torch.Generator().manual_seed(0)).to(dev.name)
        figures["packed"] = part_packed(path, dev, ids, args.steps)
        figures["train"] = part_train(path, dev, ids, args.steps)
    figures["losses"] = part_losses(dev, *loss_sizes)
    write_results("gpu_check", figures, args.results_dir, args)
    return figures


if __name__ == "__main__":
    main()

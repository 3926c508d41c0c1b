"""Benchmark 7: the peak memory of a train step at real layouts, beside ``nexus plan``'s prediction.

A random GPT-OSS checkpoint with gpt-oss-20b's dimensions (H = I = 2880, 32 experts, top-4, MXFP4
experts, the real 201,088-entry vocabulary) and ``--layers`` decoder layers (24: the full 20B
layout, ~13 GB on disk) is written by :mod:`benchmarks.layouts`, with a width-720 adapter. Each
configuration runs one optimizer step of the real ``nexus train`` engine (``--bf16``, self
teacher, 1 x ``--seq`` tokens, chunked vocabulary losses) in a child process of its own
(:func:`benchmarks.common.run_child`), so each peak is that configuration's alone:

- chunked losses (the default), with and without gradient checkpointing;
- + ``--experts-on host``;
- + ``--optim adamw8bit`` and + ``--embeddings-on host`` where this version of ``nexus train`` has
  them (a configuration whose option is missing is reported as not run).

Measured: on a CUDA device ``torch.cuda.max_memory_allocated``; on a CPU the process's peak
anonymous memory (``RssAnon`` of ``/proc/self/status`` sampled every few milliseconds; the
safetensors files mapped while loading are file-backed pages, reported apart as ``RssFile``),
beside :func:`nexus.plan.plan` for the same options (on a CPU its device and host totals are the
same memory; the weights it maps from the checkpoint are compared with ``RssFile`` apart). The
planner's figures for gpt-oss-120b, Qwen3-30B-A3B (bf16 and FP8) and DeepSeek-V3 are added from
their configs alone (no weights). On a CPU ``--experts-on host`` and ``--embeddings-on host`` move
nothing, so those configurations are not measured apart there (the plan's CUDA figures are given).

    python benchmarks/bench_memory.py                 # 2 layers, 1 x 1024 tokens (CPU: ~10 minutes)
    python benchmarks/bench_memory.py --layers 24     # the full gpt-oss-20b layout
    python benchmarks/bench_memory.py --quick         # a tiny layout, a smoke run
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_parser, parse_bench_args, run_child, thread_env, write_results  # noqa: E402

GIB = 2**30
WIDTH = 720

# name -> the nexus train options it sets (beyond --bf16, batch 1, --seq tokens, self teacher).
CONFIGURATIONS = {
    "chunked": {},
    "chunked+checkpointing": {"gradient_checkpointing": True},
    "adamw8bit": {"optim": "adamw8bit"},
    "experts-host": {"experts_on": "host"},
    "experts-host+checkpointing": {"experts_on": "host", "gradient_checkpointing": True},
    "experts-host+embeddings-host": {"experts_on": "host", "embeddings_on": "host"},
    "experts-host+embeddings-host+checkpointing": {"experts_on": "host", "embeddings_on": "host",
                                                   "gradient_checkpointing": True},
}

# Released configs for the planner alone (fields transformers reads; no weights are written).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Qwen/Qwen3-30B-A3B-FP8: the same model, every linear layer block-scaled FP8 (128 x 128).
QWEN3_30B_A3B_FP8 = {**QWEN3_30B_A3B, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                             "quant_method": "fp8", "weight_block_size": [128, 128]}}


def available_options() -> set[str]:
    """The ``nexus train`` options (TrainConfig fields) this version has."""
    import dataclasses

    from nexus.training.train_config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


class AnonPeak:
    """The process's peak ``RssAnon`` and ``RssFile`` (bytes), sampled by a thread every ``interval`` s."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.anon, self.file = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        """``RssAnon``, ``RssFile``, ``VmHWM`` of ``/proc/self/status`` now, in bytes."""
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            now = self.read()
            self.anon, self.file = max(self.anon, now["RssAnon"]), max(self.file, now["RssFile"])
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        now = self.read()
        self.anon, self.file = max(self.anon, now["RssAnon"]), max(self.file, now["RssFile"])


def baseline_child() -> dict:
    """Anonymous memory of a process that imported torch, transformers and the engine, before any model."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import nexus.engines.train  # noqa: F401

    return AnonPeak.read()


def measure_train(work: str, options: dict, seq: int) -> dict:
    """One optimizer step of ``nexus train`` with ``options``; its peak memory and component figures."""
    import torch

    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    cuda = torch.cuda.is_available()
    work = Path(work)
    out = work / "runs" / "-".join(f"{k}={v}" for k, v in sorted(options.items()) or [("plain", 1)])
    config = TrainConfig(model=str(work / "model"), adapter=str(work / "adapter"), output=str(out),
                         data=str(work / "data.jsonl"), teacher="self", bf16=True, batch_size=1, seq_len=seq,
                         max_steps=1, save_every=0, log_every=1, overwrite=True, **options)
    with AnonPeak() as peak:
        result = train(config)
    state = {t.data_ptr(): t for s in result.optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    opt_bytes = sum(t.numel() * t.element_size() for t in state.values())  # code books shared by tensors once
    return {"peak_anon": peak.anon, "peak_file": peak.file, "vmhwm": AnonPeak.read()["VmHWM"],
            "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None, "optimizer_state_bytes": opt_bytes,
            "device": "cuda" if cuda else "cpu"}


def write_inputs(work: Path, layers: int, vocab: int, hidden: int, experts: int, width: int) -> dict:
    """The checkpoint, its tokenizer, an adapter of ``width`` and the data, under ``work``."""
    from benchmarks.layouts import gpt_oss_config, write_gpt_oss, write_tokenizer
    from nexus.demo import demo_paragraphs

    config = gpt_oss_config(layers=layers, vocab=vocab, hidden=hidden, experts=experts,
                            heads=64 if hidden >= 2880 else 4, kv_heads=8 if hidden >= 2880 else 2,
                            head_dim=64 if hidden >= 2880 else 16)
    written = write_gpt_oss(work / "model", config)
    write_tokenizer(work / "model", min(8192, vocab))
    (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_paragraphs(400)))
    code = (f"from benchmarks.bench_memory import write_adapter; write_adapter({str(work)!r}, {width}); "
            f"print('{{}}')")
    run_child(code, env=thread_env(2))
    return written


def write_adapter(work: str, width: int) -> None:
    """A random adapter of ``width`` for ``work/model`` (scalar gates), saved to ``work/adapter``."""
    import torch

    from nexus.adapter import AdapterConfig, save_adapter
    from nexus.family import resolve_family
    from nexus.fingerprint import config_fingerprint
    from nexus.loading import load_model
    from nexus.shared_expert import attach_shared_experts

    model = load_model(Path(work) / "model", dtype=torch.bfloat16)
    family = resolve_family(model.config)
    torch.manual_seed(0)
    attach_shared_experts(model, family, width, "scalar")
    cfg = AdapterConfig(family=family.name, base_fingerprint=config_fingerprint(model.config),
                        shared_intermediate_size=width, gate_mode="scalar", base_model=str(Path(work) / "model"),
                        model_type=model.config.model_type)
    save_adapter(model, Path(work) / "adapter", cfg)


def predict(model: str, options: dict, seq: int, device: str, adapter: str | None = None,
            width: int = WIDTH) -> dict:
    """``nexus plan``'s figures for ``options`` (its JSON document)."""
    from nexus.plan import PlanConfig, plan

    fields = {k: v for k, v in options.items() if k in PlanConfig.__dataclass_fields__}
    cfg = PlanConfig(model=model, adapter=adapter, bf16=True, batch_size=1, seq_len=seq, device=device,
                     shared_intermediate_size=None if adapter else width, **fields)
    return plan(cfg).to_dict()


def planner_only(work: Path, seq: int) -> dict:
    """The planner's figures for layouts too large to write here: configs (and no weights) only."""
    from benchmarks.layouts import DEEPSEEK_V3, GPT_OSS_120B

    rows = {}
    for name, config, width in (("gpt-oss-120b", GPT_OSS_120B, WIDTH), ("Qwen3-30B-A3B", QWEN3_30B_A3B, 192),
                                ("Qwen3-30B-A3B-FP8", QWEN3_30B_A3B_FP8, 192), ("DeepSeek-V3", DEEPSEEK_V3, 512)):
        path = work / "configs" / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config))
        rows[name] = {}
        least = {"gradient_checkpointing": True, "optim": "adamw8bit", "embeddings_on": "host",
                 **({"experts_on": "host"} if "quantization_config" in config else {})}
        for label, options in (("chunked", {}), ("least device memory", least)):
            doc = predict(str(path), options, seq, "cuda", width=width)
            rows[name][label] = {"device_gib": doc["device_bytes"] / GIB, "host_gib": doc["host_bytes"] / GIB,
                                 "packed_gib": doc["components"]["packed experts"]["device"] / GIB
                                 + doc["components"]["packed experts"]["host"] / GIB}
        print(name, rows[name], flush=True)
    return rows


# On a CPU nothing moves between host and device: these options leave its memory as it is.
CPU_NO_OPS = ("experts_on", "embeddings_on")


def measure_configuration(name: str, options: dict, work: Path, args, have: set[str],
                          seq: int | None = None) -> dict:
    """One configuration's row (at ``seq`` tokens, default ``--seq``): its measured peak in a child
    process beside the plan's prediction."""
    seq = seq or args.seq
    missing = sorted(set(options) - have)
    if missing:
        print(f"{name}: this nexus train has no {', '.join(missing)}", flush=True)
        return {"configuration": name, "options": options, "not_run": f"this nexus train has no {', '.join(missing)}"}
    if args.device == "cpu" and set(options) & set(CPU_NO_OPS):
        same = {k: v for k, v in options.items() if k not in CPU_NO_OPS}
        doc = predict(str(work / "model"), options, seq, "cuda", adapter=str(work / "adapter"))
        return {"configuration": name, "options": options, "same_on_cpu_as": same,
                "planned_cuda_gib": doc["device_bytes"] / GIB, "planned_host_gib": doc["host_bytes"] / GIB}
    start = time.perf_counter()
    measured = run_child(f"from benchmarks.bench_memory import measure_train; import json; "
                         f"print(json.dumps(measure_train({str(work)!r}, {options!r}, {seq})))",
                         env=thread_env(args.threads))
    doc = predict(str(work / "model"), options, seq, measured["device"], adapter=str(work / "adapter"))
    if measured["device"] == "cuda":
        value, predicted = measured["cuda_peak"], doc["device_bytes"]
    else:  # anonymous memory: the weights mapped from the checkpoint are file-backed, reported apart
        value, predicted = measured["peak_anon"], doc["device_bytes"] - doc["details"]["file_backed_bytes"]
    row = {"configuration": name, "options": options, "seq": seq, "device": measured["device"],
           "measured_gib": value / GIB,
           "predicted_gib": predicted / GIB, "error": predicted / value - 1,
           "peak_file_gib": measured["peak_file"] / GIB,
           "vmhwm_minus_peak_file_gib": (measured["vmhwm"] - measured["peak_file"]) / GIB,  # a check of the sampling
           "predicted_file_gib": doc["details"]["file_backed_bytes"] / GIB, "seconds": time.perf_counter() - start,
           "optimizer_state_bytes": measured["optimizer_state_bytes"],
           "planned_optimizer_bytes": doc["components"]["optimizer state"]["device"], "plan": doc}
    print(f"{name:<44} measured {value / GIB:6.2f} GiB  predicted {predicted / GIB:6.2f} GiB "
          f"({row['error']:+.1%})", flush=True)
    return row


def gpu_reference(work: Path, seq: int) -> list[dict]:
    """The H200 peaks of the newest ``gpu_check`` results (same layout: 2 layers, 1 x 1024 tokens, width
    720, gate none) beside the plan's CUDA prediction for the same options."""
    from benchmarks.common import RESULTS

    files = sorted(RESULTS.glob("gpu_check-*.json"))
    if not files:
        return []
    doc = json.loads(files[-1].read_text())
    rows = []
    for r in doc.get("train", []):
        if r.get("loss") != "chunked" or doc["config"].get("seq") != seq:
            continue
        options = {"experts_on": r["experts_on"], "gradient_checkpointing": r["gradient_checkpointing"]}
        from nexus.plan import PlanConfig, plan

        planned = plan(PlanConfig(model=str(work / "model"), bf16=True, batch_size=1, seq_len=seq, gate_mode="none",
                                  shared_intermediate_size=doc["config"]["shared_intermediate_size"], **options))
        rows.append({"source": files[-1].name, "options": options, "measured_gib": r["peak_step_gib"],
                     "predicted_gib": planned.device_bytes / GIB,
                     "error": planned.device_bytes / GIB / r["peak_step_gib"] - 1})
        print(f"H200 {options}: measured {r['peak_step_gib']:.2f} GiB, predicted {planned.device_bytes / GIB:.2f} GiB "
              f"({rows[-1]['error']:+.1%})", flush=True)
    return rows


def main(argv=None) -> dict:
    p = bench_parser(__doc__.splitlines()[0], threads=2)
    p.add_argument("--layers", type=int, default=2, help="Decoder layers of the gpt-oss layout (24: the full 20B).")
    p.add_argument("--seq", type=int, default=1024, help="Tokens of the one row per step.")
    p.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint (default: a temporary one).")
    p.add_argument("--sweep", type=lambda v: [int(x) for x in v.split(",") if x], default=[512, 1536, 2048],
                   metavar="N,N", help="Also measure the default configuration at these sequence lengths "
                                       "(default 512,1536,2048; not with --quick).")
    p.add_argument("--keep", action="store_true", help="With --work: reuse a checkpoint already written there.")
    args = parse_bench_args(p, argv)
    dims = {"layers": args.layers, "vocab": 201088, "hidden": 2880, "experts": 32, "width": WIDTH}
    if args.quick:
        dims = {"layers": 2, "vocab": 4096, "hidden": 128, "experts": 4, "width": 32}
        args.seq = 64
    have = available_options()
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = args.work if (args.keep and args.work) else Path(tmp)
        if not (work / "adapter").exists():
            start = time.perf_counter()
            write_inputs(work, **dims)
            print(f"layout written in {time.perf_counter() - start:.0f} s", flush=True)
        baseline = run_child("from benchmarks.bench_memory import baseline_child; import json; "
                             "print(json.dumps(baseline_child()))", env=thread_env(args.threads))
        rows = []
        for name, options in CONFIGURATIONS.items():
            rows.append(measure_configuration(name, options, work, args, have))
        for seq in [] if args.quick else args.sweep:  # the attention's tokens x tokens terms grow fastest
            rows.append(measure_configuration(f"chunked, {seq} tokens", {}, work, args, have, seq))
        planned = planner_only(work, args.seq)
        reference = gpu_reference(work, args.seq) if not args.quick and args.layers == 2 else []
    figures = {"config": {**dims, "seq": args.seq, "batch": 1, "bf16": True, "teacher": "self",
                          "baseline_anon_gib": baseline["RssAnon"] / GIB},
               "rows": rows, "h200_reference": reference, "planner_only": planned}
    write_results("memory-quick" if args.quick else "memory", figures, args.results_dir, args)
    return figures


if __name__ == "__main__":
    main()

"""Benchmark 5: per-process memory of training state under each distributed engine.

The same ``nexus train`` run (GPT-OSS, H = I = 512, 8 experts, 4 layers; a full-width shared
expert per layer; KD against the base) as two processes (gloo, CPU) under DDP, FSDP2 and
DeepSpeed ZeRO-1/2. Per process it reports the bytes this process holds of

- the frozen base (FSDP2 shards it; the others replicate it),
- the trainable weights as the module holds them,
- separate fp32 master copies (DeepSpeed keeps its own partition of them),
- AdamW state (ZeRO and FSDP2 partition it),

plus the peak RSS (``VmHWM``) and tokens/s, and the ratios DDP / engine (above 1: the engine
holds less). Results go to ``benchmarks/results/engines-<timestamp>.json``.

    python benchmarks/bench_engines.py           # the model above, 8 steps
    python benchmarks/bench_engines.py --quick   # H = I = 64, 2 layers, 3 steps

The CPU run measures how state is laid out, which does not depend on the device; speed on
CPU/gloo says nothing about NCCL on GPUs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_parser, parse_bench_args, peak_rss_mb, ratio, thread_env, write_results,
)

from nexus.training.distributed import PARALLEL_STRATEGIES  # noqa: E402
MIB = 2**20


def build(work: Path, quick: bool) -> dict:
    """A GPT-OSS MXFP4 checkpoint with a tokenizer, a full-width mean-of-experts adapter and text data in ``work``."""
    from benchmarks.bench_train_step import model_config

    from nexus.demo import build_checkpoint, demo_paragraphs, train_tokenizer
    from nexus.engines.convert import ConvertConfig, convert
    from nexus.family import resolve_family

    config = model_config(quick)
    build_checkpoint(resolve_family(config), work / "base", config)  # MXFP4 experts, as released
    paras = demo_paragraphs()
    train_tokenizer(paras, config.vocab_size, config).save_pretrained(work / "base")
    convert(ConvertConfig(model=work / "base", output=work / "adapter", strategy="mean_all"),
            progress=False)
    (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in paras[:200]))
    return {"model": str(work / "base"), "adapter": str(work / "adapter"), "data": str(work / "data.jsonl")}


def measure(engine: str, config, accelerator) -> dict:
    """Train under ``engine`` and return this process's figures (MiB, peak RSS)."""
    import torch

    from nexus.training.distributed import force_strategy
    from nexus.training.sharding import is_sharded
    from nexus.engines.train import train

    force_strategy(accelerator, engine)
    result = train(config, accelerator=accelerator)

    def local_bytes(t) -> int:
        t = t.to_local() if is_sharded(t) else t
        return t.numel() * t.element_size()

    params = list(result.model.parameters())
    ids = {id(p) for p in params}
    opt = result.optimizer
    return {
        "frozen_base_mib": sum(local_bytes(p) for p in params if not p.requires_grad) / MIB,
        "trainable_weights_mib": sum(local_bytes(p) for p in params if p.requires_grad) / MIB,
        # DeepSpeed swaps its fp32 partitions into AdamW's param groups; elsewhere they are the weights.
        "master_copies_mib": sum(local_bytes(p) for g in opt.param_groups for p in g["params"] if id(p) not in ids) / MIB,
        "optimizer_state_mib": sum(local_bytes(v) for st in opt.state.values() for v in st.values()
                                   if torch.is_tensor(v) and v.dim() > 0) / MIB,
        "peak_rss_mib": peak_rss_mb(),
    }


def child(engine: str, config_path: str, out_path: str, threads: str = "1") -> None:
    """One process of a two-process run (started by ``torchrun`` on this script) with ``threads`` torch threads."""
    import torch

    from nexus.metrics_log import read_metrics
    from nexus.training.distributed import end_processes, make_accelerator
    from nexus.training.train_config import TrainConfig

    torch.set_num_threads(int(threads))
    config = TrainConfig(**json.loads(Path(config_path).read_text()))
    accelerator = make_accelerator()
    figures = measure(engine, config, accelerator)  # the trained model and optimizer are gone after this
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, figures)
    if accelerator.is_main_process:
        rates = [r["tokens_per_s"] for r in read_metrics(config.output)[1:]]  # the first step pays warm-up
        Path(out_path).write_text(json.dumps({"per_process": gathered, "tokens_per_s": statistics.median(rates)}))
    end_processes(accelerator)


def run_engine(engine: str, paths: dict, work: Path, steps: int, seq_len: int, threads: int, timeout: float) -> dict:
    """Train ``steps`` steps as two processes of ``threads`` threads under ``engine``; rank 0's figures and the
    mean over processes."""
    settings = dict(paths, output=str(work / f"run-{engine}"), seq_len=seq_len, batch_size=2, max_steps=steps,
                    lr=1e-3, log_every=1, save_every=0, seed=0)
    cfg, out = work / f"{engine}.json", work / f"{engine}-out.json"
    cfg.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--child", engine, str(cfg), str(out), str(threads)]
    env = {**os.environ, **thread_env(threads), "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONFAULTHANDLER": "1"}  # an aborting child prints its Python stacks
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if "it/s]" not in x]  # progress bars say nothing here
        raise RuntimeError(f"{engine} run failed:\n" + "\n".join(lines)[-6000:])
    res = json.loads(out.read_text())
    keys = res["per_process"][0].keys()
    res["mean"] = {k: statistics.mean(p[k] for p in res["per_process"]) for k in keys}
    return res


def main(argv: list[str] | None = None) -> dict:
    """Run every engine, print the per-process figures and ratios, write the results; return them."""
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default 8; --quick 3).")
    p.add_argument("--engines", default=",".join(PARALLEL_STRATEGIES), help=f"Comma-separated subset of {','.join(PARALLEL_STRATEGIES)}.")
    args = parse_bench_args(p, argv)
    steps = args.steps or (3 if args.quick else 8)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in PARALLEL_STRATEGIES]
    if unknown:
        p.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(PARALLEL_STRATEGIES)}")
    if "ddp" not in engines:
        engines.insert(0, "ddp")  # the baseline every ratio is against
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = build(work, args.quick)
        results = {e: run_engine(e, paths, work, steps, 32 if args.quick else 128, args.threads, timeout=1800) for e in engines}
    base = results["ddp"]["mean"]
    print(f"{'engine':<7} {'base':>9} {'weights':>9} {'masters':>9} {'AdamW':>9} {'peak RSS':>9} {'tok/s':>8}   (MiB per process)")
    for e, r in results.items():
        m = r["mean"]
        print(f"{e:<7} {m['frozen_base_mib']:9.2f} {m['trainable_weights_mib']:9.2f} {m['master_copies_mib']:9.2f} "
              f"{m['optimizer_state_mib']:9.2f} {m['peak_rss_mib']:9.0f} {r['tokens_per_s']:8.0f}")
    ratios = {}
    for e, r in results.items():
        if e == "ddp":
            continue
        m = r["mean"]
        state = lambda x: x["trainable_weights_mib"] + x["master_copies_mib"] + x["optimizer_state_mib"]  # noqa: E731
        ratios[e] = {
            "frozen_base_ddp_over_engine": ratio(base["frozen_base_mib"], m["frozen_base_mib"]),
            "optimizer_state_ddp_over_engine": ratio(base["optimizer_state_mib"], m["optimizer_state_mib"]),
            "trainable_state_ddp_over_engine": ratio(state(base), state(m)),
            "peak_rss_ddp_over_engine": ratio(base["peak_rss_mib"], m["peak_rss_mib"]),
            "tokens_per_s_engine_over_ddp": ratio(r["tokens_per_s"], results["ddp"]["tokens_per_s"]),
        }
        print(f"{e}: DDP/engine  base {ratios[e]['frozen_base_ddp_over_engine']:.2f}x, AdamW state "
              f"{ratios[e]['optimizer_state_ddp_over_engine']:.2f}x, weights+masters+AdamW "
              f"{ratios[e]['trainable_state_ddp_over_engine']:.2f}x, peak RSS {ratios[e]['peak_rss_ddp_over_engine']:.2f}x; "
              f"tokens/s engine/DDP {ratios[e]['tokens_per_s_engine_over_ddp']:.2f}x")
    payload = {"steps": steps, "engines": engines, "results": results, "ratios": ratios}
    path = write_results("engines", payload, args.results_dir, args)
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()

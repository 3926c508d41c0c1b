"""Router statistics: NEXUS's streaming moments vs storing [N, L, E] probabilities + sklearn PCA.

The original NEXUS keeps every token's router probabilities (``[N, L, E]``) and runs sklearn's
PCA per layer; NEXUS accumulates float64 sums (count, sum p, sum p p^T, top-k counts/weights)
and takes the PCA from the covariance. Both run here on the same **synthetic router logits**
(a low-rank Gaussian model, streamed in seeded chunks): the benchmark is about the statistics
math and its memory, not about a model's forward pass, which costs the same either way. Each
method runs in its own process; peak memory is its peak RSS (``VmHWM``) above its peak right
after imports. The selections (top-K by the same importance rule, diversity 0) are compared.

    python benchmarks/bench_router_stats.py [--quick] [--layers 24] [--experts 32] [--top-k 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_parser, parse_bench_args, print_ratio, run_child, thread_env, write_results,
)

# The synthetic logits, identical in both children: chunk c of layer l is z @ W_l + b_l with
# z ~ N(0, 1)[chunk, 8] seeded by (c, l); W_l, b_l seeded by l.
COMMON = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
N, L, E, K, CHUNK = {n}, {layers}, {experts}, {top_k}, 8192

from benchmarks.common import peak_rss_mb as rss

def layer_params(l):
    g = torch.Generator().manual_seed(1000 + l)
    return torch.randn(8, E, generator=g) * torch.linspace(0.3, 2.0, E), torch.randn(E, generator=g)

PARAMS = [layer_params(l) for l in range(L)]

def chunks():
    for c, start in enumerate(range(0, N, CHUNK)):
        rows = min(CHUNK, N - start)
        out = []
        for l in range(L):
            g = torch.Generator().manual_seed(c * 7919 + l)
            w, b = PARAMS[l]
            out.append(torch.softmax(torch.randn(rows, 8, generator=g) @ w + b, -1))
        yield start, rows, out
"""

STREAM = COMMON + r"""
from nexus.router_stats import LayerStats, RouterStats
from nexus.engines.select import select_experts
base = rss()
t0 = time.perf_counter()
stats = RouterStats({{l: LayerStats.zeros(l, E, 4, "softmax") for l in range(L)}}, {{}})
for start, rows, probs in chunks():
    for l, p in enumerate(probs):
        stats.layers[l].update(p)
t1 = time.perf_counter()
doc = select_experts(stats, top_k=K, diversity=0.0)
t2 = time.perf_counter()
print(json.dumps({{"peak_mb": rss() - base, "accumulate_s": t1 - t0, "select_s": t2 - t1,
                   "picks": [x["experts"] for x in doc["layers"]], "importance": [x["importance"] for x in doc["layers"]],
                   "state_bytes": sum(t.numel() * t.element_size() for t in stats.state_dict().values())}}))
"""

STORE_ALL = COMMON + r"""
from sklearn.decomposition import PCA
base = rss()
t0 = time.perf_counter()
store = np.empty((N, L, E), dtype=np.float32)
for start, rows, probs in chunks():
    for l, p in enumerate(probs):
        store[start:start + rows, l] = p.numpy()
t1 = time.perf_counter()
picks, importance = [], []
for l in range(L):
    pca = PCA(n_components=E, svd_solver="full").fit(store[:, l].astype(np.float64))
    imp = (np.abs(pca.components_) * pca.explained_variance_ratio_[:, None]).sum(0)
    picks.append(np.argsort(-imp, kind="stable")[:K].tolist())
    importance.append(imp.tolist())
t2 = time.perf_counter()
print(json.dumps({{"peak_mb": rss() - base, "accumulate_s": t1 - t0, "select_s": t2 - t1, "picks": picks,
                   "importance": importance, "state_bytes": store.nbytes}}))
"""


def main(argv: list[str] | None = None) -> None:
    """Run the comparison for each N, print the ratios and write the results (``argv``: the flags)."""
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="MoE layers L (default 24, gpt-oss-20b; --quick 4).")
    p.add_argument("--experts", type=int, default=None, help="Experts E (default 32; --quick 16).")
    p.add_argument("--top-k", type=int, default=8, help="Experts picked per layer.")
    p.add_argument("--tokens", type=str, default=None, help="Comma-separated N (default 10000,100000,1000000).")
    args = parse_bench_args(p, argv)
    try:
        sizes = [int(x) for x in args.tokens.split(",")] if args.tokens else None
    except ValueError:
        p.error(f"--tokens {args.tokens!r}: give comma-separated integers, e.g. 10000,100000")

    layers = args.layers or (4 if args.quick else 24)
    experts = args.experts or (16 if args.quick else 32)
    sizes = sizes or ([2000, 20000] if args.quick else [10_000, 100_000, 1_000_000])
    print(f"router statistics, synthetic logits: L={layers}, E={experts}, K={args.top_k}, N in {sizes}")
    rows = []
    for n in sizes:
        fmt = dict(n=n, layers=layers, experts=experts, top_k=args.top_k, threads=args.threads)
        stream = run_child(STREAM.format(**fmt), env=thread_env(args.threads))
        store = run_child(STORE_ALL.format(**fmt), env=thread_env(args.threads))
        same = stream["picks"] == store["picks"]
        diff = max(abs(a - b) for la, lb in zip(stream["importance"], store["importance"]) for a, b in zip(la, lb))
        print(f"N = {n:,}: same selection in every layer: {same} (max |importance difference| {diff:.2e})")
        mem = print_ratio("  peak memory above imports", store["peak_mb"], stream["peak_mb"], "MiB")
        t_store = store["accumulate_s"] + store["select_s"]
        t_stream = stream["accumulate_s"] + stream["select_s"]
        tim = print_ratio("  time (accumulate + select)", t_store, t_stream, "s")
        state = print_ratio("  state kept (store vs sums)", store["state_bytes"] / 2**20, stream["state_bytes"] / 2**20, "MiB")
        rows.append({
            "tokens": n, "same_selection": same, "max_importance_diff": diff,
            "store_all": {k: store[k] for k in ("peak_mb", "accumulate_s", "select_s", "state_bytes")},
            "streaming": {k: stream[k] for k in ("peak_mb", "accumulate_s", "select_s", "state_bytes")},
            "memory_ratio": mem, "time_ratio": tim, "state_ratio": state,
        })
    # What storing costs at gpt-oss-120b scale (36 MoE layers, 128 experts), float32 as stored here.
    proj = {"tokens": 1_000_000, "layers": 36, "experts": 128,
            "store_all_gib": 1_000_000 * 36 * 128 * 4 / 2**30, "streaming_mib": 36 * (128 * 128 + 4 * 128 + 1) * 8 / 2**20}
    print(f"gpt-oss-120b, 1M tokens: storing [N, L, E] float32 takes {proj['store_all_gib']:.1f} GiB; "
          f"the sums take {proj['streaming_mib']:.1f} MiB whatever N")
    print("ratio = baseline / NEXUS: above 1 means NEXUS uses less")
    payload = {"synthetic_logits": True, "layers": layers, "experts": experts, "top_k": args.top_k,
               "threads": args.threads, "runs": rows, "projection_120b": proj}
    path = write_results("router_stats" + ("-quick" if args.quick else ""), payload, args.results_dir, args)
    print(f"results: {path}")


if __name__ == "__main__":
    main()

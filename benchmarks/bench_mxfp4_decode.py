"""MXFP4 decode throughput: ``nexus.quant.mxfp4.decode_mxfp4`` vs transformers' ``convert_moe_packed_tensors``.

Both decode the same random packed tensors (GPT-OSS expert shapes: rows = 2I = 5760 output
features, H = 2880 columns); the results are checked bit-exact (transformers returns the
transpose). Three ways are timed: transformers on the whole fused tensor, NEXUS on the whole
tensor, and NEXUS one expert at a time (what ``convert`` does).

    python benchmarks/bench_mxfp4_decode.py [--quick] [--experts 8] [--repeat 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, bench_parser, parse_bench_args, print_ratio, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Decode with both, print the throughput ratios and write the results (``argv``: the flags)."""
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=None, help="Experts in the fused tensor (default 8; --quick 2).")
    p.add_argument("--repeat", type=int, default=3, help="Timed repetitions (the best is kept).")
    args = parse_bench_args(p, argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from nexus.quant.mxfp4 import decode_mxfp4

    experts = args.experts or (2 if args.quick else 8)
    rows, cols = (512, 512) if args.quick else (5760, 2880)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 130, (experts, rows, cols // 32), dtype=torch.uint8, generator=g)
    values = experts * rows * cols
    print(f"MXFP4 decode of {experts} x {rows} x {cols} = {values / 1e6:.0f}M values, torch threads {torch.get_num_threads()}")

    results = {"shape": [experts, rows, cols], "values": values, "repeat": args.repeat, "threads": args.threads,
               "dtypes": {}}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        ours = decode_mxfp4(blocks, scales, dtype=dtype)
        exact = bool(torch.equal(ours.transpose(1, 2), ref))
        del ref, ours
        t_ref = best_time(lambda: convert_moe_packed_tensors(blocks, scales, dtype=dtype), args.repeat)
        t_ours = best_time(lambda: decode_mxfp4(blocks, scales, dtype=dtype), args.repeat)
        t_stream = best_time(lambda: [decode_mxfp4(blocks[e : e + 1], scales[e : e + 1], dtype=dtype)
                                      for e in range(experts)], args.repeat)
        mv = lambda t: values / t / 1e6  # noqa: E731
        print(f"[{name}] bit-exact vs transformers: {exact}")
        r_whole = print_ratio(f"[{name}] throughput, whole tensor", mv(t_ref), mv(t_ours), "Mv/s", True)
        r_stream = print_ratio(f"[{name}] throughput, one expert at a time", mv(t_ref), mv(t_stream), "Mv/s", True)
        results["dtypes"][name] = {
            "bit_exact": exact,
            "transformers_s": t_ref, "nexus_s": t_ours, "nexus_per_expert_s": t_stream,
            "transformers_mvalues_per_s": mv(t_ref), "nexus_mvalues_per_s": mv(t_ours),
            "nexus_per_expert_mvalues_per_s": mv(t_stream),
            "speed_ratio_nexus_over_transformers": r_whole,
            "speed_ratio_per_expert_over_transformers": r_stream,
        }
    print("ratio = NEXUS / transformers throughput: above 1 means NEXUS decodes faster")
    path = write_results("mxfp4_decode" + ("-quick" if args.quick else ""), results, args.results_dir, args)
    print(f"results: {path}")


if __name__ == "__main__":
    main()

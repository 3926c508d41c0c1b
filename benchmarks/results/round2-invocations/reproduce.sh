#!/bin/bash
# Every benchmark invocation behind quality-round2 and quality-licenses, then the two merged reports.
# The invocations share one run cache (~/.cache/nexus/bench): a (method, LR, seed) run done by an
# earlier line is reused by a later one. About 11.5 hours of invocation time on 2 CPU cores; two
# invocations at a time (one per core) take about 6 hours.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/round2-invocations

python benchmarks/bench_quality.py --models gpt_oss --methods nexus,nexus-gate-none,nexus-gate-token,nexus-gate-scalar_token --lrs 0.01,0.03 --seeds 2 --lr-extensions 1 --name q-gates-ce --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-gate-none-kd,nexus-gate-token-kd,nexus-gate-scalar_token-kd --lrs 0.01 --seeds 1 --lr-extensions 0 --name q-gates-kd --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-kd-general,nexus-gate-none-kd-general,nexus-gate-token-kd-general,nexus-gate-scalar_token-kd-general --lrs 0.01,0.03 --seeds 2 --lr-extensions 1 --name q-gates-kdg --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods nexus --lrs 0.03 --seeds 1 --lr-extensions 0 --name q-qwen-pre --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods nexus-gate-none-kd-general,nexus-gate-token-kd-general,nexus-gate-scalar_token-kd-general --lrs 0.01 --seeds 2 --lr-extensions 0 --name q-qwen-gates-kdg --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods lora-experts-kd-general --lrs 0.01 --seeds 2 --lr-extensions 0 --name q-qwen-lora --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-experts-kd-general,lora-experts-kd-general-w4 --lrs 0.01 --seeds 1 --lr-extensions 0 --name q-eff-lora-experts --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-attention-kd-general,lora-attention-kd-general-w4 --lrs 0.003 --seeds 1 --lr-extensions 0 --name q-eff-lora-attention --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-gate-none-kd-general,nexus-gate-token-kd-general,nexus-gate-scalar_token-kd-general --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-gates-kdg --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-kd-general --lrs 0.01,0.03,0.09 --seeds 3 --lr-extensions 1 --name r3-kdg-scalar --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-experts-kd-general --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-lora-experts --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-attention-kd-general --lrs 0.001,0.003,0.01 --seeds 3 --lr-extensions 1 --name r3-lora-attention --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-gate-none-kd-general-w4,nexus-gate-none-kd-general-w16 --lrs 0.01,0.03,0.09 --seeds 3 --lr-extensions 1 --name r3-eff-nexus --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-experts-kd-general-w4 --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-eff-lora-experts --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-attention-kd-general-w4 --lrs 0.003,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-eff-lora-attention-w4 --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods nexus-gate-none-kd-general --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-qwen-none --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods lora-experts-kd-general --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-qwen-lora-experts --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods lora-attention-kd-general --lrs 0.001,0.003,0.01 --seeds 3 --lr-extensions 1 --name r3-qwen-lora-attention --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-gate-none,nexus-gate-token,nexus-gate-scalar_token --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r4-gates-ce --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus --lrs 0.01,0.03,0.09 --seeds 3 --lr-extensions 1 --name r4-gates-ce-scalar --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-gate-none-kd,nexus-gate-token-kd,nexus-gate-scalar_token-kd --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r4-gates-kd --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods nexus-kd --lrs 0.01,0.03,0.09 --seeds 3 --lr-extensions 1 --name r4-kd-scalar --results-dir "$OUT"
python benchmarks/bench_quality.py --models gpt_oss --methods lora-attention-kd-general-w16 --lrs 0.003,0.01,0.03 --seeds 3 --lr-extensions 1 --name r4-eff-lora-attention-w16 --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods nexus-gate-token-kd-general,nexus-gate-scalar_token-kd-general --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r4-qwen-gates --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods nexus-kd-general --lrs 0.01,0.03,0.09 --seeds 3 --lr-extensions 1 --name r4-qwen-kdg-scalar --results-dir "$OUT"
python benchmarks/bench_quality.py --models qwen3_moe --methods nexus --lrs 0.01,0.03,0.09 --seeds 3 --lr-extensions 1 --name r4-qwen-ce-scalar --results-dir "$OUT"
python benchmarks/bench_quality.py --domain licenses --models gpt_oss --methods nexus-gate-none-kd-general,lora-experts-kd-general --lrs 0.01 --seeds 2 --lr-extensions 0 --name q-lic-a --results-dir "$OUT"
python benchmarks/bench_quality.py --domain licenses --models gpt_oss --methods lora-attention-kd-general --lrs 0.003 --seeds 2 --lr-extensions 0 --name q-lic-b --results-dir "$OUT"
python benchmarks/bench_quality.py --domain licenses --models gpt_oss --methods nexus-gate-none-kd-general,lora-experts-kd-general --lrs 0.00333,0.01,0.03 --seeds 3 --lr-extensions 1 --name r3-lic-a --results-dir "$OUT"
python benchmarks/bench_quality.py --domain licenses --models gpt_oss --methods lora-attention-kd-general --lrs 0.001,0.003,0.01 --seeds 3 --lr-extensions 1 --name r3-lic-b --results-dir "$OUT"

H=nexus-gate-none-kd-general,lora-experts-kd-general,lora-attention-kd-general
python -m benchmarks.quality.report $OUT/r3-{gates-kdg,kdg-scalar,lora-experts,lora-attention,eff-nexus,eff-lora-experts,eff-lora-attention-w4,qwen-none,qwen-lora-experts,qwen-lora-attention}.json \
    $OUT/r4-{gates-ce,gates-ce-scalar,gates-kd,kd-scalar,eff-lora-attention-w16,qwen-gates,qwen-kdg-scalar,qwen-ce-scalar}.json \
    $OUT/q-{gates-ce,gates-kd,gates-kdg,qwen-gates-kdg,qwen-pre,qwen-lora,eff-lora-experts,eff-lora-attention}.json \
    --name quality-round2 --out-dir benchmarks/results --headline $H
python -m benchmarks.quality.report $OUT/r3-lic-{a,b}.json $OUT/q-lic-{a,b}.json --name quality-licenses --out-dir benchmarks/results --headline $H

"""Artifact file names and the settings several modules share, in one place."""

import math

ADAPTER_CONFIG_NAME = "nexus_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ROUTER_STATS_NAME = "router_stats.safetensors"
ROUTER_STATS_META_NAME = "router_stats.json"
SELECTION_NAME = "expert_selection.json"
RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"
CACHE_METADATA_NAME = "metadata.json"
SHARED_MODULE_NAME = "nexus_shared"
SHARED_SCALE_NAME = "nexus_shared_scale"
GATE_MODES = ("none", "scalar", "token", "scalar_token")
# The gate modes `nexus export` folds into the base's own tensors (the others are input-dependent).
FOLDABLE_GATE_MODES = ("none", "scalar")
INIT_STRATEGIES = ("pca", "random", "top1", "mean_all", "zeros")
# Defaults of `nexus convert` / `nexus run`; the evidence behind them is the quality benchmark
# (README, "Quality on real text").
DEFAULT_STRATEGY = "pca"
# Chosen by the benchmark's serving-first rule (benchmarks/quality/default_choice.py): among the
# gate x loss cells that keep general ppl within 1.1x the base (KD on general text), the plain
# add had the lowest domain ppl, and it folds into a stock checkpoint (`nexus export`); no
# per-token gate was 3% better.
DEFAULT_GATE_MODE = "none"

# `select`/`convert`/`run`: experts averaged per layer when --top-k is not given:
# ceil(E * DEFAULT_TOP_K_FRACTION), at least 1 and at most DEFAULT_TOP_K. The shared expert starts
# as the average of the picked experts, so K must stay a minority of E for the PCA selection to
# matter (K = E is `mean_all`); a quarter keeps the most-routed experts of skewed routers while
# leaving three quarters out, and the cap of 24 (the original NEXUS's setting for GPT-OSS-20B)
# bounds what `convert` reads per layer on models with hundreds of experts. K >= E/2 warns.
DEFAULT_TOP_K_FRACTION = 0.25
DEFAULT_TOP_K = 24


def default_top_k(num_experts: int) -> int:
    """Experts per layer when ``--top-k`` is not given: ``ceil(E / 4)`` clipped to ``[1, 24]``."""
    return max(1, min(DEFAULT_TOP_K, math.ceil(num_experts * DEFAULT_TOP_K_FRACTION)))

DEFAULT_DIVERSITY = 0.1

# `train` and `run`: peak learning rate and tokens per row, one value for both commands.
# - lr 1e-3: only the shared experts train, from a zero-initialised (or token) gate, so they take
#   adapter-like rates, not full fine-tuning's. The quality benchmark's best rates for them were
#   1e-2 to 3e-2 on its 5.5M-parameter bases (benchmarks/results/quality-full.md); larger bases
#   want smaller rates, so the default sits a decade below that, where the demo run still learns
#   in 100 steps.
# - seq_len 256: the row length of the quality benchmark (the evidence behind the other defaults),
#   long enough for documents to carry context, short enough that `run` on the demo stays quick.
DEFAULT_LR = 1e-3
DEFAULT_SEQ_LEN = 256

# `run` without --eval-data evaluates on the documents of --data whose salted content hash falls
# in this fraction, and trains/collects on the rest (nexus.data, "Held-out split").
HOLDOUT_FRACTION = 0.1
HOLDOUT_SALT = "nexus-heldout-v1:"

# A tokenizer must map a data sample to at least min(this, distinct characters) distinct
# non-special ids, or it is refused as unable to encode the data.
MIN_DISTINCT_TOKEN_IDS = 8

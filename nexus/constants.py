"""Artifact file names and the settings several modules share, in one place."""

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
GATE_MODES = ("none", "scalar", "token")
INIT_STRATEGIES = ("pca", "random", "top1", "mean_all", "zeros")
# Defaults of `nexus convert` / `nexus run`; the evidence behind them is the quality benchmark
# (README, "Quality on real text").
DEFAULT_STRATEGY = "pca"
DEFAULT_GATE_MODE = "token"

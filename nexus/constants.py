"""Artifact file names, in one place."""

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

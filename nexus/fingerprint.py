"""Base-model fingerprints: a short hash of the config fields that define the architecture.

Two checkpoints with the same fingerprint have the same shapes and the same layers; the
fingerprint ignores how a checkpoint is stored (MXFP4 or float, dtype, paths).
"""

from __future__ import annotations

import hashlib
import json

# Keys that change with how a checkpoint was saved or loaded, not with what it is.
_VOLATILE = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "output_router_logits",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "experts_implementation",
    "_experts_implementation",
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "id2label",
    "label2id",
}


def config_fingerprint(config) -> str:
    """16 hex chars identifying the architecture of ``config`` (a PretrainedConfig or dict)."""
    d = config if isinstance(config, dict) else config.to_dict()
    canon = {k: v for k, v in sorted(d.items()) if k not in _VOLATILE and not k.startswith("_")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]

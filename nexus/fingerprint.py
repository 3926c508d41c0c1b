"""Base-model fingerprints.

- The config fingerprint: a short hash of the config fields that define the architecture. Two
  checkpoints with the same fingerprint have the same shapes and the same layers; it ignores
  how a checkpoint is stored (MXFP4 or float, dtype, paths).
- The rows fingerprint: a short hash of tokenised data (every token id, in order), so a resumed
  run or a cache can tell that it is fed the same rows.
- The weights fingerprint: a short hash of the first values of a few tensors read from disk
  (embedding, first and last routers, untied output embedding), so that two checkpoints of one
  architecture with different weights (a fine-tune, another release) are told apart cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging

log = logging.getLogger(__name__)

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


def rows_fingerprint(rows: list[list[int]]) -> str:
    """16 hex chars identifying tokenised data: a hash of every token id of ``rows``, in order."""
    import numpy as np

    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def config_fingerprint(config) -> str:
    """16 hex chars identifying the architecture of ``config`` (a PretrainedConfig or dict)."""
    d = config if isinstance(config, dict) else config.to_dict()
    return hashlib.sha256(json.dumps(_canonical(d), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _canonical(d: dict) -> dict:
    """``d`` without volatile keys, at every depth (DBRX's ``ffn_config`` carries its own ``dtype``)."""
    return {k: _canonical(v) if isinstance(v, dict) else v
            for k, v in sorted(d.items()) if k not in _VOLATILE and not k.startswith("_")}


# Elements read from the start of each fingerprinted tensor: a few rows even of a 120B model's
# embedding, so the fingerprint costs milliseconds whatever the checkpoint's size.
WEIGHTS_ELEMENTS = 16384


def fingerprint_tensor_names(model, family, blocks=None) -> list[str]:
    """The parameters the weights fingerprint reads, by their in-memory names: the input
    embedding, the routers of the first and last MoE blocks and the output embedding when it is
    not tied. Routed experts are left out (they are stored MXFP4, FP8 or float alike).

    :param model: the ``*ForCausalLM`` (a real or a meta-device model).
    :param family: its :class:`nexus.family.Family`.
    :param blocks: its MoE blocks (default ``family.moe_blocks(model)``).
    """
    names_of: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), n)  # a tied weight keeps its first name (the stored one)
    picked: list[str] = []

    def add(params) -> None:
        for p in params:
            name = names_of.get(id(p))
            if name is not None and name not in picked:
                picked.append(name)

    embed = model.get_input_embeddings()
    add([embed.weight] if embed is not None else [])
    blocks = family.moe_blocks(model) if blocks is None else blocks
    for block in dict.fromkeys([blocks[0].layer, blocks[-1].layer]):
        b = next(x for x in blocks if x.layer == block)
        router = family.router_capture(b).module
        small = b.num_experts * b.hidden_size  # a router's weight or bias, never an expert tensor
        add(p for p in router.parameters() if p.dim() >= 1 and p.shape[0] == b.num_experts and p.numel() <= small)
    out = model.get_output_embeddings()
    if out is not None and embed is not None and out.weight is not embed.weight:
        add([out.weight])
    return picked


def weights_fingerprint(path, names: list[str]) -> tuple[str, list[str]]:
    """16 hex chars identifying the weights of the checkpoint at ``path``, and the tensors used.

    Hashes each tensor's name and its first :data:`WEIGHTS_ELEMENTS` values, rounded to bfloat16
    (so a float32 and a bfloat16 copy of the same weights agree). Names the checkpoint does not
    hold are skipped.

    :param path: a checkpoint directory (read through :class:`nexus.checkpoint.CheckpointReader`).
    :param names: candidate tensor names (:func:`fingerprint_tensor_names`).
    :return: ``(fingerprint, names used)``; ``("", [])`` when none is stored under those names.
    """
    import math

    import torch

    from nexus.checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    h = hashlib.sha256()
    used = []
    for name in names:
        if name not in reader:
            continue
        shape = reader.shape(name)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        rows = min(shape[0], -(-WEIGHTS_ELEMENTS // max(row, 1))) if shape else 0
        t = reader.read_row_range(name, 0, rows) if shape else reader.read(name)
        values = t.reshape(-1)[:WEIGHTS_ELEMENTS].to(torch.bfloat16).view(torch.int16)
        h.update(name.encode() + b"\0" + str(shape).encode() + b"\0")
        h.update(values.numpy().tobytes())
        used.append(name)
    return (h.hexdigest()[:16], used) if used else ("", [])


def model_weights_fingerprint(model, family, blocks=None) -> tuple[str, list[str]]:
    """:func:`weights_fingerprint` of the checkpoint ``model`` was loaded from
    (:func:`nexus.loading.load_model` records it); ``("", [])`` for a model built in memory."""
    source = getattr(model, "_nexus_source", None)
    if source is None:
        log.debug("the model was not loaded from a checkpoint directory; no weights fingerprint")
        return "", []
    return weights_fingerprint(source, fingerprint_tensor_names(model, family, blocks))


def check_weights(recorded: str, tensors: list[str], path, what: str) -> None:
    """Refuse the checkpoint at ``path`` when its weights fingerprint differs from ``recorded``.

    :param recorded: the fingerprint stored in an artifact ("" when it predates weights
        fingerprints: a warning, no check).
    :param tensors: the tensor names the recorded fingerprint was computed over.
    :param path: the base checkpoint directory, or None (a model built in memory: not checked).
    :param what: the artifact, for messages (e.g. ``"adapter runs/a/final"``).
    :raises AdapterMismatchError: the same tensors hold other values.
    """
    from nexus.errors import AdapterMismatchError

    if not recorded:
        log.warning("%s records no base weights fingerprint (made by an older nexus, or from a model built in "
                    "memory): cannot check that %s holds the weights it was made for", what, path or "the model")
        return
    if path is None:
        log.debug("the model was built in memory; the weights fingerprint of %s is not checked", what)
        return
    actual, used = weights_fingerprint(path, tensors)
    if used != list(tensors):
        missing = sorted(set(tensors) - set(used))
        log.warning("%s: cannot check the base weights, %s does not store %s under those names",
                    what, path, ", ".join(missing[:3]))
        return
    if actual != recorded:
        raise AdapterMismatchError(
            f"{what} was made for base weights fingerprint {recorded}, but {path} has weights fingerprint {actual} "
            f"(same architecture, other weights); use the checkpoint it was made for"
        )

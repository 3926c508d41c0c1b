"""``precompute``: a teacher's top-k log-probabilities computed once into a teacher cache.

The cache's layout and its reader are :mod:`nexus.teacher_cache`. Shard ``i`` is written by
process ``i % world_size``, atomically, so a run that stops leaves only whole shards; running
again skips them. ``metadata.json`` turns ``complete`` only when every shard exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from nexus import __version__
from nexus.constants import CACHE_METADATA_NAME
from nexus.engines.precompute_config import PrecomputeConfig
from nexus.errors import Interrupted, NexusError
from nexus.fingerprint import rows_fingerprint
from nexus.io import atomic_path, local_data_path, output_lock, refuse_output_over_inputs, write_json
from nexus.teacher_cache import CACHE_VERSION, shard_path, vocab_fingerprint

log = logging.getLogger(__name__)

# Metadata keys that must agree for a resumed precompute to add to an existing cache.
_RESUME_KEYS = ("teacher_fingerprint", "tokenizer_fingerprint", "data_fingerprint", "top_k", "seq_len",
                "temperature", "router_logits", "rows_per_shard", "num_rows")


def _write_shard(path: Path, columns: dict[str, list[np.ndarray]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        dtype = pa.float32() if values[0].dtype == np.float32 else pa.int32()
        arrays[name] = pa.array([v.ravel() for v in values], type=pa.list_(dtype))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), str(tmp), compression="zstd")


def precompute(config: PrecomputeConfig, accelerator=None) -> Path:
    """Write (or complete) a teacher cache for ``config.data`` under ``config.output``.

    Runs under ``accelerate launch`` / ``torchrun`` as well: each process computes its own shards.
    The output is locked for the duration (:func:`nexus.io.output_lock`, main process).

    :return: the cache directory.
    :raises Interrupted: SIGINT/SIGTERM stopped it; the shards written so far are kept and the
        same command finishes the cache.
    :raises NexusError: the output is or holds an input (the teacher, the data, the tokenizer).
    """
    from nexus.training.distributed import make_accelerator

    refuse_output_over_inputs(config.output, {"--teacher": config.teacher, "--data": local_data_path(config.data),
                                              "--tokenizer": config.tokenizer})
    accelerator = accelerator or make_accelerator(config.bf16)
    with output_lock(config.output, enabled=accelerator.is_main_process):
        return _precompute(config, accelerator)


def _precompute(config: PrecomputeConfig, accelerator) -> Path:
    from nexus.data import collate, load_token_data, load_tokenizer
    from nexus.fingerprint import config_fingerprint
    from nexus.interrupts import StopFlag, signal_name
    from nexus.loading import load_model
    from nexus.chunked_losses import forward_hidden, topk_logprobs
    from nexus.progress import progress_bar
    from nexus.routing import RouterRecorder

    out = Path(config.output)
    model = load_model(config.teacher, dtype=torch.bfloat16 if config.bf16 else torch.float32, device=accelerator.device,
                       dequantize=config.dequantize)
    tokenizer = load_tokenizer(config.tokenizer or config.teacher, model.config)
    data = load_token_data(config.data, tokenizer, config.seq_len, config.text_column)
    family, blocks = None, []
    if config.router_logits:
        from nexus.family import resolve_family

        family = resolve_family(model.config)
        blocks = family.moe_blocks(model)
    num_shards = -(-len(data.rows) // config.rows_per_shard)
    meta = {
        "version": CACHE_VERSION,
        "nexus_version": __version__,
        "teacher": str(config.teacher),
        "teacher_fingerprint": config_fingerprint(model.config),
        "tokenizer_fingerprint": vocab_fingerprint(tokenizer),
        "vocab_size": int(model.config.vocab_size),
        "data": str(config.data),
        "data_fingerprint": rows_fingerprint(data.rows),
        "top_k": min(config.top_k, int(model.config.vocab_size)),
        "seq_len": config.seq_len,
        "temperature": config.temperature,
        "router_logits": bool(config.router_logits),
        "router_layers": [b.layer for b in blocks],
        "router_scoring": family.router_capture(blocks[0]).scoring if blocks else None,
        "num_experts": blocks[0].num_experts if blocks else None,
        "family": family.name if family else None,
        "rows_per_shard": config.rows_per_shard,
        "num_rows": len(data.rows),
        "num_tokens": data.num_tokens,
        "num_shards": num_shards,
        "pad_id": data.pad_id,
        "complete": False,
        "args": dataclasses.asdict(config),
    }
    meta_path = out / CACHE_METADATA_NAME
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = [k for k in _RESUME_KEYS if old.get(k) != meta[k]]
        if diff:
            raise NexusError(
                f"{out} already holds a teacher cache made differently ({', '.join(f'{k}: {old.get(k)} vs {meta[k]}' for k in diff)}); "
                f"choose another --output or delete it"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(meta_path, meta)
    accelerator.wait_for_everyone()

    mine = [i for i in range(num_shards) if i % accelerator.num_processes == accelerator.process_index]
    todo = [i for i in mine if not shard_path(out, i).exists()]
    log.info("precompute: %d shards, %d for this process, %d left", num_shards, len(mine), len(todo))
    k, t = meta["top_k"], config.temperature
    todo_tokens = sum(len(data.rows[r]) for i in todo
                      for r in range(i * config.rows_per_shard, min((i + 1) * config.rows_per_shard, len(data.rows))))
    bar = progress_bar(total=todo_tokens, desc="teacher cache", unit="tok", enabled=accelerator.is_local_main_process,
                       unit_scale=True)
    with StopFlag("precompute", "after this batch; finished shards are kept") as stop, bar:
        for shard in todo:
            ids = list(range(shard * config.rows_per_shard, min((shard + 1) * config.rows_per_shard, len(data.rows))))
            cols: dict[str, list[np.ndarray]] = {"input_ids": [], "topk_indices": [], "topk_logprobs": []}
            if blocks:
                cols["router_logits"] = []
            for start in range(0, len(ids), config.batch_size):
                if stop.requested:
                    break
                chunk = ids[start : start + config.batch_size]
                batch = collate([data.rows[i] for i in chunk], data.pad_id)
                with torch.no_grad(), RouterRecorder(family, blocks, detach=True) as rec, accelerator.autocast():
                    states = forward_hidden(
                        model,
                        input_ids=batch["input_ids"].to(accelerator.device),
                        attention_mask=batch["attention_mask"].to(accelerator.device),
                        use_cache=False,
                    )
                lp, ix = topk_logprobs(states.states[:, :-1], states.head, k, t)  # a chunk of tokens at a time
                width = batch["input_ids"].shape[1]
                for j, row in enumerate(chunk):
                    n = len(data.rows[row])
                    cols["input_ids"].append(np.asarray(data.rows[row], dtype=np.int32))
                    cols["topk_indices"].append(ix[j, : n - 1].cpu().numpy().astype(np.int32))
                    cols["topk_logprobs"].append(lp[j, : n - 1].cpu().numpy().astype(np.float32))
                    if blocks:
                        stacked = torch.stack([rec.logits[b.layer].reshape(len(chunk), width, -1)[j, :n]
                                               for b in blocks])
                        cols["router_logits"].append(stacked.float().cpu().numpy())
                bar.update(int(batch["attention_mask"].sum()))
            if stop.requested:
                break
            _write_shard(shard_path(out, shard), cols)
    if stop.requested:
        done = sum(shard_path(out, i).exists() for i in range(num_shards))
        raise Interrupted(
            f"precompute stopped by {signal_name(stop.signum)}: {done} of {num_shards} shards are in {out} (the shard "
            f"in progress was dropped); run the same command again to finish the cache", stop.signum)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [i for i in range(num_shards) if not shard_path(out, i).exists()]
        if missing:
            raise NexusError(f"teacher cache {out} is missing shards {missing[:5]}; run nexus precompute again to finish it")
        meta["complete"] = True
        write_json(meta_path, meta)
    accelerator.wait_for_everyone()
    return out

"""Teacher cache: a teacher's top-k log-probabilities precomputed once, read back during training.

Layout of a cache directory::

    metadata.json          what made it (teacher/tokenizer fingerprints, k, seq_len, temperature, ...)
    shard-00000.parquet    zstd Parquet, ``rows_per_shard`` sequences each, columns:
        input_ids      list<int32>    the row's token ids (length n)
        topk_indices   list<int32>    (n-1)*k vocabulary ids, position-major
        topk_logprobs  list<float32>  (n-1)*k teacher log-probs at ``temperature``
        router_logits  list<float32>  L*n*E teacher router logits (only with --router-logits)

Shard ``i`` is written by process ``i % world_size``, atomically, so a run that stops leaves
only whole shards; running again skips them. ``metadata.json`` turns ``complete`` only when
every shard exists. Training from a cache uses its rows as the data and refuses a tokenizer
(or, for router KL, a model) that differs from the one the cache was made with.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from nexus import __version__
from nexus.constants import CACHE_METADATA_NAME
from nexus.engines.precompute_config import PrecomputeConfig
from nexus.errors import Interrupted, NexusError
from nexus.io import atomic_path, output_lock, write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Metadata keys that must agree for a resumed precompute to add to an existing cache.
_RESUME_KEYS = ("teacher_fingerprint", "tokenizer_fingerprint", "data_fingerprint", "top_k", "seq_len",
                "temperature", "router_logits", "rows_per_shard", "num_rows")


def rows_fingerprint(rows: list[list[int]]) -> str:
    """16 hex chars identifying a list of token rows (order included)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.parquet"


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
    """
    from nexus.engines.distributed import make_accelerator

    accelerator = accelerator or make_accelerator(config.bf16)
    with output_lock(config.output, enabled=accelerator.is_main_process):
        return _precompute(config, accelerator)


def _precompute(config: PrecomputeConfig, accelerator) -> Path:
    from nexus.data import collate, load_token_data, load_tokenizer
    from nexus.engines.teachers import tokenizer_fingerprint
    from nexus.fingerprint import config_fingerprint
    from nexus.interrupts import StopFlag, signal_name
    from nexus.loading import load_model
    from nexus.losses import topk_logprobs
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
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
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
    todo = [i for i in mine if not _shard_path(out, i).exists()]
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
                    logits = model(
                        input_ids=batch["input_ids"].to(accelerator.device),
                        attention_mask=batch["attention_mask"].to(accelerator.device),
                        use_cache=False,
                    ).logits
                lp, ix = topk_logprobs(logits[:, :-1], k, t)
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
            _write_shard(_shard_path(out, shard), cols)
    if stop.requested:
        done = sum(_shard_path(out, i).exists() for i in range(num_shards))
        raise Interrupted(
            f"precompute stopped by {signal_name(stop.signum)}: {done} of {num_shards} shards are in {out} (the shard "
            f"in progress was dropped); run the same command again to finish the cache", stop.signum)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [i for i in range(num_shards) if not _shard_path(out, i).exists()]
        if missing:
            raise NexusError(f"teacher cache {out} is missing shards {missing[:5]}; run nexus precompute again to finish it")
        meta["complete"] = True
        write_json(meta_path, meta)
    accelerator.wait_for_everyone()
    return out


class TeacherCache:
    """A finished teacher cache opened for training: its rows are the training data.

    ``rows`` holds every row's token ids (small); the teacher tensors are read per shard on
    demand (a small LRU of decoded shards), so a cache larger than memory still trains.
    """

    def __init__(self, path: str | Path, shard_cache: int = 8):
        self.path = Path(path)
        meta_path = self.path / CACHE_METADATA_NAME
        if not meta_path.exists():
            raise NexusError(f"{path} is not a teacher cache (no {CACHE_METADATA_NAME}); make one with nexus precompute")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version", 0) > CACHE_VERSION:
            raise NexusError(f"teacher cache {path} has version {self.meta['version']}, newer than this nexus reads ({CACHE_VERSION}); upgrade nexus-moe")
        if not self.meta.get("complete"):
            raise NexusError(f"teacher cache {path} is incomplete; run nexus precompute again with the same arguments to finish it")
        import pyarrow.parquet as pq

        self.rows: list[list[int]] = []
        self._where: list[tuple[int, int]] = []
        for shard in range(self.meta["num_shards"]):
            ids = pq.read_table(_shard_path(self.path, shard), columns=["input_ids"]).column("input_ids").to_pylist()
            self._where.extend((shard, j) for j in range(len(ids)))
            self.rows.extend(ids)
        self.pad_id = int(self.meta["pad_id"])
        self._load = functools.lru_cache(maxsize=shard_cache)(self._read_shard)

    @property
    def has_router_logits(self) -> bool:
        return bool(self.meta.get("router_logits"))

    def check(self, model_config, tokenizer, need_routers: bool = False) -> None:
        """Refuse a student whose tokenizer (or, for router KL, architecture) differs from the cache's.

        :raises NexusError: naming what differs and what to do.
        """
        from nexus.engines.teachers import tokenizer_fingerprint
        from nexus.fingerprint import config_fingerprint

        if int(model_config.vocab_size) != self.meta["vocab_size"]:
            raise NexusError(
                f"teacher cache {self.path} has vocabulary size {self.meta['vocab_size']} but the model has "
                f"{model_config.vocab_size}; precompute the cache with a teacher that shares the model's tokenizer"
            )
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.meta["tokenizer_fingerprint"]:
            raise NexusError(
                f"teacher cache {self.path} was made with tokenizer {self.meta['tokenizer_fingerprint']} but the model's "
                f"is {fp}; precompute it again with this model's tokenizer"
            )
        if need_routers:
            if not self.has_router_logits:
                raise NexusError(f"teacher cache {self.path} has no router logits; precompute it with --router-logits or set --router-kl-weight 0")
            if config_fingerprint(model_config) != self.meta["teacher_fingerprint"]:
                raise NexusError(
                    f"teacher cache {self.path} was made by model {self.meta['teacher_fingerprint']}, not this base "
                    f"({config_fingerprint(model_config)}): router KL needs the same architecture; set --router-kl-weight 0"
                )

    def _read_shard(self, shard: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        import pyarrow.parquet as pq

        table = pq.read_table(_shard_path(self.path, shard))
        out = {}
        for name in ("topk_indices", "topk_logprobs", "router_logits"):
            if name in table.column_names:
                arr = table.column(name).combine_chunks()
                out[name] = (arr.offsets.to_numpy(), arr.values.to_numpy())
        return out

    def _row(self, name: str, index: int) -> np.ndarray:
        shard, j = self._where[index]
        offsets, values = self._load(shard)[name]
        return values[offsets[j] : offsets[j + 1]]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A training batch of cached rows: the usual ``input_ids``/``attention_mask``/``labels``
        plus ``teacher_topk_logprobs``/``teacher_topk_indices`` ``Tensor[B, S-1, k]`` (zeros on padding)
        and, when cached, ``teacher_router_logits`` ``Tensor[L, B, S, E]``."""
        from nexus.data import collate

        batch = collate([self.rows[i] for i in indices], self.pad_id)
        b, s = batch["input_ids"].shape
        k = self.meta["top_k"]
        lp = torch.zeros(b, s - 1, k)
        ix = torch.zeros(b, s - 1, k, dtype=torch.long)
        for j, i in enumerate(indices):
            n = len(self.rows[i]) - 1
            lp[j, :n] = torch.from_numpy(self._row("topk_logprobs", i).reshape(n, k).copy())
            ix[j, :n] = torch.from_numpy(self._row("topk_indices", i).reshape(n, k).astype(np.int64))
        batch["teacher_topk_logprobs"], batch["teacher_topk_indices"] = lp, ix
        if self.has_router_logits:
            layers, e = len(self.meta["router_layers"]), self.meta["num_experts"]
            rl = torch.zeros(layers, b, s, e)
            for j, i in enumerate(indices):
                n = len(self.rows[i])
                rl[:, j, :n] = torch.from_numpy(self._row("router_logits", i).reshape(layers, n, e).copy())
            batch["teacher_router_logits"] = rl
        return batch

"""The teacher cache: a teacher's top-k log-probabilities, written by ``precompute``, read back by ``train``.

Layout of a cache directory::

    metadata.json          what made it (teacher/tokenizer fingerprints, k, seq_len, temperature, ...)
    shard-00000.parquet    zstd Parquet, ``rows_per_shard`` sequences each, columns:
        input_ids      list<int32>    the row's token ids (length n)
        topk_indices   list<int32>    (n-1)*k vocabulary ids, position-major
        topk_logprobs  list<float32>  (n-1)*k teacher log-probs at ``temperature``
        router_logits  list<float32>  L*n*E teacher router logits (only with --router-logits)

``metadata.json`` turns ``complete`` only when every shard exists. Training from a cache uses its rows as the data and refuses a tokenizer
(or, for router KL, a model) that differs from the one the cache was made with.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from nexus.constants import CACHE_METADATA_NAME
from nexus.errors import NexusError

CACHE_VERSION = 1


def shard_path(root: Path, index: int) -> Path:
    """The path of shard ``index`` of the cache at ``root``."""
    return root / f"shard-{index:05d}.parquet"


def vocab_fingerprint(tokenizer) -> str:
    """16 hex chars identifying a tokenizer's vocabulary (token -> id, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def is_teacher_cache(path) -> bool:
    """Whether ``path`` is a teacher cache directory (it holds the cache's metadata file)."""
    return (Path(path) / CACHE_METADATA_NAME).is_file()


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
            ids = pq.read_table(shard_path(self.path, shard), columns=["input_ids"]).column("input_ids").to_pylist()
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
        from nexus.fingerprint import config_fingerprint

        if int(model_config.vocab_size) != self.meta["vocab_size"]:
            raise NexusError(
                f"teacher cache {self.path} has vocabulary size {self.meta['vocab_size']} but the model has "
                f"{model_config.vocab_size}; precompute the cache with a teacher that shares the model's tokenizer"
            )
        fp = vocab_fingerprint(tokenizer)
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

        table = pq.read_table(shard_path(self.path, shard))
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

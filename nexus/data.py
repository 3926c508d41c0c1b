"""Training and statistics data tokenised into fixed-length rows (the documents come from
:mod:`nexus.data_sources`).

**Token cache.** Inside :func:`token_cache`, every complete tokenisation is stored as per-document
token ids under the given directory, keyed by the data's content fingerprint, the tokenizer's
fingerprint and the text column, so several stages reading the same data tokenise it once.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from nexus.constants import HOLDOUT_FRACTION, MIN_DISTINCT_TOKEN_IDS
from nexus.data_sources import BATCH_DOCUMENTS, DataSource, data_fingerprint, iter_documents, parse_source
from nexus.errors import NexusError

log = logging.getLogger(__name__)

_cache_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("nexus_token_cache", default=None)

def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex chars identifying how a tokenizer encodes text (its full definition when fast, else its
    vocabulary) and renders chat (its chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def _tokenizer_source(tokenizer) -> str:
    return getattr(tokenizer, "_nexus_source", None) or getattr(tokenizer, "name_or_path", "") or "?"


def check_tokenizer_encodes(tokenizer, texts: list[str], ids: list[list[int]], data: str) -> None:
    """Refuse a tokenizer that cannot encode ``texts`` (a sample of the data), given their ``ids``.

    The texts must map to at least ``min(MIN_DISTINCT_TOKEN_IDS, distinct characters)`` distinct
    ids that are not special tokens: an empty or wrong tokenizer maps everything to nothing or to
    one unknown id, which would silently train on end-of-text tokens.

    :raises NexusError: naming the tokenizer's path and the data.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    distinct = {t for row in ids for t in row} - special
    needed = min(MIN_DISTINCT_TOKEN_IDS, len({c for t in texts for c in t if not c.isspace()}))
    if len(distinct) < needed:
        where = _tokenizer_source(tokenizer)
        raise NexusError(f"the tokenizer from {where} encodes {data} into only {len(distinct)} distinct token ids "
                         f"(vocabulary {len(tokenizer)}): it cannot encode this data; save the model's own tokenizer "
                         f"files (tokenizer.json, tokenizer_config.json) in {where}")


def check_data(data, tokenizer, text_column: str | None = None, sample_tokens: int = 4096) -> None:
    """Fail fast on ``data``: it exists, is readable, has the text column, and ``tokenizer`` encodes
    its first documents (about ``sample_tokens`` tokens; later rows are checked when read).

    :raises NexusError: as :func:`load_token_data` would.
    """
    src = parse_source(data)
    _encode_documents(DataSource(src.spec, src.name, src.local), tokenizer, text_column, sample_tokens)


def heldout_counts(data, tokenizer, text_column: str | None = None) -> tuple[int, int]:
    """``(held-out documents, documents)`` of ``data`` (every row read, nothing tokenised)."""
    held = total = 0
    for _, h in iter_documents(parse_source(data), tokenizer, text_column):
        held, total = held + h, total + 1
    return held, total


@contextlib.contextmanager
def token_cache(directory: str | os.PathLike):
    """Within the block, complete tokenisations are stored in (and reused from) ``directory``."""
    token = _cache_dir.set(Path(directory))
    try:
        yield Path(directory)
    finally:
        _cache_dir.reset(token)


def _cache_file(src: DataSource, tokenizer, text_column: str | None) -> Path | None:
    directory = _cache_dir.get()
    if directory is None:
        return None
    key = json.dumps([data_fingerprint(src.name), tokenizer_fingerprint(tokenizer), text_column])
    return directory / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


def _read_cache(file: Path | None) -> tuple[list[list[int]], list[bool]] | None:
    if file is None or not file.exists():
        return None
    from safetensors.torch import load_file

    try:
        t = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt
        log.warning("ignoring unreadable token cache %s (%s)", file, exc)
        return None
    ids, offsets = t["ids"].tolist(), t["offsets"].tolist()
    docs = [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return docs, t["heldout"].bool().tolist()


def _write_cache(file: Path, docs: list[list[int]], heldout: list[bool]) -> None:
    from nexus.io import write_safetensors

    lengths = torch.tensor([0] + [len(d) for d in docs], dtype=torch.int64)
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.int64)
    held = torch.tensor(heldout, dtype=torch.uint8)
    write_safetensors(file, {"ids": flat, "offsets": lengths.cumsum(0), "heldout": held})
    log.info("token cache: wrote %s (%d documents)", file, len(docs))


def _encode_documents(src: DataSource, tokenizer, text_column, max_tokens) -> tuple[list[list[int]], list[bool], bool]:
    """``(ids per document, held-out flags, complete)``: documents of ``src`` (only its split's
    when a token budget is given) tokenised in batches, stopping once ``max_tokens`` are reached."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs, flags, total, checked = [], [], 0, False
    limit = 16  # documents in the first batch, whose ids also check the tokenizer
    want = None if src.split is None else src.split == "heldout"
    batch: list[tuple[str, bool]] = []

    def flush() -> bool:
        nonlocal total, checked
        texts = [t for t, _ in batch]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if not checked:
            check_tokenizer_encodes(tokenizer, texts, ids, src.name)
            checked = True
        docs.extend(ids)
        flags.extend(h for _, h in batch)
        total += sum(len(x) + len(eos) for x in ids)
        batch.clear()
        return max_tokens is not None and total >= max_tokens

    seen = 0
    for text, held in iter_documents(src, tokenizer, text_column):
        seen += 1
        if max_tokens is not None and want is not None and held != want:
            continue
        batch.append((text, held))
        if len(batch) >= limit and flush():
            return docs, flags, False
        if not batch:  # with a budget, the next batch is sized to what the budget still needs
            need = BATCH_DOCUMENTS if max_tokens is None else -(-(max_tokens - total) * len(docs) // max(total, 1))
            limit = max(1, min(BATCH_DOCUMENTS, need))
    if seen == 0:
        raise NexusError(f"data {src.name} has no non-empty text")
    if batch:
        flush()
    return docs, flags, max_tokens is None or want is None


def tokenize_documents(data, tokenizer, text_column: str | None = None,
                       max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each non-empty document of ``data`` (its ``@train``/``@heldout`` side only
    when suffixed), no special tokens added. With ``max_tokens``, stops reading once the documents
    (plus one EOS each) reach that many tokens.

    :raises NexusError: unreadable data, a tokenizer that cannot encode it, or an empty split.
    """
    src = parse_source(data)
    cache = _cache_file(src, tokenizer, text_column)
    cached = _read_cache(cache)
    if cached is not None:
        docs, flags = cached
        log.info("token cache: %s from %s", src.spec, cache)
    else:
        docs, flags, complete = _encode_documents(src, tokenizer, text_column, max_tokens)
        if cache is not None and complete:
            _write_cache(cache, docs, flags)
    if src.split is not None:
        want = src.split == "heldout"
        kept = [d for d, h in zip(docs, flags) if h == want]
        if not kept:
            raise NexusError(f"the {src.split} split of {src.name} is empty ({len(docs)} documents, "
                             f"{HOLDOUT_FRACTION:.0%} held out by content hash); give more documents or --eval-data")
        docs = kept
    return docs


def check_seq_len(seq_len: int, tokenizer) -> None:
    """:raises NexusError: ``seq_len`` below 2 or above the model's ``max_position_embeddings``."""
    if seq_len < 2:
        raise NexusError(f"--seq-len must be at least 2, got {seq_len}")
    limit = getattr(getattr(tokenizer, "_nexus_model_config", None), "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise NexusError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")


def pack_documents(docs: list[list[int]], seq_len: int, eos_id: int | None, pack: bool = True) -> list[list[int]]:
    """Cut documents' token ids into rows of at most ``seq_len`` ids.

    ``pack``: documents are joined with EOS and cut into ``seq_len`` rows (the last may be
    shorter). Otherwise each document becomes its own rows, a long one split into several.
    Rows shorter than 2 tokens (nothing to predict) are left out.
    """
    rows: list[list[int]] = []
    if pack:
        stream: list[int] = []
        for ids in docs:
            stream.extend(ids + ([eos_id] if eos_id is not None else []))
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    else:
        for ids in docs:
            rows.extend(ids[i : i + seq_len] for i in range(0, len(ids), seq_len))
    return [r for r in rows if len(r) >= 2]


def collate(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch.

    :return: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding), each
        ``Tensor[B, S]`` with S the longest row.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class TokenData:
    """Tokenised rows plus the padding id; batches are drawn in a seeded order.

    ``dropped_rows``: rows of a single token (nothing to predict) left out when the data was cut.
    """

    rows: list[list[int]]
    pad_id: int
    dropped_rows: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    def order(self, seed: int | None, epoch: int = 0) -> list[int]:
        """Row order for ``epoch``: a permutation seeded by ``(seed, epoch)``, or identity when ``seed`` is None."""
        if seed is None:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def batches(
        self, batch_size: int, seed: int | None = None, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(global_batch_index, batch)`` from ``start`` on, cycling through epochs forever
        when ``seed`` is set, else one pass.

        A global batch is ``batch_size * world_size`` rows; rank ``r`` gets rows
        ``[r*batch_size, (r+1)*batch_size)`` of it, so the union over ranks is what one process
        with ``batch_size * world_size`` would see.
        """
        global_bs = batch_size * world_size
        per_epoch = max(1, -(-len(self.rows) // global_bs))
        index = start
        while True:
            epoch, pos = divmod(index, per_epoch)
            if seed is None and epoch > 0:
                return
            order = self.order(seed, epoch)
            chunk = order[pos * global_bs : (pos + 1) * global_bs]
            mine = chunk[rank * batch_size : (rank + 1) * batch_size]
            if mine:
                yield index, collate([self.rows[i] for i in mine], self.pad_id)
            index += 1


def load_token_data(data, tokenizer, seq_len: int, text_column: str | None = None, pack: bool = True,
                    max_tokens: int | None = None) -> TokenData:
    """Load, render and tokenise ``data`` (see :func:`load_rows`; ``DATA@train``/``DATA@heldout``
    for a side of the held-out split) into a :class:`TokenData` of rows of at most ``seq_len`` ids.

    :param max_tokens: stop reading the data once this many tokens are collected (None: all of it).
    :raises NexusError: unreadable data (naming the file and line), a tokenizer that cannot
        encode it (naming the tokenizer's path), or no rows of at least 2 tokens.
    """
    check_seq_len(seq_len, tokenizer)
    # A row may end up 1 token short of what was read (too short to keep): read a row more.
    docs = tokenize_documents(data, tokenizer, text_column, None if max_tokens is None else max_tokens + seq_len)
    rows = pack_documents(docs, seq_len, tokenizer.eos_token_id, pack=pack)
    if not rows:
        raise NexusError(f"data {data} gives no rows of at least 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log.info("data %s: %d documents, %d rows, %d tokens (seq_len %d)", data, len(docs), len(rows),
             sum(map(len, rows)), seq_len)
    # Every token read ends up in one row; the rest were single-token rows, left out.
    read = sum(map(len, docs)) + (len(docs) if pack and tokenizer.eos_token_id is not None else 0)
    return TokenData(rows, pad, dropped_rows=read - sum(map(len, rows)))


def load_tokenizer(path, model_config=None):
    """``AutoTokenizer`` from ``path``, with a pad token (EOS when missing).

    :raises NexusError: the directory has no tokenizer, or one with an empty vocabulary.
    """
    from transformers import AutoTokenizer

    path = Path(str(path)).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001
        raise NexusError(f"no tokenizer in {path}: {exc}. Save one beside the model or pass --tokenizer") from exc
    special = set(tok.all_special_ids)
    if not any(i not in special for i in tok.get_vocab().values()):
        raise NexusError(f"the tokenizer in {path} has an empty vocabulary (no tokenizer files?); save the model's "
                         "own tokenizer files (tokenizer.json, tokenizer_config.json) there")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok._nexus_model_config = model_config
    tok._nexus_source = str(path)
    return tok

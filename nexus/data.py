"""Training and statistics data: local files through ``datasets``, tokenised into fixed-length rows.

Accepted inputs: a ``.jsonl``/``.json``/``.parquet``/``.txt``/``.arrow`` file, a directory of
such files, or a dataset name already in the local ``datasets`` cache. Rows carry either a text
column (``text`` by default) or a chat ``messages`` column, rendered with the tokenizer's chat
template.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from nexus.errors import NexusError

log = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}


def load_rows(data: str | Path):
    """Load a local file/directory (or cached hub dataset) as a ``datasets.Dataset``.

    :raises NexusError: missing path, unknown format, or no rows.
    """
    import datasets

    path = Path(str(data)).expanduser()
    datasets.disable_progress_bars()
    if path.is_file() and path.stat().st_size == 0:
        raise NexusError(f"data {data} is empty")
    try:
        ds = _load(datasets, path, data)
    except StopIteration as exc:  # datasets' json builder on a file without rows
        raise NexusError(f"data {data} is empty") from exc
    if len(ds) == 0:
        raise NexusError(f"data {data} is empty")
    return ds


def _load(datasets, path: Path, data):
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
        if not files:
            raise NexusError(f"{path} has no data files ({', '.join(_BUILDERS)})")
        kinds = {_BUILDERS[p.suffix] for p in files}
        if len(kinds) > 1:
            raise NexusError(f"{path} mixes data formats {sorted(kinds)}; keep one format per directory")
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    elif path.exists():
        if path.suffix not in _BUILDERS:
            raise NexusError(f"cannot read {path}: use one of {', '.join(_BUILDERS)}")
        ds = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        try:
            ds = datasets.load_dataset(str(data), split="train")
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise NexusError(f"data {data!r} is not a local file or directory, nor a cached dataset: {exc}") from exc
    return ds


def row_texts(ds, tokenizer, text_column: str | None = None) -> list[str]:
    """The text of every row: ``text_column`` (default ``text``), or ``messages`` rendered by the
    tokenizer's chat template. Empty texts are dropped.

    :raises NexusError: neither column exists (the message lists the columns there are).
    """
    cols = ds.column_names
    if text_column is None and "text" not in cols and "messages" in cols:
        if getattr(tokenizer, "chat_template", None) is None:
            raise NexusError("the data has a 'messages' column but the tokenizer has no chat template; pass --text-column")
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
    else:
        col = text_column or "text"
        if col not in cols:
            raise NexusError(f"the data has no column {col!r} (columns: {', '.join(cols)}); pass --text-column NAME")
        texts = list(ds[col])
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise NexusError("the data has no non-empty text")
    return texts


def tokenize_rows(texts: list[str], tokenizer, seq_len: int, pack: bool = True) -> list[list[int]]:
    """Tokenise ``texts`` into rows of at most ``seq_len`` token ids.

    ``pack``: documents are joined with EOS and cut into ``seq_len`` rows (the last may be
    shorter). Otherwise each document becomes its own rows, a long one split into several:
    nothing is ever dropped.
    """
    if seq_len < 2:
        raise NexusError(f"--seq-len must be at least 2, got {seq_len}")
    limit = getattr(getattr(tokenizer, "_nexus_model_config", None), "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise NexusError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    if pack:
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids + ([eos] if eos is not None else []))
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    else:
        for ids in encoded:
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
    """Tokenised rows plus the padding id; batches are drawn in a seeded order."""

    rows: list[list[int]]
    pad_id: int

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


def load_token_data(data, tokenizer, seq_len: int, text_column: str | None = None, pack: bool = True) -> TokenData:
    """Load, render and tokenise ``data`` (see :func:`load_rows`) into a :class:`TokenData`."""
    texts = row_texts(load_rows(data), tokenizer, text_column)
    rows = tokenize_rows(texts, tokenizer, seq_len, pack=pack)
    if not rows:
        raise NexusError(f"data {data} gives no rows of at least 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log.info("data %s: %d rows, %d tokens (seq_len %d)", data, len(rows), sum(map(len, rows)), seq_len)
    return TokenData(rows, pad)


def load_tokenizer(path, model_config=None):
    """``AutoTokenizer`` from ``path``, with a pad token (EOS when missing).

    :raises NexusError: the directory has no tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001
        raise NexusError(f"no tokenizer in {path}: {exc}. Save one beside the model or pass --tokenizer") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok._nexus_model_config = model_config
    return tok

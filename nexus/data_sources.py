"""Where documents come from: local files through ``datasets``, read row by row with errors that
name the file and line.

Accepted inputs: a ``.jsonl``/``.json``/``.parquet``/``.txt``/``.arrow`` file, a directory of
such files, or a dataset name already in the local ``datasets`` cache (looked up offline). An
argument that looks like a path (it starts with ``/``, ``.`` or ``~``, has two or more ``/``, or
ends in a data suffix) is always local: a missing one fails at once. Rows carry either a text
column (``text`` by default) or a chat ``messages`` column, rendered with the tokenizer's chat
template. A document holds at most :data:`MAX_DOCUMENT_CHARS` characters.

**Held-out split.** ``DATA@train`` and ``DATA@heldout`` name the two sides of a deterministic
split of ``DATA`` by document (row): a document is held out when the SHA-256 of its content
(salted with :data:`nexus.constants.HOLDOUT_SALT`) falls in the lowest
:data:`nexus.constants.HOLDOUT_FRACTION` of the hash range. The decision depends on the
document alone, so identical documents always land on the same side and appending rows never
moves an existing document across.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nexus.constants import HOLDOUT_FRACTION, HOLDOUT_SALT
from nexus.errors import NexusError

log = logging.getLogger(__name__)


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
# Suffixes that make an argument a local path even when it does not exist (a typo must not go to the Hub).
_PATH_SUFFIXES = {*_BUILDERS, ".csv", ".tsv", ".gz", ".zst", ".bz2", ".xz", ".jsonl.gz"}
SPLITS = ("train", "heldout")
BATCH_DOCUMENTS = 256  # documents read (and tokenised) per call
# Characters in one document (one line of JSON lines). Tokenisers hold about 200 bytes per character
# of a text while encoding it (a 50 MB line took 10 GB and 84 s), and packing cuts documents into
# --seq-len rows anyway, so a longer document is far more likely a mistake (a corpus on one line)
# than a need; split into several lines, it trains the same.
MAX_DOCUMENT_CHARS = 2_000_000


@dataclass(frozen=True)
class DataSource:
    """A parsed data argument.

    Attributes:
        spec: the argument as given (recorded in artifacts).
        name: the local path (``~`` expanded) or the dataset name, without the split suffix.
        local: whether ``name`` is a local file or directory.
        split: ``"train"``, ``"heldout"`` or None (every document).
    """

    spec: str
    name: str
    local: bool
    split: str | None = None

    @property
    def path(self) -> Path:
        """``name`` as a path (meaningful when ``local``)."""
        return Path(self.name)


def _looks_like_path(s: str) -> bool:
    p = Path(s)
    return (s.startswith(("/", ".", "~")) or s.count("/") >= 2 or os.sep != "/" and os.sep in s
            or p.suffix.lower() in _PATH_SUFFIXES)


def parse_source(data: str | os.PathLike) -> DataSource:
    """Parse a data argument: ``~`` expanded, an ``@train``/``@heldout`` suffix split off.

    :raises NexusError: a path-like argument that does not exist.
    """
    spec = str(data)
    name, split = spec, None
    for s in SPLITS:
        if spec.endswith(f"@{s}") and not Path(spec).expanduser().exists():
            name, split = spec[: -len(s) - 1], s
    expanded = Path(name).expanduser()
    if expanded.exists():
        return DataSource(spec, str(expanded), True, split)
    if _looks_like_path(name):
        raise NexusError(f"data {name} does not exist; check the path (a file or a directory of "
                         f"{', '.join(_BUILDERS)} files)")
    return DataSource(spec, name, False, split)


def resolved_spec(data: str | os.PathLike) -> str:
    """``data`` with a local path made absolute (``~`` expanded, ``..`` and links resolved), an
    ``@train``/``@heldout`` suffix kept; a dataset name unchanged. Every spelling of one file gives
    one spec (``nexus run`` records these in its stamps).

    :raises NexusError: a path-like argument that does not exist (:func:`parse_source`).
    """
    src = parse_source(data)
    if not src.local:
        return src.spec
    return str(src.path.resolve()) + (f"@{src.split}" if src.split else "")


def split_specs(data: str) -> tuple[str, str]:
    """``(DATA@train, DATA@heldout)``: the two sides of the held-out split of ``data``."""
    return f"{data}@train", f"{data}@heldout"


def is_heldout(doc) -> bool:
    """Whether a document (a text, or a ``messages`` list) belongs to the held-out split."""
    key = doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True, default=str)
    digest = hashlib.sha256((HOLDOUT_SALT + key).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < HOLDOUT_FRACTION * 2**64


def _data_files(src: DataSource) -> list[Path]:
    if src.path.is_dir():
        return sorted(p for p in src.path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
    return [src.path]


def data_fingerprint(data: str | os.PathLike) -> str:
    """16 hex chars that change whenever the data's content changes (appended rows, edits in place).

    Local files: SHA-256 over every file's relative name, size and content (the modification time
    is left out, so touching or copying a file is no change). A cached dataset: its ``datasets``
    fingerprint. The ``@train``/``@heldout`` suffix does not enter.
    """
    src = parse_source(data)
    h = hashlib.sha256()
    if not src.local:
        h.update(load_rows(src.name)._fingerprint.encode())
        return h.hexdigest()[:16]
    root = src.path if src.path.is_dir() else src.path.parent
    for f in _data_files(src):
        h.update(f"{f.relative_to(root)}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def load_rows(data: str | os.PathLike | DataSource, text_column: str | None = None):
    """Load a local file/directory (or cached hub dataset) as a ``datasets.Dataset`` (every
    document; an ``@train``/``@heldout`` suffix is ignored here).

    :param text_column: the column that must hold strings, for the message about a file that
        ``datasets`` cannot read (default ``text``).
    :raises NexusError: missing path, unknown format, unreadable content (naming the file and
        line), or no rows.
    """
    import datasets

    src = data if isinstance(data, DataSource) else parse_source(data)
    datasets.disable_progress_bars()
    if src.local and src.path.is_file() and src.path.stat().st_size == 0:
        raise NexusError(f"data {src.name} is empty")
    try:
        ds = _load(datasets, src, text_column or "text")
    except StopIteration as exc:  # datasets' json builder on a file without rows
        raise NexusError(f"data {src.name} is empty") from exc
    if len(ds) == 0:
        raise NexusError(f"data {src.name} is empty")
    return ds


def _load(datasets, src: DataSource, column: str):
    path = src.path
    if not src.local:
        offline = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True  # only what is already in the local cache; no Hub retries
        try:
            return datasets.load_dataset(src.name, split="train")
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise NexusError(f"data {src.name!r} is not a local file or directory, nor a dataset in the local "
                             f"datasets cache; give a path to a .jsonl/.parquet/.txt file or directory") from exc
        finally:
            datasets.config.HF_HUB_OFFLINE = offline
    if path.is_dir():
        files = _data_files(src)
        if not files:
            raise NexusError(f"{path} has no data files ({', '.join(_BUILDERS)})")
        kinds = {_BUILDERS[p.suffix] for p in files}
        if len(kinds) > 1:
            raise NexusError(f"{path} mixes data formats {sorted(kinds)}; keep one format per directory")
        builder = kinds.pop()
    else:
        if path.suffix not in _BUILDERS:
            raise NexusError(f"cannot read {path}: use one of {', '.join(_BUILDERS)}")
        files, builder = [path], _BUILDERS[path.suffix]
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its own report of a bad file would duplicate ours
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as exc:  # noqa: BLE001 - find the line at fault, else report the library's reason
        if builder in ("json", "text"):
            for f in files:
                _check_lines(f, builder, column)
        cause = exc.__cause__ or exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise NexusError(f"cannot read data {path}: {reason}") from exc
    finally:
        quiet.setLevel(level)


def _check_lines(file: Path, builder: str, column: str = "text") -> None:
    """Raise a :class:`NexusError` naming the first line of ``file`` that is not UTF-8, not a JSON
    object, or whose ``column`` is not a string."""
    if file.suffix == ".json":
        try:
            doc = json.loads(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = file.read_bytes()[: exc.start].count(b"\n") + 1
            raise NexusError(f"{file} line {line}: bytes that are not UTF-8; re-encode the file as UTF-8") from exc
        except json.JSONDecodeError:
            doc = None  # maybe JSON lines in a .json file: checked below
        if isinstance(doc, (list, dict)):
            return
    with open(file, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise NexusError(f"{file} line {n}: bytes that are not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); re-encode the file as UTF-8") from exc
            if builder != "json" or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NexusError(f"{file} line {n}: invalid JSON ({exc.msg}, column {exc.colno}); "
                                 "each line must be one JSON object") from exc
            if not isinstance(obj, dict):
                raise NexusError(f"{file} line {n}: a JSON {type(obj).__name__}, not an object; "
                                 'each line must be one JSON object such as {"text": "..."}')
            value = obj.get(column)
            if value is not None and not isinstance(value, str) and column != "messages":
                raise NexusError(f"{file} line {n}: {column!r} is not a string but {type(value).__name__} "
                                 f"{str(value)[:40]}; put the document's text in {column!r} as a JSON string")


def _where(src: DataSource, row: int) -> str:
    """``FILE line N`` for a row of JSON-lines data, else ``DATA row N`` (1-based)."""
    if src.local:
        files = _data_files(src)
        if files and all(f.suffix in (".jsonl", ".json") for f in files):
            seen = 0
            for f in files:
                with open(f, "rb") as fh:
                    for n, raw in enumerate(fh, 1):
                        if raw.strip():
                            if seen == row:
                                return f"{f} line {n}"
                            seen += 1
    return f"{src.name} row {row + 1}"


def _text_column(ds, tokenizer, text_column: str | None) -> tuple[str, bool]:
    """``(column, is_chat)``: the column holding the documents.

    :raises NexusError: neither column exists (the message lists the columns there are), or chat
        data with a tokenizer that has no chat template.
    """
    cols = ds.column_names
    if text_column is None and "text" not in cols and "messages" in cols:
        if getattr(tokenizer, "chat_template", None) is None:
            raise NexusError("the data has a 'messages' column but the tokenizer has no chat template; "
                             "pass --text-column")
        return "messages", True
    col = text_column or "text"
    if col not in cols:
        raise NexusError(f"the data has no column {col!r} (columns: {', '.join(cols)}); pass --text-column NAME")
    return col, False


def iter_documents(src: DataSource, tokenizer, text_column: str | None = None, ds=None) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, held_out)`` for every non-empty document of ``src`` in order (both sides of
    the split), chat ``messages`` rendered with the tokenizer's chat template. Reads the rows in
    batches, so stopping early reads no further.

    :raises NexusError: a document that is not a string, or longer than :data:`MAX_DOCUMENT_CHARS`
        (naming the file and line).
    """
    ds = load_rows(src, text_column) if ds is None else ds
    col, chat = _text_column(ds, tokenizer, text_column)
    for start in range(0, len(ds), BATCH_DOCUMENTS):
        try:
            values = ds[start : start + BATCH_DOCUMENTS][col]
        except UnicodeDecodeError as exc:  # pyarrow keeps bytes it never validated as UTF-8
            for f in _data_files(src) if src.local else []:
                _check_lines(f, "text")
            raise NexusError(f"{src.name} rows {start + 1}-{start + BATCH_DOCUMENTS}: bytes that are not UTF-8; "
                             "re-encode the data as UTF-8") from exc
        for i, value in enumerate(values):
            if value is None:
                continue
            if chat:
                try:
                    text = tokenizer.apply_chat_template(value, tokenize=False)
                except Exception as exc:  # noqa: BLE001
                    raise NexusError(f"{_where(src, start + i)}: 'messages' cannot be rendered by the chat template "
                                     f"({exc}); give a list of {{role, content}} objects") from exc
            elif isinstance(value, str):
                text = value
            else:
                raise NexusError(f"{_where(src, start + i)}: {col!r} is not a string but {type(value).__name__} "
                                 f"{str(value)[:40]}; put the document's text in {col!r} as a JSON string")
            if len(text) > MAX_DOCUMENT_CHARS:
                raise NexusError(f"{_where(src, start + i)}: a document of {len(text):,} characters, over the limit "
                                 f"of {MAX_DOCUMENT_CHARS:,} per document; split it into several documents (lines)")
            if text.strip():
                yield text, is_heldout(value)

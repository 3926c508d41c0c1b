"""Raw safetensors access for ``nexus export``: tensors copied as bytes, files written one tensor at a time.

A checkpoint is rewritten file by file. Each output file's tensors are produced one at a time:
untouched ones are copied from the source file as raw bytes (never decoded, so dtype and bytes
are identical, whatever the dtype), changed ones are serialised from a tensor. Data goes to a
body file first; the header (which needs every offset) is written once the body is complete.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from nexus.errors import NexusError

_COPY_CHUNK = 64 << 20
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor's bytes are in a safetensors file.

    Attributes:
        file: the file.
        dtype: safetensors dtype string (``"BF16"``, ``"U8"``, ``"F8_E4M3"`` ...).
        shape: the stored shape.
        start, end: absolute byte offsets of the data in ``file``.
    """

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> tuple[dict[str, RawTensor], dict]:
    """The tensors of a safetensors file in stored order, and its ``__metadata__``.

    :raises NexusError: the file is not a readable safetensors file.
    """
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise NexusError(f"{file} is not a readable safetensors file ({exc}); the base checkpoint is damaged") from exc
    meta = header.pop("__metadata__", None) or {}
    base = 8 + size
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {name: RawTensor(file, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0],
                            base + h["data_offsets"][1]) for name, h in entries}, meta


class StreamingWriter:
    """Write one safetensors file, one tensor at a time (at most one tensor in memory).

    :param path: the file to write (finished by :meth:`close`).
    :param metadata: the file's ``__metadata__``.
    """

    def __init__(self, path: Path, metadata: dict | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._body_path = self.path.with_name(self.path.name + ".body")
        self._body = open(self._body_path, "wb")
        self._header: dict = {}
        self._offset = 0

    def _entry(self, name: str, dtype: str, shape, nbytes: int) -> None:
        if name in self._header:
            raise NexusError(f"tensor {name} written twice to {self.path}")
        self._header[name] = {"dtype": dtype, "shape": list(shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes

    def copy_raw(self, name: str, raw: RawTensor) -> None:
        """Append ``raw``'s bytes unchanged under ``name``."""
        nbytes = raw.end - raw.start
        self._entry(name, raw.dtype, raw.shape, nbytes)
        with open(raw.file, "rb") as src:
            src.seek(raw.start)
            left = nbytes
            while left:
                chunk = src.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise NexusError(f"{raw.file} is truncated (tensor {name}); the base checkpoint is damaged")
                self._write(chunk)
                left -= len(chunk)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any supported dtype) under ``name``."""
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise NexusError(f"cannot write tensor {name} of dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._entry(name, _ST_DTYPES[t.dtype], t.shape, len(data))
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self._body.write(data)
        except OSError as exc:  # named as the file being written, not its body part
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data written so far."""
        return self._offset

    def names(self) -> list[str]:
        return list(self._header)

    def close(self) -> None:
        """Write the header and the body into :attr:`path`."""
        self._body.close()
        header = dict(self._header)
        if self.metadata:
            header = {"__metadata__": self.metadata, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self._body_path, "rb") as body:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(body, out, _COPY_CHUNK)
        self._body_path.unlink()


def source_files(model_path: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order (or the single ``model.safetensors``)."""
    from nexus.checkpoint import INDEX_FILE, SINGLE_FILE

    index = model_path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_path / f for f in dict.fromkeys(weight_map.values())]
    if (model_path / SINGLE_FILE).exists():
        return [model_path / SINGLE_FILE]
    raise NexusError(f"{model_path} has no safetensors weights; only safetensors checkpoints can be exported")


def iter_raw(files: list[Path]) -> Iterator[tuple[Path, dict[str, RawTensor], dict]]:
    """``(file, its tensors, its metadata)`` for every file."""
    for file in files:
        tensors, meta = read_header(file)
        yield file, tensors, meta

"""A lazy reader over a Hugging Face checkpoint directory's safetensors files.

It opens ``model.safetensors`` or the shards listed in ``model.safetensors.index.json`` and
reads single tensors or rows of a tensor (one expert's slice of a fused expert tensor) without
loading anything else. MXFP4-packed tensors (``*_blocks`` + ``*_scales``) are decoded per row.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from nexus.errors import NexusError
from nexus.mxfp4 import decode_mxfp4

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Read tensors lazily from a checkpoint directory.

    :param path: a directory holding ``config.json`` and safetensors weights.
    :raises NexusError: the directory is missing or holds no safetensors weights.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise NexusError(f"{self.path} is not a directory; pass a checkpoint directory with config.json and *.safetensors")
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / SINGLE_FILE).exists():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                self._file_of = {k: self.path / SINGLE_FILE for k in f.keys()}
        else:
            raise NexusError(
                f"{self.path} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are supported"
            )
        self._handles: dict[Path, object] = {}

    @property
    def config(self) -> dict:
        """The checkpoint's ``config.json`` as a dict."""
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise NexusError(f"{self.path} has no config.json")
        return json.loads(cfg.read_text())

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _open(self, name: str):
        if name not in self._file_of:
            raise NexusError(f"tensor {name!r} is not in checkpoint {self.path}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        """The stored shape of tensor ``name``."""
        return list(self._open(name).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``."""
        return self._open(name).get_tensor(name)

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` along its first dimension: ``Tensor[len(rows), ...]``.

        Only those rows are read from disk (one slice per row).
        """
        sl = self._open(name).get_slice(name)
        return torch.stack([sl[r : r + 1][0] for r in rows]) if rows else sl[0:0]

    def read_row_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` along its first dimension, read as one slice.

        For experts stored flat as ``(E*rows, cols)`` (DBRX): expert ``e`` is rows
        ``e*rows:(e+1)*rows``. :return: ``Tensor[stop-start, ...]``.
        """
        return self._open(name).get_slice(name)[start:stop]

    def is_mxfp4(self, name: str) -> bool:
        """Whether ``name`` is stored MXFP4-packed as ``name_blocks`` + ``name_scales``."""
        return f"{name}_blocks" in self and f"{name}_scales" in self

    def has(self, name: str) -> bool:
        """Whether ``name`` is stored, plainly or MXFP4-packed."""
        return name in self or self.is_mxfp4(name)

    def read_expert_matrices(self, name: str, experts: list[int], transposed: bool) -> torch.Tensor:
        """Expert matrices of a fused expert tensor, in ``nn.Linear`` layout, fp32.

        :param name: the in-memory parameter name, e.g. ``model.layers.0.mlp.experts.down_proj``.
            When the checkpoint holds ``name_blocks``/``name_scales`` they are decoded (MXFP4 rows
            are already output features, so no transpose is needed).
        :param experts: expert ids (first-dimension rows).
        :param transposed: the plain tensor is stored ``(E, in, out)`` (used as ``x @ W``) rather
            than ``(E, out, in)``.
        :return: ``Tensor[k, out, in]``.
        """
        if self.is_mxfp4(name):
            blocks = self.read_rows(f"{name}_blocks", experts)
            scales = self.read_rows(f"{name}_scales", experts)
            return decode_mxfp4(blocks, scales, dtype=torch.float32)
        w = self.read_rows(name, experts).float()
        return w.transpose(1, 2).contiguous() if transposed else w

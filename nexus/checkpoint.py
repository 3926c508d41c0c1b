"""A lazy reader over a Hugging Face checkpoint directory's safetensors files.

It opens ``model.safetensors`` or the shards listed in ``model.safetensors.index.json`` and
reads single tensors or rows of a tensor (one expert's slice of a fused expert tensor) without
loading anything else. MXFP4-packed tensors (``*_blocks`` + ``*_scales``) are decoded per row,
block-scaled FP8 weights (``weight`` + ``weight_scale_inv``) per tensor; a weight stored in any
other quantised form is refused by name rather than read as raw codes.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import torch
from nexus.errors import NexusError
from nexus.quant import check_finite
from nexus.quant.fp8 import SCALE_SUFFIX, block_size, decode_fp8
from nexus.quant.mxfp4 import decode_mxfp4
from nexus.tensor_files import open_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_CORRUPT_HINT = "the base checkpoint is damaged: download or save it again"


def check_weight_files(path: str | Path) -> None:
    """Open every safetensors file of the checkpoint directory ``path`` (headers only), so that a
    truncated or corrupt shard is named before a loader that reports it without its name reads it.

    :raises NexusError: naming the first unreadable file.
    """
    for file in sorted(Path(path).glob("*.safetensors")):
        with open_safetensors(file, _CORRUPT_HINT):
            pass


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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise NexusError(f"{index} is not a valid safetensors index ({exc}); "
                                 f"download the checkpoint again") from exc
            self._file_of = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / SINGLE_FILE).exists():
            with open_safetensors(self.path / SINGLE_FILE, _CORRUPT_HINT) as f:
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
            self._handles[file] = open_safetensors(file, _CORRUPT_HINT)
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

    @property
    def quant_method(self) -> str | None:
        """``quantization_config.quant_method`` of ``config.json`` (None for a float checkpoint)."""
        if not hasattr(self, "_quant"):
            qc = self.config.get("quantization_config") if (self.path / "config.json").exists() else None
            self._quant = qc.get("quant_method") if isinstance(qc, dict) else None
        return self._quant

    def _check_decodable(self, name: str) -> None:
        """Refuse, by name, weights stored in a form this reader does not decode.

        Known: plain floats, MXFP4 (``name_blocks``/``name_scales``) and block-scaled FP8
        (``name_scale_inv``). An unknown ``quant_method`` or an unknown companion tensor of
        ``name`` (``.weight_scale``, ``.qweight``, ``_zero_point``, ...) would otherwise be read
        as raw codes.
        """
        method = self.quant_method
        if method not in (None, "mxfp4", "fp8"):
            raise NexusError(
                f"checkpoint {self.path} is quantised with quant_method {method!r}, which NEXUS does not decode; "
                f"save a dequantised (float) copy of it with transformers and pass that"
            )
        if not hasattr(self, "_sorted_keys"):
            self._sorted_keys = sorted(self._file_of)
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        known = {name, f"{name}_blocks", f"{name}_scales", f"{name}{SCALE_SUFFIX}", f"{stem}.bias", f"{name}_bias"}
        start = bisect.bisect_left(self._sorted_keys, stem)
        for key in self._sorted_keys[start:]:
            if not key.startswith(stem):
                break
            rest = key[len(stem):]
            if key not in known and rest[:1] in (".", "_") and rest.count(".") <= 1:
                raise NexusError(
                    f"checkpoint {self.path} stores {name} with a companion tensor {key} that NEXUS does not decode "
                    f"(a quantisation it does not know); save a dequantised (float) copy and pass that"
                )

    def read_weight(self, name: str) -> torch.Tensor:
        """The whole weight ``name`` as fp32 values, decoded when stored FP8 with ``name_scale_inv``.

        :raises NexusError: the weight is stored in a form this reader does not decode (unknown
            ``quant_method``, unknown companion tensors, FP8/integer codes without scales), or it
            (or its scales) holds NaN or infinite values, naming the stored tensor.
        """
        self._check_decodable(name)
        w = self.read(name)
        if f"{name}{SCALE_SUFFIX}" in self:
            scales = self.read(f"{name}{SCALE_SUFFIX}")
            return decode_fp8(w, scales, self._fp8_block(), torch.float32, f"{self.path}: {name}")
        if not w.is_floating_point() or w.element_size() == 1:
            raise NexusError(
                f"checkpoint {self.path} stores {name} as {w.dtype} without the scales needed to decode it; "
                f"save a dequantised (float) copy and pass that"
            )
        check_finite(w, f"{self.path}: {name}", "holds")
        return w.float()

    def _fp8_block(self) -> tuple[int, int]:
        if self.quant_method != "fp8":
            raise NexusError(f"checkpoint {self.path} holds FP8 scale tensors but its config.json has no "
                             f"quantization_config with quant_method fp8 and weight_block_size")
        return block_size(self.config.get("quantization_config"), str(self.path / "config.json"))

    def read_expert_matrices(self, name: str, experts: list[int], transposed: bool) -> torch.Tensor:
        """Expert matrices of a fused expert tensor, in ``nn.Linear`` layout, fp32.

        :param name: the in-memory parameter name, e.g. ``model.layers.0.mlp.experts.down_proj``.
            When the checkpoint holds ``name_blocks``/``name_scales`` they are decoded (MXFP4 rows
            are already output features, so no transpose is needed).
        :param experts: expert ids (first-dimension rows).
        :param transposed: the plain tensor is stored ``(E, in, out)`` (used as ``x @ W``) rather
            than ``(E, out, in)``.
        :return: ``Tensor[k, out, in]``.
        :raises NexusError: as :meth:`read_weight`.
        """
        self._check_decodable(name)
        if self.is_mxfp4(name):
            blocks = self.read_rows(f"{name}_blocks", experts)
            scales = self.read_rows(f"{name}_scales", experts)
            return decode_mxfp4(blocks, scales, dtype=torch.float32, name=f"{self.path}: {name}")
        w = self.read_rows(name, experts)
        if f"{name}{SCALE_SUFFIX}" in self:
            scales = self.read_rows(f"{name}{SCALE_SUFFIX}", experts)
            w = decode_fp8(w, scales, self._fp8_block(), torch.float32, f"{self.path}: {name}")
        elif not w.is_floating_point() or w.element_size() == 1:
            raise NexusError(f"checkpoint {self.path} stores {name} as {w.dtype} without the scales needed to decode "
                             f"it; save a dequantised (float) copy and pass that")
        else:
            check_finite(w, f"{self.path}: {name}", "holds")
        w = w.float()
        return w.transpose(1, 2).contiguous() if transposed else w

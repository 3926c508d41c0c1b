"""The ``collect`` artifact: per-MoE-layer float64 sums of router probabilities.

Per layer (``E`` experts): ``count`` tokens, ``sum_p`` ``Tensor[E]``, ``sum_pp`` ``Tensor[E, E]``,
``topk_count`` ``Tensor[E]`` and ``topk_weight`` ``Tensor[E]`` (see :mod:`nexus.engines.collect` for
how they are gathered). Sums merge by addition, so shards and resumed runs combine exactly.
``collect`` writes it, ``select`` reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from nexus import __version__
from nexus.constants import ROUTER_STATS_META_NAME, ROUTER_STATS_NAME
from nexus.errors import NexusError
from nexus.io import write_json, write_safetensors
from nexus.tensor_files import open_safetensors

log = logging.getLogger(__name__)

FIELDS = ("count", "sum_p", "sum_pp", "topk_count", "topk_weight")  # the sums of one layer, in file order


@dataclass
class LayerStats:
    """The float64 sums of one MoE layer (see the module docstring).

    Attributes:
        layer: decoder layer index.
        num_experts: E.
        top_k: experts per token of the block.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        count: ``Tensor[1]``, tokens counted.
        sum_p: ``Tensor[E]``.
        sum_pp: ``Tensor[E, E]``.
        topk_count: ``Tensor[E]``.
        topk_weight: ``Tensor[E]``.
    """

    layer: int
    num_experts: int
    top_k: int
    scoring: str
    count: torch.Tensor
    sum_p: torch.Tensor
    sum_pp: torch.Tensor
    topk_count: torch.Tensor
    topk_weight: torch.Tensor

    @classmethod
    def zeros(cls, layer: int, num_experts: int, top_k: int, scoring: str, device="cpu") -> "LayerStats":
        """Empty sums for a layer of ``num_experts`` experts."""
        z = dict(dtype=torch.float64, device=device)
        e = num_experts
        return cls(layer, e, top_k, scoring, torch.zeros(1, **z), torch.zeros(e, **z), torch.zeros(e, e, **z),
                   torch.zeros(e, **z), torch.zeros(e, **z))

    def update(self, probs: torch.Tensor, selected: torch.Tensor | None = None) -> None:
        """Add tokens.

        :param probs: ``Tensor[T, E]`` probabilities of the counted tokens (no padding), any float dtype.
        :param selected: ``Tensor[T, k]`` the experts each token is routed to; None: the top-k of ``probs``.
        """
        if probs.shape[0] == 0:
            return
        p = probs.to(torch.float64)
        self.count += p.shape[0]
        self.sum_p += p.sum(0)
        self.sum_pp += p.T @ p
        idx = selected if selected is not None else p.topk(min(self.top_k, self.num_experts), dim=-1).indices
        vals = p.gather(1, idx)
        weights = vals / vals.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        self.topk_count += torch.bincount(idx.reshape(-1), minlength=self.num_experts).to(torch.float64)
        self.topk_weight.index_add_(0, idx.reshape(-1), weights.reshape(-1))

    @property
    def tokens(self) -> int:
        """Tokens counted in this layer."""
        return int(self.count.item())

    def mean(self) -> torch.Tensor:
        """``E[p]``, ``Tensor[E]`` float64."""
        return self.sum_p / self.count

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """Covariance of the probabilities, ``Tensor[E, E]`` float64, normalised by ``N - ddof``
        (``ddof=1``: unbiased, as ``numpy.cov`` and sklearn's PCA).
        """
        n = self.count
        if n.item() <= ddof:
            raise NexusError(f"layer {self.layer}: {self.tokens} tokens are too few for a covariance; collect more data")
        mu = self.sum_p / n
        return (self.sum_pp - n * torch.outer(mu, mu)) / (n - ddof)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The five sums by name (``count``, ``sum_p``, ``sum_pp``, ``topk_count``, ``topk_weight``)."""
        return {name: getattr(self, name) for name in FIELDS}


@dataclass
class RouterStats:
    """Per-layer router statistics plus what they were computed from.

    Attributes:
        layers: ``{layer_index: LayerStats}`` in layer order.
        meta: provenance (family, base fingerprint, data, arguments, progress); see :func:`collect_router_stats`.
    """

    layers: dict[int, LayerStats]
    meta: dict = field(default_factory=dict)

    @classmethod
    def for_blocks(cls, family, blocks, device="cpu", meta: dict | None = None) -> "RouterStats":
        """Empty statistics for the MoE ``blocks`` of a model of ``family``."""
        layers = {}
        for b in blocks:
            scoring = family.router_capture(b).scoring
            layers[b.layer] = LayerStats.zeros(b.layer, b.num_experts, b.top_k, scoring, device)
        return cls(layers, dict(meta or {}))

    @property
    def tokens(self) -> int:
        """Tokens counted (the same in every layer)."""
        return next(iter(self.layers.values())).tokens if self.layers else 0

    def layout(self) -> list[dict]:
        """``[{layer, num_experts, top_k, scoring}]``: what must agree for two stats to merge."""
        return [{"layer": s.layer, "num_experts": s.num_experts, "top_k": s.top_k, "scoring": s.scoring}
                for s in self.layers.values()]

    def merge(self, other: "RouterStats") -> "RouterStats":
        """Add ``other``'s sums into these (in place) and return ``self``.

        :raises NexusError: the two were collected on models with different MoE layouts.
        """
        if self.layout() != other.layout():
            raise NexusError("cannot merge router statistics of models with different MoE layers or expert counts")
        fp, ofp = self.meta.get("base_fingerprint"), other.meta.get("base_fingerprint")
        if fp and ofp and fp != ofp:
            raise NexusError(f"cannot merge router statistics of base {fp} with those of base {ofp}")
        for layer, s in self.layers.items():
            o = other.layers[layer]
            for name in FIELDS:
                getattr(s, name).add_(getattr(o, name).to(getattr(s, name).device))
        self.meta["tokens"] = self.tokens
        return self

    def to(self, device) -> "RouterStats":
        """These statistics with every tensor on ``device`` (a copy when the device changes)."""
        layers = {}
        for layer, s in self.layers.items():
            t = {n: getattr(s, n).to(device) for n in FIELDS}
            layers[layer] = LayerStats(s.layer, s.num_experts, s.top_k, s.scoring, **t)
        return RouterStats(layers, dict(self.meta))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors ``layers.{i}.{count,sum_p,sum_pp,topk_count,topk_weight}``."""
        return {f"layers.{layer}.{n}": t for layer, s in self.layers.items() for n, t in s.tensors().items()}

    def save(self, directory: str | Path) -> Path:
        """Write ``router_stats.safetensors`` (sums + the metadata, so the file alone is complete)
        and ``router_stats.json`` (the metadata, for people) into ``directory``, atomically each.

        :return: the directory.
        """
        directory = Path(directory)
        meta = dict(self.meta, nexus_version=__version__, tokens=self.tokens, layers=self.layout())
        self.meta = meta
        write_safetensors(directory / ROUTER_STATS_NAME, self.state_dict(),
                          metadata={"format": "pt", "nexus_meta": json.dumps(meta, default=str)})
        write_json(directory / ROUTER_STATS_META_NAME, meta)
        return directory

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "RouterStats":
        """Read statistics saved by :meth:`save` from a directory or the ``.safetensors`` file.

        :raises NexusError: no statistics there, or a file not written by ``nexus collect``.
        """
        path = Path(path)
        file = path / ROUTER_STATS_NAME if path.is_dir() else path
        if not file.exists():
            raise NexusError(f"no router statistics at {path} (expected {ROUTER_STATS_NAME}); run `nexus collect` first")
        hint = (f"it is not router statistics: pass the directory `nexus collect` wrote ({ROUTER_STATS_NAME}) "
                f"or collect again")
        with open_safetensors(file, hint, device) as f:
            raw = (f.metadata() or {}).get("nexus_meta")
            if raw is None:
                raise NexusError(f"{file} was not written by `nexus collect` (no nexus metadata); {hint}")
            try:
                meta = json.loads(raw)
                layers = {}
                for info in meta["layers"]:
                    i = info["layer"]
                    t = {n: f.get_tensor(f"layers.{i}.{n}") for n in FIELDS}
                    layers[i] = LayerStats(i, info["num_experts"], info["top_k"], info["scoring"], **t)
            except (ValueError, KeyError, TypeError, SafetensorError) as exc:
                raise NexusError(f"{file} holds damaged router statistics ({type(exc).__name__}: {exc}); "
                                 f"collect again with --overwrite") from exc
        for s in layers.values():
            e = s.num_experts
            shapes = {"count": (1,), "sum_p": (e,), "sum_pp": (e, e), "topk_count": (e,), "topk_weight": (e,)}
            bad = [n for n, shape in shapes.items() if tuple(getattr(s, n).shape) != shape]
            if bad:
                raise NexusError(f"{file} holds damaged router statistics (layer {s.layer}: {', '.join(bad)} "
                                 f"not shaped for {e} experts); collect again with --overwrite")
        return cls(layers, meta)

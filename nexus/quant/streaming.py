"""Routed experts kept in host memory and streamed to the compute device one MoE layer at a time.

With ``experts_on="host"`` (``--experts-on host``) the packed bytes of every
:class:`~nexus.quant.packed_experts.PackedExperts` (MXFP4 blocks/scales, FP8 weight/scale bits)
stay in host memory, pinned once they are first sent to a CUDA device. A layer's bytes are copied
to the device its hidden states are on just before it needs them, and dropped after use:

- forward: fetching layer ``i`` starts the copy of layer ``i + 1`` on a side stream, so the copy
  overlaps layer ``i``'s compute; layer ``i``'s bytes are dropped when its forward returns;
- backward (the packed autograd function decodes again): the same in reverse order; only layers
  whose forward recorded a graph (inputs needing grad) are prefetched;
- gradient checkpointing (reentrant or not): the forward recomputed in backward keeps its bytes
  for the layer's backward that follows, so the recompute and the backward share one copy, and
  every layer below is prefetched (each is recomputed).

The device then holds at most two layers' packed experts (the one in use, the one arriving). The
biases of routed experts are small and stay resident. On a CPU the copy is a no-op; the
:class:`ResidencyLedger` still accounts for what would be on the device (tests assert the
two-layer bound and one fetch per layer per pass with it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging

import torch
from torch import nn

from nexus.errors import NexusError
from nexus.quant.packed_experts import PackedExperts, PackedMatrices

log = logging.getLogger(__name__)

EXPERTS_ON = ("device", "host")


@dataclasses.dataclass
class ResidencyLedger:
    """What a :class:`ExpertStreamer` holds on the compute device (layers are MoE-layer positions).

    :ivar on_device: ``layer -> bytes`` currently on the device (fetched or arriving).
    :ivar peak_bytes: most bytes on the device at once since the last :meth:`reset`.
    :ivar peak_layers: most layers on the device at once since the last :meth:`reset`.
    :ivar fetches: ``"forward"``/``"backward"`` -> ``Counter(layer -> copies started)``; a copy made
        for a forward recomputed in backward counts as ``"backward"``.
    """

    on_device: dict[int, int] = dataclasses.field(default_factory=dict)
    peak_bytes: int = 0
    peak_layers: int = 0
    fetches: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {"forward": collections.Counter(), "backward": collections.Counter()})

    def reset(self) -> None:
        """Start counting fetches and peaks afresh (what is on the device stays)."""
        for counter in self.fetches.values():
            counter.clear()
        self.peak_bytes, self.peak_layers = sum(self.on_device.values()), len(self.on_device)

    def _add(self, layer: int, nbytes: int, kind: str) -> None:
        self.on_device[layer] = nbytes
        self.fetches[kind][layer] += 1
        self.peak_bytes = max(self.peak_bytes, sum(self.on_device.values()))
        self.peak_layers = max(self.peak_layers, len(self.on_device))

    def _drop(self, layer: int) -> None:
        self.on_device.pop(layer, None)


@dataclasses.dataclass
class _Copy:
    """One layer's bytes on the device: ``tensors[(matrices, buffer name)]``, ready after ``event``."""

    tensors: dict
    event: object  # torch.cuda.Event, or None on a CPU
    installed: bool = False


def _in_backward() -> bool:
    # -1 outside a backward pass; torch.utils.checkpoint tells recomputation apart the same way.
    return torch._C._current_graph_task_id() != -1


class ExpertStreamer:
    """Moves the packed bytes of ``modules`` (in execution order) between host and compute device.

    :param modules: the model's :class:`PackedExperts`, in the order its layers run.
    """

    def __init__(self, modules: list[PackedExperts]):
        self.modules = list(modules)
        self.position = {id(m): i for i, m in enumerate(self.modules)}
        self.host = [self._to_host(m) for m in self.modules]
        self.nbytes = [sum(t.numel() * t.element_size() for t in h.values()) for h in self.host]
        self.ledger = ResidencyLedger()
        self.resident: dict[int, _Copy] = {}
        self.expects_backward = [False] * len(self.modules)
        self._stream = None  # the side stream of CUDA copies, made on first use
        self._cleanup_task = None  # the backward pass whose end drops what is left
        self._recomputing = False  # this backward pass recomputes forwards (gradient checkpointing)

    @staticmethod
    def _to_host(module: PackedExperts) -> dict:
        """``(matrices, buffer name) -> host tensor``; marks the matrices so ``.to(device)`` leaves them."""
        host = {}
        for mats in module.modules():
            if isinstance(mats, PackedMatrices):
                for name, buf in list(mats._buffers.items()):
                    if buf is not None:
                        buf = buf.cpu()
                        mats._buffers[name] = buf
                        host[(mats, name)] = buf
                mats.streamed = True
        return host

    def host_bytes(self) -> int:
        """Packed bytes kept in host memory (all layers)."""
        return sum(self.nbytes)

    @contextlib.contextmanager
    def on_device(self, module: PackedExperts, device: torch.device, needs_grad: bool = False,
                  backward: bool = False):
        """Within the block, ``module``'s buffers are its bytes on ``device``.

        :param device: the compute device (that of the layer's hidden states).
        :param needs_grad: a forward that records a graph (its backward will decode again).
        :param backward: called from the layer's backward.
        """
        i = self.position[id(module)]
        in_backward = backward or _in_backward()
        if not in_backward:
            self.expects_backward[i] |= needs_grad
            self._cleanup_task = None  # a backward that failed before its end left it set
        else:
            self._cleanup_after_backward()
            self._recomputing |= not backward
        self._acquire(i, device, in_backward)
        try:
            yield
        finally:
            # A forward recomputed in backward (gradient checkpointing) keeps the bytes for its backward.
            if not (in_backward and not backward and needs_grad):
                self._free(i)

    def _next(self, i: int, in_backward: bool) -> int | None:
        """The layer to prefetch after ``i``: the next one in forward; in backward, the previous one
        (under gradient checkpointing every checkpointed layer is recomputed), else the previous one
        whose forward recorded a graph."""
        if not in_backward:
            return i + 1 if i + 1 < len(self.modules) else None
        if self._recomputing:
            return i - 1 if i > 0 else None
        return next((j for j in range(i - 1, -1, -1) if self.expects_backward[j]), None)

    def _acquire(self, i: int, device: torch.device, in_backward: bool) -> None:
        target = self._next(i, in_backward)
        for j in [j for j in self.resident if j not in (i, target)]:
            self._free(j)
        kind = "backward" if in_backward else "forward"
        if i not in self.resident:
            self._fetch(i, device, kind)
        copy = self.resident[i]
        if not copy.installed:
            if copy.event is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(copy.event)
                for t in copy.tensors.values():
                    t.record_stream(stream)  # not reused by the side stream before this stream is done with it
            for (mats, name), t in copy.tensors.items():
                mats._buffers[name] = t
            copy.installed = True
        if target is not None and target not in self.resident:
            self._fetch(target, device, kind)

    def _fetch(self, i: int, device: torch.device, kind: str) -> None:
        """Start copying layer ``i``'s bytes to ``device`` (on the side stream on CUDA)."""
        host, event = self.host[i], None
        if device.type == "cuda":
            for key, t in host.items():
                if not t.is_pinned():
                    host[key] = t.pin_memory()  # once per layer: copies from pinned memory run asynchronously
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._stream):
                tensors = {key: t.to(device, non_blocking=True) for key, t in host.items()}
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            tensors = {key: t.to(device) for key, t in host.items()}  # the same tensors on a CPU
        self.resident[i] = _Copy(tensors, event)
        self.ledger._add(i, self.nbytes[i], kind)

    def _free(self, i: int) -> None:
        """Drop layer ``i``'s device bytes; its buffers are the host bytes again."""
        copy = self.resident.pop(i, None)
        if copy is None:
            return
        for (mats, name) in copy.tensors:
            mats._buffers[name] = self.host[i][(mats, name)]
        self.ledger._drop(i)

    def free_all(self) -> None:
        """Drop every layer's device bytes (after a backward, or a forward left unfinished)."""
        for i in list(self.resident):
            self._free(i)

    def _cleanup_after_backward(self) -> None:
        """Once per backward pass: drop what is left on the device when it ends (a prefetched layer
        whose backward did not run), and forget which forwards recorded a graph."""
        if self._cleanup_task is not None:  # queued already, in this pass or the one enclosing it (reentrant)
            return
        self._cleanup_task = torch._C._current_graph_task_id()

        def done():
            self.free_all()
            self.expects_backward = [False] * len(self.modules)
            self._cleanup_task, self._recomputing = None, False

        torch.autograd.Variable._execution_engine.queue_callback(done)


def stream_experts(model: nn.Module, what: str = "model") -> ExpertStreamer:
    """Keep the packed routed experts of ``model`` in host memory, streamed to the device per layer.

    Afterwards ``model.to(device)`` moves everything but the packed bytes; the streamer is
    ``model._nexus_streamer``. Calling it again returns the existing streamer.

    :param what: how errors name the model (its path, say).
    :raises NexusError: ``model`` holds no packed experts (nothing to stream).
    """
    existing = getattr(model, "_nexus_streamer", None)
    if existing is not None:
        return existing
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    if not modules:
        raise nothing_to_stream(what)
    streamer = ExpertStreamer(modules)
    for m in modules:
        m.streamer = streamer
    model._nexus_streamer = streamer
    log.info("%s: %d MoE layers keep their packed experts in host memory (%.1f MB), streamed to the device "
             "per layer", what, len(modules), streamer.host_bytes() / 2**20)
    return streamer


def nothing_to_stream(what: str) -> NexusError:
    """The error for ``experts_on="host"`` on a model ``what`` that keeps no routed experts packed."""
    return NexusError(f"{what}: experts_on='host' (--experts-on host) streams routed experts kept packed "
                      f"(MXFP4 or FP8 checkpoints), and this model keeps none packed (a float checkpoint, or "
                      f"loaded with dequantize); use --experts-on device")


def check_experts_on(value: str, flag: str = "--experts-on") -> str:
    """``value`` if it is one of :data:`EXPERTS_ON`.

    :raises NexusError: any other value.
    """
    if value not in EXPERTS_ON:
        raise NexusError(f"{flag} must be one of {', '.join(EXPERTS_ON)}, got {value!r}")
    return value

"""The input embedding table kept in host memory (``--embeddings-on host``, ``load_model(embeddings_on="host")``).

A large vocabulary makes the input embedding one of the biggest frozen tensors (201,088 x 2,880 in
bf16 is 1.1 GiB for GPT-OSS). With ``embeddings_on="host"`` the table stays in host memory: the
token ids go to the host, the lookup runs there, and only the looked-up rows (``[B, S, hidden]``)
move to the compute device, from pinned memory without blocking on CUDA. ``model.to(device)`` (and
accelerate's placement) moves every other tensor and only records ``device`` as where the rows go;
a dtype cast still applies to the table, on the host.

The module keeps its class (a subclass is swapped in), its parameter names and its state dict, so
checkpoints, adapters and the self teacher (the same model, adapter off) see no difference; on a
CPU the rows are already where they go, and results are bit-identical. A model whose output head
shares the table (``tie_word_embeddings``) is refused: the head runs on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from torch import nn

from nexus.errors import NexusError

log = logging.getLogger(__name__)

EMBEDDINGS_ON = ("device", "host")


@dataclasses.dataclass
class TransferLedger:
    """What a host embedding sent to its compute device since the last :meth:`reset` (counted on a
    CPU too, where nothing moves).

    :ivar lookups: forward calls.
    :ivar rows: token rows looked up.
    :ivar nbytes: bytes of the looked-up rows sent to the compute device.
    """

    lookups: int = 0
    rows: int = 0
    nbytes: int = 0

    def reset(self) -> None:
        """Start counting afresh."""
        self.lookups = self.rows = self.nbytes = 0


class HostEmbedding:
    """Mixed into the class of a model's input embedding module by :func:`keep_embeddings_on_host`.

    :ivar compute_device: where the looked-up rows go (the device of the last ``.to()``).
    :ivar ledger: a :class:`TransferLedger`.
    """

    compute_device: torch.device
    ledger: TransferLedger

    def _apply(self, fn, recurse=True):
        # A zero-element probe tells where and in what dtype the caller wants each tensor; the
        # tensors take the dtype and stay on the host.
        self.compute_device = fn(self.weight.new_empty(0)).device
        return super()._apply(lambda t: t.to(dtype=fn(t.new_empty(0)).dtype), recurse)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``input_ids: Tensor[B, S]`` (any device) -> ``Tensor[B, S, hidden]`` on :attr:`compute_device`."""
        rows = super().forward(input_ids.to(self.weight.device), *args, **kwargs)
        self.ledger.lookups += 1
        self.ledger.rows += input_ids.numel()
        self.ledger.nbytes += rows.numel() * rows.element_size()
        if self.compute_device.type == "cuda" and not rows.requires_grad:
            rows = rows.pin_memory()  # so that the copy below does not block the host
        return rows.to(self.compute_device, non_blocking=True)


@functools.cache
def _host_class(cls: type) -> type:
    return type(f"{cls.__name__}OnHost", (HostEmbedding, cls), {"__module__": cls.__module__})


def keep_embeddings_on_host(model: nn.Module, what: str = "model") -> HostEmbedding:
    """Keep ``model``'s input embedding table in host memory; the lookup runs there.

    Moves the table to the host now; rows go to the device the table was on until the next
    ``model.to(...)``. DDP is told to leave the table alone (``_ddp_params_and_buffers_to_ignore``:
    it is frozen and the same on every process). Calling it again returns the same module.

    :param what: how errors name the model (its path, say).
    :return: the embedding module (a :class:`HostEmbedding`).
    :raises NexusError: the model has no input embedding, or its output head shares the table.
    """
    emb = model.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return emb
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise NexusError(f"{what}: embeddings_on='host' (--embeddings-on host) needs an input embedding table, and "
                         f"this model has none nexus can find (get_input_embeddings()); use --embeddings-on device")
    head = model.get_output_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied or (head is not None and getattr(head, "weight", None) is emb.weight):
        raise NexusError(f"{what}: its output head shares the input embedding table (tie_word_embeddings), which "
                         f"then cannot stay in host memory while the head runs on the device; use "
                         f"--embeddings-on device (embeddings_on='device')")
    device = emb.weight.device
    emb.__class__ = _host_class(type(emb))
    nn.Module._apply(emb, lambda t: t.cpu())
    emb.compute_device, emb.ledger = device, TransferLedger()
    prefix = next(name for name, m in model.named_modules() if m is emb)
    names = [f"{prefix}.{n}" for n, _ in emb.named_parameters()] + [f"{prefix}.{n}" for n, _ in emb.named_buffers()]
    model._ddp_params_and_buffers_to_ignore = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", [])) |
                                                     set(names))
    log.info("%s: the input embedding %s (%.1f MB) stays in host memory", what, list(emb.weight.shape),
             emb.weight.numel() * emb.weight.element_size() / 2**20)
    return emb


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: where a host embedding sends its rows, else its first parameter's
    device (transformers' ``model.device`` reads the first parameter, which is the host table)."""
    emb = next((m for m in model.modules() if isinstance(m, HostEmbedding)), None)
    return emb.compute_device if emb is not None else next(model.parameters()).device


def check_embeddings_on(value: str, flag: str = "--embeddings-on") -> str:
    """``value`` if it is one of :data:`EMBEDDINGS_ON`.

    :raises NexusError: any other value.
    """
    if value not in EMBEDDINGS_ON:
        raise NexusError(f"{flag} must be one of {', '.join(EMBEDDINGS_ON)}, got {value!r}")
    return value

"""Distillation teachers: the base itself (``self``), another model (a path), or a teacher cache.

Every teacher answers :meth:`outputs` for a batch with a :class:`TeacherOutput`: final hidden
states and the output head (online teachers; the vocabulary losses project them a chunk at a time,
:mod:`nexus.chunked_losses`) or cached top-k log-probabilities, plus router probabilities per MoE
layer when it can give them (needed by the router KL and the router drift metrics).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nexus.chunked_losses import OutputHead, forward_hidden
from nexus.errors import NexusError
from nexus.routing import RouterRecorder, router_probs
from nexus.shared_expert import base_view
from nexus.teacher_cache import vocab_fingerprint

log = logging.getLogger(__name__)


@dataclass
class TeacherOutput:
    """What a teacher gives for one batch of ``B`` rows of ``S`` tokens.

    Attributes:
        hidden: ``Tensor[B, S, H]`` final hidden states (online teachers), else None.
        head: the output head turning ``hidden`` into logits (:class:`nexus.chunked_losses.OutputHead`).
        logits: ``Tensor[B, S, V]`` full teacher logits, for a teacher that gives them instead of ``hidden``.
        topk_logprobs: ``Tensor[B*(S-1), k]`` cached log-probs aligned with shifted positions, else None.
        topk_indices: ``Tensor[B*(S-1), k]`` their vocabulary ids.
        router_probs: per MoE layer ``Tensor[B*S, E]`` teacher router probabilities (may be empty).
    """

    hidden: torch.Tensor | None = None
    head: OutputHead | None = None
    logits: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    router_probs: dict[int, torch.Tensor] = field(default_factory=dict)


def _forward_hidden(model, batch, device, autocast) -> TeacherOutput:
    with autocast():
        out = forward_hidden(model, input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), use_cache=False)
    return TeacherOutput(hidden=out.states, head=out.head)


class SelfTeacher:
    """The student's own base: the same model with its shared experts (and trained routers) off.

    No second copy of the base is held; the teacher pass runs under ``no_grad``.
    """

    kind = "self"

    def __init__(self, model: nn.Module, family, blocks, base_originals=None, autocast=contextlib.nullcontext):
        self.model, self.family, self.blocks = model, family, blocks
        self.base_originals = base_originals or {}
        self.autocast = autocast

    def outputs(self, batch: dict, device, want_routers: bool = True) -> TeacherOutput:
        """Teacher hidden states ``Tensor[B, S, H]`` (and head) and router probabilities for ``batch``."""
        with torch.no_grad(), base_view(self.model, self.base_originals):
            recorder = RouterRecorder(self.family, self.blocks if want_routers else [], detach=True)
            with recorder:
                out = _forward_hidden(self.model, batch, device, self.autocast)
            out.router_probs = {layer: recorder.probs(layer) for layer in recorder.logits}
        return out


class ModelTeacher:
    """Another causal LM (a bigger sibling, say) with the same tokenizer, run under ``no_grad``.

    Its router probabilities are used only when its MoE layers have the student's layout
    (same layer indices and expert counts); otherwise router KL and drift are unavailable.
    """

    kind = "model"

    def __init__(self, model: nn.Module, family=None, blocks=(), autocast=contextlib.nullcontext):
        self.model, self.family, self.blocks = model, family, list(blocks)
        self.autocast = autocast

    def outputs(self, batch: dict, device, want_routers: bool = True) -> TeacherOutput:
        with torch.no_grad():
            recorder = RouterRecorder(self.family, self.blocks if (want_routers and self.family) else [], detach=True)
            with recorder:
                out = _forward_hidden(self.model, batch, device, self.autocast)
            out.router_probs = {layer: recorder.probs(layer) for layer in recorder.logits}
        return out


class CacheTeacher:
    """Teacher outputs read from a teacher cache; the batches themselves carry them."""

    kind = "cache"

    def __init__(self, cache):
        self.cache = cache

    def outputs(self, batch: dict, device, want_routers: bool = True) -> TeacherOutput:
        k = batch["teacher_topk_logprobs"].shape[-1]
        out = TeacherOutput(
            topk_logprobs=batch["teacher_topk_logprobs"].reshape(-1, k).to(device),
            topk_indices=batch["teacher_topk_indices"].reshape(-1, k).to(device),
        )
        if want_routers and "teacher_router_logits" in batch:
            logits = batch["teacher_router_logits"]  # [L, B, S, E]
            for i, layer in enumerate(self.cache.meta["router_layers"]):
                out.router_probs[layer] = router_probs(logits[i].reshape(-1, logits.shape[-1]).to(device), self.cache.meta["router_scoring"])
        return out


def check_same_vocab(student_config, student_tokenizer, teacher_path: str | Path, teacher_config) -> None:
    """Refuse a teacher whose tokenizer is not the student's.

    :raises NexusError: vocabulary sizes differ, the teacher's tokenizer cannot be loaded (or is
        empty), or it maps tokens differently.
    """
    sv, tv = student_config.vocab_size, teacher_config.vocab_size
    if sv != tv:
        raise NexusError(
            f"teacher {teacher_path} has vocabulary size {tv} but the model has {sv}: distillation needs the "
            f"same tokenizer; use a teacher from the same model family and tokenizer"
        )
    try:
        from transformers import AutoTokenizer

        teacher_tok = AutoTokenizer.from_pretrained(str(teacher_path))
        if not teacher_tok.get_vocab():
            raise ValueError("its vocabulary is empty")
    except Exception as exc:  # noqa: BLE001 - any failure means the tokenizers cannot be compared
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise NexusError(
            f"cannot load the tokenizer of teacher {teacher_path} ({reason}), so it cannot be checked against the "
            f"model's: distillation needs the same tokenizer; save the model's tokenizer files in {teacher_path}"
        ) from None
    if vocab_fingerprint(teacher_tok) != vocab_fingerprint(student_tokenizer):
        raise NexusError(
            f"the tokenizer of teacher {teacher_path} differs from the model's (same size {tv}, different tokens): "
            f"distillation needs the same tokenizer; use a teacher that shares it"
        )


def same_router_layout(student_blocks, teacher_blocks) -> bool:
    """Whether two models' MoE layers line up (same layer indices and expert counts)."""
    return [(b.layer, b.num_experts) for b in student_blocks] == [(b.layer, b.num_experts) for b in teacher_blocks]

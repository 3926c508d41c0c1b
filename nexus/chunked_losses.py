"""Vocabulary losses from the final hidden states, a chunk of tokens at a time.

The full-logit losses of :mod:`nexus.losses` take ``Tensor[N, V]`` logits and build several fp32
``[N, V]`` copies (log-softmax of student and teacher, their exponentials): about 27 bytes per
token per vocabulary entry, 5.6 GiB for 1,024 tokens at a 201,088-entry vocabulary. Here the model
forward stops at the final hidden states ``Tensor[N, H]`` (:func:`forward_hidden`) and the output
projection (:class:`OutputHead`: the ``lm_head`` weight ``[V, H]``, its bias, the family's logit
post-processing) is applied ``chunk`` tokens at a time inside a :class:`torch.autograd.Function`
that keeps only the hidden states for backward and recomputes each chunk's logits there. No
``[N, V]`` tensor exists at any time; the workspace is ``[chunk, V]``.

Each chunk's loss is the full-logit function of :mod:`nexus.losses` itself (the same definitions,
gradients by autograd), so values and gradients equal the full-logit path up to float summation
order. ``chunk`` 0 picks the chunk from :data:`WORKSPACE_BYTES` (:func:`chunk_tokens`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nexus import losses
from nexus.errors import NexusError

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30
"""Default budget of one chunk's loss workspace (fp32 logits, log-softmax, exp, their gradients)."""

_BYTES_PER_ENTRY = 32  # what one (token, vocabulary entry) costs in a chunk's workspace, with margin
_MIN_CHUNK = 16

# Logit post-processing that transformers models apply after ``lm_head``, keyed by config field,
# in the order they are applied: granite's ``logits / logits_scaling``, cohere's ``logits *
# logit_scale``, gemma's ``tanh(logits / c) * c`` (``final_logit_softcapping``).
_POST_FIELDS = (("logits_scaling", "div"), ("logit_scale", "mul"), ("final_logit_softcapping", "softcap"))
_logged_fallbacks: set[str] = set()


def chunk_tokens(vocab_size: int, chunk: int = 0) -> int:
    """Tokens per chunk: ``chunk`` when positive, else as many as fit :data:`WORKSPACE_BYTES`
    at ``vocab_size`` entries per token (at least 16; 166 at a 201,088-entry vocabulary)."""
    if chunk > 0:
        return int(chunk)
    return max(_MIN_CHUNK, WORKSPACE_BYTES // (_BYTES_PER_ENTRY * max(int(vocab_size), 1)))


@dataclass(frozen=True)
class OutputHead:
    """The output projection from final hidden states to logits.

    ``weight`` ``Tensor[V, H]`` (None: the "hidden states" are already logits, the head is the
    identity), ``bias`` ``Tensor[V]`` or None, ``post``: ``(op, value)`` pairs applied to the
    projected logits in order (``div``, ``mul``, ``softcap``), in the logits' dtype as the model does.
    ``autocast``: ``(device type, enabled, dtype)`` the model's ``lm_head`` ran under (recorded by
    :func:`forward_hidden`), so that the projection here rounds as the model's did; None: ambient.
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    post: tuple[tuple[str, float], ...] = ()
    autocast: tuple[str, bool, torch.dtype] | None = None

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply :attr:`post` to ``logits`` ``Tensor[..., V]`` (elementwise)."""
        for op, value in self.post:
            if op == "div":
                logits = logits / value
            elif op == "mul":
                logits = logits * value
            else:
                logits = torch.tanh(logits / value) * value
        return logits

    def logits(self, hidden: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """``Tensor[n, V]`` logits of ``hidden`` ``Tensor[n, H]`` (``weight``/``bias`` override the
        head's own, to differentiate through them)."""
        weight = self.weight if weight is None else weight
        if weight is None:
            return hidden
        bias = self.bias if bias is None else bias
        with _autocast(self.autocast):
            return self.postprocess(F.linear(hidden, weight, bias))

    def gathered(self) -> "OutputHead":
        """This head with sharded (``DTensor``, FSDP2) tensors gathered whole, once per loss call."""
        if not any(hasattr(t, "full_tensor") for t in (self.weight, self.bias)):
            return self
        return dataclasses.replace(self, weight=_full(self.weight), bias=_full(self.bias))


IDENTITY = OutputHead()
"""The head of full logits: :meth:`OutputHead.logits` returns its input."""


def _autocast(state: tuple[str, bool, torch.dtype] | None):
    if state is None:
        return contextlib.nullcontext()
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded (``DTensor``, FSDP2) tensor gathered whole (differentiably); any other as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``: DDP/DeepSpeed wrappers (``.module``) and
    :class:`nexus.trainers.NexusModel` (``get_base_model()``) taken off."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    return model


def _post_ops(config) -> tuple[tuple[str, float], ...]:
    ops = []
    for name, op in _POST_FIELDS:
        value = getattr(config, name, None)
        if value is not None and not (op in ("div", "mul") and value == 1):
            ops.append((op, float(value)))
    return tuple(ops)


def output_head(model: nn.Module) -> tuple[nn.Module | None, OutputHead]:
    """``(lm_head module, its OutputHead)`` of ``model``, or ``(None, IDENTITY)`` when the output
    projection is not a plain ``nn.Linear`` (a quantised head, say): the losses then take the
    model's full logits (logged once per model class)."""
    lm = causal_lm(model)
    get = getattr(lm, "get_output_embeddings", None)
    head = get() if get is not None else None
    weight = getattr(head, "weight", None)
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward and weight is not None \
            and weight.dim() == 2:
        return head, OutputHead(weight, head.bias, _post_ops(lm.config))
    _log_fallback(lm, f"its output projection is {type(head).__name__}, not a plain Linear")
    return None, IDENTITY


def _log_fallback(model, reason: str) -> None:
    name = type(model).__name__
    if name not in _logged_fallbacks:
        _logged_fallbacks.add(name)
        log.info("vocabulary losses of %s from full logits (%s)", name, reason)


@dataclass
class HiddenStates:
    """A forward stopped before the vocabulary: ``states`` ``Tensor[B, S, H]`` (or the full
    logits ``[B, S, V]`` with the :data:`IDENTITY` head), ``head`` and the model's ``outputs``
    (whose ``logits`` are not logits)."""

    states: torch.Tensor
    head: OutputHead
    outputs: object


@contextlib.contextmanager
def _returning_input(module: nn.Module, sink: list):
    """While active, ``module(x)`` returns ``x`` (and appends it and the autocast state to ``sink``)
    instead of running."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")

    def forward(hidden, *args, **kwargs):
        sink.append((hidden, _autocast_state(hidden.device.type)))
        return hidden

    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def forward_hidden(model: nn.Module, **inputs) -> HiddenStates:
    """Run ``model(**inputs)`` (through any wrapper, so DDP, FSDP and hooks see a normal forward)
    with its ``lm_head`` returning its input: the final hidden states ``Tensor[B, S, H]``.

    The model's own post-processing of the "logits" it got (hidden states) is compared with the
    head's :attr:`OutputHead.post`; a model that does something else to its logits is refused.

    :raises NexusError: the model post-processes its logits in a way the head does not reproduce.
    """
    lm_head, head = output_head(model)
    if lm_head is None:
        out = model(**inputs)
        return HiddenStates(out.logits, IDENTITY, out)
    sink: list[tuple[torch.Tensor, tuple]] = []
    with _returning_input(lm_head, sink):
        out = model(**inputs)
    if len(sink) != 1:
        _log_fallback(causal_lm(model), f"its forward called the output projection {len(sink)} times")
        full = model(**inputs) if sink else out  # not called: the logits came another way
        return HiddenStates(full.logits, IDENTITY, full)
    hidden, autocast = sink[0]
    head = dataclasses.replace(head, autocast=autocast)
    got = getattr(out, "logits", None)
    if got is not None and got is not hidden:
        with torch.no_grad():
            same = got.shape == hidden.shape and torch.equal(got.float(), head.postprocess(hidden).float())
        if not same:
            raise NexusError(
                f"{type(causal_lm(model)).__name__} post-processes its logits in a way the chunked vocabulary "
                f"losses do not know (they apply {list(head.post) or 'nothing'}); add its config field to "
                f"nexus.chunked_losses._POST_FIELDS")
    return HiddenStates(hidden, head, out)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know
        return device_type, False, torch.float32


class _ChunkedVocabSums(torch.autograd.Function):
    """``sum over chunks of fn(head.logits(hidden[chunk]), *rows[chunk])`` for the tuple of scalars
    ``fn`` returns, each chunk's logits computed once for all of them and recomputed in backward;
    saves only ``hidden``, the head's tensors and ``rows``."""

    @staticmethod
    def forward(ctx, fn, head, chunk, hidden, weight, bias, *rows):
        totals = None
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            sums = fn(head.logits(hidden[start:stop], weight, bias), *(r[start:stop] for r in rows))
            totals = list(sums) if totals is None else [t + x for t, x in zip(totals, sums)]
        if totals is None:  # no tokens
            totals = [hidden.new_zeros((), dtype=torch.float32) for _ in fn(head.logits(hidden, weight, bias), *rows)]
        ctx.fn, ctx.head, ctx.chunk = fn, head, chunk
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, weight, bias, *rows)
        return tuple(totals)

    @staticmethod
    def backward(ctx, *grad):
        hidden, weight, bias, *rows = ctx.saved_tensors
        need = ctx.needs_input_grad[3:6]
        grads = [torch.zeros_like(t, dtype=torch.float32) if n else None for t, n in zip((hidden, weight, bias), need)]
        with torch.enable_grad(), _autocast(ctx.autocast):
            for start in range(0, hidden.shape[0], ctx.chunk):
                stop = start + ctx.chunk
                h, w, b = (None if t is None else t.detach().requires_grad_(n)
                           for t, n in zip((hidden[start:stop], weight, bias), need))
                sums = ctx.fn(ctx.head.logits(h, w, b), *(r[start:stop] for r in rows))
                wrt = [t for t, n in zip((h, w, b), need) if n]
                got = iter(torch.autograd.grad(sums, wrt, grad_outputs=grad)) if wrt else iter(())
                if need[0]:
                    grads[0][start:stop] = next(got)
                for i in (1, 2):
                    if need[i]:
                        grads[i] += next(got)
        out = [None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias))]
        return (None, None, None, *out, *(None for _ in rows))


def _chunked_sums(fn, hidden: torch.Tensor, head: OutputHead, rows, chunk: int) -> tuple[torch.Tensor, ...]:
    head = head.gathered()
    vocab = head.weight.shape[0] if head.weight is not None else hidden.shape[-1]
    rows = [r.detach() for r in rows]
    return _ChunkedVocabSums.apply(fn, head, chunk_tokens(vocab, chunk), hidden, head.weight, head.bias, *rows)


def _kl_fn(temperature: float, teacher_head: OutputHead | None):
    """``fn(logits, mask, *teacher rows) -> KL sum``: from teacher hidden states under
    ``teacher_head``, or (``teacher_head`` None) from cached top-k log-probs and ids."""
    if teacher_head is None:
        return lambda logits, m, lp, ix: losses.topk_kl_sum(lp, ix, logits, m, temperature)

    def kl(logits, m, t_hidden):
        with torch.no_grad():
            t_logits = teacher_head.logits(t_hidden)
        return losses.kl_div_sum(t_logits, logits, m, temperature)

    return kl


def ce_and_kl_sums(hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor, *, teacher=None,
                   teacher_topk=None, temperature: float = 1.0,
                   chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE and the distillation KL of the student's logits together, each chunk projected once
    (forward and backward) for both: :func:`cross_entropy_sum` plus :func:`kl_div_sum` (``teacher``)
    or :func:`topk_kl_sum` (``teacher_topk``), the KL over the labelled tokens.

    :param hidden: ``Tensor[N, H]`` student hidden states, shifted as ``labels`` ``Tensor[N]``.
    :param teacher: ``(teacher hidden states Tensor[N, H_t], teacher head)``.
    :param teacher_topk: ``(log-probs Tensor[N, k], ids Tensor[N, k])`` from a teacher cache.
    :return: ``(ce_sum, count, kl_sum)``, scalars (fp32 sums, long count).
    """
    if (teacher is None) == (teacher_topk is None):
        raise NexusError("ce_and_kl_sums needs exactly one of teacher (hidden states, head) and teacher_topk "
                         "(log-probs, ids)")
    kl = _kl_fn(temperature, teacher[1].gathered() if teacher is not None else None)
    rows = [labels, labels != losses.IGNORE_INDEX, *([teacher[0]] if teacher is not None else teacher_topk)]

    def fn(logits, y, m, *t_rows):
        return losses.cross_entropy_sum(logits, y)[0], kl(logits, m, *t_rows)

    ce, kd = _chunked_sums(fn, hidden, head, rows, chunk)
    return ce, (labels != losses.IGNORE_INDEX).sum(), kd


def cross_entropy_sum(hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor,
                      chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nexus.losses.cross_entropy_sum` of ``head.logits(hidden)``, chunked.

    :param hidden: ``Tensor[N, H]`` final hidden states (shifted: row ``t`` predicts ``labels[t]``).
    :param labels: ``Tensor[N]`` target ids, ``-100`` to ignore.
    :param chunk: tokens per chunk (0: :func:`chunk_tokens`).
    :return: ``(loss_sum, count)``: scalar fp32 sum and the number of labelled tokens.
    """
    (total,) = _chunked_sums(lambda logits, y: (losses.cross_entropy_sum(logits, y)[0],), hidden, head, [labels],
                             chunk)
    return total, (labels != losses.IGNORE_INDEX).sum()


def kl_div_sum(teacher_hidden: torch.Tensor, teacher_head: OutputHead, hidden: torch.Tensor, head: OutputHead,
               mask: torch.Tensor, temperature: float = 1.0, chunk: int = 0) -> torch.Tensor:
    """:func:`nexus.losses.kl_div_sum` of the teacher's and the student's logits, chunked.

    :param teacher_hidden: ``Tensor[N, H_t]`` teacher hidden states (no gradient flows to them).
    :param teacher_head: the teacher's head (the student's for the self teacher).
    :param hidden: ``Tensor[N, H]`` student hidden states.
    :param mask: ``Tensor[N]`` bool.
    :return: scalar fp32 sum over masked tokens of ``KL(p_teacher || p_student)`` at ``temperature``.
    """
    kl = _kl_fn(temperature, teacher_head.gathered())
    (total,) = _chunked_sums(lambda logits, m, t_hidden: (kl(logits, m, t_hidden),), hidden, head,
                             [mask, teacher_hidden], chunk)
    return total


def topk_kl_sum(teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor, hidden: torch.Tensor,
                head: OutputHead, mask: torch.Tensor, temperature: float = 1.0, chunk: int = 0) -> torch.Tensor:
    """:func:`nexus.losses.topk_kl_sum` (cached top-k + tail bucket) of the student's logits, chunked.

    :param teacher_logprobs: ``Tensor[N, k]`` cached teacher log-probabilities at ``temperature``.
    :param teacher_indices: ``Tensor[N, k]`` their vocabulary ids.
    :param hidden: ``Tensor[N, H]`` student hidden states.
    :param mask: ``Tensor[N]`` bool.
    """
    kl = _kl_fn(temperature, None)
    (total,) = _chunked_sums(lambda logits, m, lp, ix: (kl(logits, m, lp, ix),), hidden, head,
                             [mask, teacher_logprobs, teacher_indices], chunk)
    return total


def topk_logprobs(hidden: torch.Tensor, head: OutputHead, k: int, temperature: float = 1.0,
                  chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nexus.losses.topk_logprobs` of ``head.logits(hidden)``, chunked (no gradient).

    :param hidden: ``Tensor[..., H]``.
    :return: ``(logprobs[..., k] fp32, indices[..., k] long)``, sorted descending.
    """
    flat, head = hidden.reshape(-1, hidden.shape[-1]), head.gathered()
    vocab = head.weight.shape[0] if head.weight is not None else hidden.shape[-1]
    step = chunk_tokens(vocab, chunk)
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, flat.shape[0], step):
            v, i = losses.topk_logprobs(head.logits(flat[start:start + step]), k, temperature)
            values.append(v)
            indices.append(i)
    width = min(k, vocab)
    if not values:
        return flat.new_zeros(0, width, dtype=torch.float32), flat.new_zeros(0, width, dtype=torch.long)
    shape = (*hidden.shape[:-1], width)
    return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)

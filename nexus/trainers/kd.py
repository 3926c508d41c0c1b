"""Distillation in transformers' ``Trainer`` API: NEXUS's KD term against the same model with the
adapter disabled (no second copy), computed by :mod:`nexus.chunked_losses` exactly as ``nexus train`` does.

Loss of a micro-batch, as ``nexus train``'s (``nexus.training.train_step.loss_to_backpropagate``)::

    (ce_weight * CE_sum + kd_weight * T^2 * KL_sum) / n

with the token sums over the predicted (shifted, label != -100) tokens and ``n`` the predicted
tokens of the whole accumulation window (``num_items_in_batch``, which ``Trainer`` counts the same
way), or of the micro-batch when ``Trainer`` does not pass it. CE and KL are computed from the final
hidden states a chunk of tokens at a time (:mod:`nexus.chunked_losses`): no ``[tokens, vocab]``
logits are kept, for the student or the teacher.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from nexus import chunked_losses
from nexus.errors import NexusError
from nexus.losses import shift_for_next_token

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "disable_adapter"):
        model = model.module  # DDP and friends
    return model


def nexus_kd_loss(model, inputs: dict, *, ce_weight: float = 1.0, kd_weight: float = 1.0, temperature: float = 1.0,
                  num_items_in_batch=None, return_parts: bool = False, chunk_tokens: int = 0):
    """The CE + KD loss of ``model`` on ``inputs``, the teacher being ``model`` with its adapter off.

    :param model: a :class:`nexus.trainers.NexusModel` (possibly wrapped by DDP).
    :param inputs: ``input_ids``/``labels`` ``Tensor[B, S]`` (+ ``attention_mask``/``position_ids``);
        ``labels`` unshifted, ``-100`` where nothing is predicted.
    :param num_items_in_batch: predicted tokens in the whole accumulation window; default this batch's.
    :param return_parts: also return ``{"ce": sum, "kd": sum, "n": count, "outputs": student outputs}``;
        the outputs' ``logits`` ``Tensor[B, S, V]`` are then computed (detached) from the hidden states.
    :param chunk_tokens: tokens per chunk of the losses (0: :func:`nexus.chunked_losses.chunk_tokens`).
    :return: the scalar loss (fp32), or ``(loss, parts)``.
    """
    base = _unwrap(model)
    if not hasattr(base, "disable_adapter"):
        raise NexusError(f"distillation needs a NexusModel (got {type(base).__name__}); wrap the model with "
                         f"nexus.get_nexus_model or nexus.NexusModel.from_pretrained")
    if "labels" not in inputs:
        raise NexusError("distillation needs `labels` in the batch (a causal-LM collator provides them)")
    feed = {k: inputs[k] for k in MODEL_INPUTS if inputs.get(k) is not None}
    if kd_weight:
        with torch.no_grad(), base.disable_adapter():
            teacher = chunked_losses.forward_hidden(model, **feed, use_cache=False)
    student = chunked_losses.forward_hidden(model, **feed, use_cache=False)
    s_hidden, labels = shift_for_next_token(student.states, inputs["labels"])
    if kd_weight:
        t_hidden, _ = shift_for_next_token(teacher.states, inputs["labels"])
        ce, n, kd = chunked_losses.ce_and_kl_sums(s_hidden, student.head, labels, teacher=(t_hidden, teacher.head),
                                                  temperature=temperature, chunk=chunk_tokens)
    else:
        ce, n = chunked_losses.cross_entropy_sum(s_hidden, student.head, labels, chunk_tokens)
        kd = ce.new_zeros(())
    denom = n if num_items_in_batch is None else num_items_in_batch
    denom = torch.as_tensor(denom, device=ce.device, dtype=torch.float32).clamp_min(1.0)
    loss = (ce_weight * ce + kd_weight * float(temperature) ** 2 * kd) / denom
    if return_parts:
        outputs = student.outputs
        with torch.no_grad():
            outputs.logits = student.head.logits(student.states.detach())
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "n": n, "outputs": outputs}
    return loss


class NexusDistillationMixin:
    """Mix into any ``Trainer`` subclass (``class T(NexusDistillationMixin, SFTTrainer)``) to train
    with :func:`nexus_kd_loss` instead of the model's own loss.

    :param kd_weight: weight of the KL term (``nexus train --kd-weight``; default 1).
    :param ce_weight: weight of the cross-entropy term (default 1).
    :param temperature: distillation temperature T (the KL is multiplied by T^2).
    """

    def __init__(self, *args, kd_weight: float = 1.0, ce_weight: float = 1.0, temperature: float = 1.0, **kwargs):
        if temperature <= 0:
            raise NexusError(f"temperature must be positive, got {temperature}")
        self.kd_weight, self.ce_weight, self.temperature = float(kd_weight), float(ce_weight), float(temperature)
        super().__init__(*args, **kwargs)
        # The loss is normalised by num_items_in_batch, so Trainer must count it and not divide by GA again.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``nexus_kd_loss`` on ``inputs`` (``Trainer.compute_loss``'s contract); the outputs' logits
        are computed only when ``return_outputs`` asks for them."""
        result = nexus_kd_loss(model, inputs, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                               temperature=self.temperature, num_items_in_batch=num_items_in_batch,
                               return_parts=return_outputs)
        loss, parts = result if return_outputs else (result, None)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens while DDP averages the gradients (as Trainer does).
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, parts["outputs"]) if return_outputs else loss


class NexusKDTrainer(NexusDistillationMixin, Trainer):
    """transformers' ``Trainer`` training a :class:`nexus.trainers.NexusModel` with CE + KD
    (the teacher: the same model with the adapter off)."""

"""The training loss on real (tiny, random) models stops at the final hidden states and equals the
full-logit reference: ``distill_losses`` and the Trainer KD loss against nexus.losses on the model's
own logits, GraniteMoE's logit scaling included, without any [tokens, vocab] tensor kept for backward."""

from __future__ import annotations

import pytest
import torch

import nexus
from nexus import losses
from nexus.family import resolve_family
from nexus.shared_expert import is_shared_parameter

B, S = 2, 12
REL = 1e-6
GRAD_REL = 1e-5  # parameter gradients: fp32 rounding of the chunked head's backward, through every layer


def _model(family_name: str, logits_scaling: float | None = None):
    from transformers import AutoModelForCausalLM

    family = resolve_family(name=family_name)
    config = family.example_config()
    config.vocab_size = 307  # no other weight of the model ends in this dimension
    if logits_scaling is not None:
        config.logits_scaling = logits_scaling
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = nexus.get_nexus_model(base, nexus.NexusConfig(gate_mode="scalar"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 if "scale" in name else 0.0))
    ids = torch.randint(0, config.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -4:] = 0  # a padded row
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return model, family, batch


def _reference(model, batch, temperature):
    """CE and KL sums from the model's full logits (nexus.losses), teacher: the adapter off."""
    feed = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad(), model.disable_adapter():
        t_logits = model(**feed).logits
    s_logits, labels = losses.shift_for_next_token(model(**feed).logits, batch["labels"])
    t_logits, _ = losses.shift_for_next_token(t_logits, batch["labels"])
    ce, n = losses.cross_entropy_sum(s_logits, labels)
    return ce, losses.kl_div_sum(t_logits, s_logits, labels != -100, temperature), n


class _VocabRowsSaved(torch.autograd.graph.saved_tensors_hooks):
    """Records ``rows``: the most rows of any tensor ``[..., V]`` saved for backward while active,
    the output head's weight (``[V, H]``, saved as its transpose) left aside."""

    def __init__(self, head_weight: torch.Tensor):
        self.rows = 0
        vocab, storage = head_weight.shape[0], head_weight.untyped_storage().data_ptr()

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == vocab and t.untyped_storage().data_ptr() != storage:
                self.rows = max(self.rows, t.numel() // vocab)
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _assert_close(got, want, rel=REL):
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    assert float((got - want).abs().max()) <= rel * max(float(want.abs().max()), 1e-30)


@pytest.mark.parametrize("family_name,scaling", [("gpt_oss", None), ("granitemoe", 3.0)])
def test_distill_losses_equal_the_full_logit_reference(family_name, scaling):
    from nexus.training.teachers import SelfTeacher
    from nexus.training.train_step import distill_losses

    model, family, batch = _model(family_name, scaling)
    base = model.get_base_model()
    temperature = 2.0
    head_weight = base.get_output_embeddings().weight
    with _VocabRowsSaved(head_weight) as full:
        ce_ref, kd_ref, n_ref = _reference(model, batch, temperature)
        ref_grads = _grads(model, ce_ref + 1.7 * kd_ref)
    teacher = SelfTeacher(base, family, family.moe_blocks(base), base_originals={})
    with _VocabRowsSaved(head_weight) as chunked:
        parts = distill_losses(model, batch, teacher, "cpu", kd=True, temperature=temperature, chunk_tokens=5)
        grads = _grads(model, parts.ce + 1.7 * parts.kd)
    assert float(kd_ref.detach()) > 0 and int(parts.n_pred) == int(n_ref)
    _assert_close(parts.ce, ce_ref)
    _assert_close(parts.kd, kd_ref)
    for got, want in zip(grads, ref_grads):
        _assert_close(got, want, GRAD_REL)
    # Saved for backward: [tokens, vocab] tensors by the full-logit path, a chunk's rows at most here.
    assert full.rows >= B * (S - 1) and chunked.rows <= 5


def test_trainer_kd_loss_equals_the_full_logit_reference():
    model, _, batch = _model("granitemoe", 3.0)
    ce_ref, kd_ref, n_ref = _reference(model, batch, 2.0)
    want = (0.7 * ce_ref + 1.3 * 4.0 * kd_ref) / n_ref
    got, parts = nexus.trainers.nexus_kd_loss(model, batch, ce_weight=0.7, kd_weight=1.3, temperature=2.0,
                                              return_parts=True, chunk_tokens=4)
    _assert_close(got, want)
    for g, w in zip(_grads(model, got), _grads(model, want)):
        _assert_close(g, w, GRAD_REL)
    # The outputs handed back to Trainer carry real logits (the model's, scaling included).
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(parts["outputs"].logits, logits, rtol=1e-6, atol=1e-6)

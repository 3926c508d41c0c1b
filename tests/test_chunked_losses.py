"""Chunked vocabulary losses (nexus.chunked_losses) against the full-logit functions of nexus.losses,
which stay the reference: values and gradients, vocabularies above and below the chunk, padding,
temperature, a trainable head, and no [N, V] tensor saved for backward."""

from __future__ import annotations

import pytest
import torch

from nexus import chunked_losses as cl
from nexus import losses
from nexus.errors import NexusError

N, H = 23, 8
REL = 1e-6


def _close(got, want, rel=REL):
    """Equal to ``rel`` relative to the largest magnitude of ``want`` (elementwise for tensors)."""
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert float((got - want).abs().max()) <= rel * max(scale, 1e-30), (got, want)


def _setup(vocab: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).requires_grad_(True)
    weight = torch.randn(vocab, H, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[[1, 5, 6, 17]] = losses.IGNORE_INDEX  # padding
    t_hidden = torch.randn(N, H, generator=g) * 2
    t_weight = torch.randn(vocab, H, generator=g)
    return hidden, cl.OutputHead(weight, b), labels, t_hidden, cl.OutputHead(t_weight)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# Vocabularies above and below the chunk, a chunk of one token, a chunk that does not divide N,
# and one larger than N.
CASES = [(40, 5), (40, 1), (3, 7), (7, 100), (64, 23)]


@pytest.mark.parametrize("vocab,chunk", CASES)
def test_cross_entropy_equals_full_logits(vocab, chunk):
    hidden, head, labels, _, _ = _setup(vocab)
    ref, ref_n = losses.cross_entropy_sum(head.logits(hidden), labels)
    got, n = cl.cross_entropy_sum(hidden, head, labels, chunk)
    assert int(n) == int(ref_n) == N - 4
    _close(got, ref)
    _close(_grad(got, hidden), _grad(ref, hidden))


@pytest.mark.parametrize("vocab,chunk", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_kl_equals_full_logits(vocab, chunk, temperature):
    hidden, head, labels, t_hidden, t_head = _setup(vocab)
    mask = labels != losses.IGNORE_INDEX
    ref = losses.kl_div_sum(t_head.logits(t_hidden), head.logits(hidden), mask, temperature)
    got = cl.kl_div_sum(t_hidden, t_head, hidden, head, mask, temperature, chunk)
    _close(got, ref)
    _close(_grad(got, hidden), _grad(ref, hidden))


@pytest.mark.parametrize("vocab,chunk", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_and_topk_logprobs_equal_full_logits(vocab, chunk, temperature):
    hidden, head, labels, t_hidden, t_head = _setup(vocab)
    mask = labels != losses.IGNORE_INDEX
    k = max(1, vocab // 3)  # a tail bucket
    lp, ix = losses.topk_logprobs(t_head.logits(t_hidden), k, temperature)
    got_lp, got_ix = cl.topk_logprobs(t_hidden, t_head, k, temperature, chunk)
    assert torch.equal(got_ix, ix)
    _close(got_lp, lp)
    ref = losses.topk_kl_sum(lp, ix, head.logits(hidden), mask, temperature)
    got = cl.topk_kl_sum(lp, ix, hidden, head, mask, temperature, chunk)
    _close(got, ref)
    _close(_grad(got, hidden), _grad(ref, hidden))


@pytest.mark.parametrize("teacher_kind", ["model", "cache"])
@pytest.mark.parametrize("vocab,chunk", [(40, 5), (3, 7)])
def test_ce_and_kl_together_equal_the_separate_full_logit_losses(teacher_kind, vocab, chunk):
    """One projection per chunk for both terms; each term's gradient is its own (a weighted sum of
    the two, or either alone, back-propagates as with the full-logit functions)."""
    hidden, head, labels, t_hidden, t_head = _setup(vocab)
    mask = labels != losses.IGNORE_INDEX
    logits = head.logits(hidden)
    ce_ref = losses.cross_entropy_sum(logits, labels)[0]
    if teacher_kind == "model":
        kd_ref = losses.kl_div_sum(t_head.logits(t_hidden), logits, mask, 2.0)
        ce, n, kd = cl.ce_and_kl_sums(hidden, head, labels, teacher=(t_hidden, t_head), temperature=2.0, chunk=chunk)
    else:
        lp, ix = losses.topk_logprobs(t_head.logits(t_hidden), max(1, vocab // 3), 2.0)
        kd_ref = losses.topk_kl_sum(lp, ix, logits, mask, 2.0)
        ce, n, kd = cl.ce_and_kl_sums(hidden, head, labels, teacher_topk=(lp, ix), temperature=2.0, chunk=chunk)
    assert int(n) == N - 4
    _close(ce, ce_ref)
    _close(kd, kd_ref)
    for want, got in ((0.7 * ce_ref + 5.2 * kd_ref, 0.7 * ce + 5.2 * kd), (ce_ref, ce), (kd_ref, kd)):
        _close(torch.autograd.grad(got, hidden, retain_graph=True)[0],
               torch.autograd.grad(want, hidden, retain_graph=True)[0])
    with pytest.raises(NexusError, match="exactly one of teacher"):
        cl.ce_and_kl_sums(hidden, head, labels)


def test_trainable_head_gets_the_full_logit_gradient():
    hidden, head, labels, t_hidden, t_head = _setup(40)
    weight, bias = head.weight.clone().requires_grad_(True), head.bias.clone().requires_grad_(True)
    head = cl.OutputHead(weight, bias)
    mask = labels != losses.IGNORE_INDEX
    ref = losses.cross_entropy_sum(head.logits(hidden), labels)[0] \
        + 3 * losses.kl_div_sum(t_head.logits(t_hidden), head.logits(hidden), mask, 2.0)
    got = cl.cross_entropy_sum(hidden, head, labels, 6)[0] + 3 * cl.kl_div_sum(t_hidden, t_head, hidden, head, mask,
                                                                              2.0, 6)
    _close(got, ref)
    for want, have in zip(torch.autograd.grad(ref, (hidden, weight, bias)),
                          torch.autograd.grad(got, (hidden, weight, bias))):
        _close(have, want)


def test_post_processing_and_identity_head():
    """Scaling and soft-capping are applied to the projected logits; the identity head takes logits."""
    hidden, head, labels, _, _ = _setup(11)
    post = cl.OutputHead(head.weight, head.bias, (("div", 4.0), ("softcap", 3.0)))
    full = torch.tanh(head.logits(hidden) / 4.0 / 3.0) * 3.0
    _close(post.logits(hidden), full)
    ref = losses.cross_entropy_sum(full, labels)[0]
    _close(cl.cross_entropy_sum(hidden, post, labels, 4)[0], ref)
    _close(cl.cross_entropy_sum(full, cl.IDENTITY, labels, 4)[0], ref)


def test_backward_saves_no_tensor_of_tokens_times_vocab():
    """Neither the forward nor the backward of a chunked loss keeps a [N, V]-sized tensor for a
    later backward; the full-logit path does (the check would catch it)."""
    vocab, chunk = 50, 4
    hidden, head, labels, t_hidden, t_head = _setup(vocab)
    mask = labels != losses.IGNORE_INDEX
    lp, ix = cl.topk_logprobs(t_hidden, t_head, 5)

    def largest_saved(compute) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compute()
            loss.backward()
        return max(sizes)

    chunked = [lambda: cl.cross_entropy_sum(hidden, head, labels, chunk)[0],
               lambda: cl.kl_div_sum(t_hidden, t_head, hidden, head, mask, 2.0, chunk),
               lambda: cl.topk_kl_sum(lp, ix, hidden, head, mask, 2.0, chunk),
               lambda: sum(cl.ce_and_kl_sums(hidden, head, labels, teacher=(t_hidden, t_head), chunk=chunk)[::2])]
    for compute in chunked:
        assert largest_saved(compute) <= max(chunk * vocab, vocab * H, N * H) < N * vocab
    assert largest_saved(lambda: losses.cross_entropy_sum(head.logits(hidden), labels)[0]) >= N * vocab


def test_default_chunk_follows_the_workspace_budget():
    assert cl.chunk_tokens(201_088) == cl.WORKSPACE_BYTES // (32 * 201_088)
    assert cl.chunk_tokens(10) > N
    assert cl.chunk_tokens(201_088, 512) == 512
    assert cl.chunk_tokens(10**12) == 16


class _TinyLM(torch.nn.Module):
    """A causal LM shaped as transformers': ``model`` body, ``lm_head``, optional post-processing."""

    def __init__(self, post=None, scaling=None):
        super().__init__()
        self.config = type("Config", (), {"logits_scaling": scaling})()
        self.model = torch.nn.Embedding(13, H)
        self.lm_head = torch.nn.Linear(H, 13, bias=False)
        self.post = post

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        logits = self.lm_head(self.model(input_ids))
        if self.post is not None:
            logits = self.post(logits)
        return type("Out", (), {"logits": logits})()


def test_forward_hidden_stops_before_the_head_and_checks_post_processing():
    torch.manual_seed(0)
    ids = torch.randint(0, 13, (2, 5))
    plain = _TinyLM()
    out = cl.forward_hidden(plain, input_ids=ids)
    assert out.states.shape == (2, 5, H) and out.head.weight is plain.lm_head.weight
    assert torch.equal(out.head.logits(out.states), plain(ids).logits)
    assert "forward" not in plain.lm_head.__dict__  # the head is itself again

    scaled = _TinyLM(post=lambda x: x / 2.5, scaling=2.5)
    out = cl.forward_hidden(scaled, input_ids=ids)
    assert out.head.post == (("div", 2.5),)
    assert torch.equal(out.head.logits(out.states), scaled(ids).logits)

    unknown = _TinyLM(post=lambda x: x * 2.0)
    with pytest.raises(NexusError, match="_TinyLM post-processes its logits"):
        cl.forward_hidden(unknown, input_ids=ids)


def test_forward_hidden_falls_back_to_full_logits_for_another_head():
    class Head(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = _TinyLM()
    model.lm_head = Head(H, 13, bias=False)
    ids = torch.randint(0, 13, (2, 5))
    out = cl.forward_hidden(model, input_ids=ids)
    assert out.head is cl.IDENTITY
    assert torch.equal(out.states, model(ids).logits)

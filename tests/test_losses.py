"""Losses against float64 references written here from the definitions, independently of nexus.losses.

The vocabulary losses run twice: the full-logit functions of :mod:`nexus.losses` and the chunked ones
of :mod:`nexus.chunked_losses` (the logits given as hidden states under an identity projection)."""

from __future__ import annotations

import math

import pytest
import torch

from nexus import chunked_losses, losses


class _Chunked:
    """:mod:`nexus.chunked_losses` behind the full-logit signatures: the logits ``[N, V]`` are the
    hidden states, the head's weight the ``[V, V]`` identity (exact), 5 tokens per chunk."""

    CHUNK = 5

    @staticmethod
    def _head(logits):
        return chunked_losses.OutputHead(torch.eye(logits.shape[-1]))

    def cross_entropy_sum(self, logits, labels):
        return chunked_losses.cross_entropy_sum(logits, self._head(logits), labels, self.CHUNK)

    def kl_div_sum(self, teacher, student, mask, temperature=1.0):
        return chunked_losses.kl_div_sum(teacher, self._head(teacher), student, self._head(student), mask,
                                         temperature, self.CHUNK)

    def topk_kl_sum(self, lp, ix, student, mask, temperature=1.0):
        return chunked_losses.topk_kl_sum(lp, ix, student, self._head(student), mask, temperature, self.CHUNK)

    def topk_logprobs(self, logits, k, temperature=1.0):
        return chunked_losses.topk_logprobs(logits, self._head(logits), k, temperature, self.CHUNK)


@pytest.fixture(params=["full", "chunked"])
def vocab_losses(request):
    """The vocabulary losses under test: :mod:`nexus.losses` or the chunked ones."""
    return losses if request.param == "full" else _Chunked()


def _ref_ce(logits, labels):
    total, n = 0.0, 0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        if y == -100:
            continue
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[y]
        n += 1
    return total, n


def _softmax(row, t=1.0):
    m = max(v / t for v in row)
    e = [math.exp(v / t - m) for v in row]
    s = sum(e)
    return [x / s for x in e]


def _ref_kl(teacher, student, mask, t):
    total = 0.0
    for tr, sr, keep in zip(teacher.double().tolist(), student.double().tolist(), mask.tolist()):
        if not keep:
            continue
        p, q = _softmax(tr, t), _softmax(sr, t)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
    return total


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    n, v = 12, 17
    return torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3


def test_cross_entropy_matches_float64_reference(logits, vocab_losses):
    student, _ = logits
    labels = torch.tensor([3, -100, 0, 16, 5, -100, 7, 7, 1, 2, -100, 9])
    s, n = vocab_losses.cross_entropy_sum(student, labels)
    ref, ref_n = _ref_ce(student, labels)
    assert int(n) == ref_n == 9
    assert float(s) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_kl_matches_float64_reference(logits, vocab_losses, temperature):
    teacher, student = logits
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    got = vocab_losses.kl_div_sum(teacher, student, mask, temperature)
    assert float(got) == pytest.approx(_ref_kl(teacher, student, mask, temperature), rel=1e-5)
    assert float(vocab_losses.kl_div_sum(teacher, teacher, mask, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_equals_full_kl_when_k_is_vocab(logits, vocab_losses):
    teacher, student = logits
    mask = torch.ones(teacher.shape[0], dtype=torch.bool)
    mask[3] = False
    for t in (1.0, 2.0):
        lp, ix = vocab_losses.topk_logprobs(teacher, teacher.shape[-1], t)
        got = vocab_losses.topk_kl_sum(lp, ix, student, mask, t)
        assert float(got) == pytest.approx(_ref_kl(teacher, student, mask, t), rel=1e-5)


def test_topk_kl_with_tail_bucket_matches_reference(logits, vocab_losses):
    """k < V: the KL between the (k+1)-outcome projections, recomputed by hand in float64."""
    teacher, student = logits
    k = 5
    mask = torch.ones(teacher.shape[0], dtype=torch.bool)
    lp, ix = vocab_losses.topk_logprobs(teacher, k)
    got = float(vocab_losses.topk_kl_sum(lp, ix, student, mask))
    ref = 0.0
    for tr, sr, idx in zip(teacher.double().tolist(), student.double().tolist(), ix.tolist()):
        p, q = _softmax(tr), _softmax(sr)
        pk, qk = [p[i] for i in idx], [q[i] for i in idx]
        pt, qt = 1 - sum(pk), 1 - sum(qk)
        ref += sum(a * math.log(a / b) for a, b in zip(pk, qk)) + pt * math.log(pt / qt)
    assert got == pytest.approx(ref, rel=1e-4)
    # A lower bound of the full KL (coarse-graining never increases KL).
    assert got <= _ref_kl(teacher, student, mask, 1.0) + 1e-5


def test_topk_kl_gradient_is_finite_when_support_holds_all_mass(vocab_losses):
    teacher = torch.tensor([[30.0, 0.0, -30.0, -30.0]])
    student = torch.zeros(1, 4, requires_grad=True)
    lp, ix = vocab_losses.topk_logprobs(teacher, 2)
    vocab_losses.topk_kl_sum(lp, ix, student, torch.ones(1, dtype=torch.bool)).backward()
    assert torch.isfinite(student.grad).all()


def test_router_kl_entropy_and_drift_match_reference():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(6, 4, generator=g), -1)
    q = torch.softmax(torch.randn(6, 4, generator=g), -1)
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    rows = [i for i in range(6) if mask[i]]
    pd, qd = p.double(), q.double()
    ref_kl = sum(float((pd[i] * (pd[i] / qd[i]).log()).sum()) for i in rows)
    assert float(losses.router_kl_sum(p, q, mask)) == pytest.approx(ref_kl, rel=1e-5)
    ref_bern = ref_kl + sum(float(((1 - pd[i]) * ((1 - pd[i]) / (1 - qd[i])).log()).sum()) for i in rows)
    assert float(losses.router_kl_sum(p, q, mask, "sigmoid")) == pytest.approx(ref_bern, rel=1e-5)
    ref_h = sum(float(-(qd[i] * qd[i].log()).sum()) for i in rows)
    assert float(losses.entropy_sum(q, mask)) == pytest.approx(ref_h, rel=1e-5)
    ref_d = sum(float((qd[i] - pd[i]).abs().mean()) for i in rows)
    assert float(losses.l1_drift_sum(p, q, mask)) == pytest.approx(ref_d, rel=1e-5)


def test_shift_pairs_position_with_next_label():
    logits = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
    lg, lb = losses.shift_for_next_token(logits, labels)
    assert lb.tolist() == [6, 7, 9, -100]
    assert torch.equal(lg[0], logits[0, 0]) and torch.equal(lg[2], logits[1, 0])

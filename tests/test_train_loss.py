"""The loss ``nexus train`` back-propagates and logs, against references written here from the
definitions (float64, from raw token rows and fresh model copies, independently of nexus.losses):
temperature scaling (T^2) with a top-k cache smaller than the vocabulary, the router KL averaged
over layers, padding masked, and the RNG restored on resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data, student_at_step0
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.engines.precompute import PrecomputeConfig, precompute
from nexus.engines.train import train
from nexus.training.train_config import TrainConfig

SEQ = 32
TOP_K = 16  # < the 256-token vocabulary: the tail bucket is exercised
T = 2.0


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    from nexus.data import load_token_data, load_tokenizer

    root = tmp_path_factory.mktemp("loss")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    data = make_data(root / "data.jsonl", n=2)
    rows = load_token_data(data, load_tokenizer(base), SEQ).rows
    assert min(map(len, rows)) < SEQ, "the batch must hold a padded row"
    cache = precompute(PrecomputeConfig(teacher=str(base), data=str(data), output=str(root / "cache"), top_k=TOP_K,
                                        seq_len=SEQ, batch_size=4, rows_per_shard=4, temperature=T))
    return {"base": base, "adapter": make_adapter(base, root / "adapter"), "data": data, "rows": rows, "cache": cache}


def _first_record(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def _batch(rows):
    """Right-padded ids, attention mask and a [B, S] mask of the positions that predict a real token."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    predicts = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        predicts[i, : len(r) - 1] = True
    return ids, attn, predicts


def _grad_norm(model) -> float:
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def _router_probs(model, ids, attn) -> list[torch.Tensor]:
    """Per MoE layer, softmax of the router logits ``[B*S, E]`` (GPT-OSS scoring), captured by hooks."""
    captured = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, out: captured.append(out[0]))
             for layer in model.model.layers]
    try:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, [torch.softmax(c.double(), -1) for c in captured]


def test_cached_topk_kd_at_temperature_is_scaled_by_t_squared_and_padding_is_masked(work, tmp_path):
    config = TrainConfig(model=str(work["base"]), adapter=str(work["adapter"]), teacher=str(work["cache"]),
                         output=str(tmp_path / "run"), seq_len=SEQ, batch_size=len(work["rows"]), max_steps=1,
                         ce_weight=0.7, kd_weight=1.3, temperature=T, log_every=1, save_every=0, max_grad_norm=1e9)
    train(config)
    rec = _first_record(tmp_path / "run")

    from nexus.loading import load_model

    ids, attn, predicts = _batch(work["rows"])
    with torch.no_grad():
        t_logits = load_model(work["base"])(input_ids=ids, attention_mask=attn, use_cache=False).logits
    student = student_at_step0(work)
    s_logits = student(input_ids=ids, attention_mask=attn, use_cache=False).logits
    m = predicts[:, :-1].reshape(-1)
    target = ids[:, 1:].reshape(-1)[m]
    s = s_logits[:, :-1].reshape(-1, s_logits.shape[-1])[m].double()
    t = t_logits[:, :-1].reshape(-1, t_logits.shape[-1])[m].double()
    n_pred = int(m.sum())
    ce = F.cross_entropy(s, target, reduction="sum")
    p_all, q_all = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    idx = p_all.topk(TOP_K, -1).indices
    p, q = p_all.gather(-1, idx), q_all.gather(-1, idx)
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
    kl = ((p * (p / q).log()).sum(-1) + p_tail * (p_tail / q_tail).log()).sum()
    loss = (0.7 * ce + 1.3 * T**2 * kl) / n_pred
    loss.backward()

    ce, kl, loss = ce.detach(), kl.detach(), loss.detach()
    assert rec["ce"] == pytest.approx(float(ce) / n_pred, rel=1e-5)
    assert rec["kd"] == pytest.approx(float(kl) / n_pred, rel=1e-4)
    assert rec["loss"] == pytest.approx(float(loss), rel=1e-5)  # the logged loss is the back-propagated one
    assert rec["grad_norm"] == pytest.approx(_grad_norm(student), rel=1e-4)


def test_router_kl_is_averaged_over_layers_and_input_tokens(work, tmp_path):
    rows = work["rows"]
    config = TrainConfig(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]),
                         output=str(tmp_path / "run"), seq_len=SEQ, batch_size=len(rows), max_steps=1, ce_weight=0.5,
                         kd_weight=0.0, router_kl_weight=2.0, log_every=1, save_every=0, max_grad_norm=1e9)
    train(config)
    rec = _first_record(tmp_path / "run")

    from nexus.loading import load_model

    ids, attn, predicts = _batch(rows)
    with torch.no_grad():
        _, p_layers = _router_probs(load_model(work["base"]), ids, attn)
    student = student_at_step0(work)
    s_logits, q_layers = _router_probs(student, ids, attn)
    keep = attn.reshape(-1).bool()
    n_in, n_layers = int(keep.sum()), len(p_layers)
    rkl = sum((p[keep] * (p[keep] / q[keep]).log()).sum() for p, q in zip(p_layers, q_layers))
    m = predicts[:, :-1].reshape(-1)
    ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1])[m].double(), ids[:, 1:].reshape(-1)[m],
                         reduction="sum")
    loss = 0.5 * ce / int(m.sum()) + 2.0 * rkl / (n_in * n_layers)
    loss.backward()

    rkl, loss = rkl.detach(), loss.detach()
    assert n_layers == 3 and float(rkl) > 0
    assert rec["router_kl"] == pytest.approx(float(rkl) / (n_in * n_layers), rel=1e-4)
    assert rec["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert rec["grad_norm"] == pytest.approx(_grad_norm(student), rel=1e-4)


def test_resume_restores_the_rng_that_the_next_step_draws_from(work, tmp_path, monkeypatch):
    """Each step draws from torch's global RNG (as dropout in a shared expert would): a resumed
    run equals a straight one only if the checkpoint's RNG state is restored."""
    import nexus.engines.train as engine

    real = engine.distill_losses

    def noisy(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.ce = parts.ce * (1 + torch.rand(()))
        return parts

    monkeypatch.setattr(engine, "distill_losses", noisy)
    common = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), seq_len=SEQ,
                  batch_size=2, max_steps=4, lr=3e-3, log_every=1, save_every=0, seed=1)
    straight = train(TrainConfig(output=str(tmp_path / "a"), **common))
    train(TrainConfig(output=str(tmp_path / "b"), stop_after=2, **common))
    resumed = train(TrainConfig(output=str(tmp_path / "b"), resume=True, **common))
    a = load_file(str(straight.final / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(resumed.final / ADAPTER_WEIGHTS_NAME))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_chunk_tokens_reaches_the_losses_and_changes_only_rounding(work, tmp_path, monkeypatch):
    """--loss-chunk-tokens sets the chunk of every vocabulary loss (CE and cached top-k KL); a chunk
    of 3 tokens gives the loss and gradient of the default chunk (here larger than the batch)."""
    from nexus import chunked_losses
    from nexus.errors import NexusError

    seen = []
    real = chunked_losses.chunk_tokens
    monkeypatch.setattr(chunked_losses, "chunk_tokens",
                        lambda vocab, chunk=0: seen.append(chunk) or real(vocab, chunk))
    records = {}
    for chunk in (0, 3):
        config = TrainConfig(model=str(work["base"]), adapter=str(work["adapter"]), teacher=str(work["cache"]),
                             output=str(tmp_path / f"run{chunk}"), seq_len=SEQ, batch_size=len(work["rows"]),
                             max_steps=1, temperature=T, log_every=1, save_every=0, max_grad_norm=1e9,
                             loss_chunk_tokens=chunk)
        train(config)
        records[chunk] = _first_record(tmp_path / f"run{chunk}")
    assert seen == [0, 3]  # CE and KD together, once per run
    assert real(256) > SEQ * len(work["rows"])  # the default chunk holds the whole batch
    for key in ("loss", "ce", "kd"):
        assert records[3][key] == pytest.approx(records[0][key], rel=1e-6)
    assert records[3]["grad_norm"] == pytest.approx(records[0]["grad_norm"], rel=1e-5)
    with pytest.raises(NexusError, match="--loss-chunk-tokens must be at least 0, got -1"):
        TrainConfig(model="m", adapter="a", output="o", loss_chunk_tokens=-1)

"""Packed experts under a decode budget (``set_reuse_bytes``, ``--packed-cache-bytes``): a forward that
records a graph keeps its layer's decoded experts for the backward when they fit, with results
bit-identical to decoding again; no-grad passes and a budget of 0 keep nothing."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_conformance import input_ids
from nexus.errors import NexusError
from nexus.loading import load_model
from nexus.quant.packed_experts import set_reuse_bytes
from nexus.quant.packed_loading import packed_modules

EVERYTHING = 2**40


def _forward_backward(model, ids):
    """Logits and the gradient w.r.t. the input embeddings (through every expert and router)."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), emb.grad


def _routed(model):
    """``name -> set of experts`` each packed module is routed to in the next forward (hooks; remove them)."""
    routed, handles = {}, []
    for n, m in packed_modules(model).items():
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: routed.setdefault(n, set()).update(args[1].flatten().tolist())))
    return routed, handles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_reuses_the_forward_decode_bit_identically(gpt_oss_mxfp4_dir, dtype):
    again, reuse = load_model(gpt_oss_mxfp4_dir, dtype=dtype), load_model(gpt_oss_mxfp4_dir, dtype=dtype)
    budget = set_reuse_bytes(reuse, EVERYTHING)
    ids = input_ids(reuse.config, batch=2, seq=9)
    routed, handles = _routed(reuse)
    (la, ga), (lr, gr) = _forward_backward(again, ids), _forward_backward(reuse, ids)
    for h in handles:
        h.remove()
    assert torch.equal(la, lr) and torch.equal(ga, gr)
    for n, m in packed_modules(again).items():
        assert dict(m.decoded) == {e: 2 for e in routed[n]}  # forward and backward each decode
    for n, m in packed_modules(reuse).items():
        assert dict(m.decoded) == {e: 1 for e in routed[n]}  # backward used the forward's decode
    assert budget.held == 0  # everything kept was released by the backward


def test_budget_is_shared_by_the_layers_in_forward_order(gpt_oss_mxfp4_dir):
    model = load_model(gpt_oss_mxfp4_dir)
    modules = list(packed_modules(model).values())
    assert len(modules) >= 2
    first = modules[0]
    k = model.config.num_experts_per_tok
    one_layer = k * first._expert_bytes(torch.float32)  # one token: k experts hit per layer
    budget = set_reuse_bytes(model, one_layer + one_layer // 2)  # room for one layer, not two
    ids = input_ids(model.config, batch=1, seq=1)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    assert budget.held == one_layer
    logits.sum().backward()
    assert budget.held == 0 and budget.peak == one_layer
    assert sorted(first.decoded.values()) == [1] * k
    for m in modules[1:]:
        assert sorted(m.decoded.values()) == [2] * k


def test_no_grad_passes_and_a_zero_budget_keep_nothing(gpt_oss_mxfp4_dir):
    model = load_model(gpt_oss_mxfp4_dir)
    ids = input_ids(model.config, batch=1, seq=4)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    budget = set_reuse_bytes(model, EVERYTHING)
    with torch.no_grad():
        model(inputs_embeds=emb)
    model.requires_grad_(False)
    model(ids)  # grad mode, but nothing to differentiate (frozen base, plain ids)
    assert budget.peak == 0
    zero = set_reuse_bytes(model, 0)
    for m in packed_modules(model).values():
        m.decoded.clear()
    model(inputs_embeds=emb).logits.sum().backward()
    assert zero.held == 0
    assert all(m.decoded and set(m.decoded.values()) == {2} for m in packed_modules(model).values())


def test_a_graph_dropped_without_backward_returns_its_bytes(gpt_oss_mxfp4_dir):
    model = load_model(gpt_oss_mxfp4_dir)
    budget = set_reuse_bytes(model, EVERYTHING)
    emb = model.get_input_embeddings()(input_ids(model.config, batch=1, seq=4)).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    assert budget.held > 0
    del logits  # the graph goes, and with it what its forwards kept
    assert budget.held == 0


def test_host_streamed_experts_with_reuse_equal_resident_ones(gpt_oss_mxfp4_dir):
    resident, host = load_model(gpt_oss_mxfp4_dir), load_model(gpt_oss_mxfp4_dir, experts_on="host")
    budget = set_reuse_bytes(host, EVERYTHING)
    ids = input_ids(host.config, batch=2, seq=5)
    (lr, gr), (lh, gh) = _forward_backward(resident, ids), _forward_backward(host, ids)
    assert torch.equal(lr, lh) and torch.equal(gr, gh)
    assert budget.held == 0 and all(set(m.decoded.values()) == {1} for m in packed_modules(host).values())


def test_a_negative_budget_is_refused_by_name(gpt_oss_mxfp4_dir):
    model = load_model(gpt_oss_mxfp4_dir)
    with pytest.raises(NexusError, match=r"--packed-cache-bytes.*got -1"):
        set_reuse_bytes(model, -1)
    assert set_reuse_bytes(torch.nn.Linear(2, 2), 10) is None  # nothing packed, nothing to budget


def test_train_with_packed_cache_bytes_trains_the_same_adapter_decoding_less(gpt_oss_mxfp4_dir, tmp_path):
    from safetensors.torch import load_file

    from helpers_train import make_adapter, make_base, make_data
    from nexus.constants import ADAPTER_WEIGHTS_NAME
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    base = make_base(gpt_oss_mxfp4_dir, tmp_path / "base")
    args = dict(model=str(base), adapter=str(make_adapter(base, tmp_path / "adapter")),
                data=str(make_data(tmp_path / "data.jsonl", n=8)), seq_len=32, batch_size=2, max_steps=2, lr=3e-3,
                log_every=1, save_every=0, seed=3)
    runs = [train(TrainConfig(**args, output=str(tmp_path / f"out{cache}"), packed_cache_bytes=cache))
            for cache in (0, EVERYTHING)]
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
              for r in runs]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    a, b = (load_file(str(r.final / ADAPTER_WEIGHTS_NAME)) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    decodes = [sum(sum(m.decoded.values()) for m in packed_modules(r.model).values()) for r in runs]
    assert decodes[1] < decodes[0]  # the student's backward decoded nothing again
    with pytest.raises(NexusError, match="--packed-cache-bytes must be at least 0, got -1"):
        TrainConfig(**args, output=str(tmp_path / "bad"), packed_cache_bytes=-1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_reuse_under_gradient_checkpointing(gpt_oss_mxfp4_dir, reentrant):
    plain, ckpt = load_model(gpt_oss_mxfp4_dir), load_model(gpt_oss_mxfp4_dir)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.train()
    budget = set_reuse_bytes(ckpt, EVERYTHING)
    ids = input_ids(ckpt.config, batch=2, seq=5)
    (lp, gp), (lc, gc) = _forward_backward(plain, ids), _forward_backward(ckpt, ids)
    assert torch.equal(lp, lc) and torch.equal(gp, gc)
    assert budget.peak > 0 and budget.held == 0  # kept for a backward, and all given back

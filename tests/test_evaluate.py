"""Evaluation, generation and plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from helpers_train import make_adapter, make_base, make_data
from nexus.engines.evaluate import EvaluateConfig, GenerateConfig, evaluate, generate


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {
        "base": base,
        "adapter": make_adapter(base, root / "adapter", scale=0.2),
        "zero": make_adapter(base, root / "zero", gate_mode="scalar", scale=0.0),
        "data": make_data(root / "heldout.jsonl", n=4),
        "root": root,
    }


def _reference_perplexity(model_dir, data, adapter=None):
    """Row by row (no padding), with transformers' own mean loss weighted by predicted tokens."""
    from nexus.adapter import load_adapter
    from nexus.data import load_token_data, load_tokenizer
    from nexus.loading import load_model

    model = load_model(model_dir)
    if adapter:
        load_adapter(model, adapter)
    rows = load_token_data(data, load_tokenizer(model_dir), 48).rows
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r])
            nll += float(model(input_ids=ids, labels=ids).loss.double()) * (len(r) - 1)
            n += len(r) - 1
    return math.exp(nll / n), n


def test_perplexity_kl_and_router_health(work):
    res = evaluate(EvaluateConfig(model=work["base"], data=work["data"], adapter=work["adapter"], seq_len=48,
                                  batch_size=3))
    ref_base, n = _reference_perplexity(work["base"], work["data"])
    ref_adapted, _ = _reference_perplexity(work["base"], work["data"], work["adapter"])
    assert res["tokens"] == n
    assert res["base"]["perplexity"] == pytest.approx(ref_base, rel=1e-5)
    assert res["adapted"]["perplexity"] == pytest.approx(ref_adapted, rel=1e-5)
    assert res["adapted"]["perplexity"] != pytest.approx(ref_base, rel=1e-4)
    assert res["kl_base_adapted"] > 0
    router = res["adapted"]["router"]
    assert router["layers"] == [0, 1, 2]
    for load, ent in zip(router["load"], router["entropy"]):
        assert len(load) == 8 and sum(load) == pytest.approx(1.0)
        assert 0 < ent <= math.log(8) + 1e-6
    assert res["router_drift"][0] == pytest.approx(0.0, abs=1e-7)  # layer 0 routes before any shared expert
    assert all(d > 0 for d in res["router_drift"][1:])


def test_zero_gate_adapter_is_the_base(work):
    res = evaluate(EvaluateConfig(model=work["base"], data=work["data"], adapter=work["zero"], seq_len=24, batch_size=2,
                                  max_batches=2))
    assert res["kl_base_adapted"] == 0.0
    assert res["adapted"]["perplexity"] == res["base"]["perplexity"]
    assert res["router_drift"] == [0.0, 0.0, 0.0]


def test_cli_evaluate_writes_json(work, tmp_path):
    from nexus.cli import cli

    out = tmp_path / "eval.json"
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(work["base"]), "--adapter", str(work["adapter"]),
                                 "--data", str(work["data"]), "--seq-len", "24", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "adapted" in r.output and json.loads(out.read_text())["adapter"] == str(work["adapter"])


def test_generate_greedy_and_chat(work):
    from nexus.adapter import load_adapter
    from nexus.data import load_tokenizer
    from nexus.loading import load_model

    text = generate(GenerateConfig(model=work["base"], prompt="The Congress", adapter=work["adapter"],
                                   max_new_tokens=8))
    chat = generate(GenerateConfig(model=work["base"], prompt="Hello there", adapter=work["adapter"], chat=True,
                                   max_new_tokens=8))
    model = load_adapter(load_model(work["base"]), work["adapter"])
    tok = load_tokenizer(work["base"])
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert tok.decode(ids[0]).endswith("assistant: ")
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert chat == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    again = generate(GenerateConfig(model=work["base"], prompt="The Congress", adapter=work["adapter"], max_new_tokens=8))
    assert isinstance(text, str) and text == again


def test_plot_run(work, tmp_path):
    from nexus.cli import cli
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    run = tmp_path / "run"
    train(TrainConfig(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(run),
                      seq_len=24, batch_size=2, max_steps=4, log_every=1, save_every=0, sfa_interval=2, router_kl_weight=0.1))
    r = CliRunner().invoke(cli, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert names == sorted(f"{n}.png" for n in ("loss", "kl", "lr", "grad_norm", "throughput", "router_drift", "router_entropy"))
    for p in (run / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert r.exit_code == 1 and "metrics.jsonl" in r.output

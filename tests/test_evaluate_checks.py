"""evaluate (and train) as consumers of artifacts: router load as the family routes, dropped rows reported,
adapters for another base and unwritable outputs refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers_prepare import random_rows
from helpers_train import make_adapter, make_base, make_data
from nexus.constants import ADAPTER_CONFIG_NAME
from nexus.errors import AdapterMismatchError, NexusError


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_checks")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter", scale=0.2),
            "data": make_data(root / "heldout.jsonl", n=3), "root": root}


def test_router_load_uses_the_family_selection_bias_as_collect_does():
    """DeepSeek-V3 routes on biased scores: evaluate's load must count the experts collect counts."""
    from transformers import AutoModelForCausalLM

    from nexus.data import TokenData
    from nexus.engines.evaluate import _RouterTally
    from nexus.engines.collect import CollectArgs, collect_router_stats
    from nexus.family import resolve_family
    from nexus.routing import RouterRecorder

    family = resolve_family(name="deepseek_v3")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.example_config()).eval()
    blocks = family.moe_blocks(model)
    favoured = blocks[0].num_experts - 1
    for b in blocks:
        bias = family.router_capture(b).selection_bias
        assert bias is not None
        with torch.no_grad():
            bias.zero_()
            bias.view(-1)[favoured] = 10.0  # chosen by every token, whatever its probability
    data = TokenData(random_rows(6, 5, 12, seed=1, vocab=model.config.vocab_size), pad_id=0)
    stats = collect_router_stats(model, family, data, CollectArgs(batch_size=4), progress=False)
    tally = _RouterTally(family, blocks)
    with torch.no_grad():
        for _, batch in data.batches(4):
            with RouterRecorder(family, blocks) as rec:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tally.add(rec, batch["attention_mask"].reshape(-1).bool())
    for b in blocks:
        assert torch.equal(tally.load[b.layer], stats.layers[b.layer].topk_count)
        assert tally.load[b.layer][favoured] == data.num_tokens


def test_single_token_rows_are_counted_and_reported(work, caplog):
    from nexus.data import load_token_data, load_tokenizer
    from nexus.engines.evaluate import EvaluateConfig, evaluate

    tok = load_tokenizer(work["base"])
    stream = len(load_token_data(work["data"], tok, 4096).rows[0])  # the packed stream, one row
    seq_len = next(s for s in range(8, 64) if stream % s == 1)  # the last row holds 1 token
    with caplog.at_level("WARNING", logger="nexus.engines.evaluate"):
        res = evaluate(EvaluateConfig(model=work["base"], data=work["data"], seq_len=seq_len, batch_size=8))
    assert res["dropped_rows"] == 1
    assert res["tokens"] == stream - 1 - (stream // seq_len)  # every kept row predicts all but its first token
    assert "1 rows of a single token" in caplog.text


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_unwritable_output_fails_before_loading_anything(work, tmp_path, monkeypatch, where):
    import nexus.loading
    from nexus.engines.evaluate import EvaluateConfig, evaluate

    def must_not_load(*args, **kwargs):
        raise AssertionError("evaluate loaded the model before checking --output")

    monkeypatch.setattr(nexus.loading, "load_model", must_not_load)
    if where == "directory":
        output = tmp_path
    else:
        (tmp_path / "a_file").write_text("")
        output = tmp_path / "a_file" / "eval.json"
    with pytest.raises(NexusError, match=str(output)):
        evaluate(EvaluateConfig(model=work["base"], data=work["data"], adapter=work["adapter"], output=output))


def test_output_is_written(work, tmp_path):
    from nexus.engines.evaluate import EvaluateConfig, evaluate

    out = tmp_path / "sub" / "eval.json"
    res = evaluate(EvaluateConfig(model=work["base"], data=work["data"], seq_len=24, batch_size=4, max_batches=1,
                                  output=out))
    assert json.loads(out.read_text())["tokens"] == res["tokens"]


def _edited_adapter(work, tmp_path, **changes):
    path = tmp_path / "adapter"
    shutil.copytree(work["adapter"], path)
    cfg = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    return path, cfg


def test_adapter_of_another_family_or_other_weights_is_refused(work, tmp_path):
    from nexus.engines.evaluate import EvaluateConfig, evaluate

    path, _ = _edited_adapter(work, tmp_path, family="mixtral", model_type="mixtral", base_fingerprint="0" * 16)
    with pytest.raises(AdapterMismatchError, match="family mixtral"):
        evaluate(EvaluateConfig(model=work["base"], data=work["data"], adapter=path, seq_len=24, max_batches=1))
    shutil.rmtree(path)
    path, cfg = _edited_adapter(work, tmp_path, base_weights_fingerprint="f" * 16)
    assert cfg["base_weights_tensors"]
    with pytest.raises(AdapterMismatchError, match=f"{'f' * 16}, but {work['base']} has weights fingerprint"):
        evaluate(EvaluateConfig(model=work["base"], data=work["data"], adapter=path, seq_len=24, max_batches=1))


def test_train_refuses_an_adapter_of_another_family(work, tmp_path):
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    path, _ = _edited_adapter(work, tmp_path, family="mixtral", model_type="mixtral", base_fingerprint="0" * 16)
    with pytest.raises(AdapterMismatchError, match=f"adapter {path} was made for base fingerprint 0{{16}} "
                                                   r"\(mixtral .*family mixtral\)"):
        train(TrainConfig(model=str(work["base"]), adapter=str(path), data=str(work["data"]),
                          output=str(tmp_path / "run"), seq_len=24, batch_size=2, max_steps=1))

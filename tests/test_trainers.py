"""The PEFT-style wrapper (nexus.trainers.model) under transformers' Trainer and TRL's SFTTrainer, and KD."""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch
from safetensors import safe_open

import nexus
from helpers_trainers import TRAINER_ARGS, base_state, fixed_batch, make_tiny_base, text_dataset, write_jsonl
from nexus.errors import NexusError
from nexus.family import resolve_family
from nexus.shared_expert import is_shared_parameter


@pytest.fixture(scope="module", params=["gpt_oss", "qwen3_moe"])
def base_dir(request, tmp_path_factory):
    return make_tiny_base(resolve_family(name=request.param), tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gpt_oss_base_dir(tmp_path_factory):
    return make_tiny_base(resolve_family(name="gpt_oss"), tmp_path_factory.mktemp("gpt_oss_quick"))


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _sft(model, tokenizer, out, max_steps=3, resume=None, **kwargs):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-2,
                     max_length=32, router_aux_loss_coef=0.0, seed=0, **{**TRAINER_ARGS, **kwargs})
    trainer = SFTTrainer(model=model, args=args, train_dataset=text_dataset(16), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if is_shared_parameter(n)}


def test_sft_trains_only_the_adapter_and_checkpoints_hold_only_it(gpt_oss_base_dir, tmp_path):
    base, tok = _load(gpt_oss_base_dir)
    model = nexus.get_nexus_model(base, nexus.NexusConfig())
    frozen = base_state(base)
    batch = fixed_batch(tok)
    with torch.no_grad():
        before = model(**batch).loss.item()
    layer_calls, mlp = [], base.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *a, **k: layer_calls.append(1) or forward(*a, **k)  # hooks do not see recomputation
    _sft(model, tok, tmp_path / "run", max_steps=4, save_steps=2, gradient_checkpointing=True)
    assert len(layer_calls) == 8  # checkpointing recomputes each forward in backward: 2 calls per step
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(v, base_state(base)[k]) for k, v in frozen.items())
    files = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "nexus_config.json", "optimizer.pt"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    with safe_open(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and all(is_shared_parameter(k) and k.startswith("model.layers.") for k in keys)
    # Only the shared experts were given to the optimizer: base parameters never required grad.
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {n for n in keys}


def test_wrapper_habits(gpt_oss_base_dir, tmp_path, caplog):
    base, tok = _load(gpt_oss_base_dir)
    reference = base(**fixed_batch(tok)).logits
    model = nexus.get_nexus_model(base, nexus.NexusConfig(gate_mode="token", init_strategy="mean_all"))
    assert model.get_base_model() is base
    with caplog.at_level(logging.INFO, logger="nexus.trainers.model"):
        model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in caplog.text
    batch = fixed_batch(tok)
    adapted = model(**batch).logits
    assert not torch.allclose(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(model(**batch).logits, reference)
    assert torch.equal(model(**batch).logits, adapted)
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_model.safetensors", "nexus_config.json"]
    fresh, _ = _load(gpt_oss_base_dir)
    again = nexus.NexusModel.from_pretrained(fresh, tmp_path / "a")
    assert torch.equal(again(**batch).logits, adapted)
    assert not any(p.requires_grad for p in again.parameters())
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(base.config)
    config._name_or_path = ""
    with pytest.raises(NexusError, match="checkpoint directory"):
        nexus.get_nexus_model(AutoModelForCausalLM.from_config(config), nexus.NexusConfig(init_strategy="mean_all"))


def test_sft_resume_equals_uninterrupted(base_dir, tmp_path):
    base, tok = _load(base_dir)
    straight = nexus.get_nexus_model(base, nexus.NexusConfig())
    _sft(straight, tok, tmp_path / "a", max_steps=4, save_steps=2)
    base2, _ = _load(base_dir)
    frozen = base_state(base2)
    resumed = nexus.get_nexus_model(base2, nexus.NexusConfig())
    _sft(resumed, tok, tmp_path / "b", max_steps=4, save_steps=2, resume=str(tmp_path / "a" / "checkpoint-2"))
    a, b = _adapter_tensors(straight), _adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, base_state(base2)[k]) for k, v in frozen.items())


def test_kd_loss_equals_nexus_train(base_dir):
    from nexus.training.train_step import loss_to_backpropagate
    from nexus.training.teachers import SelfTeacher
    from nexus.training.train_step import distill_losses

    base, tok = _load(base_dir)
    model = nexus.get_nexus_model(base, nexus.NexusConfig(gate_mode="scalar"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if "scale" in name else 0.0))
    batch = fixed_batch(tok)
    settings = dict(ce_weight=0.7, kd_weight=1.3, temperature=2.0)
    ours, parts = nexus.trainers.nexus_kd_loss(model, batch, return_parts=True, **settings)
    family = resolve_family(base.config)
    theirs = distill_losses(base, batch, SelfTeacher(base, family, family.moe_blocks(base)), "cpu", kd=True,
                            temperature=settings["temperature"])
    reference = loss_to_backpropagate(types.SimpleNamespace(router_kl_weight=0.0, **settings), theirs.ce, theirs.kd,
                                      theirs.router_kl, float(theirs.n_pred), float(theirs.n_in), 1)
    assert parts["kd"] > 0
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_kd_trainer_with_gradient_accumulation(gpt_oss_base_dir, tmp_path):
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    base, tok = _load(gpt_oss_base_dir)
    model = nexus.get_nexus_model(base, nexus.NexusConfig())
    data = text_dataset(16).map(lambda r: tok(r["text"], truncation=True, max_length=32), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="no", **TRAINER_ARGS)
    trainer = nexus.trainers.NexusKDTrainer(model=model, args=args, train_dataset=data, kd_weight=1.0,
                                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    frozen = base_state(base)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert all(torch.equal(v, base_state(base)[k]) for k, v in frozen.items())


def test_trainer_adapter_loads_in_nexus_and_back(gpt_oss_base_dir, tmp_path):
    from click.testing import CliRunner

    from nexus.cli import cli
    from nexus.loading import load_model

    base, tok = _load(gpt_oss_base_dir)
    model = nexus.get_nexus_model(base, nexus.NexusConfig(gate_mode="scalar"))
    _sft(model, tok, tmp_path / "run", max_steps=2, save_steps=2)
    adapter = tmp_path / "run" / "checkpoint-2"
    batch = fixed_batch(tok)
    with torch.no_grad():
        expected = model(**batch).logits
        native = nexus.load_adapter(load_model(gpt_oss_base_dir, dequantize=True), adapter)
        torch.testing.assert_close(native(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"text": r["text"]} for r in text_dataset(4)])
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(gpt_oss_base_dir), "--adapter", str(adapter),
                                 "--data", str(data), "--seq-len", "24", "--output", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    # And back: the adapter nexus loads is the one the wrapper trains further.
    again = nexus.NexusModel.from_pretrained(_load(gpt_oss_base_dir)[0], adapter, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert {n for n, p in again.named_parameters() if p.requires_grad}
    _sft(again, tok, tmp_path / "run2", max_steps=1, save_strategy="no")


def test_merge_and_unload(gpt_oss_base_dir):
    base, tok = _load(gpt_oss_base_dir)
    model = nexus.get_nexus_model(base, nexus.NexusConfig(gate_mode="scalar", init_strategy="mean_all"))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "nexus_shared_scale" in name:
                p.fill_(0.7)
        batch = fixed_batch(tok)
        expected = model(**batch).logits
        merged = model.merge_and_unload()
        assert not any("nexus" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    token, _ = _load(gpt_oss_base_dir)
    with pytest.raises(NexusError, match="token"):
        nexus.get_nexus_model(token, nexus.NexusConfig(gate_mode="token")).merge_and_unload()


def test_peft_cannot_host_nexus_as_a_method():
    """docs/trainers.md: peft 0.21's register_peft_method accepts only members of its closed PeftType enum."""
    from peft.utils import register_peft_method

    with pytest.raises(ValueError, match="PeftType"):
        register_peft_method(name="nexus", config_cls=nexus.NexusConfig, model_cls=nexus.NexusModel)


def test_packed_base_counts_its_experts_as_the_dequantised_one(gpt_oss_base_dir, tmp_path):
    from nexus.loading import load_model
    from nexus.quant.packed_loading import packed_modules

    packed = load_model(gpt_oss_base_dir)
    assert packed_modules(packed), "the tiny GPT-OSS base should load packed"
    counts = [nexus.get_nexus_model(m, nexus.NexusConfig(gate_mode="scalar")).get_nb_trainable_parameters()
              for m in (packed, load_model(gpt_oss_base_dir, dequantize=True))]
    assert counts[0] == counts[1]

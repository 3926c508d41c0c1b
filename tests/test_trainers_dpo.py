"""TRL's DPOTrainer on a NexusModel: the reference is the same model with the adapter disabled."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

import nexus
from helpers_trainers import TRAINER_ARGS, make_tiny_base, preference_rows
from nexus.family import resolve_family


def _alive_parameters() -> tuple[int, int]:
    params = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)]
    return len(params), sum(p.numel() for p in params)


def test_dpo_uses_the_adapter_disabled_model_as_reference(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base_dir = make_tiny_base(resolve_family(name="gpt_oss"), tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = nexus.get_nexus_model(base, nexus.NexusConfig(gate_mode="token", init_strategy="mean_all"))
    gc.collect()
    before = _alive_parameters()
    args = DPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     max_length=48, router_aux_loss_coef=0.0, save_strategy="no", **TRAINER_ARGS)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_rows(8)),
                         processing_class=tok)
    assert trainer.ref_model is None
    trainer.train()
    gc.collect()
    assert _alive_parameters() == before  # no reference copy, not even of the adapter
    assert sum(isinstance(o, type(base)) for o in gc.get_objects()) == 1

    batch = next(iter(trainer.get_train_dataloader()))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    # The base model's own log-probabilities of the completions, from a fresh load.
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        sums = (logp * batch["completion_mask"][:, 1:]).sum(-1)
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = chosen.shape[0]
    torch.testing.assert_close(chosen, sums[:n], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(rejected, sums[n:], rtol=1e-4, atol=1e-3)
    assert not torch.allclose(adapted, logits, atol=1e-3)  # the policy is not the base

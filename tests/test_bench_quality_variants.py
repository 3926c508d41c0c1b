"""The quality benchmark's methods as data (variant files) and its losses (nexus.losses)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("peft")

from nexus.errors import NexusError  # noqa: E402


def _write(directory: Path, name: str, doc: dict) -> None:
    (directory / f"{name}.json").write_text(json.dumps(doc))


def test_a_variant_is_a_file_over_the_defaults(tmp_path):
    from benchmarks.quality.methods import load_methods

    _write(tmp_path, "defaults", {"kind": "nexus", "convert": {"strategy": "pca", "gate_mode": "scalar"},
                                  "train": {"kd_weight": 0.0, "temperature": 1.0}})
    _write(tmp_path, "nexus", {"about": "reference"})
    _write(tmp_path, "lora", {"kind": "lora_experts", "budget_of": "nexus"})
    assert [m.name for m in load_methods(tmp_path)] == ["nexus", "lora"]
    _write(tmp_path, "nexus-kd-token", {"convert": {"gate_mode": "token"}, "train": {"kd_weight": 0.5}})
    by_name = {m.name: m for m in load_methods(tmp_path)}
    kd = by_name["nexus-kd-token"]
    # Nested objects merge key by key over the defaults.
    assert kd.convert == {"strategy": "pca", "gate_mode": "token"}
    assert kd.train == {"kd_weight": 0.5, "temperature": 1.0}
    assert kd.gate == "token" and kd.kd_weight == 0.5 and by_name["nexus"].kd_weight == 0.0


@pytest.mark.parametrize("doc, words", [
    ({"colour": "red"}, "unknown key"),
    ({"kind": "adapters"}, "kind"),
    ({"train": {"lr": 1.0}}, "cannot be set"),
    ({"train": {"kd_wieght": 1.0}}, "cannot be set"),
    ({"convert": {"output": "x"}}, "cannot be set"),
    ({"kind": "lora_experts", "budget_of": "lora-other"}, "not a NEXUS variant"),
    ({"width_fraction": 0}, "width_fraction"),
])
def test_a_bad_variant_names_its_file(tmp_path, doc, words):
    from benchmarks.quality.methods import load_methods

    _write(tmp_path, "defaults", {"kind": "nexus"})
    _write(tmp_path, "nexus", {})
    _write(tmp_path, "bad", doc)
    with pytest.raises(NexusError, match=words) as exc:
        load_methods(tmp_path)
    assert "bad" in str(exc.value)


def test_shipped_variants_cover_the_compared_methods():
    from benchmarks.quality.compare import FACTORS, REFERENCE
    from benchmarks.quality.methods import METHODS_BY_NAME, MILESTONE_METHODS

    assert REFERENCE in METHODS_BY_NAME
    assert all(name in METHODS_BY_NAME for _, variants in FACTORS.values() for name in variants)
    assert {METHODS_BY_NAME[n].kind for n in ("lora-experts", "lora-attention", "full-experts")} == {
        "lora_experts", "lora_attention", "full_experts"}
    assert set(MILESTONE_METHODS) == {"nexus", "nexus-init-mean_all", "lora-experts", "full-experts"}


def test_nexus_variants_become_the_product_stage_configs(tmp_path):
    from benchmarks.quality.methods import METHODS_BY_NAME, shared_width
    from benchmarks.quality.nexus_path import nexus_configs
    from benchmarks.quality.run import settings_of
    from nexus.engines.convert_config import ConvertConfig
    from nexus.training.train_config import TrainConfig

    cfg = {"steps": 8, "batch_size": 2, "warmup_frac": 0.1, "eval_points": 2}

    def configs(name):
        m = METHODS_BY_NAME[name]
        s = settings_of(cfg, m, 1e-3, 3)
        return nexus_configs(m, "base", "data.jsonl", "sel.json", shared_width(m, 64), s, 32, tmp_path)

    conv, train = configs("nexus")
    assert isinstance(conv, ConvertConfig) and isinstance(train, TrainConfig)
    assert (conv.strategy, conv.gate_mode, conv.selection) == ("pca", "scalar", "sel.json")
    assert conv.shared_intermediate_size == 64
    assert (train.adapter, train.teacher, train.kd_weight, train.sfa_interval) == (conv.output, "self", 0.0, 0)
    assert (train.max_steps, train.batch_size, train.lr, train.seed, train.save_every) == (8, 2, 1e-3, 3, 4)
    assert configs("nexus-kd")[1].kd_weight == 1.0
    assert configs("nexus-gate-token")[0].gate_mode == "token"
    assert configs("nexus-router")[1].train_routers is True
    assert configs("nexus-init-mean_all")[0].selection is None
    assert configs("nexus-small")[0].shared_intermediate_size == 16
    assert configs("nexus-sfa")[1].sfa_interval == 2


def test_losses_and_perplexity_are_next_token_ce_over_labelled_tokens(gpt_oss_model):
    from benchmarks.quality.evaluate import causal_ce, kd_loss, perplexity

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = -100
    direct = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(causal_ce(logits, labels)) == pytest.approx(float(direct), rel=1e-6)
    mask = (labels[:, 1:] != -100).reshape(-1)
    p = F.log_softmax(teacher[:, :-1].reshape(-1, 11) / 2, -1)
    q = F.log_softmax(logits[:, :-1].reshape(-1, 11) / 2, -1)
    kl = ((p.exp() * (p - q)).sum(-1)[mask]).mean() * 4
    assert float(kd_loss(logits, teacher, labels, temperature=2.0)) == pytest.approx(float(kl), rel=1e-5)

    rows = torch.randint(3, gpt_oss_model.config.vocab_size, (3, 16), generator=g)
    with torch.no_grad():
        hf = [float(gpt_oss_model(input_ids=r[None], labels=r[None]).loss) for r in rows]
    assert perplexity(gpt_oss_model, rows, batch_size=2) == pytest.approx(math.exp(sum(hf) / len(hf)), rel=1e-5)


def test_retitling_a_variant_keeps_its_runs_but_changing_its_training_does_not():
    import dataclasses

    from benchmarks.quality.methods import METHODS_BY_NAME
    from benchmarks.quality.run import same_training, variant_digest

    m = METHODS_BY_NAME["nexus-kd-general"]
    done = {"variant": m.definition(), "variant_digest": variant_digest(m)}
    retitled = dataclasses.replace(m, about="another title", milestone=not m.milestone, curve="another series")
    assert variant_digest(retitled) != done["variant_digest"] and same_training(done, retitled)
    retrained = dataclasses.replace(m, train={**m.train, "kd_weight": 0.5})
    assert not same_training(done, retrained)
    assert not same_training({"variant_digest": "old"}, retitled)

"""The quality benchmark's ``kd_on`` variant key: distillation on the general stream (``--kd-data``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("peft")

from nexus.errors import NexusError  # noqa: E402

CFG = {"steps": 8, "batch_size": 2, "warmup_frac": 0.1, "eval_points": 2}


def _configs(name, tmp_path, general_path=None):
    from benchmarks.quality.methods import METHODS_BY_NAME, shared_width
    from benchmarks.quality.nexus_path import nexus_configs
    from benchmarks.quality.run import settings_of

    m = METHODS_BY_NAME[name]
    return nexus_configs(m, "base", "domain.jsonl", "sel.json", shared_width(m, 64), settings_of(CFG, m, 1e-3, 0), 32,
                         tmp_path, general_path)


def test_kd_on_general_passes_the_general_text_as_kd_data(tmp_path):
    _, train = _configs("nexus-kd-general", tmp_path, "general.jsonl")
    assert (train.data, train.kd_data, train.kd_weight) == ("domain.jsonl", "general.jsonl", 1.0)
    conv, train = _configs("nexus-gate-token-kd-general", tmp_path, "general.jsonl")
    assert (conv.gate_mode, train.kd_data) == ("token", "general.jsonl")
    # KD on the domain batches (the default) keeps one stream even when the general text is at hand.
    _, train = _configs("nexus-kd", tmp_path, "general.jsonl")
    assert (train.data, train.kd_data, train.kd_weight) == ("domain.jsonl", None, 1.0)


def test_kd_on_general_without_the_general_text_is_refused(tmp_path):
    with pytest.raises(NexusError, match="nexus-kd-general.*general training text"):
        _configs("nexus-kd-general", tmp_path)


@pytest.mark.parametrize("doc, words", [
    ({"kd_on": "elsewhere", "train": {"kd_weight": 1.0}}, "kd_on"),
    ({"kd_on": "general", "train": {"kd_data": "x.jsonl"}}, "cannot be set"),
])
def test_a_bad_kd_on_variant_names_its_file(tmp_path, doc, words):
    from benchmarks.quality.methods import load_methods

    (tmp_path / "defaults.json").write_text(json.dumps({"kind": "nexus"}))
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(NexusError, match=words) as exc:
        load_methods(tmp_path)
    assert "bad.json" in str(exc.value)


def test_kd_on_at_its_default_leaves_the_cached_run_keys_unchanged():
    from benchmarks.quality.methods import METHODS_BY_NAME

    assert "kd_on" not in METHODS_BY_NAME["nexus-kd"].definition()
    assert METHODS_BY_NAME["nexus-kd-general"].definition()["kd_on"] == "general"


def test_run_one_hands_the_contexts_general_text_to_the_nexus_stages(tmp_path, monkeypatch):
    import torch

    from benchmarks.quality import nexus_path, run

    seen = {}

    def fake_train_nexus(method, base_path, data_path, selection_path, width, settings, seq_len, run_dir, evaluate,
                         general_path=None, device="cpu"):
        seen["configs"] = nexus_path.nexus_configs(method, base_path, data_path, selection_path, width, settings,
                                                   seq_len, run_dir, general_path)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(nexus_path, "train_nexus", fake_train_nexus)
    torch.save({"eval_rows": {}, "drift_rows": {}, "base_probs": {}}, tmp_path / "context.pt")
    ctx = {"config": {**CFG, "threads": 1}, "tensors": str(tmp_path / "context.pt"), "expert_width": 64,
           "base_path": "base", "train_jsonl": "domain.jsonl", "general_jsonl": "general.jsonl",
           "selection_path": "sel.json", "seq_len": 32}
    (tmp_path / "context.json").write_text(json.dumps(ctx))
    job = {"context": str(tmp_path / "context.json"), "method": "nexus-kd-general", "lr": 1e-3, "seed": 0,
           "out": str(tmp_path / "runs" / "r.json")}
    with pytest.raises(RuntimeError, match="stop before training"):
        run.run_one(job)
    assert seen["configs"][1].kd_data == "general.jsonl"


def test_smoke_preset_distils_on_the_general_training_text(tmp_path, monkeypatch, capsys):
    """End to end on the smoke preset: the training stage reads the general training documents as --kd-data."""
    from benchmarks.bench_quality import main

    monkeypatch.setenv("NEXUS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["--preset", "smoke", "--models", "gpt_oss", "--methods", "nexus-kd-general", "--lrs", "1e-2",
            "--results-dir", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    model = json.loads((out / "quality-smoke.json").read_text())["models"]["gpt_oss"]
    general = Path(model["context"]["general_jsonl"])
    assert general.is_file() and general.name.startswith("general-train-")
    (run_result,) = model["methods"]["nexus-kd-general"]["runs"]
    train = run_result["info"]["train"]
    domain = model["context"]["train_jsonl"]
    assert (train["kd_data"], train["data"], train["kd_weight"]) == (str(general), domain, 1.0)
    assert run_result["info"]["kd_on"] == "general" and all("kd" in point for point in run_result["curve"])


def test_the_baseline_loop_distils_on_the_general_batches(gpt_oss_model):
    """With ``kd_on="general"`` the loop's KD term is the KL on the general stream's first batch
    (drawn as ``nexus train --kd-data`` draws it), not on the domain batch; CE stays on the domain."""
    import contextlib

    import torch

    from benchmarks.quality.evaluate import causal_ce, kd_loss
    from benchmarks.quality.methods import Prepared
    from benchmarks.quality.trainer import TrainSettings, train
    from nexus.data import TokenData

    g = torch.Generator().manual_seed(0)
    vocab = gpt_oss_model.config.vocab_size
    domain = TokenData([torch.randint(3, vocab, (12,), generator=g).tolist() for _ in range(6)], pad_id=0)
    general = TokenData([torch.randint(3, vocab, (12,), generator=g).tolist() for _ in range(6)], pad_id=0)
    head = gpt_oss_model.lm_head.weight
    sharpen = {"on": False}
    gpt_oss_model.lm_head.register_forward_hook(lambda m, a, out: out * 2 if sharpen["on"] else out)

    @contextlib.contextmanager
    def teacher():  # a teacher whose logits differ from the student's, so the KL is not 0
        sharpen["on"] = True
        try:
            yield
        finally:
            sharpen["on"] = False

    gpt_oss_model.eval()
    s = TrainSettings(steps=1, batch_size=2, lr=0.0, seed=3, kd_weight=1.0, kd_on="general")
    record = train(Prepared(gpt_oss_model, [head], teacher), domain, s, lambda step: {}, kd_data=general)

    def first(data):
        _, b = next(data.batches(2, seed=3))
        with torch.no_grad():
            student = gpt_oss_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            with teacher():
                ref = gpt_oss_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return b, student, ref

    b, student, ref = first(general)
    expected_kd = float(kd_loss(student, ref, b["labels"]))
    d, d_student, d_ref = first(domain)
    assert record["curve"][0]["kd"] == pytest.approx(expected_kd, rel=1e-5)
    assert record["curve"][0]["kd"] != pytest.approx(float(kd_loss(d_student, d_ref, d["labels"])), rel=1e-3)
    assert record["curve"][0]["ce"] == pytest.approx(float(causal_ce(d_student, d["labels"])), rel=1e-5)
    with pytest.raises(ValueError, match="kd_data"):
        train(Prepared(gpt_oss_model, [head], teacher), domain, s, lambda step: {})

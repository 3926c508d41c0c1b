"""``nexus collect``, ``nexus select``, ``nexus convert`` through click's CliRunner."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from nexus.cli import cli

from helpers_prepare import model_with_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def model_dir(gpt_oss_mxfp4_dir, tmp_path_factory):
    """The tiny MXFP4 GPT-OSS with a tokenizer saved beside it."""
    return model_with_tokenizer(gpt_oss_mxfp4_dir, tmp_path_factory.mktemp("gpt_oss_tok"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", n=30)


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def pipeline(model_dir, data_file, tmp_path_factory):
    """collect -> select -> convert on the tiny model; returns the working directory."""
    work = tmp_path_factory.mktemp("pipeline")
    r = invoke("collect", "--model", model_dir, "--data", data_file, "--output", work / "stats", "--seq-len", 32,
               "--batch-size", 4, "--target-tokens", 400)
    assert r.exit_code == 0, r.output
    assert "400 tokens, 3 MoE layers (complete)" in r.output
    r = invoke("select", "--stats", work / "stats", "--top-k", 3, "--output", work / "selection.json")
    assert r.exit_code == 0, r.output
    r = invoke("convert", "--model", model_dir, "--selection", work / "selection.json", "--output", work / "adapter",
               "--gate-mode", "none", "--weighted")
    assert r.exit_code == 0, r.output
    return work


def test_collect_select_convert(pipeline, model_dir):
    from nexus.adapter import load_adapter, read_adapter_config
    from nexus.loading import load_model

    stats = json.loads((pipeline / "stats" / "router_stats.json").read_text())
    assert stats["tokens"] == 400 and stats["complete"] and stats["source"]["seq_len"] == 32
    sel = json.loads((pipeline / "selection.json").read_text())
    assert [len(x["experts"]) for x in sel["layers"]] == [3, 3, 3]
    assert (pipeline / "selection_importance.png").exists() and (pipeline / "selection_variance.png").exists()
    cfg = read_adapter_config(pipeline / "adapter")
    assert cfg.init["strategy"] == "pca" and cfg.init["weighted"] and cfg.gate_mode == "none"
    assert cfg.init["experts"] == {str(x["layer"]): x["experts"] for x in sel["layers"]}
    load_adapter(load_model(model_dir), pipeline / "adapter")


def test_collect_resumes_and_refuses_other_arguments(model_dir, data_file, tmp_path, monkeypatch):
    base = ["collect", "--model", model_dir, "--data", data_file, "--output", tmp_path, "--seq-len", 32,
            "--batch-size", 2, "--target-tokens", 300]
    r = invoke(*base, "--max-batches", 2)
    assert r.exit_code == 0 and "128 tokens, 3 MoE layers (partial, resume from batch 2)" in r.output
    r = invoke(*base)
    assert r.exit_code == 0 and "300 tokens, 3 MoE layers (complete)" in r.output
    with monkeypatch.context() as m:  # complete statistics of the same run: the model is not even loaded
        m.setattr("nexus.loading.load_model", lambda *a, **k: pytest.fail("loaded the model again"))
        r = invoke(*base)
    assert r.exit_code == 0 and "300 tokens, 3 MoE layers (complete)" in r.output
    r = invoke(*base[:-1], 100)
    assert_one_line_error(r, "holds router statistics of another run", "target_tokens: 300 -> 100", "--overwrite")
    r = invoke(*base[:-1], 100, "--overwrite")
    assert r.exit_code == 0 and "100 tokens" in r.output


def test_non_moe_model_is_refused(dense_model_dir, data_file, tmp_path):
    r = invoke("collect", "--model", dense_model_dir, "--data", data_file, "--output", tmp_path / "stats")
    assert_one_line_error(r, "'llama'", "no MoE family")
    r = invoke("convert", "--model", dense_model_dir, "--strategy", "mean_all", "--output", tmp_path / "ad")
    assert_one_line_error(r, "no MoE family")
    assert not (tmp_path / "stats").exists() and not (tmp_path / "ad").exists()


@pytest.mark.parametrize("content", ["", '{"text": "  "}\n'])
def test_empty_data_is_refused(model_dir, tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    r = invoke("collect", "--model", model_dir, "--data", data, "--output", tmp_path / "stats")
    assert_one_line_error(r, "empty" if not content else "no non-empty text")
    assert not (tmp_path / "stats").exists()


def test_top_k_larger_than_experts(pipeline, tmp_path):
    r = invoke("select", "--stats", pipeline / "stats", "--top-k", 9, "--output", tmp_path / "sel.json")
    assert_one_line_error(r, "--top-k 9", "8 experts")
    assert not (tmp_path / "sel.json").exists()


def test_stats_and_selection_for_another_model(pipeline, tmp_path, gpt_oss, gpt_oss_config):
    # another GPT-OSS: 4 experts instead of 8
    from nexus.demo import build_checkpoint

    cfg = gpt_oss_config.__class__.from_dict(gpt_oss_config.to_dict())
    cfg.num_local_experts = 4
    other = build_checkpoint(gpt_oss, tmp_path / "other", cfg)
    r = invoke("convert", "--model", other, "--selection", pipeline / "selection.json", "--output", tmp_path / "ad")
    assert_one_line_error(r, "was made for base fingerprint", "run `nexus collect` and `nexus select` on this model")
    assert not (tmp_path / "ad").exists() and not (tmp_path / ".ad.partial").exists()
    r = invoke("select", "--stats", tmp_path / "nowhere", "--output", tmp_path / "sel.json")
    assert_one_line_error(r, "no router statistics", "run `nexus collect` first")


def test_unwritable_output(pipeline, model_dir, data_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = invoke("convert", "--model", model_dir, "--selection", pipeline / "selection.json", "--output", blocker / "ad")
    assert_one_line_error(r, "cannot write")
    r = invoke("select", "--stats", pipeline / "stats", "--output", blocker / "sel.json")
    assert_one_line_error(r, "cannot write")
    r = invoke("collect", "--model", model_dir, "--data", data_file, "--output", blocker / "stats", "--seq-len", 32,
               "--target-tokens", 50)
    assert_one_line_error(r, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command", ["collect", "select", "convert", "evaluate", "generate", "train", "precompute",
                                     "run"])
def test_generated_options_are_the_config_fields(command):
    """Every option of a stage's command is a field of its config, with the field's default."""
    import dataclasses

    from nexus.engines.collect_config import CollectConfig
    from nexus.engines.convert_config import ConvertConfig
    from nexus.engines.evaluate_config import EvaluateConfig, GenerateConfig
    from nexus.engines.precompute_config import PrecomputeConfig
    from nexus.engines.run import RunConfig
    from nexus.engines.select_config import SelectConfig
    from nexus.training.train_config import TrainConfig

    config = {"collect": CollectConfig, "select": SelectConfig, "convert": ConvertConfig, "evaluate": EvaluateConfig,
              "generate": GenerateConfig, "train": TrainConfig, "precompute": PrecomputeConfig, "run": RunConfig}[command]
    fields = {f.name: f for f in dataclasses.fields(config)}
    params = {p.name: p for p in cli.commands[command].params if p.name != "help"}
    assert set(params) == set(fields) - ({"family"} if command == "run" else set())
    ctx = click.Context(cli.commands[command])
    for name, param in params.items():
        default = fields[name].default
        want = None if default is dataclasses.MISSING else default
        if param.required:
            assert want is None, name
        else:
            got = param.get_default(ctx)
            got = None if got is getattr(click.core, "UNSET", None) else got  # click >= 8.3: "no default"
            assert got == (bool(want) if param.is_flag else want), name
        assert param.help == fields[name].metadata["help"], name


def test_run_options_are_the_stage_options():
    """run's options shared with a stage are that stage's field: same default, same checks."""
    from nexus.constants import DEFAULT_DIVERSITY, DEFAULT_LR, DEFAULT_SEQ_LEN
    from nexus.engines.collect_config import CollectArgs
    from nexus.engines.run import RunConfig

    cfg = RunConfig(output="runs/x")
    assert (cfg.lr, cfg.seq_len, cfg.diversity) == (DEFAULT_LR, DEFAULT_SEQ_LEN, DEFAULT_DIVERSITY)
    assert cfg.batch_size == CollectArgs().batch_size


def test_convert_defaults_are_the_shared_constants(tmp_path):
    from nexus.constants import DEFAULT_GATE_MODE, DEFAULT_STRATEGY
    from nexus.engines.run import RunConfig

    out = CliRunner().invoke(cli, ["convert", "--help"]).output
    assert f"[default: {DEFAULT_STRATEGY}]" in " ".join(out.split()) and f"[default: {DEFAULT_GATE_MODE}]" in " ".join(out.split())
    cfg = RunConfig(output=str(tmp_path))
    assert (cfg.strategy, cfg.gate_mode) == (DEFAULT_STRATEGY, DEFAULT_GATE_MODE)


def test_help_documents_the_rules():
    out = CliRunner().invoke(cli, ["select", "--help"]).output
    assert "importance_e = sum_i |loading_ie| * explained_ratio_i" in out and "--diversity" in out
    out = CliRunner().invoke(cli, ["convert", "--help"]).output
    assert "mean_all" in out and "--shared-intermediate-size" in out
    out = CliRunner().invoke(cli, ["collect", "--help"]).output
    assert "--target-tokens" in out and "--checkpoint-every" in out


def test_select_reports_each_layer_once(pipeline, tmp_path):
    import re

    result = CliRunner().invoke(cli, ["select", "--stats", str(pipeline / "stats"), "--top-k", "3", "--no-plots",
                                      "--output", str(tmp_path / "sel.json")])  # default log level (INFO)
    assert result.exit_code == 0, result.output
    for layer in range(3):
        assert len(re.findall(rf"layer\s+{layer}:", result.output)) == 1, result.output

"""``nexus run`` end to end: the demo, a tiny float checkpoint, reruns that skip, and bad inputs."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from nexus.cli import cli
from tests.helpers_train import make_adapter, make_base, make_data

SMALL = ["--max-steps", "4", "--seq-len", "32", "--batch-size", "4", "--target-tokens", "1500",
         "--eval-batches", "2", "--warmup-steps", "1", "--top-k", "2"]


def _run(args):
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


@pytest.mark.slow
def test_run_demo_end_to_end_then_rerun_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    first = _run(["--family", "gpt_oss", "run", "--output", str(out), *SMALL])
    assert first.exit_code == 0, first.output
    assert "ran collect, select, convert, train, evaluate, plot" in first.output
    for artifact in ("stats/router_stats.safetensors", "expert_selection.json", "adapter_init/nexus_config.json",
                     "train/final/adapter_model.safetensors", "train/metrics.jsonl", "eval.json", "train/plots/loss.png"):
        assert (out / artifact).exists(), artifact
    ev = json.loads((out / "eval.json").read_text())
    assert ev["adapted"]["perplexity"] > 0 and ev["base"]["perplexity"] > 0
    selection = json.loads((out / "expert_selection.json").read_text())
    assert all(len(layer["experts"]) == 2 for layer in selection["layers"])

    again = _run(["--family", "gpt_oss", "run", "--output", str(out), *SMALL])
    assert again.exit_code == 0, again.output
    assert "ran nothing" in again.output and "skipped collect, select, convert, train, evaluate, plot" in again.output

    # Changing a training argument (with --overwrite) reruns train and what follows, not the stages before it.
    changed = _run(["--family", "gpt_oss", "run", "--output", str(out), *SMALL[:-2], "--top-k", "2", "--lr", "0.01",
                    "--overwrite"])
    assert changed.exit_code == 0, changed.output
    assert "ran train, evaluate, plot" in changed.output


@pytest.mark.slow
def test_run_on_a_float_checkpoint(gpt_oss_float_dir, tmp_path):
    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = make_data(tmp_path / "train.jsonl", 30)
    out = tmp_path / "run"
    result = _run(["run", "--model", str(base), "--data", str(data), "--output", str(out), *SMALL,
                   "--strategy", "mean_all", "--gate-mode", "none"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "train/final/nexus_config.json").read_text())
    assert cfg["family"] == "gpt_oss" and cfg["gate_mode"] == "none"


def _error_line(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_run_missing_data_column(gpt_oss_float_dir, tmp_path):
    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"content": "hello there"}\n{"content": "general kenobi"}\n')
    result = CliRunner().invoke(cli, ["-q", "run", "--model", str(base), "--data", str(data),
                                      "--output", str(tmp_path / "run"), *SMALL])
    line = _error_line(result)
    assert "'text'" in line and "content" in line and "--text-column" in line


def test_run_seq_len_above_the_model(gpt_oss_float_dir, tmp_path):
    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = make_data(tmp_path / "train.jsonl", 5)
    limit = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    result = CliRunner().invoke(cli, ["-q", "run", "--model", str(base), "--data", str(data),
                                      "--output", str(tmp_path / "run"), "--seq-len", str(limit * 2)])
    line = _error_line(result)
    assert str(limit * 2) in line and str(limit) in line


def test_adapter_for_another_base_is_refused(gpt_oss_float_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from nexus.family import resolve_family

    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    other_cfg = resolve_family(name="gpt_oss").example_config()  # 2 layers, 4 experts: another architecture
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(other_cfg).save_pretrained(other)
    adapter = make_adapter(other, tmp_path / "adapter")
    data = make_data(tmp_path / "eval.jsonl", 5)
    result = CliRunner().invoke(cli, ["-q", "evaluate", "--model", str(base), "--adapter", str(adapter),
                                      "--data", str(data), "--seq-len", "32"])
    line = _error_line(result)
    assert "fingerprint" in line


def _docs_of(spec, base):
    from nexus.data import load_tokenizer, tokenize_documents

    return {tuple(d) for d in tokenize_documents(spec, load_tokenizer(base))}


def test_run_holds_out_documents_and_reruns_when_the_data_changes(gpt_oss_float_dir, tmp_path):
    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = make_data(tmp_path / "train.jsonl", 30)
    out = tmp_path / "run"
    args = ["run", "--model", str(base), "--data", str(data), "--output", str(out), *SMALL[:2], "--max-steps", "2"]
    first = _run(args)
    assert first.exit_code == 0, first.output
    assert "held out by content hash, not trained on" in first.output

    # Without --eval-data: evaluate reads only held-out documents, collect and train only the others.
    ev = json.loads((out / "eval.json").read_text())
    assert ev["data"] == f"{data}@heldout" and ev["eval_source"]["kind"] == "heldout_split"
    trained_on = json.loads((out / "train/run_config.json").read_text())["config"]["data"]
    collected_on = json.loads((out / "stats/router_stats.json").read_text())["source"]["data"]
    assert trained_on == collected_on == f"{data}@train"
    held, train = _docs_of(ev["data"], base), _docs_of(trained_on, base)
    assert held and train and not held & train
    assert len(held) + len(train) == len(_docs_of(data, base))

    # Rows appended: refused without --overwrite, naming the data's content; with it, every stage that
    # reads the data runs again.
    with data.open("a") as f:
        f.write(json.dumps({"text": "A new paragraph about the state of the union and its finances."}) + "\n")
    line = _error_line(_run(args))
    assert "stage collect" in line and "data_fingerprint" in line and "--overwrite" in line
    appended = _run([*args, "--overwrite"])
    assert appended.exit_code == 0, appended.output
    assert "ran collect, select, convert, train, evaluate, plot" in appended.output

    # Edited in place, same size, same modification time: still a change.
    stat, text = data.stat(), data.read_text()
    data.write_text(text.replace("the", "thy", 1))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = _run([*args, "--overwrite"])
    assert edited.exit_code == 0, edited.output
    assert "ran collect, select, convert, train, evaluate, plot" in edited.output
    unchanged = _run(args)
    assert "ran nothing" in unchanged.output


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "-1"], "--lr must be a positive"),
    (["--eval-data", "missing.jsonl"], "missing.jsonl does not exist"),
    (["--top-k", "99"], "--top-k must be between 1 and 8"),
    (["--eval-batches", "0"], "--eval-batches must be at least 1"),
    (["--diversity", "-1"], "--diversity must be"),
])
def test_run_checks_every_argument_before_the_first_stage(gpt_oss_float_dir, tmp_path, monkeypatch, extra, expected):
    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = make_data(tmp_path / "train.jsonl", 30)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["-q", "run", "--model", str(base), "--data", str(data), "--output", str(out),
                                      *SMALL[:-2], *extra])
    assert expected in _error_line(result)
    assert not (out / "stages").exists() and not (out / "stats").exists()


def test_run_refuses_a_model_without_a_tokenizer(tmp_path):
    from helpers_conformance import build_checkpoint

    from nexus.family import resolve_family

    model = build_checkpoint(resolve_family(name="qwen3_moe"), tmp_path / "q3")
    data = make_data(tmp_path / "train.jsonl", 30)
    result = CliRunner().invoke(cli, ["-q", "run", "--model", str(model), "--data", str(data),
                                      "--output", str(tmp_path / "run"), *SMALL])
    line = _error_line(result)
    assert str(model) in line and "tokenizer" in line
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("stage, exc, code", [
    ("train", "SIGINT", 130), ("train", "SIGTERM", 143), ("collect", "KeyboardInterrupt", 130),
])
def test_run_stops_after_an_interrupted_stage(gpt_oss_float_dir, tmp_path, monkeypatch, stage, exc, code):
    import signal

    import nexus.engines.collect
    import nexus.engines.train
    from nexus.errors import Interrupted

    def stop(*args, **kwargs):
        if exc == "KeyboardInterrupt":
            raise KeyboardInterrupt
        raise Interrupted("saved a checkpoint at step 1; resume with --resume", getattr(signal, exc))

    target = {"train": (nexus.engines.train, "train"), "collect": (nexus.engines.collect, "run_collect")}[stage]
    monkeypatch.setattr(*target, stop)
    evaluated = []
    monkeypatch.setattr("nexus.engines.evaluate.evaluate", lambda *a, **k: evaluated.append(1))
    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = make_data(tmp_path / "train.jsonl", 30)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["-q", "run", "--model", str(base), "--data", str(data), "--output", str(out),
                                      *SMALL])
    assert result.exit_code == code, result.output
    line = _error_line(result)
    assert f"run stopped in stage {stage}" in line or f"aborted in stage {stage}" in line
    assert not evaluated and not (out / "eval.json").exists()
    assert not (out / "stages" / f"{stage}.json").exists() and (out / "stages" / f"{stage}.started.json").exists()

"""``nexus run``'s stage stamps: one run however its paths are spelled, and a rerun that would
replace what other inputs made is refused (naming what differs) unless ``--overwrite``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nexus.cli import cli
from nexus.engines.run_stages import Stage, StageRunner
from nexus.errors import NexusError
from tests.helpers_train import make_base, make_data

ARGS = ["--seq-len", "32", "--batch-size", "4", "--target-tokens", "1500", "--eval-batches", "2",
        "--warmup-steps", "1", "--top-k", "2", "--max-steps", "2"]


def _run(*args):
    return CliRunner().invoke(cli, ["-q", "run", *map(str, args), *ARGS])


def _error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _snapshot(run_dir):
    """Every file of the run but the token cache and the stage stamps, with its bytes."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] not in ("cache", "stages")}


def test_paths_spelled_otherwise_are_the_same_run_and_a_changed_one_is_refused(gpt_oss_float_dir, tmp_path,
                                                                               monkeypatch):
    make_base(gpt_oss_float_dir, tmp_path / "base")
    (tmp_path / "fx").mkdir()
    make_data(tmp_path / "fx" / "D.jsonl", 30)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    first = _run("--model", "base", "--data", "fx/D.jsonl", "--output", "R")
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "R"
    made = _snapshot(run_dir)
    assert any(p.parts[0] == "train" and p.name == "adapter_model.safetensors" for p in made)

    for cwd, model, data, output in [
        (tmp_path / "sub", "../base", "../fx/D.jsonl", "../R"),
        (tmp_path, tmp_path / "base", "fx/../fx/D.jsonl", f"{run_dir}/"),
    ]:
        monkeypatch.chdir(cwd)
        again = _run("--model", model, "--data", data, "--output", output)
        assert again.exit_code == 0, again.output
        assert "ran nothing" in again.output and "deleting" not in again.output
        assert _snapshot(run_dir) == made

    # Another argument: refused before anything runs, naming what differs and how to proceed.
    line = _error_line(_run("--model", "base", "--data", "fx/D.jsonl", "--output", "R", "--lr", "0.01"))
    assert "stage train" in line and "lr" in line and "0.01" in line
    assert "--overwrite" in line and "--output" in line
    assert _snapshot(run_dir) == made

    replaced = _run("--model", "base", "--data", "fx/D.jsonl", "--output", "R", "--lr", "0.01", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "ran train, evaluate, plot" in replaced.output and "skipped collect, select, convert" in replaced.output


# The stage runner on its own, with stages that record how they were called.


def _stage(name, inputs, tmp_path, calls, after=(), resumable=False, fail=False):
    artifact = tmp_path / "run" / name

    def fn(resume, replace):
        calls.append((name, resume, replace))
        if fail:
            raise KeyboardInterrupt
        artifact.write_text(json.dumps(inputs))

    return Stage(name, inputs, artifact, fn, after=after, resumable=resumable)


def _runner(tmp_path, **kwargs):
    (tmp_path / "run").mkdir(exist_ok=True)
    return StageRunner(tmp_path / "run", **kwargs)


def test_an_interrupted_stage_resumes_with_its_inputs_and_is_refused_with_others(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        _runner(tmp_path).run_all([_stage("a", {"x": 1}, tmp_path, calls, resumable=True, fail=True)])
    (tmp_path / "run" / "a.partial").write_text("checkpoint")

    with pytest.raises(NexusError, match=r"stage a was made from other inputs \(x 1 -> 2\).*--overwrite"):
        _runner(tmp_path).run_all([_stage("a", {"x": 2}, tmp_path, calls, resumable=True)])
    assert calls == [("a", False, False)] and (tmp_path / "run" / "a.partial").exists()

    _runner(tmp_path).run_all([_stage("a", {"x": 1}, tmp_path, calls, resumable=True)])
    assert calls[-1] == ("a", True, False)

    _runner(tmp_path, overwrite=True).run_all([_stage("a", {"x": 2}, tmp_path, calls, resumable=True)])
    assert calls[-1] == ("a", False, True)


def test_a_refusal_comes_before_any_stage_runs(tmp_path):
    calls = []
    runner = _runner(tmp_path)
    runner.run_all([_stage("a", {"x": 1}, tmp_path, calls), _stage("b", {"y": 1}, tmp_path, calls, after=("a",))])
    (tmp_path / "run" / "a").unlink()  # a would run again (same inputs), but b changed
    with pytest.raises(NexusError, match=r"stage b .*y 1 -> 2"):
        _runner(tmp_path).run_all([_stage("a", {"x": 1}, tmp_path, calls),
                                   _stage("b", {"y": 2}, tmp_path, calls, after=("a",))])
    assert calls == [("a", False, False), ("b", False, False)]


def test_an_artifact_no_stamp_accounts_for_is_not_replaced_unasked(tmp_path):
    calls = []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a").write_text("made elsewhere")
    with pytest.raises(NexusError, match="exists but no stamp"):
        _runner(tmp_path).run_all([_stage("a", {"x": 1}, tmp_path, calls)])
    assert not calls and (tmp_path / "run" / "a").read_text() == "made elsewhere"
    _runner(tmp_path, force=True).run_all([_stage("a", {"x": 1}, tmp_path, calls)])
    assert calls == [("a", False, True)]

"""No stage writes over or into what it reads: an output that is an input, contains one or lies inside
one is refused before any work, even with --overwrite, however the paths are spelt; convert, like the
other stages, replaces an existing output only with --overwrite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers_prepare import model_with_tokenizer, write_jsonl
from helpers_train import make_adapter
from nexus.cli import cli
from nexus.errors import NexusError
from nexus.io import refuse_output_over_inputs

RULE = "a stage never writes over or into what it reads"


@pytest.fixture(scope="module")
def fx(gpt_oss_mxfp4_dir, tmp_path_factory):
    """A model with a tokenizer, data, statistics collected on the model, a selection, an adapter."""
    root = tmp_path_factory.mktemp("guards")
    base = model_with_tokenizer(gpt_oss_mxfp4_dir, root / "base")
    data = write_jsonl(root / "data.jsonl", n=12)
    r = _invoke("collect", "--model", base, "--data", data, "--output", root / "stats", "--seq-len", 32,
                "--batch-size", 4, "--target-tokens", 200)
    assert r.exit_code == 0, r.output
    r = _invoke("select", "--stats", root / "stats", "--output", root / "selection.json", "--no-plots")
    assert r.exit_code == 0, r.output
    return {"root": root, "base": base, "data": data, "stats": root / "stats", "selection": root / "selection.json",
            "adapter": make_adapter(base, root / "adapter")}


def _invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _refused(result, *parts) -> str:
    """The one ``Error:`` line of a refused command, checked to hold the rule and ``parts``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for part in (RULE, *parts):
        assert str(part) in lines[0], lines[0]
    return lines[0]


# --- the helper ----------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}\n")
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    return tmp_path, model


@pytest.mark.parametrize("spelling, relation", [
    ("models/m", "is"),
    ("models/m/", "is"),
    ("models/x/../m", "is"),
    ("link", "is"),
    ("models", "contains"),
    ("", "contains"),
    ("models/m/config.json", "lies inside"),
    ("link/config.json", "lies inside"),
    ("models/m/sub/new", "lies inside"),
])
def test_an_output_over_an_input_is_refused_however_spelt(tree, monkeypatch, spelling, relation):
    root, model = tree
    monkeypatch.chdir(root)
    for output in (spelling or ".", str(root / spelling)):  # relative and absolute
        with pytest.raises(NexusError) as err:
            refuse_output_over_inputs(output, {"--model": str(model)})
        assert str(err.value).startswith(f"--output {output} {relation} the base model (--model {model}); "), err.value


def test_a_relative_input_against_an_absolute_output(tree, monkeypatch):
    root, model = tree
    monkeypatch.chdir(model.parent)
    with pytest.raises(NexusError, match=r"lies inside the selection \(--selection m\)"):
        refuse_output_over_inputs(model / "out.json", {"--selection": "m"})


def test_a_hard_link_to_an_input_is_the_input(tree):
    root, model = tree
    os.link(model / "config.json", root / "hard.json")
    with pytest.raises(NexusError, match="is the selection"):
        refuse_output_over_inputs(root / "hard.json", {"--selection": model / "config.json"})


def test_outputs_apart_from_the_inputs_pass(tree):
    root, model = tree
    (root / "models" / "m2").mkdir()
    for output in (root / "models" / "m2", root / "models" / "m-out", root / "models" / "mm" / "x", root / "other"):
        refuse_output_over_inputs(output, {"--model": model, "--adapter": None, "--data": [None, root / "d.jsonl"]})
    refuse_output_over_inputs(None, {"--model": model})  # no output (evaluate printing its result)


def test_the_files_of_an_input_and_other_names(tree):
    root, model = tree
    output = model / "config.json"
    with pytest.raises(NexusError) as err:
        refuse_output_over_inputs(output, {"the run's metrics": [root / "a", output]}, flag="plot output")
    assert str(err.value).startswith(f"plot output {output} is the run's metrics ({output}); ")
    assert str(err.value).endswith("choose another plot output")


# --- convert -------------------------------------------------------------------------------------------------------


def test_convert_refuses_the_model_even_with_overwrite(fx, tmp_path):
    base = shutil.copytree(fx["base"], tmp_path / "base")
    before = _snapshot(tmp_path)
    for output, relation in ((base, "is"), (tmp_path, "contains"), (base / "adapter", "lies inside")):
        result = _invoke("convert", "--model", base, "--strategy", "mean_all", "--output", output, "--overwrite")
        _refused(result, f"--output {output} {relation} the base model (--model {base})")
    assert _snapshot(tmp_path) == before


def test_convert_refuses_an_output_holding_its_selection(fx, tmp_path):
    (tmp_path / "run").mkdir()
    selection = shutil.copy(fx["selection"], tmp_path / "run" / "expert_selection.json")
    before = _snapshot(tmp_path)
    for given in (selection, tmp_path / "run"):  # the file, or the directory holding expert_selection.json
        result = _invoke("convert", "--model", fx["base"], "--selection", given, "--output", tmp_path / "run",
                         "--overwrite")
        _refused(result, f"--output {tmp_path / 'run'} contains the selection")
    assert _snapshot(tmp_path) == before
    # a directory holding the selection is still a valid --selection for an output beside it
    result = _invoke("convert", "--model", fx["base"], "--selection", tmp_path / "run", "--output", tmp_path / "run2")
    assert result.exit_code == 0, result.output


def test_convert_replaces_an_existing_output_only_with_overwrite(fx, tmp_path):
    trained = shutil.copytree(fx["adapter"], tmp_path / "final")
    before = _snapshot(trained)
    result = _invoke("convert", "--model", fx["base"], "--strategy", "mean_all", "--output", trained)
    assert result.exit_code == 1 and f"Error: {trained} exists; pass --overwrite" in result.output, result.output
    assert _snapshot(trained) == before
    result = _invoke("convert", "--model", fx["base"], "--strategy", "mean_all", "--output", trained, "--overwrite")
    assert result.exit_code == 0, result.output
    assert _snapshot(trained) != before and sorted(p.name for p in trained.iterdir()) == [
        "adapter_model.safetensors", "nexus_config.json"]
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    result = _invoke("convert", "--model", fx["base"], "--strategy", "mean_all", "--output", tmp_path / "empty")
    assert result.exit_code == 0, result.output


# --- the other stages ----------------------------------------------------------------------------------------------


def test_export_overwrite_never_deletes_a_directory_holding_an_input(fx, tmp_path):
    adapter = shutil.copytree(fx["adapter"], tmp_path / "work" / "adapter")
    base = shutil.copytree(fx["base"], tmp_path / "models" / "base")
    before = _snapshot(tmp_path)
    for output, what in ((tmp_path / "work", "the adapter"), (tmp_path / "models", "the base model"),
                         (tmp_path, "the base model")):
        result = _invoke("export", "--model", base, "--adapter", adapter, "--output", output, "--overwrite")
        _refused(result, f"--output {output} contains {what}")
    assert _snapshot(tmp_path) == before


def test_select_refuses_a_file_of_the_model_its_statistics_came_from(fx):
    before = _snapshot(fx["base"])
    result = _invoke("select", "--stats", fx["stats"], "--output", fx["base"] / "config.json")
    _refused(result, f"lies inside the base model of --stats {fx['stats']} ({fx['base']})")
    result = _invoke("select", "--stats", fx["stats"], "--output", fx["stats"] / "router_stats.json")
    _refused(result, "is the router statistics")
    assert _snapshot(fx["base"]) == before


def test_select_still_writes_beside_its_statistics_by_default(fx, tmp_path):
    stats = shutil.copytree(fx["stats"], tmp_path / "stats")
    result = _invoke("select", "--stats", stats, "--no-plots")
    assert result.exit_code == 0, result.output
    assert (stats / "expert_selection.json").exists()


def test_evaluate_refuses_a_file_of_the_model(fx, tmp_path):
    base = shutil.copytree(fx["base"], tmp_path / "base")
    before = _snapshot(base)
    result = _invoke("evaluate", "--model", base, "--data", fx["data"], "--output", base / "config.json",
                     "--seq-len", 24, "--max-batches", 1)
    _refused(result, f"--output {base / 'config.json'} lies inside the base model")
    result = _invoke("evaluate", "--model", base, "--adapter", fx["adapter"], "--data", fx["data"],
                     "--output", fx["adapter"] / "eval.json", "--seq-len", 24, "--max-batches", 1)
    _refused(result, "lies inside the adapter")
    assert _snapshot(base) == before


def test_train_overwrite_never_deletes_a_run_directory_holding_its_adapter(fx, tmp_path):
    run = tmp_path / "run"
    adapter = shutil.copytree(fx["adapter"], run / "final")  # training again from a run's own result
    data = shutil.copy(fx["data"], run / "data.jsonl")
    before = _snapshot(tmp_path)
    common = ("--model", fx["base"], "--seq-len", 24, "--max-steps", 1, "--overwrite")
    _refused(_invoke("train", *common, "--adapter", adapter, "--data", fx["data"], "--output", run),
             f"--output {run} contains the adapter (--adapter {adapter})")
    _refused(_invoke("train", *common, "--adapter", fx["adapter"], "--data", data, "--output", run),
             "contains the data")
    _refused(_invoke("train", *common, "--adapter", fx["adapter"], "--data", fx["data"], "--teacher", fx["base"],
                     "--output", fx["base"] / "run"), "lies inside the base model")
    assert _snapshot(tmp_path) == before


def test_run_refuses_an_output_holding_its_data(fx, tmp_path):
    data = shutil.copy(fx["data"], tmp_path / "data.jsonl")
    before = _snapshot(tmp_path)
    result = _invoke("run", "--model", fx["base"], "--data", data, "--output", tmp_path)
    _refused(result, f"contains the data (--data {data})")
    result = _invoke("run", "--model", fx["base"], "--data", fx["data"], "--output", fx["base"] / "run")
    _refused(result, "lies inside the base model")
    assert _snapshot(tmp_path) == before


def test_collect_and_precompute_refuse_the_model(fx, tmp_path):
    base = shutil.copytree(fx["base"], tmp_path / "base")
    before = _snapshot(tmp_path)
    _refused(_invoke("collect", "--model", base, "--data", fx["data"], "--output", base, "--overwrite"),
             "is the base model")
    _refused(_invoke("precompute", "--teacher", base, "--data", fx["data"], "--output", base / "cache"),
             "lies inside the teacher")
    assert _snapshot(tmp_path) == before


def test_plot_refuses_a_plots_link_to_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "plots").symlink_to(run, target_is_directory=True)
    result = _invoke("plot", run)
    _refused(result, f"plot output {run / 'plots'} contains the run's metrics")

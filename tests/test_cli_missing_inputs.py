"""A missing input (--data, --kd-data, --eval-data, --adapter, --teacher, --tokenizer, ...) is
reported, naming the option, before any model loads."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from helpers_prepare import model_with_tokenizer, write_jsonl
from helpers_train import make_adapter
from nexus.cli import cli, load_plugin_commands


@pytest.fixture(scope="module")
def fx(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("missing_inputs")
    base = model_with_tokenizer(gpt_oss_mxfp4_dir, root / "base")
    return {"root": root, "base": base, "data": write_jsonl(root / "d.jsonl", 12),
            "adapter": make_adapter(base, root / "adapter")}


@pytest.fixture
def loads(monkeypatch):
    """The models loaded during the test (``nexus.loading.load_model``, wherever it was imported)."""
    import nexus.loading

    calls, real = [], nexus.loading.load_model

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("nexus") and m is not None]:
        if getattr(module, "load_model", None) is real:
            monkeypatch.setattr(module, "load_model", spy)
    return calls


MISSING_FILE, MISSING_DIR = "missing.jsonl", "missing_dir"

CASES = {
    "train --data": ("--data", MISSING_FILE, ["train", "--adapter", "{adapter}", "--output", "{out}"]),
    "train --kd-data": ("--kd-data", MISSING_FILE, ["train", "--adapter", "{adapter}", "--data", "{data}",
                                                    "--output", "{out}"]),
    "train --adapter": ("--adapter", MISSING_DIR, ["train", "--data", "{data}", "--output", "{out}"]),
    "train --teacher": ("--teacher", MISSING_DIR, ["train", "--adapter", "{adapter}", "--data", "{data}",
                                                   "--output", "{out}"]),
    "train --tokenizer": ("--tokenizer", MISSING_DIR, ["train", "--adapter", "{adapter}", "--data", "{data}",
                                                       "--output", "{out}"]),
    "evaluate --data": ("--data", MISSING_FILE, ["evaluate", "--adapter", "{adapter}"]),
    "precompute --data": ("--data", MISSING_FILE, ["precompute", "--teacher", "{base}", "--output", "{out}"]),
    "precompute --teacher": ("--teacher", MISSING_DIR, ["precompute", "--data", "{data}", "--output", "{out}"]),
    "run --data": ("--data", MISSING_FILE, ["run", "--output", "{out}"]),
    "run --eval-data": ("--eval-data", MISSING_FILE, ["run", "--data", "{data}", "--output", "{out}"]),
    "run --kd-data": ("--kd-data", MISSING_FILE, ["run", "--data", "{data}", "--output", "{out}"]),
    "collect --data": ("--data", MISSING_FILE, ["collect", "--output", "{out}"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_missing_input_is_named_before_any_model_loads(fx, tmp_path, loads, case):
    load_plugin_commands()
    flag, missing, args = CASES[case]
    values = {"adapter": fx["adapter"], "data": fx["data"], "base": fx["base"], "out": tmp_path / "out"}
    command = [a.format(**values) for a in args]
    if command[0] != "precompute":
        command += ["--model", str(fx["base"])]
    path = str(tmp_path / missing)
    result = CliRunner().invoke(cli, ["-q", *command, flag, path])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and flag in errors[0] and path in errors[0], result.output
    assert not loads
    assert not (tmp_path / "out").exists()

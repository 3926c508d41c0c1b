"""Every path option of every command reads ``~`` as the home directory, in every spelling: the
shell leaves ``--output=~/x`` and a quoted ``'~/x'`` alone, so the CLI expands them itself."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from helpers_prepare import model_with_tokenizer, write_jsonl
from nexus.cli import cli, load_plugin_commands
from nexus.cli.options import ExpandedPath

# Parameter names that hold a path (or a data argument, which may be one) wherever they appear.
PATH_NAMES = {"model", "model_path", "adapter", "output", "data", "eval_data", "kd_data", "teacher", "tokenizer",
              "stats", "selection", "run_dir"}


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _path_params():
    load_plugin_commands()
    return [(" ".join(names), command, param) for names, command in _commands(cli) for param in command.params
            if param.name in PATH_NAMES or isinstance(param.type, click.Path)]


def test_every_path_option_is_an_expanded_path():
    params = _path_params()
    assert {name for name, _, _ in params} >= {"train", "run", "export", "evaluate", "collect", "convert", "select",
                                               "precompute", "plot", "inspect", "generate"}
    plain = [f"{name} {param.opts or param.name}" for name, _, param in params
             if not isinstance(param.type, ExpandedPath)]
    assert not plain, f"path options that do not expand ~: {plain}"


def test_every_path_option_expands_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "x").mkdir(parents=True)  # exists, for the options that must
    monkeypatch.setenv("HOME", str(home))
    for name, command, param in _path_params():
        ctx = click.Context(command)
        assert param.type_cast_value(ctx, "~/x") == str(home / "x"), f"{name} {param.name}"


def test_equals_form_and_quoted_tilde_reach_the_command_expanded(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    model_with_tokenizer(gpt_oss_mxfp4_dir, home / "models" / "tiny")
    write_jsonl(home / "heldout.jsonl", 4)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["-q", "evaluate", "--model=~/models/tiny", "--data", "~/heldout.jsonl",
                                      "--output=~/eval.json", "--seq-len", "32", "--max-batches", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((home / "eval.json").read_text())["base"]["perplexity"] > 0
    assert not (tmp_path / "~").exists()

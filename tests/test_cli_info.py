"""``nexus --help``, ``plugins``, ``families``, ``inspect``: output and one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nexus.cli import cli


def _run(*args, ok=True):
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_family_is_a_one_line_error():
    _assert_one_line_error(_run("--family", "nosuch", "inspect", ok=False), "unknown family 'nosuch'", "gpt_oss")


def test_inspect_a_directory_that_is_not_a_model(tmp_path):
    _assert_one_line_error(_run("inspect", "--model", str(tmp_path), ok=False), str(tmp_path), "config.json")
    _assert_one_line_error(_run("inspect", "--model", str(tmp_path / "missing"), ok=False), "does not exist")


def test_inspect_a_dense_model_names_its_model_type(dense_model_dir):
    _assert_one_line_error(_run("inspect", "--model", str(dense_model_dir), ok=False), "'llama'", "no MoE family")


def test_inspect_without_model_or_family_is_a_usage_error():
    result = _run("inspect", ok=False)
    assert result.exit_code == 2 and "--family" in result.output and "Traceback" not in result.output


def test_help_shows_a_worked_example():
    for flag in ("--help", "-h"):
        out = _run(flag).output
        assert "nexus --family gpt_oss run" in out
        assert "nexus inspect --model" in out
        for command in ("plugins", "families", "inspect"):
            assert command in out


def _gpt_oss_hooks() -> set[str]:
    """Hook names the GPT-OSS plugin object implements, read from its hookimpl markers."""
    from families.gpt_oss import plugin

    return {name for name in dir(plugin) if name.startswith("nexus_") and hasattr(getattr(plugin, name), "nexus_impl")}


def test_plugins_lists_gpt_oss_with_its_hooks():
    expected = _gpt_oss_hooks()
    assert {"nexus_register_families", "nexus_activation", "nexus_read_experts", "nexus_moe_blocks"} <= expected
    lines = _run("plugins").output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("gpt_oss "))
    assert "nexus-moe" in lines[start]
    hooks = []
    for line in lines[start + 1 :]:
        if not line.startswith("    "):
            break
        hooks.append(line.strip())
    assert set(hooks) == expected
    rows = {r["name"]: r for r in json.loads(_run("plugins", "--json").stdout)}
    assert set(rows["gpt_oss"]["hooks"]) == expected
    assert "nexus_build_shared_expert" in rows["nexus.defaults"]["hooks"]


def test_families_lists_gpt_oss():
    out = _run("families").output
    line = next(line for line in out.splitlines() if line.startswith("gpt_oss "))
    assert "nexus-moe" in line and "MXFP4" in line
    rows = json.loads(_run("families", "--json").stdout)
    assert {"name": "gpt_oss", "model_types": ["gpt_oss"]}.items() <= next(r for r in rows if r["name"] == "gpt_oss").items()


def _shared_params(hidden: int, inter: int) -> int:
    """One shared expert: gate and up Linear(H -> I) and down Linear(I -> H), all with biases.
    (The gate scale is not part of the MLP and not counted.)"""
    return 2 * (hidden * inter + inter) + (inter * hidden + hidden)


def test_inspect_json(gpt_oss_mxfp4_dir, gpt_oss_config):
    info = json.loads(_run("inspect", "--model", str(gpt_oss_mxfp4_dir), "--json").stdout)
    L, E, H, I = 3, 8, 64, gpt_oss_config.intermediate_size  # noqa: E741
    assert info["family"] == "gpt_oss" and info["model_type"] == "gpt_oss"
    assert info["quantization"] == "mxfp4"
    assert [b["layer"] for b in info["moe_layers"]] == [0, 1, 2]
    assert info["moe_layers"][1] == {"layer": 1, "path": "model.layers.1.mlp", "num_experts": E, "top_k": 2,
                                     "hidden_size": H, "intermediate_size": I}
    assert info["num_layers"] == L
    assert info["shared_intermediate_size"] == I
    assert info["shared_expert_parameters"] == L * _shared_params(H, I)
    assert info["routed_expert_parameters"] == L * E * (H * 2 * I + 2 * I + I * H + H)
    from nexus.fingerprint import config_fingerprint
    from nexus.loading import load_model

    model = load_model(gpt_oss_mxfp4_dir, dequantize=True)  # every parameter, experts included
    assert info["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["fingerprint"] == config_fingerprint(model.config)
    assert info["checkpoint_bytes"] == (gpt_oss_mxfp4_dir / "model.safetensors").stat().st_size

    narrow = json.loads(_run("inspect", "--model", str(gpt_oss_mxfp4_dir), "--shared-intermediate-size", "32", "--json").stdout)
    assert narrow["shared_intermediate_size"] == 32
    assert narrow["shared_expert_parameters"] == L * _shared_params(H, 32)
    assert narrow["shared_expert_parameters"] < info["shared_expert_parameters"]


def test_inspect_float_checkpoint_text(gpt_oss_float_dir):
    out = _run("inspect", "--model", str(gpt_oss_float_dir)).output
    assert "quantisation   none" in out
    assert "MoE layers     3 of 3: [0, 1, 2]" in out
    assert "experts        8 routed, top-2" in out


def test_inspect_demo_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_CACHE", str(tmp_path))
    info = json.loads(_run("--family", "gpt_oss", "inspect", "--json").stdout)
    assert info["quantization"] == "mxfp4"
    assert info["path"].startswith(str(tmp_path / "demo" / "gpt_oss-"))
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [info["path"].rsplit("/", 1)[1]]


@pytest.mark.parametrize("args", [["--version"]])
def test_version(args):
    from nexus import __version__

    assert __version__ in _run(*args).output


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    assert _run("--version").output.strip() == f"nexus, version {version('nexus-moe')}"


_STARTUP = """
import sys
from click.testing import CliRunner
from nexus.cli import cli
assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported by nexus.cli'
for args in (['--version'], ['--help'], ['train', '--help'], ['run', '--help'], ['precompute', '--help'],
             ['select', '--help'], ['evaluate', '--help']):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
    heavy = sorted({'torch', 'transformers', 'families', 'nexus_family_example'} & set(sys.modules))
    assert not heavy, (args, heavy)
assert not cli.plugins_loaded
"""


def test_help_and_version_import_neither_torch_nor_plugins():
    """``nexus --help``/``--version`` and every built-in command's ``--help`` start without torch,
    transformers or any plugin (which import both)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _STARTUP], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_plugin_command_is_found_without_building_the_cli_again():
    import click

    import nexus
    from nexus.plugins import get_plugin_manager

    class LatePlugin:
        __name__ = "LatePlugin"

        @nexus.hookimpl
        def nexus_register_commands(self, cli):
            @cli.command(name="late-hello")
            def hello():
                """Say hello."""
                click.echo("hello from a plugin")

    pm = get_plugin_manager()
    plugin = LatePlugin()
    pm.register(plugin, name="late-plugin")
    loaded = cli.plugins_loaded
    cli.plugins_loaded = False  # as in a fresh process: plugins not loaded yet
    try:
        assert _run("late-hello").output == "hello from a plugin\n"
        assert cli.plugins_loaded
    finally:
        pm.unregister(plugin)
        cli.commands.pop("late-hello", None)
        cli.plugins_loaded = loaded
    assert _run("late-hello", ok=False).exit_code == 2

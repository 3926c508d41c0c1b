"""convert's progress bar never shares its line with what follows: a warning logged while it runs,
and the error that stops it, each start a line of their own."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from nexus.cli import cli
from nexus.errors import NexusError


def _visible_lines(output: str) -> list[str]:
    """The lines a terminal shows: what follows the last carriage return of each line."""
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


@pytest.mark.parametrize("warn", [False, True])
def test_a_warning_and_an_error_during_convert_start_lines_of_their_own(gpt_oss_mxfp4_dir, tmp_path, monkeypatch,
                                                                        warn):
    import nexus.engines.convert as convert_module

    real = convert_module.layer_tensors
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if warn:
                logging.getLogger("nexus.engines.convert").warning("layer 1 looks odd")
            raise NexusError("layer 1 cannot be read")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "layer_tensors", failing)
    result = CliRunner().invoke(cli, ["convert", "--model", str(gpt_oss_mxfp4_dir), "--strategy", "mean_all",
                                      "--output", str(tmp_path / "adapter")])
    assert result.exit_code == 1 and len(calls) == 2, result.output
    assert "convert:" in result.output  # the bar was shown
    lines = _visible_lines(result.output)
    if warn:
        assert any(line.startswith("WARNING") and line.endswith("layer 1 looks odd") for line in lines), lines
    assert "Error: layer 1 cannot be read" in lines, lines

"""The demo's duration is stated the same way in the README and in ``nexus run --help``."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from nexus.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def test_run_help_states_the_readme_demo_duration():
    text = " ".join(README.read_text().split())
    stated = re.search(r"it takes (about [a-z ]+?) on \d+ CPU cores", text)
    assert stated, "README no longer states the demo's duration as 'it takes about ... on N CPU cores'"
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert f"built-in demo, {stated.group(1)}" in help_text

"""docs/cli.md is the built-in commands' --help as the code renders it today."""

from __future__ import annotations

from pathlib import Path

from nexus.cli.reference import render_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert PAGE.read_text() == render_reference(), (
        "docs/cli.md is stale: regenerate it with `python -m nexus.cli.reference > docs/cli.md`"
    )


def test_cli_reference_lists_every_builtin_command():
    from nexus.cli import BUILTIN_COMMANDS

    page = PAGE.read_text()
    assert {"collect", "select", "convert", "train", "run", "export"} <= set(BUILTIN_COMMANDS)
    for name in BUILTIN_COMMANDS:
        assert f"## nexus {name}\n" in page

"""The adapters docs/trainers.md's scripts make are ones ``nexus export`` takes: their gates fold."""

from __future__ import annotations

import ast

from helpers_trainers import docs_scripts
from nexus.constants import DEFAULT_GATE_MODE, FOLDABLE_GATE_MODES


def _gate_modes(source: str) -> list[str]:
    """The gate mode of every ``NexusConfig(...)`` the script builds (the default when not given)."""
    modes = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "NexusConfig":
            given = [k.value for k in node.keywords if k.arg == "gate_mode"]
            modes.append(ast.literal_eval(given[0]) if given else DEFAULT_GATE_MODE)
    return modes


def test_every_docs_script_makes_an_exportable_adapter():
    scripts = docs_scripts()
    assert scripts
    for name, source in scripts.items():
        modes = _gate_modes(source)
        assert modes, f"docs script {name} builds no NexusConfig"
        assert set(modes) <= set(FOLDABLE_GATE_MODES), f"docs script {name}: gate {modes} does not export"

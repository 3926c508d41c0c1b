"""Meta-tests over the hook specs: every hook is documented in docs/plugins.md and has a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nexus.plugins import build_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent

_PM = build_plugin_manager(load_entry_points=False)
HOOKS = sorted(name for name in dir(_PM.hook) if not name.startswith("_"))
HEADING = re.compile(r"^## (nexus_\w+)\(([^)]*)\)\s*$", re.MULTILINE)


def _documented() -> dict[str, list[str]]:
    text = DOCS.read_text()
    return {m.group(1): [a.strip() for a in m.group(2).split(",") if a.strip()] for m in HEADING.finditer(text)}


def test_there_are_hooks():
    assert "nexus_register_families" in HOOKS and "nexus_read_experts" in HOOKS
    assert len(HOOKS) >= 9


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hook_is_documented(hook):
    argnames = list(getattr(_PM.hook, hook).spec.argnames)
    documented = _documented()
    assert hook in documented, f"docs/plugins.md needs a heading '## {hook}({', '.join(argnames)})'"
    assert documented[hook] == argnames, f"heading arguments {documented[hook]} differ from the spec's {argnames}"


def test_documented_hooks_exist():
    assert sorted(_documented()) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hook_has_a_test(hook):
    pattern = re.compile(rf"^\s*def test_hook_{hook}\b", re.MULTILINE)
    files = [p.relative_to(TESTS) for p in TESTS.rglob("test_*.py") if pattern.search(p.read_text())]
    assert files, f"no test function named test_hook_{hook} under tests/"

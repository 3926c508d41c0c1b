"""Loading is one-way: the plugin contract declares formats, ``nexus.quant`` decodes and loads them,
and the loader calls both. Neither imports back (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import nexus

PACKAGE = Path(nexus.__file__).parent
CONTRACT = ("hookspecs.py", "spec.py", "expert_layout.py", "types.py", "family.py")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_contract_does_not_import_the_loader_or_the_decoders():
    for name in CONTRACT:
        bad = {m for m in _imports(PACKAGE / name) if m.startswith(("nexus.quant", "nexus.loading"))}
        assert not bad, f"nexus/{name} imports {sorted(bad)}"


def test_decoders_do_not_import_the_contract_or_the_loader():
    for path in sorted((PACKAGE / "quant").glob("*.py")):
        bad = {m for m in _imports(path)
               if m in ("nexus.loading", "nexus.family", "nexus.spec", "nexus.hookspecs", "nexus.plugins")}
        assert not bad, f"nexus/quant/{path.name} imports {sorted(bad)}"


def test_hook_nexus_expert_layout():
    """Spec families declare their stored layout; the loader reads it from the hook, not the spec."""
    from nexus.expert_layout import ExpertLayout
    from nexus.family import resolve_family

    layout = resolve_family(name="gpt_oss").expert_layout()
    assert isinstance(layout, ExpertLayout) and "mxfp4" in layout.packed_formats
    assert resolve_family(name="deepseek_v3").expert_layout().packed_formats == ("fp8",)

"""The quality benchmark's second domain: licence texts of the installed distributions."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from nexus.errors import NexusError  # noqa: E402


class _Dist:
    def __init__(self, root: Path, files: dict[str, str]):
        self.root = root
        self.files = []
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
            self.files.append(Path(rel))

    def locate_file(self, rel):
        return self.root / rel


def _text(i: int) -> str:
    return f"Licence number {i}. " + "Permission is hereby granted, free of charge, to any person. " * 10


def test_each_distinct_licence_text_is_one_document(tmp_path, monkeypatch):
    from importlib import metadata

    from benchmarks.quality import corpus

    dists = [
        _Dist(tmp_path / "a", {"a-1.0.dist-info/LICENSE": _text(0), "a/__init__.py": _text(9),
                               "a-1.0.dist-info/licenses/NOTICE.txt": _text(1)}),
        # the same text with other line breaks, and a text too short to be a licence
        _Dist(tmp_path / "b", {"b-1.0.dist-info/LICENSE.txt": _text(0).replace(". ", ".\n"),
                               "b-1.0.dist-info/COPYING": "MIT"}),
        _Dist(tmp_path / "c", {"c-2.0.dist-info/licence.md": _text(2), "c/LICENSE_helper.py": _text(3)}),
    ]
    monkeypatch.setattr(metadata, "distributions", lambda: iter(dists))
    texts = corpus.license_texts()
    assert sorted(t.split(".")[0] for t in texts.values()) == ["Licence number 0", "Licence number 1",
                                                              "Licence number 2"]
    with pytest.raises(NexusError, match="only 3 distinct licence texts"):
        corpus.license_corpus()


def test_the_installed_licences_make_a_split_domain():
    from benchmarks.quality.corpus import DOMAINS

    build, label = DOMAINS["licenses"]
    c = build()
    assert "licen" in label and all(c.splits[s] for s in ("train", "val", "test"))
    names = [n for s in c.splits.values() for n, _ in s]
    assert len(names) == len(set(names)) and all(len(n) == 16 for n in names)

"""Helpers for the collect/select/convert tests: a checkpoint copy with a tokenizer, small data files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def demo_paragraphs(n: int) -> list[str]:
    """The first ``n`` non-empty paragraphs of NEXUS's real-text sample."""
    from nexus.demo import demo_text_path

    paras = [p.strip() for p in demo_text_path().read_text().split("\n\n") if p.strip()]
    return paras[:n]


def model_with_tokenizer(src: Path, dst: Path) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` and save a 256-entry BPE tokenizer beside it."""
    from nexus.demo import train_tokenizer

    if not (dst / "tokenizer.json").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        train_tokenizer(demo_paragraphs(200), vocab_size=256).save_pretrained(dst)
    return dst


def write_jsonl(path: Path, n: int) -> Path:
    """A ``.jsonl`` file with a ``text`` column of ``n`` real paragraphs."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_paragraphs(n)))
    return path

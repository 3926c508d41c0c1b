"""The scripts of docs/trainers.md run as written, on a tiny model, a few steps each."""

from __future__ import annotations

import pytest

from helpers_trainers import docs_scripts, make_tiny_base, preference_rows, run_docs_script, text_dataset, write_jsonl
from nexus.adapter import read_adapter_config
from nexus.family import resolve_family


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    return {
        "root": root,
        "model": str(make_tiny_base(resolve_family(name="qwen3_moe"), root / "base")),
        "text": str(write_jsonl(root / "train.jsonl", [{"text": r["text"]} for r in text_dataset(16)])),
        "prefs": str(write_jsonl(root / "preferences.jsonl", preference_rows(8))),
    }


def test_docs_have_the_three_scripts():
    assert set(docs_scripts()) == {"sft", "sft_kd", "dpo"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "sft_kd", "dpo"])
def test_docs_script_runs(work, name):
    out = work["root"] / name
    data = work["prefs"] if name == "dpo" else work["text"]
    run_docs_script(name, {"MODEL": work["model"], "DATA": data, "OUTPUT": str(out), "MAX_STEPS": 2}, work["root"])
    assert read_adapter_config(out / "final").family == "qwen3_moe"

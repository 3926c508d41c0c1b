"""Builders for the trainer-integration tests: tiny MoE checkpoints with a tokenizer, datasets, the docs' scripts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from nexus.demo import build_checkpoint, demo_paragraphs, train_tokenizer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "trainers.md"
TRAINER_ARGS = dict(use_cpu=True, bf16=False, report_to=[], dataloader_num_workers=0, disable_tqdm=True,
                    logging_steps=1)


def make_tiny_base(family, path: Path) -> Path:
    """A random checkpoint of ``family``'s example config (GPT-OSS: MXFP4 on disk) plus a BPE tokenizer."""
    config = family.example_config()
    tokenizer = train_tokenizer(demo_paragraphs(200), config.vocab_size, config)
    build_checkpoint(family, path, config)
    tokenizer.save_pretrained(path)
    return path


def text_dataset(n: int = 16):
    """A ``datasets.Dataset`` of ``n`` demo paragraphs in a ``text`` column."""
    from datasets import Dataset

    return Dataset.from_list([{"text": t} for t in demo_paragraphs(n)])


def preference_rows(n: int = 8) -> list[dict]:
    """``prompt``/``chosen``/``rejected`` rows cut from the demo text at word boundaries."""
    paras = demo_paragraphs(n + 1)
    rows = []
    for i in range(n):
        words, other = paras[i].split(), paras[i + 1].split()
        rows.append({"prompt": " ".join(words[:6]), "chosen": " " + " ".join(words[6:18]),
                     "rejected": " " + " ".join(other[6:18])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_state(model) -> dict[str, torch.Tensor]:
    """Clones of every base (non-shared-expert) parameter and buffer of ``model``."""
    from nexus.shared_expert import is_shared_parameter

    return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_shared_parameter(k)}


def fixed_batch(tokenizer, n: int = 4, length: int = 32) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` of ``n`` demo paragraphs, right-padded to ``length``."""
    enc = tokenizer(demo_paragraphs(n), truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def docs_scripts() -> dict[str, str]:
    """The ```python blocks of docs/trainers.md that start with ``# script: NAME``, by NAME."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    return {m.group(1): b for b in blocks if (m := re.match(r"# script: (\S+)", b))}


def run_docs_script(name: str, settings: dict[str, object], cwd: Path,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the docs script ``name`` with its upper-case settings (``MODEL = ...`` lines) replaced by ``settings``."""
    from helpers_train import subprocess_env

    source = docs_scripts()[name]
    for key, value in settings.items():
        source, count = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", source, count=1, flags=re.M)
        assert count == 1, f"docs script {name} has no setting {key}"
    script = cwd / f"{name}.py"
    script.write_text(source)
    r = subprocess.run([sys.executable, str(script)], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

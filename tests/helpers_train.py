"""Builders for the training tests: a tiny GPT-OSS base with a tokenizer, a random adapter, text data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from nexus.demo import demo_paragraphs, train_tokenizer  # noqa: F401  (demo_paragraphs: used by tests)


def make_base(src: Path, dst: Path, vocab_size: int = 256) -> Path:
    """Copy the checkpoint at ``src`` to ``dst`` and save a BPE tokenizer of ``vocab_size`` beside it."""
    shutil.copytree(src, dst)
    tok = train_tokenizer(demo_paragraphs(200), vocab_size)
    tok.save_pretrained(dst)
    return dst


def make_adapter(model_dir: Path, out: Path, gate_mode: str = "scalar", seed: int = 0, intermediate_size: int | None = 32,
                 scale: float = 0.05) -> Path:
    """A random adapter for ``model_dir``: shared experts with N(0, scale) weights and non-zero gates."""
    from nexus.adapter import AdapterConfig, save_adapter
    from nexus.family import resolve_family
    from nexus.fingerprint import config_fingerprint
    from nexus.loading import load_model
    from nexus.shared_expert import attach_shared_experts, is_shared_parameter

    model = load_model(model_dir)
    family = resolve_family(model.config)
    blocks = attach_shared_experts(model, family, intermediate_size, gate_mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * scale + (0.5 if "scale" in name else 0.0))
    cfg = AdapterConfig(family=family.name, base_fingerprint=config_fingerprint(model.config),
                        shared_intermediate_size=intermediate_size or blocks[0].intermediate_size, gate_mode=gate_mode,
                        base_model=str(model_dir), model_type=model.config.model_type)
    return save_adapter(model, out, cfg)


def subprocess_env() -> dict:
    """The environment for a child process of a test: one torch thread, quiet tokenizers, faulthandler on."""
    # A child that aborts prints its Python stacks (faulthandler), not only the launcher's report.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def torchrun(*args: str, no_python: bool = False, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` as two ``torchrun`` processes (gloo on CPU), ``env`` added; assert they succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *(["--no-python"] if no_python else []), *args]
    r = subprocess.run(cmd, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def make_data(path: Path, n: int = 40) -> Path:
    """A ``.jsonl`` with ``n`` demo paragraphs in a ``text`` column."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_paragraphs(n)))
    return path


def student_at_step0(work):
    """The base ``work["base"]`` with the adapter ``work["adapter"]``, only the shared experts trainable."""
    from nexus.adapter import load_adapter
    from nexus.loading import load_model
    from nexus.shared_expert import is_shared_parameter

    model = load_model(work["base"])
    load_adapter(model, work["adapter"])
    for name, p in model.named_parameters():
        p.requires_grad_(is_shared_parameter(name))
    return model

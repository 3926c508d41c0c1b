"""Helpers for the collect/select/convert tests: a checkpoint copy with a tokenizer, small data files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nexus.demo import demo_paragraphs


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


def random_rows(n: int, lo: int, hi: int, seed: int, vocab: int = 256) -> list[list[int]]:
    """``n`` rows of random token ids (never the padding id 0), lengths in ``[lo, hi]``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def router_reference(model, batches) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer of a GPT-OSS model, from hooks on transformers' ``GptOssTopKRouter`` (not NEXUS's
    recorder): the counted tokens' probabilities ``p[N, E]`` (float64 of the float32 softmax), the
    router's own top-k indices ``idx[N, k]`` and routing weights ``w[N, k]``.

    A batch's tokens are counted where ``attention_mask`` is 1, or where ``batch["keep"]`` is True.
    """
    out: dict[int, dict[str, list]] = {}
    captured = {}
    handles = [
        layer.mlp.router.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                keep = batch.get("keep", batch["attention_mask"].reshape(-1).bool())
                for i, (logits, scores, idx) in captured.items():
                    d = out.setdefault(i, {"p": [], "idx": [], "w": []})
                    d["p"].append(torch.softmax(logits.float(), -1).double()[keep])
                    d["idx"].append(idx[keep])
                    d["w"].append(scores[keep].double())
    finally:
        for h in handles:
            h.remove()
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in out.items()}

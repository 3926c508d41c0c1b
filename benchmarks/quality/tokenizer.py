"""A byte-level BPE tokenizer trained on the general corpus, and token streams cached on disk."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from nexus.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_bpe(texts: list[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with ``vocab_size`` entries.

    Every byte is in the alphabet, so any text (Python code included) encodes without unknowns.
    Special tokens ``<pad> <s> </s>`` take ids 0-2.

    :return: a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def cached_tokenizer(texts: list[str], vocab_size: int, cache: Path, key: str):
    """The tokenizer trained on ``texts``, loaded from ``cache/tokenizer-<hash>`` when present.

    :param key: identifies ``texts`` (the corpus fingerprint); part of the cache key.
    :return: ``(tokenizer, directory)``.
    """
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(f"bpe-bytelevel-v1\0{vocab_size}\0{key}".encode()).hexdigest()[:16]
    path = Path(cache) / f"tokenizer-{digest}"
    if not (path / "tokenizer.json").exists():
        log.info("training a %d-entry byte-level BPE on %d documents -> %s", vocab_size, len(texts), path)
        tok = train_bpe(texts, vocab_size)
        with atomic_dir(path) as tmp:
            tok.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(path), path


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All ``texts`` as one token stream, each document followed by EOS: ``uint16[N]``."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for doc in ids:
        out.extend(doc)
        out.append(tokenizer.eos_token_id)
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise ValueError("vocabulary too large for a uint16 token stream")
    return np.asarray(out, dtype=np.uint16)


def cached_stream(tokenizer, texts: list[str], cache: Path, key: str) -> np.ndarray:
    """:func:`encode_stream`, cached as ``cache/<key>.npy`` (key must identify tokenizer and texts)."""
    path = Path(cache) / f"{key}.npy"
    if path.exists():
        return np.load(path)
    stream = encode_stream(tokenizer, texts)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, stream)
    return stream

"""The built-in demo: a tiny random checkpoint of a family, built once and cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from nexus.fingerprint import config_fingerprint
from nexus.io import atomic_dir

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$NEXUS_CACHE`` or ``~/.cache/nexus``."""
    return Path(os.environ.get("NEXUS_CACHE", Path.home() / ".cache" / "nexus"))


def build_checkpoint(family, path: str | Path, config=None, seed: int = 0) -> Path:
    """Build a random model of ``family`` from ``config`` (default its example config) and
    write it to ``path`` in the family's native format (GPT-OSS: MXFP4).

    :return: ``path``.
    """
    from transformers import AutoModelForCausalLM

    config = config or family.example_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    family.write_checkpoint(model, path)
    return path


def demo_text_path() -> Path:
    """The real-text sample shipped with NEXUS (public-domain State of the Union addresses)."""
    return Path(__file__).parent / "demo_texts" / "demo.txt"


def demo_paragraphs(n: int | None = None) -> list[str]:
    """The first ``n`` (default all) non-empty paragraphs of :func:`demo_text_path`, stripped."""
    paras = [p.strip() for p in demo_text_path().read_text().split("\n\n") if p.strip()]
    return paras[:n]


def demo_eval_path() -> Path:
    """Held-out paragraphs of the same addresses, for evaluating the demo."""
    return Path(__file__).parent / "demo_texts" / "demo_eval.txt"


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, config=None):
    """Train a small BPE tokenizer on ``texts`` with ``vocab_size`` entries.

    Special tokens ``<pad> <s> </s> <unk>`` take ids 0-3; when ``config`` is given its
    ``pad/bos/eos_token_id`` are set to match.

    :return: a ``transformers.PreTrainedTokenizerFast`` with a simple chat template.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    if config is not None:
        config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return fast


def demo_checkpoint(family) -> Path:
    """The cached demo checkpoint of ``family`` (model + tokenizer), built on first use."""
    config = family.example_config()
    text = demo_text_path().read_text()
    key = hashlib.sha256((config_fingerprint(config) + text).encode()).hexdigest()[:12]
    path = cache_root() / "demo" / f"{family.name}-{key}"
    if not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
        log.info("building the %s demo checkpoint in %s", family.name, path)
        texts = text.split("\n\n")
        with atomic_dir(path) as tmp:
            tokenizer = train_tokenizer(texts, config.vocab_size, config)
            build_checkpoint(family, tmp, config)
            tokenizer.save_pretrained(tmp)
    return path

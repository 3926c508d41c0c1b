"""The arguments of ``nexus evaluate`` and ``nexus generate``, apart from the engine so that the CLI
builds without torch."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.config_fields import option as _f
from nexus.constants import DEFAULT_SEQ_LEN

_DEQUANTIZE_HELP = "Dequantise experts stored quantised (MXFP4, FP8) at load instead of keeping them packed as stored."


@dataclass
class EvaluateConfig:
    """Arguments of ``nexus evaluate``; each field's help is also the CLI's."""

    model: str = _f(None, "Base model checkpoint directory.", required=True, exists=True)
    adapter: str | None = _f(None, "Adapter directory (omit to evaluate the base alone).", exists=True)
    data: str = _f(None, "Held-out data: .jsonl/.parquet/.txt file, a directory of them, or a cached dataset.",
                   required=True, data=True)
    output: str | None = _f(None, "Write the results JSON here (default: print it).", path=True)
    seq_len: int = _f(DEFAULT_SEQ_LEN, "Tokens per row.", min=2)
    batch_size: int = _f(4, "Rows per forward pass.", min=1)
    max_batches: int | None = _f(None, "Stop after this many batches.", min=1)
    tokenizer: str | None = _f(None, "Tokenizer directory (default: the model's).", exists=True)
    text_column: str | None = _f(None, "Text column of the data (default: text, or chat messages).")
    bf16: bool = _f(False, "Run in bfloat16.")
    dequantize: bool = _f(False, _DEQUANTIZE_HELP)


@dataclass
class GenerateConfig:
    """Arguments of ``nexus generate``; each field's help is also the CLI's."""

    model: str = _f(None, "Base model checkpoint directory.", required=True, exists=True)
    adapter: str | None = _f(None, "Adapter directory (omit for the base).", exists=True)
    prompt: str = _f(None, "Text to continue (or the user message with --chat).", required=True)
    chat: bool = _f(False, "Format the prompt with the tokenizer's chat template.")
    max_new_tokens: int = _f(64, "Tokens to generate.", min=1)
    temperature: float = _f(0.0, "0: greedy; otherwise sample.", min=0.0)
    seed: int = _f(0, "Sampling seed.")
    tokenizer: str | None = _f(None, "Tokenizer directory (default: the model's).", exists=True)
    dequantize: bool = _f(False, _DEQUANTIZE_HELP)

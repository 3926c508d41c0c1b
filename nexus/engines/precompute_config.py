"""The arguments of ``nexus precompute``, apart from the engine so that the CLI builds without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from nexus.constants import DEFAULT_SEQ_LEN


@dataclass
class PrecomputeConfig:
    """Arguments of ``nexus precompute``; each field's help is also the CLI's."""

    teacher: str = field(metadata={"help": "Teacher model directory (a Hugging Face causal LM).", "exists": True})
    data: str = field(metadata={"help": "Data: .jsonl/.parquet/.txt file, a directory of them, or a cached dataset.", "data": True})
    output: str = field(metadata={"help": "Cache directory to write (resumed when it exists).", "path": True})
    top_k: int = field(default=64, metadata={"help": "Teacher log-probabilities kept per token."})
    seq_len: int = field(default=DEFAULT_SEQ_LEN, metadata={"help": "Tokens per row (packed)."})
    batch_size: int = field(default=4, metadata={"help": "Rows per forward pass (per process)."})
    rows_per_shard: int = field(default=256, metadata={"help": "Rows per Parquet shard."})
    temperature: float = field(default=1.0, metadata={"help": "Teacher temperature the log-probs are taken at (train with the same --temperature)."})
    router_logits: bool = field(default=False, metadata={"help": "Also store the teacher's router logits (for --router-kl-weight)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer directory (default: the teacher's).", "exists": True})
    text_column: str | None = field(default=None, metadata={"help": "Text column of the data (default: text, or chat messages)."})
    bf16: bool = field(default=False, metadata={"help": "Run the teacher in bfloat16."})
    dequantize: bool = field(default=False, metadata={"help": "Dequantise experts stored quantised (MXFP4, FP8) "
                                                              "at load instead of keeping them packed as stored."})

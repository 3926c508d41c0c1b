"""The arguments of ``nexus collect``, apart from the engine so that the CLI builds without torch."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.config_fields import option as _f
from nexus.config_fields import same_as
from nexus.constants import DEFAULT_SEQ_LEN
from nexus.errors import NexusError


@dataclass
class CollectArgs:
    """What a ``collect`` run does (the run's identity is made from these, minus the progress knobs).

    Attributes:
        target_tokens: stop after exactly this many (non-padding) tokens; None: the whole data, once.
            The data is read in order until the budget is met (a 168 MB file is not read whole for
            20k tokens), so the statistics describe the first documents of the file, shuffled
            among themselves: put a representative sample first, or shuffle the file.
        batch_size: rows per forward, per process.
        seed: shuffle the rows with this seed (None: data order). Matters only with ``target_tokens``.
        checkpoint_every: save the partial statistics every this many batches (0: only at the end).
    """

    target_tokens: int | None = _f(None, "Stop after exactly this many non-padding tokens, read from the start of "
                                         "the data (default: the whole data, once).")
    batch_size: int = _f(8, "Rows per forward pass, per process.")
    seed: int | None = _f(None, "Shuffle rows with this seed (default: data order).")
    checkpoint_every: int = _f(50, "Save partial statistics every N batches (0: only at the end); a rerun "
                                   "resumes from them.")

    def __post_init__(self):
        if self.target_tokens is not None and self.target_tokens < 1:
            raise NexusError(f"--target-tokens must be positive, got {self.target_tokens}")
        if self.batch_size < 1:
            raise NexusError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass
class CollectConfig:
    """Arguments of ``nexus collect``; each field's help is also the CLI's. The run's identity
    (:class:`CollectArgs`) is :meth:`args`."""

    model: str | None = _f(None, "Base checkpoint directory with its tokenizer (default with --family: the demo "
                                 "checkpoint).", path=True)
    data: str | None = _f(None, "Text data: .jsonl/.json/.parquet/.txt/.arrow file or directory, or a cached "
                                "dataset name (default with the demo model: the demo text).", data=True)
    output: str = _f(None, "Directory for router_stats.safetensors/.json (and the resume checkpoints).",
                     required=True, short="-o", path=True)
    target_tokens: int | None = same_as(CollectArgs, "target_tokens")
    batch_size: int = same_as(CollectArgs, "batch_size")
    seq_len: int = _f(DEFAULT_SEQ_LEN, "Tokens per row (documents are packed).")
    text_column: str | None = _f(None, "Text column of the data (default: text, or chat 'messages').")
    seed: int | None = same_as(CollectArgs, "seed")
    checkpoint_every: int = same_as(CollectArgs, "checkpoint_every")
    max_batches: int | None = _f(None, "Stop after N batches in this invocation, leaving resumable partial "
                                       "statistics.")
    dtype: str = _f("float32", "Dtype the base is loaded in.", choices=("float32", "bfloat16"))
    overwrite: bool = _f(False, "Discard statistics of a different run found in --output.")
    dequantize: bool = _f(False, "Dequantise experts stored quantised (MXFP4, FP8) at load instead of keeping "
                                 "them packed as stored.")

    def args(self) -> CollectArgs:
        """The part of the arguments that makes the run's identity (checked on resume)."""
        return CollectArgs(target_tokens=self.target_tokens, batch_size=self.batch_size, seed=self.seed,
                           checkpoint_every=self.checkpoint_every)

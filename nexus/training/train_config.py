"""The arguments of ``nexus train``: one dataclass whose field help is also the CLI's ``--help``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

from nexus.config_fields import option as _f
from nexus.constants import DEFAULT_LR, DEFAULT_SEQ_LEN
from nexus.errors import NexusError


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in ``run/run_config.json``.

    ``lr`` and ``seq_len`` default to the values ``nexus run`` uses too
    (:data:`nexus.constants.DEFAULT_LR`, :data:`~nexus.constants.DEFAULT_SEQ_LEN`, where the
    reasons are given).
    """

    model: str = _f(None, "Base model checkpoint directory.", required=True, exists=True)
    adapter: str = _f(None, "Adapter directory to start from (from nexus convert).", required=True,
                      exists=True)
    output: str = _f(None, "Run directory: run_config.json, metrics.jsonl, checkpoints/, final/.", required=True,
                     path=True)
    teacher: str = _f("self", "Teacher: 'self' (the base, adapter off; no second copy), a model directory with the same tokenizer, or a teacher cache from nexus precompute.", exists=True, unless=("self",))
    data: str | None = _f(None, "Training data: .jsonl/.parquet/.txt file, a directory of them, or a cached dataset (optional with a teacher cache).", data=True)
    tokenizer: str | None = _f(None, "Tokenizer directory (default: the model's).", exists=True)
    text_column: str | None = _f(None, "Text column of the data (default: text, or chat messages).")
    kd_data: str | None = _f(None, "General text for distillation: KD (and router KL) on batches of it, CE on --data "
                                   "(default: every term on --data). With a teacher cache: the data the cache was "
                                   "made from.", data=True)
    kd_batch_size: int | None = _f(None, "Rows of --kd-data per micro-batch per process (default: --batch-size).")
    kd_text_column: str | None = _f(None, "Text column of --kd-data (default: text, or chat messages).")
    seq_len: int = _f(DEFAULT_SEQ_LEN, "Tokens per row (documents are packed).")
    batch_size: int = _f(4, "Rows per micro-batch per process.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (the loss is normalised by the tokens of the whole window).")
    max_steps: int = _f(100, "Optimizer steps in total.")
    lr: float = _f(DEFAULT_LR, "Peak learning rate of the shared experts.")
    router_lr: float | None = _f(None, "Learning rate of the routers with --train-routers (default: --lr).")
    train_routers: bool = _f(False, "Also train the routers (saved in the adapter).")
    train_native_shared: bool = _f(False, "Also train the shared expert the family already has (Qwen2-MoE, DeepSeek-V3, ...; saved in the adapter).")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    schedule: str = _f("cosine", "Learning-rate schedule after warmup: cosine or constant.", choices=("cosine", "constant"))
    min_lr_ratio: float = _f(0.0, "Cosine floor as a fraction of the peak learning rate.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optim: str = _f("adamw", "Optimizer of the trainable parameters: adamw (fp32 state, 8 bytes per parameter) or "
                    "adamw8bit (bitsandbytes' 8-bit AdamW, about 2 bytes per parameter; the optim8bit extra).",
                    choices=("adamw", "adamw8bit"))
    ce_weight: float = _f(1.0, "Weight of the cross-entropy on the data.")
    kd_weight: float = _f(1.0, "Weight of the distillation KL(teacher || student), multiplied by T^2.")
    temperature: float = _f(1.0, "Distillation temperature T.")
    router_kl_weight: float = _f(0.0, "Weight of the router KL(teacher || student), averaged over MoE layers.")
    sfa_interval: int = _f(0, "SFA: every N steps pull the trainable weights toward the anchor (0: off).")
    sfa_beta: float = _f(0.5, "SFA: weight of the anchor in each merge.")
    sfa_anchor: str = _f("start", "SFA anchor: start (the adapter training began from, as in the paper) or previous (the last merge).", choices=("start", "previous"))
    save_every: int = _f(100, "Checkpoint every N steps (0: only at the end).")
    keep_last: int = _f(3, "Checkpoints kept (older ones are deleted; 0 keeps all).")
    resume: bool = _f(False, "Resume from the latest checkpoint in --output.")
    allow_data_change: bool = _f(False, "With --resume: continue even though the content of --data or --kd-data "
                                        "changed since the run started (a warning names both fingerprints); "
                                        "without it such a resume is refused.")
    overwrite: bool = _f(False, "Delete the run already in --output (checkpoints, metrics.jsonl, final/), "
                                "then start over.")
    stop_after: int | None = _f(None, "Stop after this many steps in this invocation, with a checkpoint (resume later).")
    log_every: int = _f(10, "Write a metrics.jsonl line every N steps.")
    report_to: str | None = _f(None, "Also log to accelerate trackers: tensorboard, wandb, ... or all.")
    gradient_checkpointing: bool = _f(False, "Recompute decoder-layer activations in backward to save memory.")
    loss_chunk_tokens: int = _f(0, "Tokens per chunk of the vocabulary losses (CE, KL), computed from the final "
                                "hidden states a chunk at a time so that no [tokens, vocab] logits are kept (0: as "
                                "many as fit a 1 GiB workspace, 166 at a 201,088-token vocabulary).")
    seed: int = _f(0, "Seed of the data order and of torch.")
    bf16: bool = _f(False, "Base weights in bfloat16 and bf16 autocast (shared experts and optimizer stay fp32).")
    dequantize: bool = _f(False, "Dequantise experts stored quantised (MXFP4, FP8) at load instead of keeping them "
                          "packed as stored.")
    experts_on: str = _f("device", "Where packed routed experts (MXFP4, FP8) live: device, or host (host memory, "
                         "streamed to the device one MoE layer at a time while the previous one computes; the "
                         "device holds at most two layers' routed experts). Results are identical.",
                         choices=("device", "host"))
    packed_cache_bytes: int = _f(0, "Bytes of decoded routed experts (packed MXFP4, FP8) the student's forward may keep "
                                 "for its backward, shared by the layers in forward order; a layer whose decoded "
                                 "experts fit is not decoded again in backward (0: every backward decodes again). "
                                 "Results are identical.")
    embeddings_on: str = _f("device", "Where the input embedding table lives: device, or host (host memory; the "
                            "lookup runs there and only the looked-up rows move to the device). Not for models whose "
                            "output head shares the table. Results are identical.", choices=("device", "host"))

    def __post_init__(self):
        for name in ("model", "adapter", "output"):
            if not getattr(self, name):
                raise NexusError(f"--{name} is required")
        at_least = {"seq_len": 2, "batch_size": 1, "grad_accum": 1, "max_steps": 1, "log_every": 1,
                    "warmup_steps": 0, "save_every": 0, "keep_last": 0, "sfa_interval": 0,
                    "loss_chunk_tokens": 0, "packed_cache_bytes": 0}
        for name in ("stop_after", "kd_batch_size"):
            if getattr(self, name) is not None:
                at_least[name] = 1
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise NexusError(f"{_flag(name)} must be at least {low}, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise NexusError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        positive = ["lr", "temperature"] + (["router_lr"] if self.router_lr is not None else [])
        non_negative = ["weight_decay", "max_grad_norm", "ce_weight", "kd_weight", "router_kl_weight"]
        for name in positive + non_negative:
            value = getattr(self, name)
            bad = not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            if bad or (name in positive and value == 0):
                kind = "a positive" if name in positive else "a non-negative"
                raise NexusError(f"{_flag(name)} must be {kind} finite number, got {value}")
        if self.ce_weight + self.kd_weight + self.router_kl_weight == 0:
            raise NexusError("loss weights must not all be zero (--ce-weight, --kd-weight, --router-kl-weight)")
        if not (0 <= self.min_lr_ratio <= 1):
            raise NexusError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.sfa_beta <= 1):
            raise NexusError(f"--sfa-beta must be in [0, 1], got {self.sfa_beta}")
        self._check_kd_data()
        self._check_experts_on()
        from nexus.host_embedding import check_embeddings_on
        from nexus.training.optimizers import check_optim

        check_optim(self.optim)
        check_embeddings_on(self.embeddings_on)
        if self.resume and self.overwrite:
            raise NexusError("--resume continues the run in --output and --overwrite deletes it: give only one")
        if self.allow_data_change and not self.resume:
            raise NexusError("--allow-data-change applies to --resume, which is not given; give --resume or drop "
                             "--allow-data-change")
        self._check_output_apart()

    def _check_output_apart(self) -> None:
        """Refuse an --output that is, holds or lies inside what the run reads, even with --overwrite
        (the run's own checkpoints in --output are not inputs)."""
        from nexus.io import local_data_path, refuse_output_over_inputs

        refuse_output_over_inputs(self.output, {
            "--model": self.model, "--adapter": self.adapter, "--teacher": None if self.teacher == "self" else self.teacher,
            "--data": local_data_path(self.data), "--kd-data": local_data_path(self.kd_data), "--tokenizer": self.tokenizer})

    def _check_kd_data(self) -> None:
        """Refuse --kd-data options that would be silently ignored."""
        if self.kd_data is None:
            for name in ("kd_batch_size", "kd_text_column"):
                if getattr(self, name) is not None:
                    raise NexusError(f"{_flag(name)} applies to --kd-data, which is not given; give --kd-data or "
                                     f"drop {_flag(name)}")
        elif self.kd_weight == 0 and self.router_kl_weight == 0:
            raise NexusError("--kd-data feeds the distillation terms, but --kd-weight and --router-kl-weight are 0; "
                             "set one of them above 0 or drop --kd-data")

    def _check_experts_on(self) -> None:
        from nexus.quant.streaming import check_experts_on

        if check_experts_on(self.experts_on) == "host" and self.dequantize:
            raise NexusError("--experts-on host streams the routed experts kept packed, and --dequantize loads "
                             "them as floats instead: give only one")
        if self.packed_cache_bytes and self.dequantize:
            raise NexusError("--packed-cache-bytes keeps decoded routed experts of a packed model, and --dequantize "
                             "loads them as floats instead: give only one")

    def to_dict(self) -> dict:
        """Every field, as recorded in ``run_config.json`` and the adapter's ``args``."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Changing these between a run and its resume would silently change what is trained, or be silently
# ignored (the optimizer state restores the learning rates and weight decay of the original run).
RESUME_MUST_MATCH = ("model", "adapter", "teacher", "data", "seq_len", "batch_size", "grad_accum", "seed",
                     "train_routers", "train_native_shared", "sfa_interval", "sfa_anchor", "text_column", "tokenizer",
                     "lr", "router_lr", "weight_decay", "ce_weight", "kd_weight", "router_kl_weight", "temperature",
                     "kd_data", "kd_batch_size", "kd_text_column", "optim")

KD_STREAM_FIELDS = ("kd_data", "kd_batch_size", "kd_text_column")
"""The options of the separate distillation stream (all None without ``--kd-data``)."""


@contextlib.contextmanager
def kd_data_errors(kd_data: str):
    """Re-raise a data error (:mod:`nexus.data`) met while reading ``--kd-data`` as one about it:
    prefixed with the flag and the path, naming ``--kd-text-column`` instead of ``--text-column``."""
    try:
        yield
    except NexusError as exc:
        message = str(exc).replace("--text-column", "--kd-text-column")
        raise NexusError(f"--kd-data {kd_data}: {message}") from exc

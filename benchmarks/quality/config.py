"""Benchmark settings: model recipes and the presets (smoke, quick, full, gpu). The compared methods
are data (:mod:`benchmarks.quality.methods`).

Everything here that changes a result is in these frozen dataclasses, so a hash of them keys the
cached base models and the per-run results (each run is also keyed by its variant's definition).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelRecipe:
    """How one base model is built and pretrained on the general corpus.

    Attributes:
        name: short name used in paths and tables (``gpt_oss``, ``qwen3_moe``).
        family: the NEXUS family name (``resolve_family(name=...)``).
        config: keyword arguments of the transformers config class (``model_type`` selects it).
        steps: pretraining optimizer steps (the budget; deterministic).
        batch_size, seq_len: rows per step and tokens per row.
        lr, warmup, weight_decay: AdamW with linear warmup then cosine decay to 10%.
        aux_loss_coef: weight of the model's load-balancing loss (keeps the experts diverse).
        max_seconds: safety cap on pretraining wall time; a capped run is marked ``truncated``.
        eval_every: steps between held-out evaluations on the pretraining curve.
        seed: initialisation and data-order seed.
        bf16: pretrain under bf16 autocast (weights and optimizer stay fp32; on CUDA only).
    """

    name: str
    family: str
    config: dict
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    max_seconds: float = 3600.0
    eval_every: int = 100
    seed: int = 0
    bf16: bool = False

    def key(self, *extra: str) -> str:
        """16 hex chars over this recipe and ``extra`` (tokenizer and corpus identities).

        ``bf16`` enters the hash only when set, so the recipes cached before it existed keep their key.
        """
        d = dataclasses.asdict(self)
        if not d["bf16"]:
            del d["bf16"]
        return digest(d, *extra)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark preset.

    Attributes:
        preset: ``smoke``, ``quick``, ``full`` or ``gpu``.
        vocab_size: BPE entries.
        general_max_chars, domain_max_chars: optional per-split character caps.
        models: the base-model recipes.
        steps, batch_size, seq_len: the adaptation budget shared by every method.
        warmup_frac: LR warmup as a fraction of ``steps`` (then cosine to 10%).
        lrs: the initial LR grid (the same for every method).
        lr_extensions: how many times a grid may grow past an edge that holds the best LR.
        seeds: seeds per method at its best LR (mean +- std).
        eval_points: evaluations along training (the last at the end), for curves and Pareto.
        eval_rows: rows per evaluation split (``domain_val``, ``domain_test``, ``general_test``).
        drift_rows: rows of each test split used for router drift.
        collect_rows: domain training rows used for router statistics (NEXUS selection).
        nexus_top_k: experts per layer of ``select`` (averaged by the ``pca`` init).
        threads: torch threads per run.
        isolate: run each adaptation in its own spawned process, so its peak RSS is its own
            (about 5 s of start-up per run; the small presets run in-process).
        device: where pretraining, evaluation and the baselines run (``cpu`` or ``cuda``; the
            NEXUS stages pick theirs through accelerate: CUDA whenever it is available).
    """

    preset: str
    vocab_size: int
    models: tuple[ModelRecipe, ...]
    steps: int
    batch_size: int
    seq_len: int
    lrs: tuple[float, ...]
    seeds: int
    general_max_chars: dict | None = None
    domain_max_chars: dict | None = None
    warmup_frac: float = 0.1
    lr_extensions: int = 2
    eval_points: int = 3
    eval_rows: dict = field(default_factory=lambda: {"domain_val": 32, "domain_test": 64, "general_test": 64})
    drift_rows: int = 16
    collect_rows: int = 64
    nexus_top_k: int = 4
    threads: int = 2
    isolate: bool = True
    device: str = "cpu"

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def adaptation_dict(self) -> dict:
        """The fields that change an adaptation run's result (models excluded: keyed separately)."""
        d = dataclasses.asdict(self)
        for k in ("models", "preset", "lrs", "seeds", "lr_extensions", "threads", "isolate", "device"):
            d.pop(k)
        return d


def digest(*parts) -> str:
    """16 hex chars of SHA-256 over the JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gpt_oss_config(hidden: int, inter: int, experts: int, layers: int, vocab: int, heads: int = 4) -> dict:
    """A GPT-OSS config dict (alternating sliding/full attention, top-2; MXFP4 needs H, I % 32 == 0)."""
    return {
        "model_type": "gpt_oss",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
        "sliding_window": 128,
        "max_position_embeddings": 1024,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def qwen3_moe_config(hidden: int, inter: int, experts: int, layers: int, vocab: int, heads: int = 4) -> dict:
    """A Qwen3-MoE config dict (every layer MoE, top-2, renormalised top-k weights)."""
    return {
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * inter,
        "moe_intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _models(hidden, inter, experts, layers, vocab, **train) -> tuple[ModelRecipe, ...]:
    return (
        ModelRecipe("gpt_oss", "gpt_oss", gpt_oss_config(hidden, inter, experts, layers, vocab), **train),
        ModelRecipe("qwen3_moe", "qwen3_moe", qwen3_moe_config(hidden, inter, experts, layers, vocab), **train),
    )


PRESETS = {
    # Seconds: the test suite's end-to-end check. Numbers mean nothing.
    "smoke": BenchConfig(
        preset="smoke",
        vocab_size=384,
        models=_models(64, 64, 4, 2, 384, steps=6, batch_size=4, seq_len=64, warmup=2, eval_every=3),
        general_max_chars={"train": 60_000, "val": 5_000, "test": 10_000},
        domain_max_chars={"train": 40_000, "val": 5_000, "test": 10_000},
        steps=4,
        batch_size=2,
        seq_len=64,
        lrs=(1e-3, 1e-2),
        seeds=1,
        lr_extensions=0,
        eval_points=2,
        eval_rows={"domain_val": 2, "domain_test": 2, "general_test": 2},
        drift_rows=2,
        collect_rows=4,
        nexus_top_k=2,
        threads=1,
        isolate=False,
    ),
    # Minutes: every method end to end on tiny models and capped corpora, for CI.
    "quick": BenchConfig(
        preset="quick",
        vocab_size=1024,
        models=_models(64, 64, 8, 2, 1024, steps=150, batch_size=8, seq_len=128, warmup=15, eval_every=50),
        general_max_chars={"train": 1_500_000, "val": 50_000, "test": 100_000},
        domain_max_chars={"train": 600_000, "val": 50_000, "test": 100_000},
        steps=30,
        batch_size=8,
        seq_len=128,
        lrs=(3e-3, 1e-2, 3e-2),
        seeds=2,
        lr_extensions=1,
        eval_points=2,
        eval_rows={"domain_val": 8, "domain_test": 16, "general_test": 16},
        drift_rows=4,
        collect_rows=16,
        nexus_top_k=2,
        threads=1,
        isolate=False,
    ),
    # Hours: ~5.5M-parameter models pretrained ~10 min each, the full method list and LR sweep.
    # One thread per run: on a shared 2-core machine two threads oversubscribe and run ~10x slower
    # (measured); pass --threads 2 on an idle machine.
    "full": BenchConfig(
        preset="full",
        vocab_size=8192,
        models=_models(128, 128, 16, 4, 8192, steps=450, batch_size=16, seq_len=256, warmup=45, eval_every=75, max_seconds=1800),
        steps=120,
        batch_size=8,
        seq_len=256,
        lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        seeds=3,
        lr_extensions=2,
        eval_points=3,
        eval_rows={"domain_val": 32, "domain_test": 64, "general_test": 64},
        drift_rows=16,
        collect_rows=64,
        nexus_top_k=4,
        threads=1,
    ),
    # One CUDA GPU (not run yet): ~99M-parameter bases, 98.9M (GPT-OSS) and 98.7M (Qwen3-MoE)
    # parameters counted with the transformers config classes (hidden 512, 8 layers, 8 heads,
    # 32 experts of width 192, top-2, vocab 16384; ~28M active per token, 16.8M of them embeddings
    # and head), pretrained under bf16 autocast with 64 x 512-token batches. The general corpus
    # (~2M training tokens) bounds pretraining, not the clock: 1000 steps are ~33M tokens, about
    # 17 epochs; max_seconds caps it at 30 min. Adaptation: 400 steps x 32 x 512 = 6.6M tokens
    # (about one epoch of the Python domain) in fp32, in-process (CUDA per spawned run costs more
    # than its RSS figure is worth). Fails at once without CUDA (benchmarks.quality.device).
    "gpu": BenchConfig(
        preset="gpu",
        vocab_size=16384,
        models=tuple(
            ModelRecipe(name, name, make(512, 192, 32, 8, 16384, heads=8), steps=1000, batch_size=64, seq_len=512,
                        lr=1e-3, warmup=100, eval_every=100, max_seconds=1800, bf16=True)
            for name, make in (("gpt_oss", gpt_oss_config), ("qwen3_moe", qwen3_moe_config))
        ),
        steps=400,
        batch_size=32,
        seq_len=512,
        lrs=(1e-3, 3e-3, 1e-2, 3e-2),
        seeds=3,
        lr_extensions=2,
        eval_points=4,
        eval_rows={"domain_val": 64, "domain_test": 128, "general_test": 128},
        drift_rows=32,
        collect_rows=256,
        nexus_top_k=4,
        threads=4,
        isolate=False,
        device="cuda",
    ),
}

"""``nexus train`` and ``nexus precompute``: options generated from the engines' config dataclasses."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing

import click


def _is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that reports; other ranks only log warnings."""
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        logging.getLogger("nexus").setLevel(logging.WARNING)
    return main


def dataclass_options(cls, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of dataclass ``cls``.

    Field metadata ``help`` becomes the option help, ``required`` and ``choices`` carry over;
    ``bool`` fields become flags; ``X | None`` fields default to None.
    """
    hints = typing.get_type_hints(cls)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            base = args[0] if args else kind
            meta = dict(f.metadata)
            default = None if f.default is dataclasses.MISSING else f.default
            if base is bool:
                fn = click.option(flag, f.name, is_flag=True, default=bool(default), help=meta.get("help"))(fn)
                continue
            ctype = click.Choice(meta["choices"]) if "choices" in meta else base
            fn = click.option(
                flag, f.name, type=ctype, default=default, required=meta.get("required", False),
                show_default=default is not None, help=meta.get("help"),
            )(fn)
        return fn

    return decorate


TRAIN_EPILOG = """\b
Examples:
  nexus train --model base/ --adapter adapter/ --data train.jsonl --output runs/a
  nexus train ... --teacher cache/ --ce-weight 0.5 --temperature 2
  accelerate launch --multi_gpu --num_processes 4 $(which nexus) train ...   # DDP
  torchrun --nproc_per_node 2 --no-python nexus train ...                    # DDP on CPU (gloo)
  nexus train ... --output runs/a --resume       # continue from the last checkpoint
"""


def _train_command():
    from nexus.engines.train_config import TrainConfig

    @click.command(epilog=TRAIN_EPILOG)
    @dataclass_options(TrainConfig)
    def train(**kwargs):
        """Train the shared experts of an adapter with CE + distillation from a teacher.

        Writes OUTPUT/run_config.json, metrics.jsonl, checkpoints/step-N/ and final/ (an adapter).
        SIGINT/SIGTERM save a checkpoint and stop; --resume continues bit-identically.
        """
        from nexus.engines.train import train as run_train

        main = _is_main_process()
        result = run_train(TrainConfig(**kwargs))
        if not main:
            return
        if result.final is not None:
            click.echo(f"trained {result.step} steps; adapter in {result.final}")
        else:
            click.echo(f"stopped at step {result.step}; checkpoint {result.checkpoint}. Resume with --resume")

    return train


def _precompute_command():
    from nexus.engines.teacher_cache import PrecomputeConfig

    @click.command(epilog="\b\nExample:\n  nexus precompute --teacher base/ --data train.jsonl --top-k 64 --output cache/\n")
    @dataclass_options(PrecomputeConfig)
    def precompute(**kwargs):
        """Precompute a teacher's top-k log-probabilities into Parquet shards (resumable, multi-process).

        Train from it with nexus train --teacher OUTPUT.
        """
        from nexus.engines.teacher_cache import precompute as run_precompute

        main = _is_main_process()
        out = run_precompute(PrecomputeConfig(**kwargs))
        if main:
            click.echo(f"teacher cache in {out}")

    return precompute


def register(cli):
    cli.add_command(_train_command())
    cli.add_command(_precompute_command())

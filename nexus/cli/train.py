"""``nexus train`` and ``nexus precompute``: options generated from the stages' config dataclasses."""

from __future__ import annotations

import logging
import os

import click

from nexus.cli.options import dataclass_options
from nexus.errors import Interrupted


def _is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that reports; other ranks only log warnings."""
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        logging.getLogger("nexus").setLevel(logging.WARNING)
    return main


def _run_in_processes(stage, config, describe) -> None:
    """Run ``stage(config)`` in every launched process, free the process group, report on rank 0.

    :param describe: ``result -> str``, the line rank 0 prints; the result is dropped before the
        group is freed (a trained model holds the group).
    """
    from nexus.io import check_writable_output
    from nexus.training.distributed import end_processes

    check_writable_output(config.output, directory=True)
    main = _is_main_process()
    try:
        result = stage(config)
    except Interrupted:  # every process stops together, so they can free their groups together
        end_processes()
        raise
    message = describe(result)
    del result
    end_processes()
    if main:
        click.echo(message)


def _describe_training(result) -> str:
    if result.final is not None:
        return f"trained {result.step} steps; adapter in {result.final}"
    return f"stopped at step {result.step}; checkpoint {result.checkpoint}. Resume with --resume"


TRAIN_EPILOG = """\b
Examples:
  nexus train --model base/ --adapter adapter/ --data train.jsonl --output runs/a
  nexus train ... --teacher cache/ --ce-weight 0.5 --temperature 2
  nexus train ... --kd-data general.jsonl --kd-batch-size 8   # CE on --data, KD on general text
  accelerate launch --multi_gpu --num_processes 4 $(which nexus) train ...   # DDP
  torchrun --nproc_per_node 2 --no-python nexus train ...                    # DDP on CPU (gloo)
  accelerate launch --config_file fsdp2.yaml $(which nexus) train ...       # base sharded (docs/training.md)
  accelerate launch --config_file zero2.yaml $(which nexus) train ...       # DeepSpeed ZeRO-1/2
  nexus train ... --output runs/a --resume       # continue from the last checkpoint
"""


def _train_command():
    from nexus.training.train_config import TrainConfig

    @click.command(epilog=TRAIN_EPILOG)
    @dataclass_options(TrainConfig)
    def train(**kwargs):
        """Train the shared experts of an adapter with CE + distillation from a teacher.

        Writes OUTPUT/run_config.json, metrics.jsonl, checkpoints/step-N/ and final/ (an adapter).
        SIGINT/SIGTERM save a checkpoint and stop (exit status 130/143); --resume continues bit-identically.
        An OUTPUT holding another run is refused unless --resume or --overwrite.
        """
        from nexus.engines.train import train as run_train

        _run_in_processes(run_train, TrainConfig(**kwargs), _describe_training)

    return train


def _precompute_command():
    from nexus.engines.precompute_config import PrecomputeConfig

    @click.command(epilog="\b\nExample:\n  nexus precompute --teacher base/ --data train.jsonl --top-k 64 --output cache/\n")
    @dataclass_options(PrecomputeConfig)
    def precompute(**kwargs):
        """Precompute a teacher's top-k log-probabilities into Parquet shards (resumable, multi-process).

        Train from it with nexus train --teacher OUTPUT.
        """
        from nexus.engines.precompute import precompute as run_precompute

        _run_in_processes(run_precompute, PrecomputeConfig(**kwargs), lambda out: f"teacher cache in {out}")

    return precompute


def register(cli):
    cli.add_command(_train_command())
    cli.add_command(_precompute_command())

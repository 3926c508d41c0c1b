"""The ``nexus`` command line: a thin click layer over the engines, one module per command group."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. With the default (spin) policy, a torch
# process whose threads share cores with any other busy process slows down 50-100x on small
# operations (measured: 1.06 s vs 0.015 s per forward of the demo model with one core busy).
# Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import click

from nexus import __version__
from nexus.errors import NexusError

# Each module defines ``register(cli)``; plugins add more through nexus_register_commands.
COMMAND_MODULES = (
    "nexus.cli.info",
    "nexus.cli.prepare",
    "nexus.cli.train",
    "nexus.cli.evaluate",
    "nexus.cli.run",
)


class NexusGroup(click.Group):
    """Turns :class:`NexusError` into a one-line message and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NexusError as exc:
            if ctx.obj and ctx.obj.get("verbose", 0) > 1:
                raise
            raise click.ClickException(str(exc)) from None


EPILOG = """\b
Examples:
  nexus --family gpt_oss run --output runs/demo   # whole pipeline on the built-in demo
  nexus run --model ~/models/gpt-oss-20b --data domain.jsonl --output runs/domain
  nexus collect --model M --data D --target-tokens 2000000 --output stats/
  nexus select --stats stats/ --top-k 24 --output selection.json
  nexus convert --model M --selection selection.json --output adapter/
  nexus train --model M --adapter adapter/ --data D --teacher self --output run/
  nexus evaluate --model M --adapter run/final --data heldout.jsonl
  nexus inspect --model M --json                  # layers, experts, sizes, quantisation
  nexus families / nexus plugins                  # what is installed
"""


@click.group(cls=NexusGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="nexus")
@click.option("--family", default=None, metavar="NAME", help="Model family (default: detected from config.model_type).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug, and tracebacks on errors).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx, family, verbose, quiet):
    """NEXUS: adapt a frozen Mixture-of-Experts model by training one small shared expert per
    MoE block, initialised from its most important routed experts.

    A full run on the built-in demo model (a tiny GPT-OSS in MXFP4):

        nexus --family gpt_oss run --output runs/demo
    """
    level = logging.WARNING if quiet else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("transformers", "accelerate", "datasets", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING) if verbose < 2 else level)
    ctx.ensure_object(dict)
    ctx.obj.update(family=family, verbose=verbose, quiet=quiet)


def get_family(ctx: click.Context, config=None):
    """The family for this invocation: ``--family`` if given, else detected from ``config``."""
    from nexus.family import resolve_family

    return resolve_family(config, name=ctx.find_root().obj.get("family"))


def _build() -> click.Group:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(cli)
    from nexus.plugins import get_plugin_manager

    try:
        get_plugin_manager().hook.nexus_register_commands(cli=cli)
    except NexusError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    return cli


def main() -> None:
    """Console-script entry point."""
    _build()(prog_name="nexus")


_build()

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
    "nexus.cli.export",
    "nexus.cli.plan",
)


class NexusGroup(click.Group):
    """The ``nexus`` group: one-line errors, and plugin commands loaded only when needed.

    A :class:`NexusError` becomes a one-line message and its ``exit_code`` (default 1), never a
    traceback (``-vv`` shows it). Plugins (and with them torch and transformers) are loaded the
    first time a command that is not built in is asked for, so ``--help``, ``--version`` and the
    built-in commands' help start in a fraction of a second.
    """

    plugins_loaded = False

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NexusError as exc:
            if ctx.obj and ctx.obj.get("verbose", 0) > 1:
                raise
            error = click.ClickException(str(exc))
            error.exit_code = getattr(exc, "exit_code", 1)
            raise error from None
        except KeyboardInterrupt:  # a second Ctrl-C, or one before a stage's own handler is installed
            if ctx.obj and ctx.obj.get("verbose", 0) > 1:
                raise
            click.echo("Error: interrupted; what the stage saved before (checkpoints, finished shards) is kept", err=True)
            ctx.exit(130)

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is None and not self.plugins_loaded:
            load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command


EPILOG = """\b
Examples:
  nexus --family gpt_oss run --output runs/demo   # whole pipeline on the built-in demo
  nexus run --model ~/models/gpt-oss-20b --data domain.jsonl --output runs/domain
  nexus collect --model M --data D --target-tokens 2000000 --output stats/
  nexus select --stats stats/ --top-k 24 --output selection.json
  nexus convert --model M --selection selection.json --output adapter/
  nexus train --model M --adapter adapter/ --data D --teacher self --output run/
  nexus evaluate --model M --adapter run/final --data heldout.jsonl
  nexus export --model M --adapter run/final --output served/ --check   # serve with vLLM/SGLang
  nexus inspect --model M --json                  # layers, experts, sizes, quantisation
  nexus plan --model M --gpu-memory 24GiB --bf16  # will training fit? memory per component
  nexus families / nexus plugins                  # what is installed

Commands that plugins add are not listed here; run them as any other (nexus plugins lists the plugins).
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


def load_plugin_commands() -> click.Group:
    """Let every plugin add its commands (hook ``nexus_register_commands``); returns :data:`cli`.

    Runs the hook again when called again (for plugins registered since).

    :raises NexusError: a plugin failed to import.
    """
    from nexus.plugins import get_plugin_manager

    cli.plugins_loaded = True
    get_plugin_manager().hook.nexus_register_commands(cli=cli)
    return cli



def main() -> None:
    """Console-script entry point."""
    cli(prog_name="nexus")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)

# The commands nexus itself provides (plugins add more on first use).
BUILTIN_COMMANDS = tuple(sorted(cli.commands))

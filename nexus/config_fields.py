"""Config dataclass fields whose help text doubles as the CLI's ``--help`` (see nexus/cli/options.py)."""

from __future__ import annotations

from dataclasses import field


def option(default, help: str, **meta):
    """A dataclass field with ``metadata={"help": help, ...}``; ``required``/``choices`` carry to click."""
    return field(default=default, metadata={"help": help, **meta})

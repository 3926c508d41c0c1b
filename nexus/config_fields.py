"""Config dataclass fields whose help text doubles as the CLI's ``--help`` (see nexus/cli/options.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import field


def option(default, help: str, **meta):
    """A dataclass field with ``metadata={"help": help, ...}``.

    Metadata the CLI generator reads: ``required``, ``choices``, ``min`` (inclusive bound of an
    int or float), ``exists`` (a path that must exist), ``unless`` (values taken as they are, not as
    paths: ``("self",)``), ``path`` (a path), ``data`` (a data argument: one that looks like a path
    must exist, see :func:`nexus.data_sources.parse_source`), ``short`` (e.g. ``"-o"``), ``off_flag``
    (the negative flag of a bool, e.g. ``"--no-plots"``) and ``metavar``.
    """
    return field(default=default, metadata={"help": help, **meta})


def same_as(cls, name: str, help: str | None = None, **meta):
    """The field ``name`` of dataclass ``cls`` declared again in another config: same default, same
    metadata, so a default lives in one place; ``help`` and ``meta`` override the metadata."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    metadata = {**source.metadata, **({"help": help} if help is not None else {}), **meta}
    if source.default_factory is not dataclasses.MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)

"""Click options generated from the engines' config dataclasses, so help text lives in one place."""

from __future__ import annotations

import dataclasses
import math
import os
import typing

import click


class FiniteFloat(click.ParamType):
    """A finite float (never nan or inf), optionally at least ``min`` (strictly above it with ``min_open``)."""

    name = "float"

    def __init__(self, min: float | None = None, min_open: bool = False):
        self.min, self.min_open = min, min_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (number < self.min or (self.min_open and number == self.min)):
            self.fail(f"{value} must be {'above' if self.min_open else 'at least'} {self.min}", param, ctx)
        return number


class ExpandedPath(click.Path):
    """A ``click.Path`` whose value has a leading ``~`` expanded before it is checked or used.

    The shell expands ``~`` only at the start of a word, so ``--output=~/x`` (and a quoted
    ``'~/x'``) would otherwise reach the command as a literal ``~``; every path option of every
    command uses this type, so they all read ``~`` the same way. Inputs are checked here, when
    the command line is read, so a missing one fails before any model loads.

    :param data: a data argument: when it looks like a path, it must exist (a dataset name may
        not; :func:`nexus.data_sources.parse_source`).
    :param unless: values that are not paths (``--teacher self``), taken as they are.
    """

    def __init__(self, *args, data: bool = False, unless: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.data, self.unless = data, tuple(unless)

    def convert(self, value, param, ctx):
        if value in self.unless:
            return value
        if isinstance(value, (str, os.PathLike)):
            value = os.path.expanduser(value)
        if self.data:
            from nexus.data_sources import parse_source
            from nexus.errors import NexusError

            try:
                parse_source(value)
            except NexusError as exc:
                self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


def dataclass_options(cls, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of dataclass ``cls``.

    Field metadata (see :func:`nexus.config_fields.option`) carries over: ``help``, ``required``
    (a field without a default is required too), ``choices``, ``min`` (an inclusive bound of an int
    or float), ``exists`` (a path that must exist; ``unless`` values excepted), ``path`` (a path),
    ``data`` (a data argument; these three give an :class:`ExpandedPath`),
    ``short``, ``metavar``; ``bool`` fields become flags (``off_flag`` names the negative one);
    ``X | None`` fields default to None; ``float`` fields accept finite numbers only (other range
    checks are the dataclass's or the stage's).
    """
    hints = typing.get_type_hints(cls)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            fn = _option(f, hints[f.name])(fn)
        return fn

    return decorate


def _option(f: dataclasses.Field, kind):
    """The click option of dataclass field ``f`` of type ``kind``."""
    flag = "--" + f.name.replace("_", "-")
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind
    meta = dict(f.metadata)
    names = [meta["short"], flag] if "short" in meta else [flag]
    default = None if f.default is dataclasses.MISSING else f.default
    if base is bool:
        if "off_flag" in meta:
            return click.option(f"{flag}/{meta['off_flag']}", f.name, default=bool(default), show_default=True,
                                help=meta.get("help"))
        return click.option(*names, f.name, is_flag=True, default=bool(default), help=meta.get("help"))
    if "choices" in meta:
        ctype = click.Choice(meta["choices"])
    elif base is float:
        ctype = FiniteFloat(min=meta.get("min"))
    elif base is int and meta.get("min") is not None:
        ctype = click.IntRange(min=meta["min"])
    elif meta.get("exists") or meta.get("path") or meta.get("data"):
        ctype = ExpandedPath(exists=bool(meta.get("exists")), data=bool(meta.get("data")),
                             unless=meta.get("unless", ()))
    else:
        ctype = base
    required = meta.get("required", False) or (
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    # No default at all when there is none: click treats an explicit None as a given value,
    # which would satisfy required=True.
    defaults = {} if default is None else {"default": default, "show_default": True}
    return click.option(*names, f.name, type=ctype, required=required, help=meta.get("help"),
                        metavar=meta.get("metavar"), **defaults)

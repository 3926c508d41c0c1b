"""Click options generated from the engines' config dataclasses, so help text lives in one place."""

from __future__ import annotations

import dataclasses
import math
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


def dataclass_options(cls, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of dataclass ``cls``.

    Field metadata ``help`` becomes the option help, ``required`` and ``choices`` carry over (a
    field without a default is required); ``bool`` fields become flags; ``X | None`` fields default
    to None; ``float`` fields accept finite numbers only (range checks are the dataclass's).
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
            ctype = click.Choice(meta["choices"]) if "choices" in meta else FiniteFloat() if base is float else base
            required = meta.get("required", False) or (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            # No default at all when there is none: click treats an explicit None as a given value,
            # which would satisfy required=True.
            defaults = {} if default is None else {"default": default, "show_default": True}
            fn = click.option(flag, f.name, type=ctype, required=required, help=meta.get("help"), **defaults)(fn)
        return fn

    return decorate

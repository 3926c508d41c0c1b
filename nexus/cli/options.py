"""Click options generated from the engines' config dataclasses, so help text lives in one place."""

from __future__ import annotations

import dataclasses
import typing

import click


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

"""Command-line flags generated from the config dataclasses, so each field is one flag whose
help is the field's docstring, and a flag given on the command line wins over a config file."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

FLAG_DEST_PREFIX = "cfg__"


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, title: str, exclude: tuple[str, ...] = ()
) -> None:
    """One ``--field-name`` flag per field of ``cls``, defaulting to None ("not given")."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        dest = f"{FLAG_DEST_PREFIX}{cls.__name__}__{f.name}"
        if kind is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=dest, type=kind, default=None, help=help_text, metavar=f.name.upper()
            )


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were set on the command line."""
    prefix = f"{FLAG_DEST_PREFIX}{cls.__name__}__"
    return {
        key[len(prefix) :]: value
        for key, value in vars(args).items()
        if key.startswith(prefix) and value is not None
    }

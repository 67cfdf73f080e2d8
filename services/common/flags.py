"""Command-line flags generated from a config dataclass, so that names, types and defaults
cannot drift from the config. One flag per field: `--field-name` (or a rename); the field's
type (`X | None` parses as X, `tuple[X, ...]` takes one or more values, a bool is `--name` /
`--no-name`); required when the field has no default; help and choices from the field's
metadata when it has them."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

NONE = type(None)


def _flag(name: str, renames: Mapping[str, str] | None) -> str:
    """A field's flag: `--field-name`, or its rename."""
    return (renames or {}).get(name, "--" + name.replace("_", "-"))


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, renames: Mapping[str, str] | None = None
) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        options: dict[str, Any] = {"dest": f.name}
        if typing.get_origin(kind) is tuple:
            options.update(nargs="+", type=typing.get_args(kind)[0])
        elif kind is bool:  # --flag / --no-flag
            options["action"] = argparse.BooleanOptionalAction
        else:
            kinds = [t for t in typing.get_args(kind) if t is not NONE]
            options["type"] = kinds[0] if kinds else kind
        required = f.default is dataclasses.MISSING
        if required:
            options["required"] = True
        else:
            options["default"] = f.default
        if "choices" in f.metadata:
            options["choices"] = list(f.metadata["choices"])
        if "help" in f.metadata:
            shows_default = not required and f.default is not None
            options["help"] = f.metadata["help"] + (
                " (default: %(default)s)" if shows_default else ""
            )
        parser.add_argument(_flag(f.name, renames), **options)


def from_args(cls: type, args: argparse.Namespace):
    """The config the parsed flags describe (validated by the config itself)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is tuple and value is not None:
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def to_args(config, renames: Mapping[str, str] | None = None) -> list[str]:
    """The command line that from_args(type(config), ...) parses back to `config` (with the
    same renames as add_arguments): fields at their defaults are left out (they parse back
    to them)."""
    args: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = _flag(f.name, renames)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args

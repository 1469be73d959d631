"""Command-line flags generated from a dataclass's fields: one `--field-name` each, typed by its annotation, help
from its metadata. Unset flags stay None, so a caller can tell "not given" from a default."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def value_type(annotation: Any) -> Any:
    """int / float / str / bool from a field's annotation such as Optional[float] (for flags and grids)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def field_types(dataclass_type: type) -> dict[str, Any]:
    """Each field's value type (Optional[...] unwrapped)."""
    hints = typing.get_type_hints(dataclass_type)
    return {field.name: value_type(hints[field.name]) for field in dataclasses.fields(dataclass_type)}


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, dataclass_type: type,
                        skip: tuple[str, ...] = ()) -> None:
    """One --flag per field (booleans get --no-flag too); each help ends with the field's default, if it has one."""
    types = field_types(dataclass_type)
    for field in dataclasses.fields(dataclass_type):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        # A None default is "unset", and every such field's help says what unset means.
        default = "" if field.default is None else f" (default: {field.default})"
        help_text = field.metadata.get("help", "") + default
        if types[field.name] is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=types[field.name], default=None,
                                metavar=field.name.upper(), help=help_text)


def given_fields(args: argparse.Namespace, dataclass_type: type) -> dict[str, Any]:
    """The fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(dataclass_type)
            if getattr(args, f.name, None) is not None}

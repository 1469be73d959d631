"""Flags generated from a dataclass: typed by its annotations, unset unless given, booleans with --no-."""
import dataclasses
from typing import Optional

import pytest

from cifar_jax.cli import OneLineErrorParser
from cifar_jax.flags import add_dataclass_flags, field_types, given_fields, value_type


@dataclasses.dataclass(frozen=True)
class Settings:
    learning_rate: Optional[float] = dataclasses.field(default=None, metadata={"help": "step size"})
    epochs: int = dataclasses.field(default=10, metadata={"help": "passes"})
    augment: Optional[bool] = None
    name: str = "run"


def parse(*argv):
    parser = OneLineErrorParser(prog="test")
    add_dataclass_flags(parser, Settings, skip=("name",))
    return parser, parser.parse_args(list(argv))


def test_value_types_unwrap_optional():
    assert value_type(Optional[float]) is float and value_type(int) is int
    assert field_types(Settings) == {"learning_rate": float, "epochs": int, "augment": bool, "name": str}


def test_flags_are_typed_and_only_given_ones_are_returned():
    _, args = parse("--learning-rate", "0.01", "--no-augment")
    assert given_fields(args, Settings) == {"learning_rate": 0.01, "augment": False}
    _, args = parse()
    assert given_fields(args, Settings) == {}


def test_help_ends_with_the_default_and_skipped_fields_have_no_flag(capsys):
    parser, _ = parse()
    help_text = " ".join(parser.format_help().split())
    assert "--epochs EPOCHS passes (default: 10)" in help_text and "--name" not in help_text
    with pytest.raises(SystemExit):
        parse("--epochs", "ten")
    assert "argument --epochs: invalid int value: 'ten'" in capsys.readouterr().err

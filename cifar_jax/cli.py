"""`cifar-jax SUBCOMMAND ...`: parse flags, call the package, print user errors as one line."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from cifar_jax.errors import CifarJaxError


def _flag_type(annotation: Any) -> Any:
    """int / float / str / bool from a field annotation such as Optional[float]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per config field, help from the field's metadata; unset flags stay None (= keep the default)."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(hints[field.name])
        help_text = f"{field.metadata.get('help', '')} (default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None, metavar=field.name.upper(), help=help_text)


def config_overrides(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if getattr(args, f.name, None) is not None}


def _train(args: argparse.Namespace) -> int:
    from cifar_jax.config import TrainConfig
    from cifar_jax.train import train

    overrides = config_overrides(args, TrainConfig)
    saved = Path(overrides["workdir"]).expanduser() / "config.json" if "workdir" in overrides else None
    # Resuming with just --workdir takes the run's own settings; flags given on top must agree with them.
    base = TrainConfig.load(saved) if saved and saved.exists() else TrainConfig()
    result = train(dataclasses.replace(base, **overrides))
    if not result.interrupted:
        print(f"run finished: {result.workdir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cifar_jax.config import TrainConfig

    parser = argparse.ArgumentParser(prog="cifar-jax", description="Train, compare, checkpoint and serve small "
                                     "CIFAR-10 classifiers with JAX/Flax on CPU, GPU or TPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser("train", help="train or resume a model",
                                       description="Train a model; on a workdir with checkpoints, resume it.")
    add_config_flags(train_parser, TrainConfig)
    train_parser.set_defaults(handler=_train)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CifarJaxError as error:
        print(f"cifar-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

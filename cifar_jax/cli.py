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


def _add_run_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `evaluate` and `plot`: which run, which checkpoint, which data, how many devices."""
    from cifar_jax.config import DATA_SOURCES

    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--step", default="best",
                        help="checkpoint: best (by test accuracy), latest, or a step number (default: best)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run was trained on)")
    parser.add_argument("--data", choices=DATA_SOURCES, default=None, help="data source (default: the run's own)")
    parser.add_argument("--num-devices", type=int, default=None, help="use only the first N local devices (default: all)")


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from cifar_jax.evaluate import evaluate, format_result

    result = evaluate(args.workdir, args.step, num_devices=args.num_devices, data_dir=args.data_dir, data=args.data)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from cifar_jax.report import report_run

    run_report = report_run(args.workdir, args.step, args.images or (), args.data_dir, args.data, args.num_devices)
    print("\n".join(str(path) for path in run_report.plots.values()))
    print(f"report: {run_report.report}")
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

    evaluate_parser = commands.add_parser(
        "evaluate", help="test loss, accuracy, per-class metrics and confusion matrix of a checkpoint",
        description="Evaluate a checkpoint on every test image of the run's dataset (or the one given).")
    _add_run_evaluation_flags(evaluate_parser)
    evaluate_parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    evaluate_parser.set_defaults(handler=_evaluate)

    plot_parser = commands.add_parser(
        "plot", help="draw a run's plots into WORKDIR/plots/ and write WORKDIR/report.md",
        description="Training curves, confusion matrices, test images with predictions, the most confused pairs "
                    "and (with --images) your own images with their top classes, plus a one-page report.md.")
    _add_run_evaluation_flags(plot_parser)
    plot_parser.add_argument("--images", nargs="+", metavar="PATH", default=None,
                             help="image files to classify and show with their top classes")
    plot_parser.set_defaults(handler=_plot)
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

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


def _predict(args: argparse.Namespace) -> int:
    import json

    from cifar_jax.errors import InputError
    from cifar_jax.predict import DEFAULT_BATCH_SIZE, Predictor

    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    predictor = Predictor.from_checkpoint(args.workdir, args.step, batch_size=batch_size, num_devices=args.num_devices)
    failed = 0
    for row in predictor.predict_paths(args.paths, errors="skip"):
        failed += not row.ok
        if args.json:
            print(json.dumps(row.to_json(args.top_k)), flush=True)
        elif row.ok:
            print(f"{row.path}: " + ", ".join(f"{name} {p:.3f}" for name, p in row.top_k(args.top_k)), flush=True)
        else:
            print(f"cifar-jax: error: {row.error}", file=sys.stderr, flush=True)
    return 1 if failed else 0


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

    predict_parser = commands.add_parser(
        "predict", help="classify image files and folders with a trained checkpoint",
        description="Top classes of each image (folders are walked recursively; any size is resized to 32x32). "
                    "Exits 1 if any input could not be read, after reporting all the others.")
    predict_parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    predict_parser.add_argument("--workdir", required=True, help="the training run's folder")
    predict_parser.add_argument("--step", default="best",
                                help="checkpoint: best (by test accuracy), latest, or a step number (default: best)")
    predict_parser.add_argument("--top-k", type=int, default=3, help="how many top classes to show (default: 3)")
    predict_parser.add_argument("--json", action="store_true",
                                help="one JSON object per image: path, label, probability, top_k; or path, error")
    predict_parser.add_argument("--batch-size", type=int, default=None,
                                help="images per device step, all devices together (default: 256)")
    predict_parser.add_argument("--num-devices", type=int, default=None,
                                help="use only the first N local devices (default: all)")
    predict_parser.set_defaults(handler=_predict)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CifarJaxError as error:
        print(f"cifar-jax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which saves and exits cleanly): nothing to save, no traceback
        print("cifar-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`cifar-jax SUBCOMMAND ...`: parse flags, call the package, print user errors as one line."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import logging
import os
import signal
import sys
import threading
import typing
import warnings
from pathlib import Path
from typing import Optional

from cifar_jax.errors import CifarJaxError, first_line
from cifar_jax.flags import add_dataclass_flags, given_fields


def _train(args: argparse.Namespace) -> int:
    from cifar_jax import distributed, rundir
    from cifar_jax.config import TrainConfig
    from cifar_jax.parallel import is_main_process
    from cifar_jax.train import train

    settings = distributed.settings_from(args)
    if distributed.needs_supervisor(settings):
        return distributed.run_supervised(args.argv, settings)
    distributed.exit_with_supervisor()
    distributed.initialize(settings)  # before anything touches a device
    if not is_main_process():
        warnings.simplefilter("ignore")  # process 0 prints them once; N copies of each would bury the progress
    announce_backend()
    overrides = given_fields(args, TrainConfig)
    # Resuming with just --workdir takes the run's own settings; flags given on top must agree with them.
    base = (rundir.saved_config(overrides["workdir"]) if "workdir" in overrides else None) or TrainConfig()
    if distributed.is_multi_process() and "num_devices" not in overrides:
        # A run started on some local devices resumes on every device of every process (the same computation).
        base = dataclasses.replace(base, num_devices=None)
    result = distributed.exiting_at_once_on_stuck_threads(lambda: train(dataclasses.replace(base, **overrides)))
    if result.interrupted:  # saved; non-zero so that `cifar-jax train ... && next-step` stops here
        return interrupted_status(result.stopped_by)
    if is_main_process():
        print(f"run finished: {result.workdir}" + (f" (stopped early: {result.stopped_by})" if result.stopped_by else ""))
    return 0


def interrupted_status(signal_name: Optional[str]) -> int:
    """128 + the signal's number, as shells report a command a signal ended: 130 for SIGINT, 143 for SIGTERM."""
    import signal

    return 128 + (signal.SIGINT if signal_name == "SIGINT" else signal.SIGTERM)


def announce_backend(stream: Optional[typing.TextIO] = None) -> None:
    """The backend and device count, first thing (process 0 only), and a warning when a GPU sits unused."""
    import jax

    from cifar_jax import backends

    if jax.process_index() != 0:
        return
    platform = jax.default_backend()
    print(backends.startup_line(platform, jax.device_count(), jax.process_count()), file=stream or sys.stdout,
          flush=True)
    warning = backends.cpu_fallback_warning(platform, backends.gpu_visible())
    if warning:
        warnings.warn(warning)


def _add_decode_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-workers", type=int, default=None,
                        help="threads decoding image files (default: one per core)")


def _add_run_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `evaluate` and `plot`: which run, which checkpoint, which data, how many devices."""
    from cifar_jax.data import DATA_SOURCES

    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--step", default="best",
                        help="checkpoint: best (by test accuracy), latest, or a step number (default: best)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run was trained on)")
    parser.add_argument("--data", choices=DATA_SOURCES, default=None, help="data source (default: the run's own)")
    parser.add_argument("--num-devices", type=int, default=None, help="use only the first N local devices (default: all)")


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from cifar_jax.evaluate import dataset_for, evaluate_restored, format_result, restore_run
    from cifar_jax.report import write_evaluation_images

    announce_backend(sys.stderr if args.json else sys.stdout)  # --json: stdout holds the object alone
    restored = restore_run(args.workdir, args.step)
    dataset = dataset_for(restored.metadata, args.data_dir, args.data)
    result = evaluate_restored(restored, dataset, args.num_devices)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    write_evaluation_images(args.workdir, result, dataset.test_images, restored.metadata)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from cifar_jax.report import report_run

    announce_backend()
    run_report = report_run(args.workdir, args.step, args.images or (), args.data_dir, args.data, args.num_devices,
                            args.decode_workers)
    print("\n".join(str(path) for path in run_report.plots.values()))
    print(f"report: {run_report.report}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from cifar_jax.errors import InputError
    from cifar_jax.predict import PredictionsFile, Predictor

    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    if args.output and args.json:
        raise InputError("--json prints to stdout; with --output the file's extension (.jsonl or .csv) sets the "
                         "format: drop --json")
    if args.resume and not args.output:
        raise InputError("--resume continues an --output file: give the --output of the job to finish")
    announce_backend(sys.stderr)  # stdout holds one result per file, nothing else
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(PredictionsFile(args.output, args.top_k, args.resume)) if args.output else None
        earlier = SkipCounter(output.done if output else {})
        predictor = Predictor.from_checkpoint(args.workdir, args.step, batch_size=args.batch_size,
                                              num_devices=args.num_devices)
        rows = predictor.predict_paths(args.paths, errors="skip", decode_workers=args.decode_workers,
                                       num_shards=args.num_shards, shard_index=args.shard_index, skip=earlier)
        predicted = failed = 0
        for row in rows:
            predicted += row.ok
            failed += not row.ok
            if output:
                output.write(row)
            elif args.json:
                print(json.dumps(row.to_json(args.top_k)), flush=True)
            elif row.ok:
                print(f"{row.path}: " + ", ".join(f"{name} {p:.3f}" for name, p in row.top_k(args.top_k)), flush=True)
            if not row.ok:
                print(f"cifar-jax: error: {row.error}", file=sys.stderr, flush=True)
    if output:
        print(f"{predicted} predicted, {failed} failed, {earlier.hits} skipped as done earlier "
              f"({earlier.failed_hits} of them failed): {output.path}", file=sys.stderr)
    return 1 if failed or earlier.failed_hits else 0


class SkipCounter:
    """The files a resumed job finds done already ({path: failed}), counting how many it skipped."""

    def __init__(self, done: dict):
        self.done, self.hits, self.failed_hits = done, 0, 0

    def __contains__(self, path: str) -> bool:
        found = path in self.done
        self.hits += found
        self.failed_hits += found and self.done[path]
        return found

    def __len__(self) -> int:
        return len(self.done)


def _benchmark(args: argparse.Namespace) -> int:
    import json

    from cifar_jax.benchmark import BenchmarkSettings, format_benchmark, run_benchmark
    from cifar_jax.config import TrainConfig

    announce_backend(sys.stderr if args.json else sys.stdout)
    config = TrainConfig(**{**given_fields(args, TrainConfig), "progress": False})
    settings = BenchmarkSettings(epochs=args.timed_epochs, windows=args.windows, max_steps=args.max_steps,
                                 profile_dir=args.profile)
    result = run_benchmark(config, settings)
    print(json.dumps(result, indent=2) if args.json else format_benchmark(result))
    return 0


def _add_benchmark_parser(commands) -> None:
    from cifar_jax.config import TrainConfig

    parser = commands.add_parser(
        "benchmark", help="time compile, training, evaluation and predict; FLOPs and memory",
        description="Times the real train step, evaluation and predict path: compile seconds, steady-state images/s "
                    "(median of timed windows after a warm-up), seconds per 50,000-image epoch, FLOPs per image "
                    "from XLA's cost analysis, peak memory. Uses synthetic data unless --data says otherwise.")
    add_dataclass_flags(parser, TrainConfig, skip=("epochs", "workdir", "resume", "progress", "checkpoint_every",
                                                "keep_checkpoints", "tensorboard", "profile_steps"))
    parser.set_defaults(data="synthetic")
    parser.add_argument("--epochs", dest="timed_epochs", type=float, default=1.0,
                        help="training to time, in epochs of the dataset, after warm-up (default: 1)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows; the median counts (default: 5)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on timed training steps (quick checks)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="write a jax.profiler trace of the timed training steps into DIR (open it in "
                             "TensorBoard's profile plugin or Perfetto)")
    # It times the compile: a persistent-cache hit would report loading a program instead.
    parser.set_defaults(handler=_benchmark, cache_compilations=False)


def _compare(args: argparse.Namespace) -> int:
    from cifar_jax.compare import FAILED, INTERRUPTED, RESULTS_MD, compare, comparison_from_options
    from cifar_jax.config import TrainConfig
    from cifar_jax.distributed import exiting_at_once_on_stuck_threads

    spec = comparison_from_options(args.config, given_fields(args, TrainConfig), args.models, args.grid or (),
                                   args.out, args.workers, args.storage, args.prune, args.search or (), args.trials,
                                   args.sampler)
    if spec.workers == 1:  # with several, this process must not claim the devices its workers need
        announce_backend()
    rows = exiting_at_once_on_stuck_threads(lambda: compare(
        spec.base, spec.grid, spec.out, workers=spec.workers, storage=spec.storage, prune=spec.prune,
        search=spec.search, trials=spec.trials, sampler=spec.sampler))
    statuses = [row["status"] for row in rows]
    out = Path(spec.out or spec.base.workdir)
    print(f"{len(rows)} run{'s' * (len(rows) != 1)}: "
          + ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)))
    print(f"results: {out / RESULTS_MD}")
    if FAILED in statuses:
        print(f"cifar-jax: error: {statuses.count(FAILED)} of {len(rows)} runs failed: each one's error is above and "
              f"in the status column of {out / RESULTS_MD}; run the same command again to retry them",
              file=sys.stderr)
    if INTERRUPTED in statuses:
        print("interrupted runs saved a checkpoint: run the same command again to resume them")
        return interrupted_status(None)
    return 1 if FAILED in statuses else 0


def _add_compare_parser(commands) -> None:
    from cifar_jax.config import TrainConfig

    parser = commands.add_parser(
        "compare", help="train a grid of settings and tabulate the results",
        description="Train every combination of the grid's values on top of the other flags, each run in "
                    "OUT/runs/NAME, and write OUT/results.csv, OUT/results.md and OUT/test_curves.png. Every run is "
                    "a trial of an Optuna study that any number of workers share. Re-running skips finished runs, "
                    "resumes interrupted ones and retries failed ones. Exits 1 if any run failed.")
    parser.add_argument("--out", default=None,
                        help="the comparison folder (required unless the --config file sets out)")
    parser.add_argument("--models", default=None, help="comma-separated models to compare, e.g. model0,model1")
    parser.add_argument("--grid", action="append", metavar="FIELD=V1,V2", default=None,
                        help="a config field and its values, e.g. learning_rate=1e-3,1e-2 (repeatable)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML or JSON file with [base] fields, a [grid] of lists, and optional out, workers, "
                             "storage, prune; flags given here override it")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes on this machine sharing the sweep, one device each where there are "
                             "several (default: 1, in this process). The same command elsewhere joins the sweep")
    parser.add_argument("--storage", default=None, metavar="URL_OR_FILE",
                        help="the Optuna storage every worker shares: sqlite:///..., postgresql://..., mysql://..., "
                             "or a journal file on a shared filesystem (default: OUT/study.db)")
    parser.add_argument("--prune", choices=("none", "median", "hyperband"), default=None,
                        help="stop hopeless runs early by their test accuracy per epoch (default: none)")
    parser.add_argument("--search", action="append", metavar="FIELD=SPEC", default=None,
                        help="a config field to sample instead of a grid: log:LOW:HIGH, uniform:LOW:HIGH, "
                             "int:LOW:HIGH or choice:A,B,C (repeatable; the grid's fields become choices)")
    parser.add_argument("--trials", type=int, default=None, help="a search's number of runs in all (not per worker)")
    parser.add_argument("--sampler", choices=("tpe", "random"), default=None,
                        help="how a search samples, seeded by --seed (default: tpe)")
    add_dataclass_flags(parser, TrainConfig, skip=("model", "workdir", "resume"))
    parser.set_defaults(handler=_compare)


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag gives one line pointing at --help, not the whole usage text (subcommands inherit this class).

    No abbreviations: argparse would silently read `--lr 0.01` as `--lr-schedule 0.01`; an unknown flag is refused
    with the flags it may have meant instead."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"cifar-jax: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        # argparse lets the top-level parser report a subcommand's unknown flags, so its hint would name the wrong
        # --help; the subcommand's own parser reports them instead.
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            subcommand = getattr(self, "subcommands", {}).get(getattr(parsed, "command", None), self)
            meant = [option for flag in unknown if flag.startswith("--") for option in subcommand.meant(flag)]
            hint = f"; did you mean {' or '.join(dict.fromkeys(meant))}?" if meant else ""
            subcommand.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return parsed

    def meant(self, flag: str) -> list[str]:
        """Flags an unknown one may stand for: those it abbreviates by initials or by prefix, or spells nearly."""
        typed = flag.split("=", 1)[0]
        options = [option for action in self._actions for option in action.option_strings
                   if option.startswith("--") and option != "--help"]
        initials = [o for o in options if "".join(word[0] for word in o[2:].split("-")) == typed[2:]]
        prefixed = [o for o in options if o.startswith(typed) and o != typed]
        return list(dict.fromkeys(initials + prefixed + difflib.get_close_matches(typed, options, n=2)))[:3]


def _add_predict_parser(commands) -> None:
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
                                help="images per device step, all devices together (default: the backend's, CPU 256, "
                                     "GPU/TPU 1024)")
    predict_parser.add_argument("--num-devices", type=int, default=None,
                                help="use only the first N local devices (default: all)")
    _add_decode_flag(predict_parser)
    predict_parser.add_argument("--num-shards", type=int, default=1,
                                help="split the sorted file list into N shards (one per machine or array task)")
    predict_parser.add_argument("--shard-index", type=int, default=0,
                                help="which shard this job predicts, 0 ... N-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    predict_parser.add_argument("--output", metavar="FILE", default=None,
                                help="write results to FILE as they come, JSON lines (.jsonl) or CSV (.csv), "
                                     "flushed each line; nothing per file on stdout")
    predict_parser.add_argument("--resume", action="store_true",
                                help="with --output: skip the files already in FILE and append the rest")
    predict_parser.set_defaults(handler=_predict)


def build_parser() -> argparse.ArgumentParser:
    from cifar_jax import distributed
    from cifar_jax.config import TrainConfig

    parser = OneLineErrorParser(prog="cifar-jax", description="Train, compare, checkpoint and serve small "
                                "CIFAR-10 classifiers with JAX/Flax on CPU, GPU or TPU.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an unexpected error instead of one line (also {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser("train", help="train or resume a model",
                                       description="Train a model; on a workdir with checkpoints, resume it.")
    add_dataclass_flags(train_parser, TrainConfig)
    distributed.add_flags(train_parser)
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
                             help="image files or folders of images to classify and show with their top classes "
                                  "(the first 24)")
    _add_decode_flag(plot_parser)
    plot_parser.set_defaults(handler=_plot)

    _add_predict_parser(commands)
    _add_benchmark_parser(commands)
    _add_compare_parser(commands)
    parser.subcommands = commands.choices
    return parser


def compilation_cache_dir(environ: typing.Mapping[str, str] = os.environ) -> Optional[Path]:
    """Where the commands keep XLA's compiled programs between runs; None when the user set JAX's own variable."""
    if "JAX_COMPILATION_CACHE_DIR" in environ:
        return None
    cache_home = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "cifar-jax" / "xla-compilation-cache"


def enable_compilation_cache() -> None:
    """A later start skips compiling what an earlier one compiled (model0's first step came 2.5x sooner on the CPU,
    docs/performance.md)."""
    cache_dir = compilation_cache_dir()
    if cache_dir is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    # JAX caches only compilations over 1 s by default; the many small ones add up to most of the start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings for a command's user read like its errors: one line, without the source line that raised them."""
    return f"cifar-jax: warning: {message}\n"


def ignore_late_async_callbacks(unraisable) -> None:
    """A failed checkpoint read closes Orbax's event loop while TensorStore's other reads still call back into it,
    and its reading coroutines still fail as they are collected: those tracebacks ('Event loop is closed', each
    failed read with TensorStore's whole spec) would bury the one line that says what happened. The package has no
    coroutines of its own."""
    error = unraisable.exc_value
    late_callback = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    if not (late_callback or inspect.iscoroutine(getattr(unraisable, "object", None))):
        sys.__unraisablehook__(unraisable)


def not_an_abandoned_task_error(record: logging.LogRecord) -> bool:
    """After a failed checkpoint read, TensorStore's other reads of it fail in asyncio tasks nobody awaits any more,
    and asyncio logs each (with its stack trace) when it is collected, after the error line. The package starts no
    asyncio tasks of its own, and the libraries' failures reach it through the calls it makes."""
    return not record.getMessage().split("\n", 1)[0].endswith("exception was never retrieved")


def speak_in_one_line_per_problem() -> None:
    """A command's warnings, Orbax's log lines and late library callbacks print as single lines, not stack traces."""
    warnings.formatwarning = one_line_warning
    sys.unraisablehook = ignore_late_async_callbacks
    # Orbax logs a failed background save in several lines (with traces) before the command's own error line says
    # it once, with what to do; and warns on every mid-epoch save that it carries no test metrics, which is so.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").addFilter(not_an_abandoned_task_error)


DEBUG_ENV = "CIFAR_JAX_DEBUG"  # set (to anything but 0) for a traceback instead of the one-line report of a bug


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # imports done: Ctrl-C raises KeyboardInterrupt again
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # what a multi-process run's supervisor hands on to its worker
        if getattr(args, "cache_compilations", True):
            enable_compilation_cache()
        speak_in_one_line_per_problem()
        return args.handler(args)
    except CifarJaxError as error:
        print(f"cifar-jax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which saves and exits cleanly): nothing to save, no traceback
        print("cifar-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the last line of defence: a bug, said in one line, its traceback kept in a file
        if "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        print(f"cifar-jax: error: {report_bug(error)}", file=sys.stderr)
        return 1


def report_bug(error: Exception) -> str:
    """Write the traceback of an error the package did not foresee to a log file; the line that says so."""
    import tempfile
    import time
    import traceback

    log = Path(tempfile.gettempdir()) / f"cifar-jax-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text("".join(traceback.format_exception(error)))
        where = f"its traceback is in {log}"
    except OSError:
        where = "run again with --debug for its traceback"
    return (f"unexpected {first_line(error)}. This is a bug in cifar-jax, not in what you asked for: please report "
            f"it; {where} (--debug or {DEBUG_ENV}=1 shows it here)")


if __name__ == "__main__":
    sys.exit(main())

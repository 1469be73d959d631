"""Hyperparameter comparisons: a base config plus a grid of values, one run per grid point in its own workdir under
the comparison folder, and the results side by side: DIR/results.csv, DIR/results.md and DIR/test_curves.png.

    cifar-jax compare --models model0,model1 --grid learning_rate=1e-3,1e-2 --epochs 10 --out comparisons/lr

Run DIR/runs/NAME is named from its grid settings (`model=model0,learning_rate=0.001`). Re-running the same
comparison skips finished runs and resumes an interrupted one from its checkpoint; a run that fails is recorded
with its error and the others go on. With `parallel`, each run trains in a worker process that sees one device,
as many at a time as there are devices.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from cifar_jax import distributed, rundir, sweep
from cifar_jax.config import RUN_IDENTITY_FIELDS, TrainConfig, check_positive_integer, conflicting_fields
from cifar_jax.flags import value_type
from cifar_jax.distributed import exiting_at_once_on_stuck_threads, signal_on_parent_death
from cifar_jax.errors import CheckpointSaveError, CifarJaxError, ConfigError, SweepError, first_line
from cifar_jax.models import MODELS, count_params
from cifar_jax.report import markdown_table
from cifar_jax.train import train

RUNS_SUBDIR = "runs"
RUN_RECORD_FILE = rundir.COMPARE_RECORD_FILE
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
CURVES_PNG = "test_curves.png"
FIELDS_COMPARE_SETS = ("workdir", "resume")  # every run gets its own workdir and always resumes

PENDING, RUNNING, FINISHED, PRUNED, FAILED, INTERRUPTED = ("pending", "running", "finished", "pruned", "failed",
                                                           "interrupted")
SETTLED = (FINISHED, PRUNED)  # a run in either state is not trained again by a rerun with the same settings
SPEC_FILE = "sweep.json"  # what workers started by --workers (or by hand on other machines) read
METRIC_COLUMNS = ("params", "train_accuracy", "train_loss", "test_accuracy", "test_loss", "best_test_accuracy",
                  "best_epoch", "train_seconds", "images_per_second", "status", "error")
COLUMN_TITLES = {"params": "parameters", "best_epoch": "best epoch", "train_seconds": "train seconds",
                 "images_per_second": "images/s"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One grid point: its name, its grid settings and the full config it trains with."""

    name: str
    settings: dict
    config: TrainConfig

    @property
    def workdir(self) -> Path:
        return Path(self.config.workdir)


# ---------------------------------------------------------------- the grid, typed like TrainConfig's fields


@functools.cache
def config_field_types() -> dict[str, tuple[type, bool]]:
    """Each TrainConfig field's value type and whether it may be None (Optional[float] → (float, True))."""
    hints = typing.get_type_hints(TrainConfig)
    return {field.name: (value_type(hints[field.name]), type(None) in typing.get_args(hints[field.name]))
            for field in dataclasses.fields(TrainConfig)}


def _known_field(name: str) -> str:
    field = name.strip().replace("-", "_")
    known = config_field_types()
    if field in FIELDS_COMPARE_SETS:
        raise ConfigError(f"{field} is set by the comparison itself (each run trains, and resumes, in "
                          "OUT/runs/NAME): leave it out, and choose the folder with --out")
    if field not in known:
        choices = ", ".join(sorted(set(known) - set(FIELDS_COMPARE_SETS)))
        raise ConfigError(f"unknown config field {name!r} in the comparison: known fields are {choices}")
    return field


_BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_value(field: str, value: Any) -> Any:
    """A grid value as its field's type: text from the command line is parsed, JSON/TOML values are checked."""
    kind, optional = config_field_types()[field]
    if isinstance(value, np.generic):  # from np.linspace, np.arange, ...: the Python value it holds
        value = value.item()
    text = value.strip().lower() if isinstance(value, str) else None
    if optional and text in ("none", "null"):  # unset: the recipe's value
        return None
    if text is not None and kind is not str:
        try:
            return _BOOLEAN_WORDS[text] if kind is bool else kind(text)
        except (KeyError, ValueError):
            pass
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif (value is None and optional) or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{field}={value!r} is not a valid {kind.__name__}: give {field} values of that type")


def typed_grid(grid: Mapping[str, Any]) -> dict[str, list]:
    """{field: [values]} with known field names and values of the field's type; a single value becomes a list, and
    any other collection of values (a range, a numpy array) a list of them."""
    typed: dict[str, list] = {}
    for name, values in grid.items():
        field = _known_field(name)
        one_value = isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable) or not np.ndim(values)
        values = [values] if one_value else list(values)  # lists, tuples, ranges, numpy arrays
        if field in typed:
            raise ConfigError(f"{field} is given twice in the grid: list all its values once, comma-separated")
        if not values:
            raise ConfigError(f"the grid gives no value for {field}: list at least one")
        typed[field] = [parse_value(field, value) for value in values]
    return typed


def parse_grid_option(option: str) -> tuple[str, list[str]]:
    """'learning_rate=1e-3,1e-2' → ('learning_rate', ['1e-3', '1e-2'])."""
    name, equals, values = option.partition("=")
    if not equals or not values.strip():
        raise ConfigError(f"--grid {option!r} is not FIELD=VALUE[,VALUE...]: e.g. --grid learning_rate=1e-3,1e-2")
    return _known_field(name), [value.strip() for value in values.split(",")]


def parse_search(field: str, spec: Any) -> sweep.Dimension:
    """'log:1e-4:1e-2', 'uniform:0:0.3', 'int:0:8' or 'choice:adam,sgd' as a searched dimension of `field`."""
    kind, _, rest = str(spec).partition(":")
    kind_of_field = config_field_types()[field][0]
    if kind not in sweep.SEARCH_KINDS or not rest:
        raise ConfigError(f"--search {field}={spec!r} is not FIELD=KIND:...: use log:LOW:HIGH, uniform:LOW:HIGH, "
                          "int:LOW:HIGH or choice:A,B,C")
    if kind == "choice":
        return sweep.Dimension("choice", choices=tuple(dict.fromkeys(parse_value(field, v) for v in rest.split(","))))
    numeric = int if kind == "int" else kind_of_field
    if numeric not in (int, float) or (kind == "int" and kind_of_field is not int):
        raise ConfigError(f"{field} cannot be searched with {kind}: it takes {kind_of_field.__name__} values; "
                          f"use choice:A,B,C")
    low, _, high = rest.partition(":")
    try:
        low, high = numeric(low), numeric(high)
    except ValueError:
        raise ConfigError(f"--search {field}={spec!r}: LOW and HIGH must be {numeric.__name__}s") from None
    if not low < high or (kind == "log" and low <= 0):
        raise ConfigError(f"--search {field}={spec!r}: give LOW < HIGH" + (", both above 0" if kind == "log" else ""))
    return sweep.Dimension(kind, low, high)


def typed_search(search: Mapping[str, Any]) -> dict[str, sweep.Dimension]:
    return {_known_field(name): parse_search(_known_field(name), spec) for name, spec in search.items()}


def parse_search_option(option: str) -> tuple[str, str]:
    name, equals, spec = option.partition("=")
    if not equals or not spec.strip():
        raise ConfigError(f"--search {option!r} is not FIELD=KIND:...: e.g. --search learning_rate=log:1e-4:1e-2")
    return _known_field(name), spec.strip()


# ---------------------------------------------------------------- a comparison from a file and the command line


FILE_KEYS = {"base": dict, "grid": dict, "search": dict, "out": str, "workers": int, "storage": str, "prune": str,
             "trials": int, "sampler": str}


def read_comparison_file(path: str | Path) -> dict:
    """A TOML or JSON file with `[base]` (config fields), `[grid]` (field = list of values), and optional
    `out`, `workers`, `storage` and `prune`."""
    path = Path(path).expanduser()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib  # Python 3.11+

            spec = tomllib.loads(path.read_text())
        else:
            spec = json.loads(path.read_text())
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"cannot read the comparison file {path}: {error}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} holds a {type(spec).__name__}: expected {', '.join(FILE_KEYS)} as keys")
    unknown = sorted(set(spec) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {path}: use {', '.join(FILE_KEYS)}")
    expected = FILE_KEYS
    for key, kind in expected.items():
        if key in spec and not isinstance(spec[key], kind):
            raise ConfigError(f"{key} in {path} is a {type(spec[key]).__name__}, not a {kind.__name__}: "
                              + ("config fields and their values" if kind is dict else f"give a {kind.__name__}"))
    return spec


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A comparison as the command line and its file describe it: what to train, where, and how."""

    base: TrainConfig
    grid: dict
    out: Optional[str]
    workers: int = 1
    storage: Optional[str] = None
    prune: str = "none"
    search: dict = dataclasses.field(default_factory=dict)
    trials: Optional[int] = None
    sampler: str = "tpe"


def comparison_from_options(config_file: Optional[str], overrides: Mapping[str, Any], models: Optional[str],
                            grid_options: Sequence[str], out: Optional[str], workers: Optional[int] = None,
                            storage: Optional[str] = None, prune: Optional[str] = None,
                            search_options: Sequence[str] = (), trials: Optional[int] = None,
                            sampler: Optional[str] = None) -> Comparison:
    """The comparison from an optional file, overridden by command-line flags and --grid."""
    spec = read_comparison_file(config_file) if config_file else {}
    # Base values are one value each, of their field's type (a list belongs in the grid).
    base_values = {_known_field(name): parse_value(_known_field(name), value)
                   for name, value in spec.get("base", {}).items()}
    base = TrainConfig.from_dict({**base_values, **overrides})
    grid = typed_grid(spec.get("grid", {}))
    pairs = [parse_grid_option(option) for option in grid_options]
    command_line_grid = dict(pairs)
    if len(command_line_grid) < len(pairs):
        raise ConfigError("a field is given by more than one --grid: list all its values once, comma-separated")
    if models:
        if "model" in command_line_grid:
            raise ConfigError("models are given both by --models and --grid model=...: use one of them")
        command_line_grid = {"model": [model.strip() for model in models.split(",")], **command_line_grid}
    grid = {**{k: v for k, v in grid.items() if k not in command_line_grid}, **typed_grid(command_line_grid)}
    search = {**spec.get("search", {}), **dict(parse_search_option(option) for option in search_options)}
    return Comparison(base, grid, out or spec.get("out"), workers or spec.get("workers", 1),
                      storage or spec.get("storage"), prune or spec.get("prune", "none"), search,
                      trials or spec.get("trials"), sampler or spec.get("sampler", "tpe"))


# ---------------------------------------------------------------- runs


def _name_part(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)  # safe as a folder name everywhere


MAX_RUN_NAME = 120  # characters of a run folder's name; filesystems allow 255 bytes


def run_name(settings: Mapping[str, Any]) -> str:
    """'model=model0,learning_rate=0.001': every grid setting, in grid order; 'base' for an empty grid. A name
    too long for a folder keeps its start and ends in a digest of the whole, so it stays unique and stable."""
    name = ",".join(f"{field}={_name_part(value)}" for field, value in settings.items()) or "base"
    if len(name) <= MAX_RUN_NAME:
        return name
    return f"{name[:MAX_RUN_NAME - 13]}~{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def plan_runs(base: TrainConfig, grid: Mapping[str, list], out_dir: Path) -> list[Run]:
    """One run per point of the grid's cross product, the first field varying slowest."""
    runs = [make_run(base, dict(zip(grid, values)), out_dir) for values in itertools.product(*grid.values())]
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"the grid gives the same run more than once ({', '.join(repeated)}): list each value once")
    return runs


def make_run(base: TrainConfig, settings: Mapping[str, Any], out_dir: Path, name: Optional[str] = None) -> Run:
    name = name or run_name(settings)
    workdir = str(out_dir / RUNS_SUBDIR / name)
    return Run(name, dict(settings), dataclasses.replace(base, **settings, workdir=workdir, resume=True))


def check_out_dir(runs: Sequence[Run], out_dir: Path, check_left_out: bool = True) -> None:
    """Refuse an --out that holds a comparison with other settings or other runs before anything trains: rerunning
    into it would mark its finished runs failed, or rewrite its tables without them. (An invalid setting fails only
    its own run, later.)"""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not a folder: choose another --out")
    for run in runs:
        try:
            requested = run.config.resolved()
        except ConfigError:
            continue
        _check_same_run(run, requested, out_dir)
    # A grid may grow (its tables then show every run), but one that leaves earlier runs out would drop their rows;
    # a run that failed before finishing an epoch (a bad value in the grid) has no results to lose.
    left_out = sorted(_earlier_runs_with_results(out_dir) - {run.name for run in runs}) if check_left_out else []
    if left_out:
        raise ConfigError(f"{out_dir} holds a comparison with runs this grid leaves out ({', '.join(left_out)}): "
                          "use a new --out, or include them in the grid")


def _check_same_run(run: Run, requested: TrainConfig, out_dir: Path) -> None:
    """The run folder holds this grid point's run, and no more epochs than are asked for now."""
    saved = rundir.saved_config(run.workdir)
    conflicts = conflicting_fields(saved, requested) if saved is not None else []
    if conflicts:
        raise ConfigError(f"{out_dir} holds a comparison with other settings (run {run.name}: "
                          f"{'; '.join(conflicts)}): use a new --out, or the settings it was run with")
    trained = len(rundir.read_history(run.workdir))
    if trained > requested.epochs:
        raise ConfigError(f"{out_dir} holds runs trained for more epochs than asked for (run {run.name}: {trained} "
                          f"epochs, --epochs {requested.epochs}): ask for --epochs {trained} or more, or use a new "
                          "--out")


def _earlier_runs_with_results(out_dir: Path) -> set[str]:
    """The runs an earlier comparison into `out_dir` holds results of: in its results.csv, or as run folders with a
    metrics file (the table may have been deleted). A results.csv of something else is refused, not overwritten."""
    earlier = {folder.name for folder in (out_dir / RUNS_SUBDIR).glob("*")
               if folder.is_dir() and rundir.read_history(folder)}
    table = out_dir / RESULTS_CSV
    if not table.is_file():
        return earlier
    try:
        with table.open(newline="") as file:
            reader = csv.DictReader(file)
            rows, columns = list(reader), reader.fieldnames or ()
    except (OSError, UnicodeDecodeError, csv.Error):
        rows, columns = None, ()
    if rows is None or "run" not in columns or "status" not in columns:
        raise ConfigError(f"{table} is not the table of a comparison: choose another --out, so it is not "
                          "overwritten")
    return earlier | {row["run"] for row in rows if row.get("train_loss")}  # rows with results, whatever their status


def read_run_record(workdir: Path) -> dict:
    """How the run last ended; {} when it has no record, or an unreadable one (it is then trained or resumed again)."""
    try:
        record = json.loads((workdir / RUN_RECORD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def write_run_record(workdir: Path, record: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(workdir / RUN_RECORD_FILE, record)


def is_settled(run: Run) -> bool:
    """Finished (or pruned) earlier with this comparison's settings (same epochs, same run identity)."""
    if read_run_record(run.workdir).get("status") not in SETTLED:
        return False
    try:
        requested, saved = run.config.resolved(), rundir.saved_config(run.workdir)
        return saved is not None and saved.epochs == requested.epochs and not conflicting_fields(saved, requested)
    except (CifarJaxError, ValueError):  # training again reports what is wrong, as this run's error
        return False


def train_run(config: TrainConfig, callbacks: Sequence = ()) -> dict:
    """Train or resume one run and record how it ended in WORKDIR/compare_result.json; errors are recorded."""
    workdir = Path(config.workdir)
    if rundir.in_use(workdir):  # another worker trains it (it took the run before this one's trial was queued)
        return {"status": RUNNING, "error": None}
    (workdir / RUN_RECORD_FILE).unlink(missing_ok=True)  # until it ends again, the run is not finished
    started = time.perf_counter()
    fatal = None
    try:
        result = train(config, callbacks=callbacks)
        status = INTERRUPTED if result.interrupted else PRUNED if result.stopped_by else FINISHED
        record = {"status": status, "error": None,
                  "test_accuracy": result.history[-1]["test_accuracy"] if result.history else None}
    except CifarJaxError as error:
        record = {"status": FAILED, "error": str(error)}
        # Orbax's writer is left waiting after a failed save: the process must exit, not train the next run.
        fatal = error if isinstance(error, CheckpointSaveError) else None
    except Exception as error:  # a bug or a device error (out of memory) in one run must not stop the others
        record = {"status": FAILED, "error": first_line(error)}
    record["wall_seconds"] = time.perf_counter() - started
    write_run_record(workdir, record)
    if fatal:
        raise fatal
    return record


# ---------------------------------------------------------------- the study: queue, workers


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One comparison as its workers see it: the base config, the grid or search, where the study lives."""

    out_dir: Path
    base: TrainConfig
    grid: dict  # field → values, typed
    search: dict = dataclasses.field(default_factory=dict)  # field → sweep.Dimension
    trials: Optional[int] = None  # a search's total number of runs
    sampler: str = "tpe"
    storage: Optional[str] = None
    prune: str = "none"

    @property
    def space(self) -> dict:
        """Every varying field as a dimension: a search's, and the grid's as choices."""
        grid = {field: sweep.Dimension("choice", choices=tuple(dict.fromkeys(values)))
                for field, values in self.grid.items()}
        return {**grid, **self.search}

    def identity(self) -> dict:
        """What makes two comparisons the same sweep: the varying fields and the base settings that define runs."""
        resolved = dataclasses.asdict(self.base)
        return {"grid": sorted(self.grid), "search": {f: d.describe() for f, d in sorted(self.search.items())},
                "base": {name: resolved[name] for name in RUN_IDENTITY_FIELDS
                         if name not in self.space and resolved[name] is not None}}

    def open_study(self):
        epochs = max(self.grid.get("epochs", [self.base.epochs or 10]))
        return sweep.open_study(self.out_dir, self.storage, self.identity(), self.prune, epochs,
                                sampler=self.sampler if self.search else "random", seed=self.base.seed)

    def to_json(self) -> dict:
        return {"base": self.base.to_dict(), "grid": self.grid, "search": {f: d.describe() for f, d in
                                                                           self.search.items()},
                "trials": self.trials, "sampler": self.sampler, "storage": self.storage, "prune": self.prune}

    @classmethod
    def from_json(cls, out_dir: Path, spec: dict) -> "Sweep":
        return cls(out_dir, TrainConfig.from_dict(spec["base"]), typed_grid(spec["grid"]),
                   typed_search(spec["search"]), spec["trials"], spec["sampler"], spec["storage"], spec["prune"])


def tell(study, trial, record: dict) -> None:
    """The run's end as the trial's: its last test accuracy (the objective), pruned, or failed."""
    from optuna.trial import TrialState

    # A trial another process failed as stale (this one stalled) stays failed; the run's own record says how it ended.
    if record["status"] == FINISHED:
        study.tell(trial, record["test_accuracy"], skip_if_finished=True)
    else:
        study.tell(trial, state=TrialState.PRUNED if record["status"] == PRUNED else TrialState.FAIL,
                   skip_if_finished=True)


def work_on_study(spec: Sweep, study, runs: Sequence[Run], on_run_end=lambda: None) -> None:
    """Take the next run (queued, or for a search a new sample), train it, report it; until nothing is left, a run
    is interrupted, or a failed checkpoint write ends the process."""
    from optuna.trial import TrialState

    space, by_name = spec.space, {run.name: run for run in runs}

    def prepare(trial) -> bool:  # its parameters (a queued trial's fixed ones) and its run's name
        queued_as = trial.user_attrs.get(sweep.RUN_ATTR)
        if not spec.search and queued_as not in by_name:  # queued with values this grid no longer holds
            return False
        settings = {field: dimension.suggest(trial, field) for field, dimension in space.items()}
        # A search's every trial is a run of its own, even where two sample the same values.
        trial.set_user_attr(sweep.RUN_ATTR, queued_as or run_name({"trial": trial.number, **settings}))
        return True

    budget = spec.trials if spec.search else None
    while (trial := sweep.take_next(study, spec.out_dir, prepare, budget)) is not None:
        name = trial.user_attrs[sweep.RUN_ATTR]
        run = by_name.get(name) or make_run(spec.base, {f: trial.params[f] for f in space}, spec.out_dir, name)
        print(f"{run.name}: training (trial {trial.number})", flush=True)
        try:
            with sweep.heartbeat(trial):
                record = train_run(run.config, [sweep.PruningReport(trial)] if spec.prune != "none" else [])
        except BaseException:  # Ctrl-C before training could take it over: the run is taken again next time
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        tell(study, trial, record)
        _announce(run, record)
        on_run_end()
        if record["status"] == INTERRUPTED:
            return


def searched_runs(spec: Sweep, study) -> list[Run]:
    """A search's runs so far, in the order they were first sampled."""
    first = {}
    for trial in study.get_trials(deepcopy=False):
        name = trial.user_attrs.get(sweep.RUN_ATTR)
        if name and name not in first and set(spec.space) <= set(trial.params):
            first[name] = make_run(spec.base, {f: trial.params[f] for f in spec.space}, spec.out_dir, name)
    return list(first.values())


def _announce(run: Run, record: dict) -> None:
    error = f": {record['error']}" if record.get("error") else ""
    print(f"{run.name}: {record['status']}{error}", flush=True)


_PROBE_DEVICES = "import jax; print(jax.default_backend(), jax.local_device_count())"


def probe_devices() -> tuple[str, int]:
    """(backend, local device count), asked of a short-lived process so this one never claims an accelerator."""
    done = subprocess.run([sys.executable, "-c", _PROBE_DEVICES], capture_output=True, text=True, check=False)
    last = (done.stdout.strip().splitlines() or [""])[-1].split()
    if done.returncode or len(last) != 2:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"could not list the devices for --workers ({tail}): run the comparison without it")
    return last[0], int(last[1])


def one_device_environment(backend: str, index: int, environment: Mapping[str, str]) -> dict[str, str]:
    """The environment of a worker that sees only device `index` of the ones this process sees."""
    env = dict(environment, PYTHONUNBUFFERED="1")
    if backend == "cpu":  # simulated host devices share the same cores: each worker gets one
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    elif backend in ("gpu", "cuda", "rocm"):  # the index counts within a CUDA_VISIBLE_DEVICES this process was given
        visible = [device.strip() for device in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if device.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[index % len(visible)] if visible else str(index)
    return env


PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # so workers import this very copy of cifar_jax


def run_workers(out_dir: Path, count: int) -> list[int]:
    """`count` worker processes on this machine, one device each where it has several, sharing the study; their
    exit codes. Ctrl-C/SIGTERM reaches them (each saves its run and stops)."""
    backend, num_devices = probe_devices()
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "cifar_jax.compare", "--worker", str(out_dir / SPEC_FILE),
               "--parent-pid", str(os.getpid())]
    workers = [subprocess.Popen(command, env={**one_device_environment(backend, index % num_devices, os.environ),
                                              "PYTHONPATH": python_path})
               for index in range(count)]

    def pass_on(signum, _frame):
        for worker in workers:
            worker.send_signal(signum)

    with distributed.signals_handled_by(pass_on):
        return [worker.wait() for worker in workers]


def write_spec(spec: Sweep) -> None:
    """What a worker needs to join the sweep, beside its runs (a worker on another machine reads it too)."""
    rundir.write_json(spec.out_dir / SPEC_FILE, spec.to_json())


# ---------------------------------------------------------------- results


@functools.cache
def parameter_count(model: str) -> Optional[int]:
    return count_params(model) if model in MODELS else None


def run_row(run: Run, grid_fields: Sequence[str], running: Collection[str] = ()) -> dict[str, Any]:
    """One row of the results table, read from the run's files: metrics after its last epoch, best test accuracy."""
    history = rundir.read_history(run.workdir)
    record = read_run_record(run.workdir)
    status = RUNNING if run.name in running else record.get("status", PENDING)
    if status in SETTLED and not is_settled(run):  # finished with other settings (fewer epochs): not yet redone
        status = PENDING
    last = history[-1] if history else {}
    best = max(history, key=lambda row: row["test_accuracy"]) if history else {}  # the first of equals
    seconds = sum(row["epoch_seconds"] for row in history)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in history)
    return {
        "run": run.name,
        "model": run.config.model,
        **{field: run.settings[field] for field in grid_fields if field != "model"},
        "params": parameter_count(run.config.model),
        **{key: last.get(key) for key in ("train_accuracy", "train_loss", "test_accuracy", "test_loss")},
        "best_test_accuracy": best.get("test_accuracy"),
        "best_epoch": best.get("epoch"),
        "train_seconds": seconds if history else None,  # training steps only: no evaluation or checkpoints
        "images_per_second": images / seconds if seconds else None,
        "status": status,
        "error": record.get("error"),
    }


def result_columns(grid_fields: Sequence[str]) -> tuple[str, ...]:
    return ("run", "model", *(field for field in grid_fields if field != "model"), *METRIC_COLUMNS)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Full-precision values; empty cells where a run has no value yet."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({column: "" if row.get(column) is None else row[column] for column in columns} for row in rows)
    tmp.replace(path)
    return path


def format_cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if column.endswith("params"):
        return f"{value:,}"
    if column.endswith(("accuracy", "loss")):
        return f"{value:.4f}"
    if column.endswith("seconds"):
        return f"{value:,.1f}"
    if column == "images_per_second":
        return f"{value:,.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def write_tables(out_dir: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str,
                 notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """DIR/results.csv and DIR/results.md (the table, DIR/test_curves.png if drawn, then each run's error)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [column for column in columns if column != "error"]
    header = [COLUMN_TITLES.get(column, column.replace("_", " ")) for column in shown]
    table = markdown_table(header, [[format_cell(column, row.get(column)) for column in shown] for row in rows])
    lines = [f"# {title}", "", *notes, *([""] if notes else []), *table, ""]
    if (out_dir / CURVES_PNG).exists():
        lines += [f"![test accuracy and loss per epoch of every run]({CURVES_PNG})", ""]
    errors = [f"- `{row['run']}`: {row['error']}" for row in rows if row.get("error")]
    lines += ["## Errors", "", *errors, ""] if errors else []
    markdown = out_dir / RESULTS_MD
    markdown.write_text("\n".join(lines))
    return write_csv(out_dir / RESULTS_CSV, rows, columns), markdown


def plot_test_curves(histories: Mapping[str, Sequence[dict]], out_path: Path) -> Path:
    """Test accuracy and test loss per epoch, one line per run, both panels sharing one legend below."""
    from matplotlib.ticker import MaxNLocator

    from cifar_jax.plots import new_figure, save_figure

    drawn = {name: history for name, history in histories.items() if history}
    figure = new_figure(11, 4.2 + 0.22 * math.ceil(len(drawn) / 2))
    panels = figure.subplots(1, 2)
    for number, (name, history) in enumerate(drawn.items()):
        style = ("-", "--", ":", "-.")[number // 10 % 4]  # the colour cycle repeats after ten runs
        for axes, metric in zip(panels, ("test_accuracy", "test_loss")):
            axes.plot([row["epoch"] for row in history], [row[metric] for row in history], linestyle=style,
                      marker="o", markersize=3, label=name)
    for axes, title in zip(panels, ("Test accuracy", "Test loss (cross-entropy)")):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
    if drawn:
        figure.legend(*panels[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    else:
        figure.suptitle("no finished epoch yet")
    return save_figure(figure, out_path)


def comparison_notes(spec: Sweep, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    statuses = [row["status"] for row in rows]
    counts = ", ".join(f"{statuses.count(status)} {status}" for status in dict.fromkeys(statuses))
    defaults = TrainConfig()
    shared = [f"`{field}={value}`" for field, value in spec.base.to_dict().items()
              if field not in spec.space and field not in (*FIELDS_COMPARE_SETS, "progress")
              and value != getattr(defaults, field)]
    varying = f"Grid: {' × '.join(spec.grid) or 'none'}" if not spec.search else (
        f"Search ({spec.sampler}, {spec.trials} trials): "
        + ", ".join(f"`{field}` {dimension.describe()}" for field, dimension in spec.space.items()))
    return [f"{varying} ({counts}). Every run: {', '.join(shared) or 'the defaults'}; each in `{RUNS_SUBDIR}/RUN/`.",
            "", "Metrics after each run's last epoch (the sweep's objective: its last test accuracy); train seconds "
                "count training steps only; images/s over all its epochs."]


def write_results(spec: Sweep, runs: Sequence[Run], plot: bool = False, study=None) -> list[dict]:
    running = sweep.running_runs(study) if study is not None else set()
    fields = list(spec.space)
    rows = [run_row(run, fields, running) for run in runs]
    if plot:
        plot_test_curves({run.name: rundir.read_history(run.workdir) for run in runs}, spec.out_dir / CURVES_PNG)
        if study is not None:
            sweep.write_plots(study, spec.out_dir, searched=bool(spec.search))
    title = f"{'Search' if spec.search else 'Comparison'} of {len(runs)} run{'s' * (len(runs) != 1)}"
    write_tables(spec.out_dir, rows, result_columns(fields), title, comparison_notes(spec, rows))
    return rows


# ---------------------------------------------------------------- the whole comparison


def settled_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs not to train again, each announced as skipped."""
    settled = [run for run in runs if is_settled(run)]
    for run in settled:
        print(f"{run.name}: {read_run_record(run.workdir)['status']} earlier, skipped", flush=True)
    return settled


def compare(base_config: TrainConfig, grid: Mapping[str, Any], out_dir: Optional[str | Path] = None, *,
            workers: int = 1, storage: Optional[str] = None, prune: str = "none",
            search: Optional[Mapping[str, str]] = None, trials: Optional[int] = None, sampler: str = "tpe") -> list[dict]:
    """Train every point of `grid` (or `trials` runs sampled from `search`) on top of `base_config`; return the
    results table, one dict per run.

    `grid` maps config fields to lists of values (text is parsed to the field's type); `search` maps fields to
    'log:LOW:HIGH', 'uniform:LOW:HIGH', 'int:LOW:HIGH' or 'choice:A,B' (a grid's fields then become choices). The runs
    live in OUT_DIR/runs/NAME (OUT_DIR defaults to base_config.workdir) and are the trials of an Optuna study in
    `storage` (default: OUT_DIR/study.db): `workers` processes here, and the same call on other machines, share
    them. Finished runs are skipped, interrupted ones resumed, failed ones recorded with their error; `prune`
    (median, hyperband) stops hopeless runs early. Writes OUT_DIR/results.csv, results.md and the plots.
    """
    spec = _checked_sweep(base_config, grid, out_dir, workers, storage, prune, search or {}, trials, sampler)
    runs = [] if spec.search else plan_runs(spec.base, spec.grid, spec.out_dir)
    check_out_dir(runs, spec.out_dir, check_left_out=not spec.search)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_sweep(spec, runs, workers)
    except Exception as error:
        if isinstance(error, CifarJaxError) or not sweep.is_storage_error(error):
            raise
        raise SweepError(f"the sweep's storage failed ({first_line(error)}): run the same command again to resume; "
                         "with several machines, use a PostgreSQL --storage rather than SQLite on a shared "
                         "filesystem") from None


def _run_sweep(spec: Sweep, runs: Sequence[Run], workers: int) -> list[dict]:
    study = spec.open_study()
    if spec.search:
        sweep.requeue_interrupted(study, spec.out_dir,
                                  lambda name: not _settled_record(spec.out_dir / RUNS_SUBDIR / name))
    else:
        settled = {run.name for run in settled_runs(runs)}
        sweep.queue_runs(study, spec.out_dir, [(run.name, run.settings) for run in runs if run.name not in settled])
    current_runs = (lambda: searched_runs(spec, study)) if spec.search else (lambda: runs)
    if workers == 1:
        work_on_study(spec, study, runs, lambda: write_results(spec, current_runs(), study=study))
    else:
        write_spec(spec)
        codes = run_workers(spec.out_dir, workers)
    rows = write_results(spec, current_runs(), plot=True, study=study)
    if workers > 1 and any(code not in (0, 130, 143, -2, -15) for code in codes):
        raise SweepError(f"{sum(code != 0 for code in codes)} of {workers} workers ended with an error (exit codes "
                         f"{codes}): their lines above say why; run the same command again to resume the sweep")
    return rows


def _settled_record(workdir: Path) -> bool:
    """A search's run not to take again: it finished or was pruned (interrupted, failed or dead ones are retried)."""
    return read_run_record(workdir).get("status") in SETTLED


def _checked_sweep(base_config, grid, out_dir, workers, storage, prune, search, trials, sampler) -> Sweep:
    if not isinstance(base_config, TrainConfig):
        raise ConfigError(f"compare() takes a TrainConfig as its base, got {type(base_config).__name__}")
    if not isinstance(grid, Mapping):
        raise ConfigError(f"the grid must map config fields to lists of values, e.g. {{'learning_rate': [1e-3, 1e-2]}}, "
                          f"got {type(grid).__name__}")
    folder = out_dir or base_config.workdir
    if not folder:
        raise ConfigError("give the comparison folder: --out DIR on the command line, out_dir=DIR from Python")
    check_positive_integer("workers", workers)
    typed = typed_search(search)
    if search and trials is None:
        raise ConfigError("a search needs --trials N: how many runs to sample in all")
    if trials is not None and not search:
        raise ConfigError("--trials counts a search's runs; a grid trains each of its points: drop --trials, or add "
                          "--search FIELD=KIND:...")
    if trials is not None:
        check_positive_integer("trials", trials)
    sweep.sampler_for(sampler, 0)  # refused now rather than once workers start
    if workers > 1 and base_config.num_devices not in (None, 1):
        raise ConfigError("--workers trains each run on one device: drop --num-devices, or --workers")
    # Checked only with one worker: asking JAX would make this process claim the devices its workers need.
    if workers == 1 and jax.process_count() > 1:
        raise ConfigError("compare runs in a single process: train multi-host runs one by one with `cifar-jax train`")
    grid = typed_grid(grid)
    both = sorted(set(typed) & set(grid))
    if both:
        raise ConfigError(f"{', '.join(both)} is both searched and in the grid: give each field one of them")
    return Sweep(Path(folder).expanduser(), base_config, grid, typed, trials, sampler, storage, prune)


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m cifar_jax.compare --worker OUT/sweep.json [--parent-pid PID]`: one worker of a comparison."""
    import argparse

    parser = argparse.ArgumentParser(description=worker_main.__doc__)
    parser.add_argument("--worker", required=True, help="the comparison's sweep.json")
    parser.add_argument("--parent-pid", type=int, default=None, help="the comparison process that started it")
    args = parser.parse_args(argv)
    # SIGTERM (save and stop) if the comparison dies, so no orphan trains a run the next comparison resumes
    if args.parent_pid is not None and not signal_on_parent_death(args.parent_pid, signal.SIGTERM):
        return 1
    spec_path = Path(args.worker)
    spec = Sweep.from_json(spec_path.parent, json.loads(spec_path.read_text()))
    spec = dataclasses.replace(spec, base=dataclasses.replace(spec.base, progress=False))
    runs = [] if spec.search else plan_runs(spec.base, spec.grid, spec.out_dir)
    exiting_at_once_on_stuck_threads(lambda: work_on_study(spec, spec.open_study(), runs))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())

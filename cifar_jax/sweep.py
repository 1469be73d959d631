"""A comparison's runs as the trials of an Optuna study, so that any number of processes, on any number of machines,
share one sweep: the study lives in a storage they all reach (an SQLite file inside the comparison folder by
default; a journal file on a shared filesystem; PostgreSQL or MySQL by URL), each run is queued once, and a worker
takes the next one nobody has taken.

Optuna's own heartbeat only runs inside `study.optimize`, and journal storages have none, so the rule for a worker
that died (kill -9, a lost host) is ours and the same on every storage: a worker stamps its trial every
HEARTBEAT_SECONDS; a running trial whose stamp is older than STALE_AFTER_SECONDS is failed and its run queued again,
to resume from its checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from cifar_jax.callbacks import Callback, TrainingRun
from cifar_jax.errors import ConfigError, one_line

STUDY_NAME_PREFIX = "cifar-jax-compare:"
STUDY_FILE = "study.db"  # the default storage: SQLite inside the comparison folder
LOCK_FILE = ".sweep.lock"
HEARTBEAT_SECONDS = float(os.environ.get("CIFAR_JAX_SWEEP_HEARTBEAT_SECONDS", 20))
STALE_AFTER_SECONDS = float(os.environ.get("CIFAR_JAX_SWEEP_STALE_SECONDS", 120))
PRUNERS = ("none", "median", "hyperband")
RUN_ATTR, ALIVE_ATTR = "run", "alive_at"


def storage_spec(out_dir: Path, storage: Optional[str]) -> str:
    """The storage a comparison uses: the one given (a URL, or a journal file's path), else SQLite in OUT."""
    return storage or f"sqlite:///{Path(out_dir).absolute() / STUDY_FILE}"


def open_storage(spec: str):
    import optuna

    if "://" not in spec:  # a journal file, on a filesystem every worker sees
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(Path(spec).expanduser())))
        except OSError as error:
            raise ConfigError(f"cannot open the journal storage {spec} ({one_line(error)}): give a file in a "
                              "folder you can write to") from None
    try:
        return optuna.storages.RDBStorage(spec)
    except Exception as error:  # SQLAlchemy's many ways of saying a URL or server cannot be used
        if isinstance(error, ImportError) or "Failed to import DB access module" in str(error):
            raise ConfigError(f"the storage {spec.split('://')[0]}:// needs a database driver that is not "
                              "installed: pip install 'cifar-jax[postgres]' (PostgreSQL) or a MySQL driver such as "
                              "pymysql") from None
        raise ConfigError(f"cannot open the storage {spec} ({one_line(error)[:200]}): check the URL, that the "
                          "server runs and that you may connect") from None


def pruner_for(name: str, epochs: int):
    """Settings that work for sweeps of a handful of runs: median stops a run below the median of finished runs at
    the same epoch once two have finished; hyperband keeps a third of the runs at each rung from the first epoch."""
    import optuna

    if name not in PRUNERS:
        raise ConfigError(f"unknown pruner {name!r}: choose one of {', '.join(PRUNERS)}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def study_name(out_dir: Path) -> str:
    """The folder's name with its parent's: the same on every machine, whatever the mount point, and distinct for
    comparisons such as exp1/lr and exp2/lr that share one database."""
    folder = Path(out_dir).absolute()
    return STUDY_NAME_PREFIX + f"{folder.parent.name}/{folder.name}"


def is_storage_error(error: BaseException) -> bool:
    """Errors of the storage itself (a database that is locked, a lost connection), not of this package."""
    import optuna

    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # journal storages need no SQLAlchemy
        SQLAlchemyError = ()  # noqa: N806
    return isinstance(error, (optuna.exceptions.StorageInternalError, *(
        (SQLAlchemyError,) if SQLAlchemyError else ())))


def open_study(out_dir: Path, storage: Optional[str], identity: Mapping[str, Any], pruner: str, epochs: int,
               sampler: str = "random", seed: int = 0):
    """The comparison's study, made on first use. One that holds another sweep (other grid fields or base settings)
    is refused: its trials would be mixed with these."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name(out_dir)
    # Under the lock: two workers starting at once would both create the storage's tables (SQLite refused one).
    with locked(out_dir):
        study = optuna.create_study(study_name=name, storage=open_storage(storage_spec(out_dir, storage)),
                                    direction="maximize", load_if_exists=True, pruner=pruner_for(pruner, epochs),
                                    sampler=sampler_for(sampler, seed))
        saved = study.user_attrs.get("comparison")
        if saved is None:
            study.set_user_attr("comparison", dict(identity))
            study.set_user_attr("sampler", sampler)
            study.set_user_attr("seed", seed)
        elif saved != dict(identity):
            raise ConfigError(f"the storage holds a different sweep under the name {name!r} (saved {saved}, "
                              f"asked {dict(identity)}): use a new --out, or another --storage")
    return study


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """One process at a time queues runs or takes the next (on a shared filesystem: across machines too)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fail_stale_trials(study) -> list[str]:
    """Fail the running trials whose worker stopped stamping them (killed, host lost); their run names."""
    from optuna.trial import TrialState

    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        alive_at = trial.user_attrs.get(ALIVE_ATTR, trial.datetime_start.timestamp() if trial.datetime_start else 0)
        if time.time() - alive_at > STALE_AFTER_SECONDS:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            stale.append(trial.user_attrs.get(RUN_ATTR))
    return stale


def queue_runs(study, out_dir: Path, runs: Sequence[tuple[str, dict]]) -> list[str]:
    """Queue each (run name, grid settings) that is not queued or running already; the names queued now."""
    from optuna.trial import TrialState

    with locked(out_dir):
        fail_stale_trials(study)
        busy = {trial.user_attrs.get(RUN_ATTR) for trial in study.get_trials(
            deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))}
        queued = [name for name, _ in runs if name not in busy]
        for name, settings in runs:
            if name in queued:
                study.enqueue_trial(dict(settings), user_attrs={RUN_ATTR: name})
    return queued


def requeue_interrupted(study, out_dir: Path, is_interrupted) -> list[str]:
    """Queue again a search's runs that did not end (interrupted, or their worker died), with their parameters."""
    from optuna.trial import TrialState

    with locked(out_dir):
        fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        busy = {t.user_attrs.get(RUN_ATTR) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
        ended = {t.user_attrs.get(RUN_ATTR) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        again = {}
        for trial in trials:
            name = trial.user_attrs.get(RUN_ATTR)
            if trial.state == TrialState.FAIL and name and name not in busy | ended and is_interrupted(name):
                again[name] = trial.params
        for name, params in again.items():
            study.enqueue_trial(params, user_attrs={RUN_ATTR: name})
    return list(again)


def write_plots(study, out_dir: Path, searched: bool) -> None:
    """Optuna's own pictures of the sweep (matplotlib): the objective over trials; for a search also which
    parameters mattered and a parallel-coordinate view. A plot Optuna cannot draw yet (too few trials) is skipped."""
    import matplotlib.pyplot as pyplot
    import optuna.visualization.matplotlib as optuna_plots

    plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
    if searched:
        plots.update({"param_importances.png": optuna_plots.plot_param_importances,
                      "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate})
    for file, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental, every call
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(Path(out_dir) / file, bbox_inches="tight")
            pyplot.close(figure)
        except Exception as error:  # too few finished trials for this view, or a parameter Optuna cannot plot
            (Path(out_dir) / file).unlink(missing_ok=True)
            warnings.warn(f"no {file}: {one_line(error)}")


def take_next(study, out_dir: Path, prepare, budget: Optional[int] = None):
    """The next run's trial, now running in this process: a queued one, else (for a search with runs left in its
    `budget`) a new one. `prepare(trial)` gives it its parameters and run name while no other worker can ask, so a
    budget is never overshot, or returns False for a trial this comparison does not hold (it is failed and the next
    one taken). None when there is nothing left to take."""
    from optuna.trial import TrialState

    with locked(out_dir):
        fail_stale_trials(study)
        while True:
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting and (budget is None or len(run_names(study)) >= budget):
                return None
            # Each trial samples from a generator seeded by (seed, trial number): workers in other processes draw
            # different values, and the same study replays the same ones.
            study.sampler = sampler_for(study.user_attrs.get("sampler", "random"),
                                        study.user_attrs.get("seed", 0) + len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            trial.set_user_attr(ALIVE_ATTR, time.time())
            if prepare(trial):
                return trial
            study.tell(trial, state=TrialState.FAIL)  # queued by a comparison with other values: not this one's


def run_names(study) -> list[str]:
    """Every run the study has handed out, once each, in the order they were first asked for."""
    return list(dict.fromkeys(trial.user_attrs[RUN_ATTR] for trial in study.get_trials(deepcopy=False)
                              if RUN_ATTR in trial.user_attrs))


# ---------------------------------------------------------------- searches


SEARCH_KINDS = ("log", "uniform", "int", "choice")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched field: `log`/`uniform` floats (or ints) between low and high, `int`s, or a `choice` of values."""

    kind: str
    low: Any = None
    high: Any = None
    choices: tuple = ()

    def suggest(self, trial, field: str) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(field, list(self.choices))
        if self.kind == "int" or isinstance(self.low, int):
            return trial.suggest_int(field, self.low, self.high, log=self.kind == "log")
        return trial.suggest_float(field, self.low, self.high, log=self.kind == "log")

    def describe(self) -> str:
        return f"choice:{','.join(map(str, self.choices))}" if self.kind == "choice" else \
            f"{self.kind}:{self.low}:{self.high}"


def sampler_for(name: str, seed: int):
    import optuna

    if name not in ("tpe", "random"):
        raise ConfigError(f"unknown sampler {name!r}: choose tpe or random")
    return optuna.samplers.TPESampler(seed=seed) if name == "tpe" else optuna.samplers.RandomSampler(seed=seed)


def running_runs(study) -> set[str]:
    from optuna.trial import TrialState

    return {trial.user_attrs.get(RUN_ATTR) for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


@contextlib.contextmanager
def heartbeat(trial) -> Iterator[None]:
    """Stamp the trial every HEARTBEAT_SECONDS while its run trains, so other workers know it is alive."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                trial.set_user_attr(ALIVE_ATTR, time.time())
            except Exception:  # a storage hiccup: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name="cifar-jax-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class PruningReport(Callback):
    """Reports each epoch's test accuracy to the trial; a run the pruner stops ends after that epoch, saved."""

    PRUNED = "pruned by the sweep's pruner"

    def __init__(self, trial):
        self.trial = trial

    def on_epoch_end(self, run: TrainingRun, metrics: dict) -> None:
        try:
            self.trial.report(metrics["test_accuracy"], metrics["epoch"])
            prune = self.trial.should_prune()
        except Exception as error:  # the storage is busy or gone: the run trains on, unpruned
            warnings.warn(f"could not report epoch {metrics['epoch']} to the sweep: {one_line(error)}")
            return
        if prune:
            run.request_stop(self.PRUNED)

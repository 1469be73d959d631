"""A run's folder, in one place: its layout, reading and writing its config and metrics, and the checks and the lock
that keep two runs from mixing in it.

    WORKDIR/config.json           the run's TrainConfig (resuming with just --workdir takes it)
    WORKDIR/metrics.jsonl         one JSON object per finished epoch
    WORKDIR/checkpoints/STEP/     Orbax checkpoints (checkpoint.py)
    WORKDIR/corrupt_checkpoints/  unreadable checkpoints moved aside, never deleted
    WORKDIR/plots/*.png           training curves (at the end of a run) and `plot`'s figures
    WORKDIR/report.md             `plot`'s one-page report
    WORKDIR/tensorboard/          TensorBoard event files (summaries.py); tensorboard/hparams/ the HParams row
    WORKDIR/profile/              a jax.profiler trace, with --profile-steps
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
from pathlib import Path
import shutil
import typing
from typing import Iterator, Sequence

from cifar_jax.config import TrainConfig, conflicting_fields
from cifar_jax.errors import ConfigError, InputError, RunFolderError, one_line

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_SUBDIR = "checkpoints"
CORRUPT_CHECKPOINTS_SUBDIR = "corrupt_checkpoints"
PLOTS_SUBDIR = "plots"
REPORT_FILE = "report.md"
TENSORBOARD_SUBDIR = "tensorboard"
PROFILE_SUBDIR = "profile"
PLOT_FILES = {  # plot name → file under WORKDIR/plots/
    "training_curves": "training_curves.png",
    "confusion_matrix": "confusion_matrix.png",
    "confusion_matrix_normalized": "confusion_matrix_normalized.png",
    "test_predictions": "test_predictions.png",
    "confused_pairs": "confused_pairs.png",
    "image_predictions": "image_predictions.png",
}
COMPARE_RECORD_FILE = "compare_result.json"  # how a run of a comparison ended, written by compare
WORKER_LOG_FILE = "train.log"  # a comparison worker's output


def checkpoints_dir(workdir: str | os.PathLike) -> Path:
    """WORKDIR/checkpoints/, whatever the workdir itself is called."""
    return Path(workdir).expanduser().absolute() / CHECKPOINTS_SUBDIR


def plot_path(workdir: str | os.PathLike, name: str) -> Path:
    return Path(workdir) / PLOTS_SUBDIR / PLOT_FILES[name]


def tensorboard_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / TENSORBOARD_SUBDIR


def run_folder_of(location: str | os.PathLike) -> Path:
    """The run folder of a workdir, its checkpoints/ folder or one checkpoint's folder (what evaluate accepts)."""
    path = Path(location).expanduser().absolute()
    if is_checkpoint_step(path):
        return path.parent.parent
    return path.parent if path.name == CHECKPOINTS_SUBDIR and not (path / CHECKPOINTS_SUBDIR).exists() else path


def is_checkpoint_step(path: Path) -> bool:
    """One checkpoint's folder (checkpoints/STEP), not a run folder named by digits under a folder called
    checkpoints (`--workdir checkpoints/$SLURM_JOB_ID`), which holds checkpoints of its own."""
    return path.name.isdigit() and path.parent.name == CHECKPOINTS_SUBDIR and not (path / CHECKPOINTS_SUBDIR).exists()


# ---------------------------------------------------------------- files


def write_text_atomically(path: Path, text: str) -> None:
    """Write beside the file, then rename: a kill or a full disk leaves the old file or the new one, never half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise_unwritable(path, error)


def raise_unwritable(path: Path, error: OSError) -> typing.NoReturn:
    """A file of the run that could not be written (full disk, no permission), in one line that says what to do."""
    raise RunFolderError(f"could not write {path} ({error.strerror or one_line(error)}): free disk space or fix the "
                         "folder's permissions, then run the same command again (what was saved before is kept)"
                         ) from None


def write_json(path: Path, value: dict) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def write_config(workdir: Path, config: TrainConfig) -> None:
    write_json(Path(workdir) / CONFIG_FILE, config.to_dict())


def saved_config(workdir: str | os.PathLike) -> TrainConfig | None:
    """The run's config.json, or None if it has none; ConfigError, naming the file, if it cannot be read or holds a
    value no run could have saved (edited by hand)."""
    path = Path(workdir).expanduser() / CONFIG_FILE
    if not path.exists():
        return None
    config = TrainConfig.load(path)
    try:
        config.resolved()
    except ConfigError as error:
        raise ConfigError(f"{path} holds a value no run saved: {error}; fix that value in the file, or train into "
                          "a new --workdir") from None
    return config


def write_history(workdir: Path, history: Sequence[dict]) -> None:
    """WORKDIR/metrics.jsonl, one object per finished epoch; rewritten whole so a kill never leaves half a line."""
    write_text_atomically(Path(workdir) / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in history))


def read_history(workdir: str | os.PathLike, fallback: Sequence[dict] = ()) -> list[dict]:
    """Per-epoch metrics of the whole run (WORKDIR/metrics.jsonl), else `fallback` (a checkpoint's history)."""
    path = Path(workdir) / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    history = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = "not JSON"
        if row is not None and not is_metrics_row(row):
            raise InputError(f"{path} line {number} is not a metrics row (an object with {', '.join(ROW_KEYS)} as "
                             "numbers): move the file away to use the history saved in the checkpoint instead")
        if row is not None:
            history.append(row)
    return history or list(fallback)


ROW_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
            "images_per_second")  # what every row has had since the first version (learning_rate came later)


def is_metrics_row(row: object) -> bool:
    return isinstance(row, dict) and all(
        isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool) for key in ROW_KEYS)


# ---------------------------------------------------------------- before a run starts


def check_workdir(config: TrainConfig) -> None:
    """Refuse a run folder that would mix this run with a different earlier one (before anything is created)."""
    workdir = Path(config.workdir).expanduser()
    checkpoints = checkpoints_dir(workdir)
    check_can_create(checkpoints)
    if workdir.name == CHECKPOINTS_SUBDIR and (workdir.parent / CONFIG_FILE).exists():
        raise ConfigError(f"{workdir} is the checkpoints folder of the run in {workdir.parent}: resume that run with "
                          f"--workdir {workdir.parent}, or choose a new --workdir")
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
    saved = saved_config(workdir)  # unreadable: refused, kept
    # Without a checkpoint the earlier run left nothing to mix with (it diverged in its first epoch, say): its
    # config.json is rewritten. Results without checkpoints are refused below.
    conflicts = conflicting_fields(saved, config) if saved is not None else []
    if conflicts and has_checkpoints:
        raise ConfigError(f"{workdir} holds a different run ({'; '.join(conflicts)}): "
                          "use a new --workdir, or drop the conflicting options to resume it")
    metrics = workdir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size and not has_checkpoints:
        raise ConfigError(f"{workdir} holds results ({METRICS_FILE}) but no checkpoint to resume from: choose a new "
                          "--workdir so they are not overwritten")
    if has_checkpoints and not config.resume:
        raise ConfigError(f"{workdir} already has checkpoints and --no-resume was given: "
                          "choose a new --workdir, or drop --no-resume to continue that run")


def check_can_create(folder: Path) -> None:
    """Raise unless `folder` is, or can be made, a folder: its nearest existing ancestor is a writable folder."""
    nearest = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not nearest.is_dir():
        raise ConfigError(f"{nearest} is a file, not a folder: choose a new --workdir")
    if not os.access(nearest, os.W_OK):
        raise ConfigError(f"cannot write in {nearest}: choose a --workdir in a folder you can write to")


def created_workdir(path: Path, named: bool) -> Path:
    """The run folder, made if missing. One the user named may hold the run to resume; a default timestamped one is
    always fresh: `path`, or PATH-2, PATH-3, ... if a run started in the same second took that name meanwhile."""
    try:
        if named:
            path.mkdir(parents=True, exist_ok=True)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in itertools.count(1):
            candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as error:  # a place the permission check could not foresee (/proc, a read-only mount, ...)
        raise ConfigError(f"cannot make the run folder {path} ({error.strerror or one_line(error)}): choose a "
                          "--workdir in a folder you can write to") from None


@contextlib.contextmanager
def removed_if_left_empty(workdir: Path, made_here: bool) -> Iterator[None]:
    """A run folder this run made is removed again if the run fails before writing any file into it: a run that
    cannot start leaves nothing behind. A folder that existed, or holds a file, is never touched."""
    try:
        yield
    except BaseException:
        if made_here and workdir.is_dir() and not any(p.is_file() for p in workdir.rglob("*")):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def in_use(workdir: Path) -> bool:
    """Whether a training run holds the folder now (its lock is taken)."""
    try:
        with exclusive_use(Path(workdir)):
            return False
    except ConfigError:
        return True
    except OSError:  # no folder yet: nobody trains in it
        return False


@contextlib.contextmanager
def exclusive_use(workdir: Path, take_lock: bool = True) -> Iterator[None]:
    """Refuse a second run training into the same folder at the same time: their checkpoints and metrics would mix.

    A lock on the folder itself, taken by process 0 (`take_lock`; the other processes of a run write beside it);
    the system drops it when the process ends, however it ends.
    """
    if not take_lock:
        yield
        return
    folder = os.open(workdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{workdir} is in use by another training run: wait for it to end, or choose a new "
                              "--workdir") from None
        yield
    finally:
        os.close(folder)

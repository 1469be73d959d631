"""Orbax checkpoints of a run: WORKDIR/checkpoints/<global step>/{params, train_state, metadata}.

Every checkpoint describes itself (model, config, class names, normalisation, metrics, history, versions), so
predict and evaluate need nothing but the folder. The latest N and the best by test accuracy are kept; the latest
is never deleted. A partially written checkpoint (killed mid-save) lives in a tmp folder Orbax ignores, and a
corrupt one is skipped with a warning in favour of the previous good one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cifar_jax import distributed, parallel, rundir
from cifar_jax.config import TrainConfig, is_whole_number
from cifar_jax.data import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, Cifar10
from cifar_jax.errors import CheckpointError, CheckpointSaveError, CifarJaxError, first_line
from cifar_jax.flags import field_types

BEST_METRIC = "test_accuracy"
_VERSIONED_PACKAGES = ("cifar-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")

# What Orbax says about its routine work, at WARNING through absl: a mid-epoch save carries no test metrics (so
# by design), and evaluate and predict open checkpoints read-only (as they ask to).
ORBAX_ROUTINE_WARNINGS = ("tracked_metric", "read_only=True", "directory is read only")


def is_not_orbax_routine(record: logging.LogRecord) -> bool:
    """A filter for the absl logger: Orbax's INFO lines (every save, every open) and its routine warnings go; the
    logger's level, and everything else logged through it, are left alone."""
    if "orbax" not in record.pathname:
        return True
    if record.levelno < logging.WARNING:
        return False
    message = record.getMessage()
    return not (record.levelno == logging.WARNING and any(words in message for words in ORBAX_ROUTINE_WARNINGS))


logging.getLogger("absl").addFilter(is_not_orbax_routine)


@dataclasses.dataclass
class Restored:
    """What a checkpoint holds: numpy pytrees plus its JSON metadata."""

    step: int
    params: Any
    train_state: Optional[dict]
    metadata: dict


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def checkpoint_dir(workdir_or_checkpoints: str | Path) -> Path:
    """For evaluate and predict: accept either a run's workdir or its checkpoints/ folder."""
    return rundir.run_folder_of(workdir_or_checkpoints) / rundir.CHECKPOINTS_SUBDIR


def _best_metric(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


def open_manager(checkpoints: Path, keep_latest: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager of the folder `checkpoints`, keeping the latest `keep_latest` and the best by test accuracy.

    `max_to_keep` + `best_fn` together deleted the latest step (orbax-checkpoint 0.12), so retention is an explicit
    preservation policy; `best_fn` is still set because Orbax only writes metrics when it is.
    """
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep_latest),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_metric,
        best_mode="max",
        preservation_policy=preservation,
        enable_async_checkpointing=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoints, options=options)


@contextlib.contextmanager
def managed(workdir: str | Path, keep_latest: int = 3) -> Iterator[ocp.CheckpointManager]:
    """A manager for training, closed on the way out once its pending save is written.

    In a multi-process run a lost peer ends it as `PeerLostError`, and the pending save is left unfinished:
    its barrier would wait for the dead process (the previous checkpoint stays the latest good one).
    """
    manager = open_manager(rundir.checkpoints_dir(workdir), keep_latest)
    resume_hint = f"start every process again to resume from the last checkpoint in {Path(workdir)}"
    try:
        with distributed.peer_failures_as_errors(resume_hint):
            yield manager
    except distributed.PeerLostError:
        raise
    except BaseException:
        _close(manager, resume_hint)
        raise
    _close(manager, resume_hint)


def _close(manager: ocp.CheckpointManager, resume_hint: str) -> None:
    with save_failures_as_errors(manager), distributed.peer_failures_as_errors(resume_hint):
        manager.wait_until_finished()
        manager.close()


@contextlib.contextmanager
def save_failures_as_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
    """A save that failed in Orbax's background writer (a full disk, no permission, a file in the way) surfaces at
    the next save or wait: say it in one line."""
    try:
        yield
    except CifarJaxError:
        raise
    except Exception as error:
        raise CheckpointSaveError(
            f"could not write a checkpoint in {manager.directory} ({first_line(error)}): free disk space or fix "
            "the folder's permissions, then run the same command again to resume from the last checkpoint saved"
        ) from None


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
    with save_failures_as_errors(manager):
        manager.wait_until_finished()


def save(manager: ocp.CheckpointManager, step: int, params: Any, train_state: dict, metadata: dict,
         metrics: Optional[dict] = None) -> None:
    """Start an async save of host (numpy) copies; host copies keep donated device buffers out of the writer's way.

    Every process calls it; the arrays are replicated, so Orbax has process 0 write them (and the metadata).
    """
    host_params, host_state = jax.device_get((params, train_state))
    with save_failures_as_errors(manager):  # Orbax first waits for the previous save, which may have failed
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(host_params),
                train_state=ocp.args.StandardSave(host_state),
                metadata=ocp.args.JsonSave({**metadata, "versions": package_versions()}),
            ),
            metrics=metrics,
            force=True,
        )


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                  abstract_train_state: Optional[dict]) -> Restored:
    items = {
        "params": ocp.args.StandardRestore(abstract_params),
        "metadata": ocp.args.JsonRestore(),
    }
    if abstract_train_state is not None:
        items["train_state"] = ocp.args.StandardRestore(abstract_train_state)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    params = jax.tree.map(np.asarray, restored["params"])
    _check_finite(params, step)
    return Restored(step, params, restored.get("train_state"), checked_metadata(restored["metadata"]))


def _check_finite(params: Any, step: int) -> None:
    if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)):
        raise ValueError(f"checkpoint {step} holds non-finite parameters")


def run_metadata(config: TrainConfig, dataset: Cifar10, epoch: int, step_in_epoch: int, history: list[dict]) -> dict:
    """What a checkpoint records of its run, so evaluate and predict need nothing but the folder."""
    return {
        "model": config.model,
        "config": config.to_dict(),
        "class_names": list(CLASS_NAMES),
        "normalization": {"scale": 1 / 255, "standardize": config.standardize,
                          "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
        "epoch": epoch,  # epochs finished
        "step_in_epoch": step_in_epoch,  # steps of the next epoch already taken (mid-epoch saves)
        "metrics": history[-1] if history and step_in_epoch == 0 else None,
        "history": history,
        "data_source": dataset.source,
        "data_fingerprint": dataset.fingerprint,
    }


def read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return checked_metadata(restored["metadata"])


class MalformedMetadata(ValueError):
    """A checkpoint's record parses but is not one this package wrote: the checkpoint counts as unreadable."""


_METADATA_TYPES = {"model": str, "config": dict, "class_names": list, "normalization": dict, "epoch": int,
                   "step_in_epoch": int, "history": list}


def checked_metadata(metadata: Any) -> dict:
    """A checkpoint's record with every field evaluate, predict and resuming read, of the right type."""
    if not isinstance(metadata, dict):
        raise MalformedMetadata(f"its record is a {type(metadata).__name__}, not an object")
    for key, kind in _METADATA_TYPES.items():
        value = metadata.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MalformedMetadata(f"its record's {key!r} is {'missing' if key not in metadata else repr(value)[:60]}")
    if not all(isinstance(row, dict) for row in metadata["history"]) or not isinstance(
            metadata["normalization"].get("standardize"), bool) or len(metadata["class_names"]) < 2:
        raise MalformedMetadata("its record's history, normalization or class names are malformed")
    try:  # its fields and their types, not today's bounds on values: what an older version trained stays readable
        TrainConfig.from_dict(metadata["config"])
    except CifarJaxError as error:
        raise MalformedMetadata(f"its record's config is not valid ({error})") from None
    for name, kind in field_types(TrainConfig).items():
        value = metadata["config"].get(name)
        if value is not None and not _is_a(value, kind):
            raise MalformedMetadata(f"its record's config has {name}={value!r}, not a {kind.__name__}")
    return dict(metadata)


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def resolve_step(manager: ocp.CheckpointManager, step: str | int) -> int:
    """'latest', 'best' or a step number → an existing step number."""
    steps = manager.all_steps()
    where = manager.directory
    if not steps:
        raise CheckpointError(f"no checkpoint in {where}: train first with `cifar-jax train --workdir ...`")
    if step == "latest":
        return max(steps)
    if step == "best":
        best = manager.best_step()
        return max(steps) if best is None else best
    # A step number: an int, or its digits (from the command line); 8.9 or True are not steps.
    is_number = is_whole_number(step) or (isinstance(step, str) and step.isdigit())
    if not is_number:
        raise CheckpointError(f"step must be 'best', 'latest' or a whole step number, got {step!r}")
    number = int(step)
    if number not in steps:
        raise CheckpointError(f"no checkpoint at step {number} in {where}: available steps {sorted(steps)}")
    return number


def restore_newest_good(manager: ocp.CheckpointManager, abstract_params: Any, abstract_train_state: dict,
                        check_metadata: Callable[[dict], None]) -> Optional[Restored]:
    """The newest checkpoint that restores cleanly, or None if there is none.

    `check_metadata` sees each checkpoint's record before its arrays are read, and raises a CifarJaxError for one
    of another run (another model, other data): that checkpoint is left as it is. Corrupt ones (their record or
    arrays unreadable) are moved aside to WORKDIR/corrupt_checkpoints/ (kept for inspection, out of Orbax's way so
    the run can save that step again) with a warning. Every process reads the same files and so gives up on the
    same steps; process 0 alone moves them, once all have stopped reading.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for position, step in enumerate(steps):
        try:
            check_metadata(read_metadata(manager, step))
            return _restore_step(manager, step, abstract_params, abstract_train_state)
        except CifarJaxError:
            raise
        except Exception as error:  # a corrupt checkpoint may fail anywhere inside Orbax or TensorStore
            distributed.barrier(f"cifar_jax:checkpoint-{step}-unreadable")
            if parallel.is_main_process():
                fallback = "the previous one" if position + 1 < len(steps) else "the start: there is no earlier one"
                _quarantine(manager, step, error, fallback)
            distributed.barrier(f"cifar_jax:checkpoint-{step}-moved")
            manager.reload()
    return None


def _quarantine(manager: ocp.CheckpointManager, step: int, error: Exception, fallback: str) -> None:
    quarantine = Path(manager.directory).parent / rundir.CORRUPT_CHECKPOINTS_SUBDIR / f"{step}-{int(time.time())}"
    warnings.warn(f"checkpoint {step} in {manager.directory} is unreadable ({first_line(error)}); "
                  f"moving it to {quarantine} and falling back to {fallback}", stacklevel=3)
    quarantine.parent.mkdir(exist_ok=True)
    shutil.move(str(Path(manager.directory) / str(step)), quarantine)


def restore_for_inference(location: str | Path, step: str | int, abstract_params_for: Any) -> Restored:
    """Params and metadata of one checkpoint; `location` is a workdir, its checkpoints/ or one step's folder.

    `abstract_params_for(model_name)` gives the shapes the named model expects.
    """
    if not isinstance(location, (str, os.PathLike)):
        raise CheckpointError(f"expected the workdir of a training run (a folder path), got {location!r}")
    path = Path(location).expanduser().absolute()
    if rundir.is_checkpoint_step(path):
        path, step = path.parent, int(path.name)
    path = checkpoint_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoints folder at {path}: pass the --workdir of a training run")
    manager = open_manager(path, read_only=True)
    number = resolve_step(manager, step)
    try:
        metadata = read_metadata(manager, number)
        return _restore_step(manager, number, abstract_params_for(metadata["model"]), None)
    except Exception as error:
        raise CheckpointError(f"checkpoint {number} in {path} could not be read ({first_line(error)}): "
                              "choose another with --step") from None

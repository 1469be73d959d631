"""TensorBoard summaries of a run, in WORKDIR/tensorboard/: curves while it trains, its hyperparameters beside its
results, and the evaluation's pictures.

Written with tensorboardX, which needs no TensorFlow (TensorBoard itself is only needed to look:
`pip install 'cifar-jax[tensorboard]'`, then `tensorboard --logdir checkpoints/`). Only process 0 writes.
Every scalar's step is the optimizer step, so a resumed run continues the same curves: its writer purges whatever an
earlier writer logged from the step it resumes at (an epoch redone after a kill is logged once).
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from cifar_jax import rundir
from cifar_jax.callbacks import Callback, TrainingRun
from cifar_jax.errors import RunFolderError, one_line

HPARAMS_RUN = "hparams"  # the sub-run TensorBoard's HParams table reads, one per training run
EPOCH_SCALARS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "images_per_second",
                 "epoch_seconds")
RUNNING_EVERY_STEPS = 200  # the running train loss/accuracy, from sums the loop reads anyway (never an extra wait)


def summary_writer(logdir: Path, purge_step: Optional[int] = None):
    from tensorboardX import SummaryWriter  # imported when a run starts, not with the package

    # Event files are named by the second they were opened in: two writers opened in the same second (a quick
    # resume, the hparams row) would overwrite each other's file without a suffix of their own.
    try:
        return SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=10, filename_suffix=f".{time.time_ns()}")
    except OSError as error:  # a file where the folder goes, no permission, a full disk
        rundir.raise_unwritable(logdir, error)


class TensorBoardSummaries(Callback):
    """Per epoch: train/test loss and accuracy, learning rate, images/s, epoch seconds (tags epoch/...). Every
    RUNNING_EVERY_STEPS steps: the epoch's running train loss and accuracy (running/...). At the end: the config as
    hyperparameters with the final and best test accuracy, for the HParams table."""

    def __init__(self):
        self.writer = None
        self.last_running_step = 0

    def on_train_start(self, run: TrainingRun) -> None:
        if run.is_main_process:
            # What an earlier writer logged after the step this run resumes from is redone: hidden, then rewritten.
            self.writer = summary_writer(rundir.tensorboard_dir(run.workdir), purge_step=run.start_step + 1)
            self.last_running_step = run.start_step

    def on_train_progress(self, run: TrainingRun, global_step: int, metrics: dict) -> None:
        if self.writer is not None and global_step - self.last_running_step >= RUNNING_EVERY_STEPS:
            for name, value in metrics.items():
                self.writer.add_scalar(f"running/{name}", value, global_step)
            self.last_running_step = global_step

    def on_epoch_end(self, run: TrainingRun, metrics: dict) -> None:
        if self.writer is None:
            return
        step = metrics["epoch"] * run.steps_per_epoch
        for name in EPOCH_SCALARS:
            if name in metrics:
                self.writer.add_scalar(f"epoch/{name}", metrics[name], step)
        self.writer.flush()

    def on_train_end(self, run: TrainingRun) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        if run.history:
            write_hparams(rundir.tensorboard_dir(run.workdir), run.config.to_dict(), run.history)


def hparam_values(config: Mapping[str, Any]) -> dict:
    """The config as TensorBoard hyperparameters: numbers, text and booleans as they are, unset ones as 'unset'."""
    return {name: value if isinstance(value, (bool, int, float, str)) else "unset" if value is None else str(value)
            for name, value in config.items()}


def write_hparams(logdir: Path, config: Mapping[str, Any], history: list[dict]) -> None:
    """The run's row of the HParams table (rewritten whole, so a resumed run has one row)."""
    shutil.rmtree(logdir / HPARAMS_RUN, ignore_errors=True)
    best = max(history, key=lambda row: row["test_accuracy"])
    metrics = {"hparam/test_accuracy": history[-1]["test_accuracy"], "hparam/test_loss": history[-1]["test_loss"],
               "hparam/best_test_accuracy": best["test_accuracy"], "hparam/epochs_trained": history[-1]["epoch"]}
    from tensorboardX.summary import hparams

    # What SummaryWriter.add_hparams writes, written straight into the sub-run: add_hparams would open a second
    # writer on the parent folder too.
    with summary_writer(logdir / HPARAMS_RUN) as writer:
        for summary in hparams(hparam_values(config), metrics):
            writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            writer.add_scalar(name, value)


def write_images(workdir: Path, step: int, pngs: Mapping[str, Path]) -> None:
    """PNG files (the evaluation's confusion matrix, its test images with predictions) as images at `step`, in the
    run folder of `workdir` (which may name its checkpoints/ or one checkpoint). Reading a run must not fail for
    want of a summary: a folder that cannot take them gets a warning instead."""
    from PIL import Image

    try:
        with summary_writer(rundir.tensorboard_dir(rundir.run_folder_of(workdir))) as writer:
            for name, path in pngs.items():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                writer.add_image(f"evaluation/{name}", pixels, step, dataformats="HWC")
    except (OSError, RunFolderError) as error:
        warnings.warn(f"no TensorBoard images written: {one_line(error)}")

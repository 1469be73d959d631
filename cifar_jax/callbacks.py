"""Hooks the training loop calls as a run goes: at its start, every few dozen steps, after each epoch and at its end.

Everything a run does beside training lives here, outside the loop and outside jitted code: writing
metrics.jsonl, the epoch's line on the terminal, the training curves; TensorBoard summaries (summaries.py) plug in
the same way, and so can a sweep's pruning.
The yardsticks are Keras's callbacks and Lightning's `Callback`; this is the small part of them a run needs:

    class StopBelow(Callback):
        def on_epoch_end(self, run, metrics):
            if metrics["test_accuracy"] < 0.2:
                run.request_stop("below 0.2")  # the loop saves a checkpoint and returns, stopped_by="below 0.2"

    train(config, callbacks=[StopBelow()])

Every process of a multi-process run calls every callback; one that writes files does so on process 0 only
(`run.is_main_process`), and a stop is taken from process 0's callbacks, so all processes stop together.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from cifar_jax import rundir
from cifar_jax.config import TrainConfig


@dataclasses.dataclass
class TrainingRun:
    """What callbacks see of a run in progress."""

    config: TrainConfig  # resolved: every field set
    workdir: Path
    steps_per_epoch: int
    history: list[dict]  # one row per finished epoch (the latest included in on_epoch_end)
    is_main_process: bool
    start_step: int = 0  # the optimizer step this (resumed) run starts from
    stop_reason: Optional[str] = None

    def request_stop(self, reason: str) -> None:
        """End the run cleanly after the current epoch: a checkpoint is saved and the result's `stopped_by` says
        why. Asked from on_train_progress, the run still finishes its epoch first; asked in the last epoch, the run
        simply finishes."""
        self.stop_reason = self.stop_reason or reason


class Callback:
    """Override the hooks you need; the loop calls them in the order the callbacks were given."""

    def on_train_start(self, run: TrainingRun) -> None:
        """Before the first step (of this process's part of the run; `run.history` holds a resumed run's epochs)."""

    def on_train_progress(self, run: TrainingRun, global_step: int, metrics: dict) -> None:
        """Every `train.PROGRESS_STEPS` steps: the epoch's running `train_loss` and `train_accuracy` so far."""

    def on_epoch_end(self, run: TrainingRun, metrics: dict) -> None:
        """After each epoch's evaluation: the row that goes into metrics.jsonl (epoch, train/test loss and accuracy,
        learning_rate, epoch_seconds, images_per_second)."""

    def on_train_end(self, run: TrainingRun) -> None:
        """When the run ends, however it ends: finished, stopped by a callback, interrupted (after its checkpoint is
        saved), or by an error (then this hook's own errors are ignored and the run's error is raised)."""


class MetricsFile(Callback):
    """WORKDIR/metrics.jsonl, rewritten whole after each epoch (a resumed run's earlier epochs included)."""

    def on_train_start(self, run: TrainingRun) -> None:
        if run.is_main_process:
            rundir.write_history(run.workdir, run.history)

    def on_epoch_end(self, run: TrainingRun, metrics: dict) -> None:
        if run.is_main_process:
            rundir.write_history(run.workdir, run.history)


class EpochLog(Callback):
    """One line per epoch on the terminal."""

    def on_epoch_end(self, run: TrainingRun, metrics: dict) -> None:
        if run.is_main_process:
            print(epoch_line(metrics), flush=True)


class TrainingCurves(Callback):
    """WORKDIR/plots/training_curves.png, redrawn whenever a run (or its resumption) ends."""

    def on_train_end(self, run: TrainingRun) -> None:
        if run.is_main_process and run.history:
            from cifar_jax import plots  # matplotlib loads only here, not on every start-up

            plots.plot_training_curves(run.history, rundir.plot_path(run.workdir, "training_curves"))


def epoch_line(metrics: dict) -> str:
    return (f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f} | "
            f"test loss {metrics['test_loss']:.4f} acc {metrics['test_accuracy']:.4f} | "
            f"{metrics['epoch_seconds']:.1f}s, {metrics['images_per_second']:,.0f} img/s")


def call_all(callbacks: Sequence[Callback], hook: str, *args) -> None:
    for callback in callbacks:
        getattr(callback, hook)(*args)


def end_all(callbacks: Sequence[Callback], run: TrainingRun, failing: bool) -> None:
    """on_train_end of every callback, even when one of them fails (each may hold a file open); the first failure is
    raised after all have run, unless the run is already failing with an error of its own."""
    first_error = None
    for callback in callbacks:
        try:
            callback.on_train_end(run)
        except Exception as error:
            first_error = first_error or error
    if first_error is not None and not failing:
        raise first_error

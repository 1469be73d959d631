"""The training loop: make or resume a run's state, train epoch by epoch, evaluate, save checkpoints, call back.

Everything that computes lives in `steps.py` (pure, jitted); the run folder in `rundir.py`; checkpoints in
`checkpoint.py`; what happens after each epoch (metrics file, terminal line, curves, and any callback a caller adds)
in `callbacks.py`. Nothing that inference needs lives here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cifar_jax import checkpoint, distributed, optim, parallel, rundir
from cifar_jax.callbacks import Callback, EpochLog, MetricsFile, TrainingCurves, TrainingRun, call_all, end_all
from cifar_jax.config import MAX_TOTAL_STEPS, TrainConfig, conflicting_fields, profile_step_range
from cifar_jax.data import Cifar10, load_cifar10
from cifar_jax.errors import CheckpointError, ConfigError, TrainingDivergedError
from cifar_jax.models import init_params
from cifar_jax.summaries import TensorBoardSummaries
from cifar_jax.optim import create_optimizer
from cifar_jax.profiling import StepTrace
from cifar_jax.steps import (BatchedInference, TrainState, build_train_step, empty_running_metrics,
                             finite_on_this_process, loss_and_accuracy)

PROGRESS_STEPS = 50  # how often the loop reads the running metrics back (each read waits for the device)


@dataclasses.dataclass
class TrainResult:
    history: list[dict]  # one dict per finished epoch, the same as WORKDIR/metrics.jsonl
    workdir: Path
    params: Any  # final parameters as host numpy arrays
    interrupted: bool = False  # stopped early by SIGINT/SIGTERM after saving a checkpoint
    stopped_by: Optional[str] = None  # the signal's name when interrupted, or why a callback stopped the run early


@dataclasses.dataclass
class RunPosition:
    """Where a run stands: finished epochs, steps into the next one, and the history so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)


def default_callbacks(config: TrainConfig) -> list[Callback]:
    """What every run does: metrics.jsonl, the epoch line, the curves, and (unless turned off) TensorBoard summaries."""
    return [MetricsFile(), EpochLog(), TrainingCurves(), *([TensorBoardSummaries()] if config.tensorboard else [])]


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled example order of one epoch: a function of (seed, epoch) only, so resuming replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """SIGINT/SIGTERM as a flag the loop checks after each step, so it can save and exit cleanly (main thread only:
    train() called from another thread runs without the flag)."""
    requested = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def note(signum, _frame):
        requested["signal"] = signal.Signals(signum).name

    with distributed.signals_handled_by(note):
        yield requested


def restore_or_init(config: TrainConfig, manager, optimizer, dataset: Cifar10) -> tuple[Any, TrainState, dict,
                                                                                          RunPosition]:
    """The newest good checkpoint's state and position, or a fresh start."""
    graphdef, params = init_params(config.model, config.seed)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    running = empty_running_metrics()
    if not manager.all_steps():
        refuse_fresh_start_over_results(config, manager)
        return graphdef, state, running, RunPosition()

    def check_same_run(saved: dict) -> None:
        if saved["model"] != config.model:
            raise CheckpointError(f"{manager.directory} holds checkpoints of {saved['model']}, not "
                                  f"{config.model}: use a new --workdir for a different model")
        # Another run's state is not a corrupt one: refused, and left where it is.
        conflicts = conflicting_fields(TrainConfig.from_dict(saved["config"]), config)
        if conflicts:
            raise CheckpointError(f"{manager.directory} holds checkpoints of a different run ({'; '.join(conflicts)}):"
                                  " use a new --workdir, or drop the conflicting options to resume it")
        trained_on = saved.get("data_fingerprint")  # absent in checkpoints saved before it was recorded
        if trained_on is not None and trained_on != dataset.fingerprint:
            raise CheckpointError(f"{manager.directory} was trained on other data ({saved.get('data_source')}, "
                                  f"{trained_on['train_images']} training images) than {dataset.source} "
                                  f"({len(dataset.train_labels)}): resume it with its own --data and --data-dir, "
                                  "or use a new --workdir")

    template = {"opt_state": state.opt_state, "step": state.step, "running": running}
    restored = checkpoint.restore_newest_good(manager, params, jax.device_get(template), check_same_run)
    if restored is None:
        refuse_fresh_start_over_results(config, manager)
        return graphdef, state, running, RunPosition()
    meta, saved = restored.metadata, restored.train_state
    state = TrainState(restored.params, saved["opt_state"], jnp.asarray(saved["step"], jnp.int32))
    return graphdef, state, saved["running"], RunPosition(meta["epoch"], meta["step_in_epoch"], meta["history"])


def refuse_fresh_start_over_results(config: TrainConfig, manager) -> None:
    """A run folder with results but no usable checkpoint (all unreadable, or only a save a kill cut short) is not
    trained afresh: that would overwrite its metrics."""
    if rundir.read_history(config.workdir):
        raise CheckpointError(f"no usable checkpoint in {manager.directory} (unreadable ones are moved to "
                              f"{rundir.CORRUPT_CHECKPOINTS_SUBDIR}/), and {config.workdir} holds results: they are "
                              "kept; train into a new --workdir")


def prepared_run(config: TrainConfig) -> tuple[TrainConfig, parallel.DeviceSet, Cifar10, bool]:
    """The resolved config (its workdir made), its devices, its data and whether the workdir is new; or an error
    before anything is written."""
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() takes a TrainConfig, got {type(config).__name__}: "
                          "TrainConfig(model=..., ...) or TrainConfig.from_dict(values)")
    named_workdir = bool(config.workdir)
    if not named_workdir and distributed.is_multi_process():
        raise ConfigError("a run over several processes needs --workdir: the same folder for every process, on a "
                          "filesystem every host sees")
    config = config.with_workdir().resolved()
    devices = parallel.DeviceSet.select(config.num_devices)
    config = config.for_devices(devices.global_count, devices.defaults.eval_batch_size)
    if named_workdir:
        rundir.check_workdir(config)
    else:
        rundir.check_can_create(Path(config.workdir))
    dataset = load_cifar10(config.data_dir, config.data)
    steps = optim.steps_per_epoch(len(dataset.train_labels), config.batch_size)  # refuses a batch over the data
    if config.epochs * steps > MAX_TOTAL_STEPS:  # the step counter is int32
        raise ConfigError(f"{config.epochs:,} epochs of {steps:,} steps exceed the {MAX_TOTAL_STEPS:,} steps a run can "
                          "count: ask for fewer --epochs or a larger --batch-size")
    # Only now: a run that cannot start leaves no empty folder behind.
    is_new = not Path(config.workdir).expanduser().exists()
    workdir = rundir.created_workdir(Path(config.workdir).expanduser(), named_workdir)
    return dataclasses.replace(config, workdir=str(workdir)), devices, dataset, is_new or not named_workdir


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train (or resume) a run as configured; returns the per-epoch history, the workdir and the final params.

    `callbacks` are called after the built-in ones (metrics.jsonl, the epoch line, the curves): see callbacks.py.
    """
    run_started = time.perf_counter()
    config, devices, dataset, new_workdir = prepared_run(config)
    workdir = Path(config.workdir)
    optimizer = create_optimizer(config, optim.steps_per_epoch(len(dataset.train_labels), config.batch_size))
    with rundir.removed_if_left_empty(workdir, new_workdir), \
            rundir.exclusive_use(workdir, take_lock=parallel.is_main_process()), \
            checkpoint.managed(workdir, keep_latest=config.keep_checkpoints) as manager:
        graphdef, state, running, position = restore_or_init(config, manager, optimizer, dataset)
        if position.epoch > config.epochs:
            raise ConfigError(f"{workdir} has already trained {position.epoch} epochs, more than the "
                              f"{config.epochs} asked for: ask for --epochs {position.epoch} or more, or use a new "
                              "--workdir")
        distributed.barrier("cifar_jax:run-checked")  # every process has read the workdir before it changes
        if parallel.is_main_process():  # only now that the workdir is known to hold this run
            rundir.write_config(workdir, config)
        loop = EpochLoop(config, dataset, devices, manager, graphdef, optimizer,
                         [*default_callbacks(config), *callbacks])
        with stop_requests() as stop:
            return loop.run(state, running, position, stop, run_started)


class EpochLoop:
    """One run's training: its compiled steps, its device-resident data, and the callbacks it calls."""

    def __init__(self, config: TrainConfig, dataset: Cifar10, devices: parallel.DeviceSet, manager, graphdef,
                 optimizer, callbacks: Sequence[Callback]):
        self.config, self.dataset, self.devices, self.manager = config, dataset, devices, manager
        self.callbacks = list(callbacks)
        self.steps_per_epoch = optim.steps_per_epoch(len(dataset.train_labels), config.batch_size)
        self.learning_rate = optim.learning_rate_schedule(config, self.steps_per_epoch)
        self.train_step = build_train_step(config, graphdef, optimizer, devices)
        self.inference = BatchedInference(graphdef, config.standardize, devices, config.eval_batch_size,
                                          config.tta_flip, config.kernels)
        self.train_arrays = devices.replicate((dataset.train_images, dataset.train_labels))
        self.show_progress = config.progress and parallel.is_main_process()
        step_range = profile_step_range(config.profile_steps) if config.profile_steps else None
        self.trace = StepTrace(step_range, Path(config.workdir) / rundir.PROFILE_SUBDIR)

    def run(self, state: TrainState, running: dict, position: RunPosition, stop: dict,
            run_started: Optional[float]) -> TrainResult:
        self.state, self.running = self.devices.replicate((state, running))
        self.run_started = run_started
        start_step = position.epoch * self.steps_per_epoch + position.step_in_epoch
        run = TrainingRun(self.config, Path(self.config.workdir), self.steps_per_epoch, list(position.history),
                          parallel.is_main_process(), start_step)
        try:
            call_all(self.callbacks, "on_train_start", run)
            result = self._epochs(run, position, stop)
        except BaseException:
            self.trace.stop(self.state)
            end_all(self.callbacks, run, failing=True)
            raise
        self.trace.stop(self.state)
        end_all(self.callbacks, run, failing=False)
        return result

    def _epochs(self, run: TrainingRun, position: RunPosition, stop: dict) -> TrainResult:
        for epoch in range(position.epoch, self.config.epochs):
            first_step = position.step_in_epoch if epoch == position.epoch else 0
            steps_done, stop_signal = self._train_epoch(run, epoch, first_step, stop)
            if stop_signal and steps_done < self.steps_per_epoch:
                # A stop on an epoch's last step instead finishes the epoch below: a mid-epoch checkpoint there would
                # take the optimizer step the epoch's own checkpoint needs, and the resumed run could never save it.
                self._save(RunPosition(epoch, steps_done, run.history), None)
                return self._stopped(run, stop_signal, epoch, steps_done)
            metrics = self._end_epoch(run, epoch, first_step)
            saved = bool(stop_signal) or (epoch + 1) % self.config.checkpoint_every == 0 \
                or epoch + 1 == self.config.epochs
            if saved:  # before the callbacks: one that fails (a full disk) cannot cost the epoch
                self._save(RunPosition(epoch + 1, 0, run.history), metrics)
            call_all(self.callbacks, "on_epoch_end", run, metrics)
            stop_reason = distributed.value_of_process_zero(run.stop_reason)
            if stop_reason and not saved:
                self._save(RunPosition(epoch + 1, 0, run.history), metrics)
            if stop_signal:
                return self._stopped(run, stop_signal, epoch, steps_done)
            if stop_reason and epoch + 1 < self.config.epochs:
                return self._result(run, stopped_by=stop_reason)
        return self._result(run)

    def _train_epoch(self, run: TrainingRun, epoch: int, first_step: int, stop: dict) -> tuple[int, Optional[str]]:
        """The epoch's steps from `first_step`: (steps done, the stop signal that ended it early, if any)."""
        config, devices = self.config, self.devices
        order = epoch_order(config.seed, epoch, len(self.dataset.train_labels))
        bar = tqdm(total=self.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not self.show_progress, leave=False, dynamic_ncols=True)
        self.epoch_started = time.perf_counter()
        steps_done, stop_signal = first_step, None
        for step_in_epoch in range(first_step, self.steps_per_epoch):
            batch = order[step_in_epoch * config.batch_size:(step_in_epoch + 1) * config.batch_size]
            self.trace.before_step(epoch * self.steps_per_epoch + step_in_epoch)
            self.state, self.running = self.train_step(self.state, self.running, *self.train_arrays,
                                                       devices.split(batch))
            steps_done = step_in_epoch + 1
            self.trace.after_step(epoch * self.steps_per_epoch + steps_done, self.state)
            devices.wait_every_few_programs(steps_done, self.state)
            self._report_first_step()
            bar.update(1)
            global_step = epoch * self.steps_per_epoch + steps_done
            stop_signal = distributed.agreed_stop(stop["signal"], global_step)
            if stop_signal:
                break
            if steps_done % PROGRESS_STEPS == 0:
                self._read_progress(run, epoch, global_step, bar)
        bar.close()
        return steps_done, stop_signal

    def _report_first_step(self) -> None:
        """The start-up figure, once: data loaded, state restored, step compiled, one step run."""
        if self.run_started is None:
            return
        jax.block_until_ready(self.state)
        if parallel.is_main_process():
            tqdm.write(f"first step done {time.perf_counter() - self.run_started:.1f} s after the run started "
                       "(data loaded, step compiled)")
        self.run_started = None

    def _read_progress(self, run: TrainingRun, epoch: int, global_step: int, bar: tqdm) -> None:
        sums = self._checked_sums(epoch)  # on every process, so all of them stop together
        metrics = _running_means(sums)
        if self.show_progress:
            bar.set_postfix({"loss": f"{metrics['train_loss']:.4f}", "acc": f"{metrics['train_accuracy']:.4f}"})
        call_all(self.callbacks, "on_train_progress", run, global_step, metrics)

    def _end_epoch(self, run: TrainingRun, epoch: int, first_step: int) -> dict:
        """Evaluate and record the epoch's row in the history; returns the row."""
        means = _running_means(self._checked_sums(epoch))
        epoch_seconds = time.perf_counter() - self.epoch_started
        test_logits = self.inference(self.state.params, self.dataset.test_images)
        test_loss, test_accuracy = loss_and_accuracy(test_logits, self.dataset.test_labels)
        steps_run = self.steps_per_epoch - first_step
        metrics = {
            "epoch": epoch + 1,
            **means,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "learning_rate": optim.rate_at(self.learning_rate, (epoch + 1) * self.steps_per_epoch - 1),
            "epoch_seconds": epoch_seconds,
            "images_per_second": steps_run * self.config.batch_size / epoch_seconds if steps_run else 0.0,
        }
        run.history.append(metrics)
        self.running = self.devices.replicate(jax.device_get(empty_running_metrics()))
        return metrics

    def _save(self, position: RunPosition, metrics: Optional[dict]) -> None:
        host_state = parallel.unreplicate(self.state)
        train_state = {"opt_state": host_state.opt_state, "step": host_state.step,
                       "running": parallel.unreplicate(self.running)}
        meta = checkpoint.run_metadata(self.config, self.dataset, position.epoch, position.step_in_epoch,
                                       position.history)
        checkpoint.save(self.manager, int(host_state.step), host_state.params, train_state, meta, metrics)

    def _stopped(self, run: TrainingRun, stop_signal: str, epoch: int, steps_done: int) -> TrainResult:
        checkpoint.wait_for_saves(self.manager)
        if parallel.is_main_process():
            print(f"{stop_signal}: saved a checkpoint at epoch {epoch + 1}, step {steps_done}; resume with: "
                  f"cifar-jax train --workdir {run.workdir}", flush=True)
        return self._result(run, interrupted=True, stopped_by=stop_signal)

    def _result(self, run: TrainingRun, interrupted: bool = False, stopped_by: Optional[str] = None) -> TrainResult:
        params = parallel.unreplicate(self.state).params
        return TrainResult(run.history, run.workdir, params, interrupted, stopped_by)

    def _checked_sums(self, epoch: int) -> dict:
        """The running metric sums on the host, raising if a step so far had a NaN/Inf loss or left NaN/Inf
        parameters (a bad gradient in the latest step, whose loss was still finite)."""
        sums = {k: v.item() for k, v in parallel.unreplicate(self.running).items()}
        if sums["first_nonfinite_step"] < 0 and not finite_on_this_process(self.state.params):
            sums["first_nonfinite_step"] = int(self.state.step.addressable_data(0))
        if sums["first_nonfinite_step"] >= 0:
            raise TrainingDivergedError(
                f"loss or gradients became NaN/Inf in epoch {epoch + 1} at step {sums['first_nonfinite_step']} of the "
                "run: train again in a new --workdir with a lower --learning-rate (checkpoints saved before it are "
                "kept)")
        return sums


def _running_means(sums: dict) -> dict:
    count = max(sums["count"], 1)
    return {"train_loss": sums["loss_sum"] / count, "train_accuracy": sums["correct"] / count}

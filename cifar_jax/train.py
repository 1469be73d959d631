"""Training: state, loss, the jitted data-parallel steps, and the loop that strings data → step → eval → checkpoint.

The steps are pure per-device functions: they take the whole (device-resident, uint8) dataset and this device's
share of the step's indices as arguments, so the host only chooses indices and nothing but those crosses to the
device per step. `parallel.DeviceSet.data_parallel` runs them on every device at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from cifar_jax import checkpoint, distributed, optim, parallel
from cifar_jax.augment import Augmentation, augment_batch, augmentation_for, example_keys
from cifar_jax.config import TrainConfig, conflicting_fields
from cifar_jax.data import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, Cifar10, load_cifar10, normalize_images
from cifar_jax.errors import CheckpointError, ConfigError, TrainingDivergedError
from cifar_jax.models import create_model
from cifar_jax.optim import create_optimizer

PROGRESS_REFRESH_STEPS = 50  # how often the bar reads metrics back; each read waits for the device


class TrainState(NamedTuple):
    params: Any  # plain nested dict of arrays (nnx.State as a pure dict)
    opt_state: Any
    step: jax.Array  # optimizer steps taken so far, int32


@dataclasses.dataclass
class TrainResult:
    history: list[dict]  # one dict per finished epoch, the same as WORKDIR/metrics.jsonl
    workdir: Path
    params: Any  # final parameters as host numpy arrays
    interrupted: bool = False  # stopped early by SIGINT/SIGTERM after saving a checkpoint


# ---------------------------------------------------------------- model, optimizer, loss


def init_params(model_name: str, seed: int) -> tuple[nnx.GraphDef, dict]:
    """The model's structure (static) and its parameters as a plain dict pytree."""
    graphdef, params = nnx.split(create_model(model_name, seed), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def abstract_model(model_name: str) -> tuple[nnx.GraphDef, dict]:
    """A model's structure and parameter shapes/dtypes, built without initialising anything."""
    return jax.eval_shape(lambda: init_params(model_name, 0))


def abstract_params(model_name: str) -> dict:
    """Parameter shapes/dtypes of a model without initialising it (for restoring checkpoints)."""
    return abstract_model(model_name)[1]


def apply_model(graphdef: nnx.GraphDef, params: dict, images: jax.Array, dtype: str = "float32") -> jax.Array:
    """float32 logits. With dtype bfloat16 the pass runs on bfloat16 copies of the float32 parameters, whose
    gradients come back float32 through the cast (mixed precision: the optimizer never sees bfloat16)."""
    if dtype != "float32":
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        images = images.astype(dtype)
    return nnx.merge(graphdef, nnx.State(params))(images).astype(jnp.float32)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy on integer class ids (Keras's sparse_categorical_crossentropy),
    against targets with `label_smoothing` of the uniform distribution mixed in."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def empty_running_metrics() -> dict:
    """Sums over the steps of an epoch so far; kept on the device and threaded through the step."""
    return {
        "loss_sum": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "first_nonfinite_step": jnp.full((), -1, jnp.int32),
    }


# ---------------------------------------------------------------- per-device steps


def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


_all_finite_jit = jax.jit(all_finite)


def finite_on_this_process(tree_replicated) -> bool:
    """all_finite of a replicated pytree, computed on this process's first device: a program on one device, with no
    collective to interleave with the steps still in flight of a multi-process run."""
    return bool(_all_finite_jit(jax.tree.map(lambda x: x.addressable_data(0), tree_replicated)))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, standardize: bool,
                    augmentation: Optional[Augmentation] = None, seed: int = 0,
                    label_smoothing: float = 0.0, dtype: str = "float32") -> Callable:
    """One data-parallel SGD step on one device's share of the global batch.

    With `augmentation`, each image is augmented with a key from (seed, step, its dataset index), so resuming
    replays it exactly and the device count does not change it.
    """

    def train_step(state: TrainState, running: dict, images_all: jax.Array, labels_all: jax.Array,
                   batch_indices: jax.Array) -> tuple[TrainState, dict]:
        images_uint8 = images_all[batch_indices]
        if augmentation is not None:
            images_uint8 = augment_batch(images_uint8, example_keys(seed, state.step, batch_indices), augmentation)
        images = normalize_images(images_uint8, standardize)
        labels = labels_all[batch_indices]

        def mean_loss(params):
            logits = apply_model(graphdef, params, images, dtype)
            return cross_entropy_loss(logits, labels, label_smoothing).mean(), logits

        (loss, logits), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, parallel.AXIS_NAME)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # Smoothing shapes only the gradient: train_loss is the true class's cross-entropy, like test_loss, so the
        # two curves (and runs with different smoothing) compare.
        reported_loss = cross_entropy_loss(logits, labels).mean() if label_smoothing else loss
        batch_loss_sum = jax.lax.psum(reported_loss * labels.shape[0], parallel.AXIS_NAME)
        # Only the loss is checked here. A NaN/Inf gradient makes the parameters NaN/Inf for good (every optimizer
        # here adds it in), so the next step's loss shows it, and the loop checks the parameters whenever it reads
        # these sums. Checking every gradient element in the step cost model1 b32 13% and b128 8% (README).
        finite = jnp.isfinite(batch_loss_sum)
        first_bad = running["first_nonfinite_step"]
        running = {
            "loss_sum": running["loss_sum"] + batch_loss_sum,
            "correct": running["correct"] + jax.lax.psum((logits.argmax(-1) == labels).sum(), parallel.AXIS_NAME),
            "count": running["count"] + jax.lax.psum(labels.shape[0], parallel.AXIS_NAME),
            "first_nonfinite_step": jnp.where((first_bad < 0) & ~finite, state.step + 1, first_bad),
        }
        return TrainState(params, opt_state, state.step + 1), running

    return train_step


def build_train_step(config: TrainConfig, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                     devices: parallel.DeviceSet) -> Callable:
    """The training loop's step as configured, run data-parallel over the run's devices (also what `benchmark` times).

    State and running metrics are donated: each step updates them in place instead of copying.
    """
    augmentation = augmentation_for(config.augment, config.crop_padding, config.pad_mode, config.cutout)
    step = make_train_step(graphdef, optimizer, config.standardize, augmentation, config.seed,
                           config.label_smoothing, config.dtype)
    return devices.data_parallel(step, split_argnums=(4,), donate_argnums=(0, 1))


def inference_logits(graphdef: nnx.GraphDef, params: dict, images: jax.Array, tta_flip: bool = False) -> jax.Array:
    """Logits of normalised images for evaluation and prediction; with `tta_flip`, averaged with the mirror images'."""
    logits = apply_model(graphdef, params, images)
    if tta_flip:
        logits = (logits + apply_model(graphdef, params, images[:, :, ::-1, :])) / 2
    return logits


def make_predict_step(graphdef: nnx.GraphDef, standardize: bool, tta_flip: bool = False) -> Callable:
    """Logits for one device's share of an evaluation batch (indices into the device-resident images)."""

    def predict_step(params: dict, images_all: jax.Array, indices: jax.Array) -> jax.Array:
        return inference_logits(graphdef, params, normalize_images(images_all[indices], standardize), tta_flip)

    return predict_step


# ---------------------------------------------------------------- host-side helpers


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled example order of one epoch: a function of (seed, epoch) only, so resuming replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def padded_eval_batches(num_examples: int, global_batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Index batches covering every example exactly once; the last is padded with index 0 and masked out."""
    batches = []
    for start in range(0, num_examples, global_batch):
        indices = np.arange(start, min(start + global_batch, num_examples), dtype=np.int32)
        mask = np.ones(global_batch, bool)
        mask[len(indices):] = False
        batches.append((np.pad(indices, (0, global_batch - len(indices))), mask))
    return batches


class Evaluator:
    """Logits for every image of a device-resident set, exactly once, whatever the batch and device count."""

    def __init__(self, graphdef: nnx.GraphDef, standardize: bool, global_batch: int, devices: parallel.DeviceSet,
                 tta_flip: bool = False):
        self._predict = devices.data_parallel(make_predict_step(graphdef, standardize, tta_flip), split_argnums=(2,),
                                              split_output=True)
        self.global_batch = global_batch
        self.devices = devices

    def logits(self, params_replicated: Any, images_replicated: jax.Array, num_examples: int) -> np.ndarray:
        outputs = []
        for indices, mask in padded_eval_batches(num_examples, self.global_batch):
            logits = self._predict(params_replicated, images_replicated, self.devices.split(indices))
            outputs.append((logits, mask))
            parallel.wait_if_queue_full(outputs)
        # Reading back only after every batch is queued keeps the device busy.
        return np.concatenate([self.devices.gather(logits)[mask] for logits, mask in outputs])


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of host logits against integer labels."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(-1) == labels).mean())


@contextlib.contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so it can save and exit cleanly.

    Only the main thread may handle signals: train() called from another thread runs without the flag."""
    requested = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, _frame):
        requested["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def write_json_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_history(workdir: Path, history: list[dict]) -> None:
    """WORKDIR/metrics.jsonl, one object per finished epoch; rewritten whole so a kill never leaves half a line."""
    write_json_atomically(workdir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def checkpoint_metadata(config: TrainConfig, dataset: Cifar10, epoch: int, step_in_epoch: int,
                        history: list[dict]) -> dict:
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


# ---------------------------------------------------------------- the run


def check_workdir(config: TrainConfig) -> None:
    """Refuse a run folder that would mix this run with a different earlier one (before anything is created)."""
    workdir = Path(config.workdir).expanduser()
    saved_config_path = workdir / "config.json"
    checkpoints = checkpoint.run_checkpoints(workdir)
    check_can_create(checkpoints)
    if workdir.name == checkpoint.CHECKPOINTS_SUBDIR and (workdir.parent / "config.json").exists():
        raise ConfigError(f"{workdir} is the checkpoints folder of the run in {workdir.parent}: resume that run with "
                          f"--workdir {workdir.parent}, or choose a new --workdir")
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
    if saved_config_path.exists():
        conflicts = conflicting_fields(TrainConfig.load(saved_config_path), config)  # unreadable: refused, kept
        # Without a checkpoint the earlier run left nothing to mix with (it diverged in its first epoch, say): its
        # config.json is rewritten. Results without checkpoints are refused below.
        if conflicts and has_checkpoints:
            raise ConfigError(f"{workdir} holds a different run ({'; '.join(conflicts)}): "
                              "use a new --workdir, or drop the conflicting options to resume it")
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size and not has_checkpoints:
        raise ConfigError(f"{workdir} holds results (metrics.jsonl) but no checkpoint to resume from: choose a new "
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


@contextlib.contextmanager
def exclusive_use(workdir: Path) -> Iterator[None]:
    """Refuse a second run training into the same folder at the same time: their checkpoints and metrics would mix.

    A lock on the folder itself, taken by process 0 (the other processes of a run write beside it); the system
    drops it when the process ends, however it ends.
    """
    if not parallel.is_main_process():
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


def created_workdir(path: Path, named: bool) -> Path:
    """The run folder, made if missing. One the user named may hold the run to resume; a default timestamped one is
    always fresh: `path`, or PATH-2, PATH-3, ... if a run started in the same second took that name meanwhile."""
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


@dataclasses.dataclass
class RunPosition:
    """Where a run stands: finished epochs, steps into the next one, and the history so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)


def restore_or_init(config: TrainConfig, manager, optimizer,
                    dataset: Cifar10) -> tuple[nnx.GraphDef, TrainState, dict, RunPosition]:
    graphdef, params = init_params(config.model, config.seed)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    running = empty_running_metrics()
    if not manager.all_steps():
        return graphdef, state, running, RunPosition()

    def check_same_run(saved: dict) -> None:
        if saved.get("model") != config.model:
            raise CheckpointError(f"{manager.directory} holds checkpoints of {saved.get('model')}, not "
                                  f"{config.model}: use a new --workdir for a different model")
        trained_on = saved.get("data_fingerprint")  # absent in checkpoints saved before it was recorded
        if trained_on is not None and trained_on != dataset.fingerprint:
            raise CheckpointError(f"{manager.directory} was trained on other data ({saved.get('data_source')}, "
                                  f"{trained_on['train_images']} training images) than {dataset.source} "
                                  f"({len(dataset.train_labels)}): resume it with its own --data and --data-dir, "
                                  "or use a new --workdir")

    template = {"opt_state": state.opt_state, "step": state.step, "running": running}
    restored = checkpoint.restore_newest_good(manager, params, jax.device_get(template), check_same_run)
    if restored is None:
        return graphdef, state, running, RunPosition()
    meta = restored.metadata
    train_state = restored.train_state
    state = TrainState(restored.params, train_state["opt_state"], jnp.asarray(train_state["step"], jnp.int32))
    return graphdef, state, train_state["running"], RunPosition(meta["epoch"], meta["step_in_epoch"], meta["history"])


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) a run as configured; returns the per-epoch history, the workdir and the final params."""
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() takes a TrainConfig, got {type(config).__name__}: "
                          "TrainConfig(model=..., ...) or TrainConfig.from_dict(values)")
    run_started = time.perf_counter()
    named_workdir = bool(config.workdir)
    if not named_workdir and distributed.is_multi_process():
        raise ConfigError("a run over several processes needs --workdir: the same folder for every process, on a "
                          "filesystem every host sees")
    config = config.with_workdir().resolved()
    devices = parallel.DeviceSet.select(config.num_devices)
    config.check_devices(devices.global_count)
    if named_workdir:
        check_workdir(config)
    else:
        check_can_create(Path(config.workdir))
    dataset = load_cifar10(config.data_dir, config.data)
    steps_per_epoch = optim.steps_per_epoch(len(dataset.train_labels), config.batch_size)
    # Only now: a run that cannot start leaves no empty folder behind.
    workdir = created_workdir(Path(config.workdir).expanduser(), named_workdir)
    config = dataclasses.replace(config, workdir=str(workdir))
    optimizer = create_optimizer(config, steps_per_epoch)
    with exclusive_use(workdir), checkpoint.managed(workdir, keep_latest=config.keep_checkpoints) as manager:
        graphdef, state, running, position = restore_or_init(config, manager, optimizer, dataset)
        if position.epoch > config.epochs:
            raise ConfigError(f"{workdir} has already trained {position.epoch} epochs, more than the "
                              f"{config.epochs} asked for: ask for --epochs {position.epoch} or more, or use a new "
                              "--workdir")
        distributed.barrier("cifar_jax:run-checked")  # every process has read the workdir before it changes
        if parallel.is_main_process():  # only now that the workdir is known to hold this run
            write_json_atomically(workdir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
            write_history(workdir, position.history)
        with stop_requests() as stop:
            result = _run_epochs(config, workdir, dataset, devices, manager, graphdef, optimizer, state, running,
                                 position, stop, run_started)
        if parallel.is_main_process() and result.history:
            draw_training_curves(workdir, result.history)
        return result


def _run_epochs(config, workdir, dataset: Cifar10, devices: parallel.DeviceSet, manager, graphdef, optimizer,
                state, running, position, stop, run_started: Optional[float]):
    train_step = build_train_step(config, graphdef, optimizer, devices)
    evaluator = Evaluator(graphdef, config.standardize, config.eval_batch_size, devices, config.tta_flip)
    train_images, train_labels = devices.replicate((dataset.train_images, dataset.train_labels))
    test_images = devices.replicate(dataset.test_images)
    state, running = devices.replicate((state, running))
    steps_per_epoch = optim.steps_per_epoch(len(dataset.train_labels), config.batch_size)
    history = list(position.history)
    show = config.progress and parallel.is_main_process()

    def save(epoch: int, step_in_epoch: int, metrics: Optional[dict]) -> None:
        host_state = parallel.unreplicate(state)
        train_state = {"opt_state": host_state.opt_state, "step": host_state.step, "running": parallel.unreplicate(running)}
        meta = checkpoint_metadata(config, dataset, epoch, step_in_epoch, history)
        checkpoint.save(manager, int(host_state.step), host_state.params, train_state, meta, metrics)

    for epoch in range(position.epoch, config.epochs):
        first_step = position.step_in_epoch if epoch == position.epoch else 0
        order = epoch_order(config.seed, epoch, len(dataset.train_labels))
        bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not show, leave=False, dynamic_ncols=True)
        started = time.perf_counter()
        stop_signal = None
        steps_done = first_step
        for step_in_epoch in range(first_step, steps_per_epoch):
            batch = order[step_in_epoch * config.batch_size:(step_in_epoch + 1) * config.batch_size]
            state, running = train_step(state, running, train_images, train_labels, devices.split(batch))
            steps_done = step_in_epoch + 1
            parallel.wait_every_few_programs(steps_done, state)
            if run_started is not None:  # the start-up figure: data load, restore and compile, then one step
                jax.block_until_ready(state)
                if parallel.is_main_process():
                    tqdm.write(f"first step done {time.perf_counter() - run_started:.1f} s after the run started "
                               "(data loaded, step compiled)")
                run_started = None
            bar.update(1)
            stop_signal = distributed.agreed_stop(stop["signal"], epoch * steps_per_epoch + steps_done)
            if stop_signal:
                break
            if steps_done % PROGRESS_REFRESH_STEPS == 0:
                sums = _checked_sums(running, state, epoch)  # on every process, so all of them stop together
                if show:
                    bar.set_postfix(_progress_summary(sums))
        sums = _checked_sums(running, state, epoch)
        epoch_seconds = time.perf_counter() - started
        bar.close()
        if stop_signal and steps_done < steps_per_epoch:
            # A stop on an epoch's last step instead finishes the epoch below: a mid-epoch checkpoint there would
            # take the optimizer step the epoch's own checkpoint needs, and the resumed run could never save it.
            save(epoch, steps_done, None)
            return _stopped(stop_signal, manager, workdir, history, state, epoch, steps_done)

        params = state.params
        test_logits = evaluator.logits(params, test_images, len(dataset.test_labels))
        test_loss, test_accuracy = loss_and_accuracy(test_logits, dataset.test_labels)
        steps_run = steps_per_epoch - first_step
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sums["loss_sum"] / max(sums["count"], 1),
            "train_accuracy": sums["correct"] / max(sums["count"], 1),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "epoch_seconds": epoch_seconds,
            "images_per_second": steps_run * config.batch_size / epoch_seconds if steps_run else 0.0,
        }
        history.append(metrics)
        running = devices.replicate(jax.device_get(empty_running_metrics()))
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs or stop_signal:
            save(epoch + 1, 0, metrics)
        if parallel.is_main_process():
            write_history(workdir, history)
            print(_epoch_line(metrics), flush=True)
        if stop_signal:
            return _stopped(stop_signal, manager, workdir, history, state, epoch, steps_done)
    return TrainResult(history, workdir, parallel.unreplicate(state).params)


def _stopped(stop_signal: str, manager, workdir: Path, history: list[dict], state, epoch: int,
             steps_done: int) -> TrainResult:
    checkpoint.wait_for_saves(manager)
    if parallel.is_main_process():
        print(f"{stop_signal}: saved a checkpoint at epoch {epoch + 1}, step {steps_done}; resume with: "
              f"cifar-jax train --workdir {workdir}", flush=True)
    return TrainResult(history, workdir, parallel.unreplicate(state).params, interrupted=True)


def draw_training_curves(workdir: Path, history: list[dict]) -> Path:
    """WORKDIR/plots/training_curves.png, redrawn whenever a run (or its resumption) ends."""
    from cifar_jax import plots, report  # matplotlib loads only here, not on every start-up

    return plots.plot_training_curves(history, workdir / report.PLOTS_SUBDIR / report.PLOT_FILES["training_curves"])


def _checked_sums(running_replicated: dict, state_replicated: TrainState, epoch: int) -> dict:
    """The running metric sums on the host, raising if a step so far had a NaN/Inf loss or left NaN/Inf parameters
    (a bad gradient in the latest step, whose loss was still finite)."""
    sums = {k: v.item() for k, v in parallel.unreplicate(running_replicated).items()}
    if sums["first_nonfinite_step"] < 0 and not finite_on_this_process(state_replicated.params):
        sums["first_nonfinite_step"] = int(state_replicated.step.addressable_data(0))
    if sums["first_nonfinite_step"] >= 0:
        raise TrainingDivergedError(
            f"loss or gradients became NaN/Inf in epoch {epoch + 1} at step {sums['first_nonfinite_step']} of the run: "
            "train again in a new --workdir with a lower --learning-rate (checkpoints saved before it are kept)")
    return sums


def _progress_summary(sums: dict) -> dict:
    count = max(sums["count"], 1)
    return {"loss": f"{sums['loss_sum'] / count:.4f}", "acc": f"{sums['correct'] / count:.4f}"}


def _epoch_line(metrics: dict) -> str:
    return (f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f} | "
            f"test loss {metrics['test_loss']:.4f} acc {metrics['test_accuracy']:.4f} | "
            f"{metrics['epoch_seconds']:.1f}s, {metrics['images_per_second']:,.0f} img/s")

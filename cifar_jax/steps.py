"""The pure JAX pieces: applying a model, the losses, the data-parallel train step, and one batched-inference path
that evaluation, the training loop and `Predictor` share.

The steps are per-device functions, as `jax.pmap` would take them; `parallel.DeviceSet.data_parallel` runs them on
every device at once. The train step takes the whole device-resident uint8 dataset and this device's share of the
step's indices, so only indices cross to the device per step.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cifar_jax import cpu_kernels, parallel
from cifar_jax.augment import Augmentation, augment_batch, augmentation_for, example_keys
from cifar_jax.backends import KERNEL_CHOICES, resolve_kernels
from cifar_jax.config import MAX_EVAL_BATCH_SIZE, TrainConfig, is_whole_number
from cifar_jax.data import normalize_images
from cifar_jax.errors import ConfigError, InputError
from cifar_jax.models import IMAGE_SHAPE, NUM_CLASSES, ConvBlock, conv_relu_pool


class TrainState(NamedTuple):
    params: Any  # plain nested dict of arrays (nnx.State as a pure dict)
    opt_state: Any
    step: jax.Array  # optimizer steps taken so far, int32


# ---------------------------------------------------------------- the model and its losses


def conv_block_for(kernels: str, platform: str) -> ConvBlock:
    """The conv block `--kernels` asks for on this backend: the CPU-tuned form, or the plain Flax one."""
    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"unknown kernels {kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    return cpu_kernels.conv_relu_pool if resolve_kernels(kernels, platform) == "cpu" else conv_relu_pool


def apply_model(graphdef: nnx.GraphDef, params: dict, images: jax.Array, dtype: str = "float32",
                conv_block: ConvBlock = conv_relu_pool) -> jax.Array:
    """float32 logits. With dtype bfloat16 the pass runs on bfloat16 copies of the float32 parameters, whose
    gradients come back float32 through the cast (mixed precision: the optimizer never sees bfloat16)."""
    if dtype != "float32":
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        images = images.astype(dtype)
    return nnx.merge(graphdef, nnx.State(params))(images, conv_block).astype(jnp.float32)


def inference_logits(graphdef: nnx.GraphDef, params: dict, images: jax.Array, tta_flip: bool = False,
                     conv_block: ConvBlock = conv_relu_pool) -> jax.Array:
    """Logits of normalised images; with `tta_flip`, averaged with the mirror images' (test-time augmentation)."""
    logits = apply_model(graphdef, params, images, conv_block=conv_block)
    if tta_flip:
        logits = (logits + apply_model(graphdef, params, images[:, :, ::-1, :], conv_block=conv_block)) / 2
    return logits


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy on integer class ids (Keras's sparse_categorical_crossentropy),
    against targets with `label_smoothing` of the uniform distribution mixed in."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of host logits against integer labels."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(-1) == labels).mean())


def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


_all_finite_jit = jax.jit(all_finite)


def finite_on_this_process(tree_replicated) -> bool:
    """all_finite of a replicated pytree, computed on this process's first device: a program on one device, with no
    collective to interleave with the steps still in flight of a multi-process run."""
    return bool(_all_finite_jit(jax.tree.map(lambda x: x.addressable_data(0), tree_replicated)))


# ---------------------------------------------------------------- training


def empty_running_metrics() -> dict:
    """Sums over the steps of an epoch so far; kept on the device and threaded through the step."""
    return {
        "loss_sum": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "first_nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, standardize: bool,
                    augmentation: Optional[Augmentation] = None, seed: int = 0, label_smoothing: float = 0.0,
                    dtype: str = "float32", conv_block: ConvBlock = conv_relu_pool) -> Callable:
    """One data-parallel step of the optimizer on one device's share of the global batch.

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
            logits = apply_model(graphdef, params, images, dtype, conv_block)
            return cross_entropy_loss(logits, labels, label_smoothing).mean(), logits

        (loss, logits), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, parallel.AXIS_NAME)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Smoothing shapes only the gradient: train_loss is the true class's cross-entropy, like test_loss.
        reported_loss = cross_entropy_loss(logits, labels).mean() if label_smoothing else loss
        running = _add_step_metrics(running, reported_loss, logits, labels, state.step)
        return TrainState(params, opt_state, state.step + 1), running

    return train_step


def _add_step_metrics(running: dict, loss: jax.Array, logits: jax.Array, labels: jax.Array,
                      step: jax.Array) -> dict:
    """The running sums after one step, summed over the devices."""
    batch_loss_sum = jax.lax.psum(loss * labels.shape[0], parallel.AXIS_NAME)
    # Only the loss is checked here: a NaN/Inf gradient leaves the parameters NaN/Inf for good, so the next loss
    # shows it, and the loop checks the parameters whenever it reads these sums (checking every gradient element
    # here cost model1 8-13%, docs/performance.md).
    first_bad = running["first_nonfinite_step"]
    return {
        "loss_sum": running["loss_sum"] + batch_loss_sum,
        "correct": running["correct"] + jax.lax.psum((logits.argmax(-1) == labels).sum(), parallel.AXIS_NAME),
        "count": running["count"] + jax.lax.psum(labels.shape[0], parallel.AXIS_NAME),
        "first_nonfinite_step": jnp.where((first_bad < 0) & ~jnp.isfinite(batch_loss_sum), step + 1, first_bad),
    }


def build_train_step(config: TrainConfig, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                     devices: parallel.DeviceSet) -> Callable:
    """The training loop's step as configured, run data-parallel over the run's devices (also what `benchmark` times).

    State and running metrics are donated: each step updates them in place instead of copying.
    """
    augmentation = augmentation_for(config.augment, config.crop_padding, config.pad_mode, config.cutout)
    step = make_train_step(graphdef, optimizer, config.standardize, augmentation, config.seed,
                           config.label_smoothing, config.dtype, conv_block_for(config.kernels, devices.platform))
    return devices.data_parallel(step, split_argnums=(4,), donate_argnums=(0, 1))


# ---------------------------------------------------------------- inference


def make_inference_step(graphdef: nnx.GraphDef, standardize: bool, tta_flip: bool = False,
                        conv_block: ConvBlock = conv_relu_pool, probabilities: bool = False) -> Callable:
    """Logits (or class probabilities) of one device's share of a batch of 32x32 uint8 images."""

    def inference_step(params: dict, images_nhwc_uint8: jax.Array) -> jax.Array:
        logits = inference_logits(graphdef, params, normalize_images(images_nhwc_uint8, standardize), tta_flip,
                                  conv_block)
        return jax.nn.softmax(logits, axis=-1) if probabilities else logits

    return inference_step


def check_batch_size(batch_size: Any) -> None:
    if not is_whole_number(batch_size) or not 1 <= batch_size <= MAX_EVAL_BATCH_SIZE:
        raise InputError(f"batch_size must be a whole number from 1 to {MAX_EVAL_BATCH_SIZE:,}, got {batch_size!r}")


class BatchedInference:
    """Any number of 32x32 uint8 images through one jitted data-parallel forward pass, results in input order.

    Images go in fixed-size batches (the last padded) split over the devices, so a new number of images never
    recompiles. Batches are queued without waiting (JAX dispatch is asynchronous) and read back at the end.
    """

    def __init__(self, graphdef: nnx.GraphDef, standardize: bool, devices: parallel.DeviceSet,
                 batch_size: Optional[int] = None, tta_flip: bool = False, kernels: str = "auto",
                 probabilities: bool = False):
        batch_size = devices.defaults.eval_batch_size if batch_size is None else batch_size
        check_batch_size(batch_size)
        # A whole number per device; the batch size only changes speed, never results, so round up quietly.
        self.batch_size = math.ceil(batch_size / devices.global_count) * devices.global_count
        self.devices = devices
        self.trace_count = 0  # how often JAX traced (= compiled) the step; stays 1 whatever N the calls use
        step = make_inference_step(graphdef, standardize, tta_flip, conv_block_for(kernels, devices.platform),
                                   probabilities)
        self._step = devices.data_parallel(self._counting_traces(step), split_argnums=(1,), split_output=True)

    def _counting_traces(self, step: Callable) -> Callable:
        @functools.wraps(step)
        def traced_step(*args):
            self.trace_count += 1  # Python runs here only while JAX traces, never inside the compiled step
            return step(*args)

        return traced_step

    def launch(self, params_replicated: Any, images_nhwc_uint8: np.ndarray) -> list[tuple[jax.Array, int]]:
        """Queue every padded batch on the devices: (output, rows that are real) per batch."""
        launched = []
        for start in range(0, len(images_nhwc_uint8), self.batch_size):
            batch = images_nhwc_uint8[start:start + self.batch_size]
            padded = np.zeros((self.batch_size,) + IMAGE_SHAPE, np.uint8)
            padded[:len(batch)] = batch
            launched.append((self._step(params_replicated, self.devices.split(padded)), len(batch)))
            self.devices.wait_if_queue_full(launched)
        return launched

    def gather(self, launched: list[tuple[jax.Array, int]]) -> np.ndarray:
        """The launched batches' real rows as one host array, (N, classes)."""
        rows = [self.devices.gather(output)[:count] for output, count in launched]
        return np.concatenate(rows) if rows else np.empty((0, NUM_CLASSES), np.float32)

    def __call__(self, params_replicated: Any, images_nhwc_uint8: np.ndarray) -> np.ndarray:
        return self.gather(self.launch(params_replicated, images_nhwc_uint8))

"""The pure JAX pieces: one batched-inference path for evaluation and predict, and the kernels the steps pick."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import TrainConfig, cpu_kernels, models
from cifar_jax.errors import ConfigError, InputError
from cifar_jax.models import init_params
from cifar_jax.optim import create_optimizer
from cifar_jax.parallel import DeviceSet
from cifar_jax.steps import (BatchedInference, TrainState, apply_model, build_train_step, conv_block_for,
                             empty_running_metrics)
from learnable import class_coloured_dataset


@pytest.mark.parametrize("num_devices, batch_size", [(1, 7), (4, 8), (4, 1000), (4, 6)])
def test_batched_inference_covers_every_image_exactly_once_in_order(num_devices, batch_size):
    dataset = class_coloured_dataset(num_train=8, num_test=37)
    graphdef, params = init_params("model0", seed=3)
    devices = DeviceSet.select(num_devices)
    inference = BatchedInference(graphdef, standardize=False, devices=devices, batch_size=batch_size)
    assert inference.batch_size % num_devices == 0 and inference.batch_size >= batch_size
    logits = inference(devices.replicate(params), dataset.test_images)
    expected = apply_model(graphdef, params, dataset.test_images.astype(np.float32) / 255)
    assert logits.shape == (37, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert inference(devices.replicate(params), dataset.test_images[:0]).shape == (0, 10)
    assert inference.trace_count == 1  # 37 images and none: the same compiled step


def test_batched_inference_gives_probabilities_when_asked():
    images = class_coloured_dataset(num_train=8, num_test=5).test_images
    graphdef, params = init_params("model0", seed=3)
    devices = DeviceSet.select(1)
    logits = BatchedInference(graphdef, False, devices, 4)(devices.replicate(params), images)
    probabilities = BatchedInference(graphdef, False, devices, 4, probabilities=True)(devices.replicate(params), images)
    np.testing.assert_allclose(probabilities, jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probabilities.sum(-1), 1, rtol=1e-5)


def test_the_backends_evaluation_batch_is_the_default_and_a_bad_batch_is_refused():
    graphdef, _ = init_params("model0", seed=0)
    devices = DeviceSet.select(4)
    assert BatchedInference(graphdef, False, devices).batch_size == devices.defaults.eval_batch_size == 256
    with pytest.raises(InputError, match="batch_size must be a whole number from 1 to 65,536, got 0"):
        BatchedInference(graphdef, False, devices, 0)


@pytest.mark.parametrize("kernels, uses_cpu_kernels", [("auto", True), ("cpu", True), ("xla", False)])
def test_the_train_step_runs_the_kernels_the_config_asks_for_on_this_cpu(kernels, uses_cpu_kernels, monkeypatch):
    traced = []
    fast_block = cpu_kernels.conv_relu_pool
    monkeypatch.setattr(cpu_kernels, "conv_relu_pool", lambda conv, x: traced.append("cpu") or fast_block(conv, x))
    config = TrainConfig(model="model0", batch_size=8, epochs=1, kernels=kernels).resolved()
    graphdef, params = init_params("model0", seed=0)
    devices = DeviceSet.select(1)
    assert devices.platform == "cpu"
    optimizer = create_optimizer(config, steps_per_epoch=1)
    step = build_train_step(config, graphdef, optimizer, devices)
    images = class_coloured_dataset(num_train=8, num_test=1).train_images
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    step(*devices.replicate((state, empty_running_metrics(), images, np.arange(8) % 10)), devices.split(np.arange(8)))
    assert bool(traced) == uses_cpu_kernels
    assert (conv_block_for(kernels, "cpu") is models.conv_relu_pool) == (not uses_cpu_kernels)


def test_unknown_kernels_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown kernels 'gpu': choose one of auto, xla, cpu"):
        TrainConfig(kernels="gpu").resolved()

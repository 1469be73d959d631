"""The tutorial's three CNNs as Flax NNX modules, registered by name.

Every conv is 3x3, stride 1, VALID padding, ReLU; every pool is 2x2 max-pool; input 32x32x3; output logits.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from flax import nnx

from cifar_jax.errors import ConfigError

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# Keras's default (glorot-uniform kernels, zero biases), so runs start where the tutorial's did.
KERAS_KERNEL_INIT = nnx.initializers.glorot_uniform()


def conv_relu_pool(conv: nnx.Conv, images_nhwc: jax.Array) -> jax.Array:
    """The tutorial's block: Conv2D(3x3, ReLU) then MaxPooling2D(2x2)."""
    return nnx.max_pool(nnx.relu(conv(images_nhwc)), window_shape=(2, 2), strides=(2, 2))


ConvBlock = Callable[[nnx.Conv, jax.Array], jax.Array]


class TutorialCNN(nnx.Module):
    """Three conv+pool blocks, then dense layers; the shape every tutorial model shares."""

    def __init__(self, conv_features: tuple[int, ...], dense_features: tuple[int, ...], *, rngs: nnx.Rngs):
        channels = (IMAGE_SHAPE[-1],) + tuple(conv_features)
        self.convs = nnx.List(
            [nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding="VALID", kernel_init=KERAS_KERNEL_INIT, rngs=rngs)
             for c_in, c_out in zip(channels[:-1], channels[1:])]
        )
        flat_features = _spatial_size_after_blocks(IMAGE_SHAPE[0], len(conv_features)) ** 2 * channels[-1]
        widths = (flat_features,) + tuple(dense_features) + (NUM_CLASSES,)
        self.denses = nnx.List(
            [nnx.Linear(d_in, d_out, kernel_init=KERAS_KERNEL_INIT, rngs=rngs) for d_in, d_out in zip(widths[:-1], widths[1:])]
        )

    def __call__(self, images_nhwc: jax.Array, conv_block: ConvBlock = conv_relu_pool) -> jax.Array:
        """Logits of (B, 32, 32, 3) images. `conv_block` may be another form of the same block (cpu_kernels.py)."""
        x = images_nhwc
        for conv in self.convs:
            x = conv_block(conv, x)
        x = x.reshape(x.shape[0], -1)
        for dense in self.denses[:-1]:
            x = nnx.relu(dense(x))
        return self.denses[-1](x)


def _spatial_size_after_blocks(size: int, num_blocks: int) -> int:
    for _ in range(num_blocks):
        size = (size - 2) // 2  # VALID 3x3 conv, then 2x2 pool
    return size


def model0(rngs: nnx.Rngs) -> TutorialCNN:
    """Conv16-pool-Conv32-pool-Conv64-pool-Dense256-Dense10: 91,946 parameters."""
    return TutorialCNN((16, 32, 64), (256,), rngs=rngs)


def model1(rngs: nnx.Rngs) -> TutorialCNN:
    """Conv8-pool-Conv16-pool-Conv32-pool-Dense3000-Dense1000-Dense10: 3,404,042 parameters."""
    return TutorialCNN((8, 16, 32), (3000, 1000), rngs=rngs)


def model2(rngs: nnx.Rngs) -> TutorialCNN:
    """The same network as model1 (3,404,042 parameters).

    In the tutorial it differed only in training settings and ended far worse (train accuracy 0.58 vs 0.79).
    Plain SGD at learning rate 0.01 (Keras's 'sgd' default) reproduces that on real data, so its preset in
    `cifar_jax.config.PRESETS` is model1's network trained with `optax.sgd(0.01)`.
    """
    return model1(rngs)


MODELS: dict[str, Callable[[nnx.Rngs], TutorialCNN]] = {"model0": model0, "model1": model1, "model2": model2}


def create_model(name: str, seed: int = 0) -> nnx.Module:
    """Build a registered model with parameters initialised from `seed`."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](nnx.Rngs(seed))


def count_params(name: str) -> int:
    """Number of trainable parameters of a registered model (computed from shapes, nothing initialised)."""
    abstract_model = nnx.eval_shape(lambda: create_model(name))
    params = nnx.state(abstract_model, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


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

"""The tutorial's three CNNs as Flax NNX modules, registered by name.

Every conv is 3x3, stride 1, VALID padding, ReLU; every pool is 2x2 max-pool; input 32x32x3; output logits.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from cifar_jax.errors import ConfigError

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# Keras's default (glorot-uniform kernels, zero biases), so runs start where the tutorial's did.
KERAS_KERNEL_INIT = nnx.initializers.glorot_uniform()
# Convs with at most this many input channels (the RGB input's 3) compute their forward pass tap by tap (see
# `conv_valid_by_taps`), up to this many output channels: the identity product it ends with grows with their square
# (at b128 with 3 input channels: 2x faster than XLA's convolution at 16 and 1.6x at 32, 1.4x slower at 64).
TAP_SUM_MAX_INPUT_CHANNELS = 4
TAP_SUM_MAX_OUTPUT_CHANNELS = 32


# Each pixel's place in its 2x2 window (row-major), broadcast against `_window_blocks`' (..., 2, W/2, 2, C) axes.
WINDOW_POSITIONS = np.arange(4, dtype=np.int8).reshape(2, 1, 2, 1)


def _window_blocks(images_nhwc: jax.Array) -> jax.Array:
    """(B, H/2, 2, W/2, 2, C): every 2x2/stride-2 window's pixels on axes 2 and 4 (odd edges dropped, like VALID)."""
    batch, height, width, channels = images_nhwc.shape
    even = images_nhwc[:, : height // 2 * 2, : width // 2 * 2, :]
    return even.reshape(batch, height // 2, 2, width // 2, 2, channels)


def _first_max_position(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each window's maximum, and the position of its first maximum in row-major order as int8."""
    corners = [blocks[:, :, row, :, col] for row in (0, 1) for col in (0, 1)]
    pooled = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
    position = jnp.where(corners[0] == pooled, 0,
                         jnp.where(corners[1] == pooled, 1, jnp.where(corners[2] == pooled, 2, 3)))
    return pooled, position.astype(jnp.int8)


@jax.custom_jvp
def max_pool_2x2(images_nhwc: jax.Array) -> jax.Array:
    """2x2/stride-2 max-pool as reshape + max; the gradient goes to the first maximum of each window.

    Same values as `flax.nnx.max_pool(x, (2, 2), (2, 2))`. Reshape + max's gradient is ~2.7x faster than
    reduce_window's on the CPU backend (measured on 2 cores). Its default gradient splits ties evenly and, to find them,
    re-reads the whole input; routing to the first maximum (TensorFlow's MaxPoolGrad, so Keras's too) needs only a
    1-byte window position kept from the forward pass: model0 b128 training 1.12-1.21x on 2 CPU cores (README).
    The models' conv blocks differentiate through `bias_relu_pool`'s rule, which routes the same way.
    """
    return _window_blocks(images_nhwc).max(axis=(2, 4))


def _tangent_at_first_max(position: jax.Array, images_tangent: jax.Array) -> jax.Array:
    """Each window's tangent at its first maximum: linear in the tangent, so JAX transposes it into "the gradient
    goes to the first maximum" for reverse mode."""
    is_first_max = position[:, :, None, :, None, :] == WINDOW_POSITIONS
    return jnp.where(is_first_max, _window_blocks(images_tangent), 0).sum(axis=(2, 4))


@max_pool_2x2.defjvp
def _max_pool_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    # A rule for the tangent, not the gradient, so forward mode (jax.jvp, jax.hessian) works too.
    (images_nhwc,), (images_tangent,) = primals, tangents
    pooled, position = _first_max_position(_window_blocks(images_nhwc))
    return pooled, _tangent_at_first_max(position, images_tangent)


@jax.custom_jvp
def bias_relu_pool(features_nhwc: jax.Array, bias: jax.Array) -> jax.Array:
    """max_pool_2x2(relu(features + bias)), computed as relu(max_pool_2x2(features) + bias).

    Both orders give the same values: the pool commutes with ReLU and with adding a per-channel bias (rounding is
    monotone). Pooling first leaves a quarter of the values for the bias and ReLU: a forward pass alone (evaluation,
    predict) is 6-8% faster so. Differentiated, the tangent rule below is used instead.
    """
    return nnx.relu(max_pool_2x2(features_nhwc) + bias)


@bias_relu_pool.defjvp
def _bias_relu_pool_jvp(primals: tuple[jax.Array, jax.Array],
                        tangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # The whole block's tangent at the pooled size: the bias's tangent is added to a quarter of the values, so its
    # gradient sums (batch, H/2, W/2) values instead of (batch, H, W), a slow loop of model0's step (0.55 ms at b128).
    # The primal is computed in the usual order (bias, ReLU, pool; pooling first here was slower at b128),
    # the ReLU mask taken from the pooled output. Training against the earlier batch-size switch (pool first up to
    # b32): model0 b32 1.24x, b128 1.05-1.28x, model1 b128 1.01x, model1 b32 within noise (interleaved A/B, README).
    (features_nhwc, bias), (features_tangent, bias_tangent) = primals, tangents
    pooled, position = _first_max_position(_window_blocks(nnx.relu(features_nhwc + bias)))
    # A window whose maximum the ReLU zeroed passes no tangent, to its features or to the bias.
    pooled_tangent = _tangent_at_first_max(position, features_tangent) + bias_tangent
    return pooled, jnp.where(pooled > 0, pooled_tangent, 0)


def _xla_conv(images_nhwc: jax.Array, kernel_hwio: jax.Array, padding: str = "VALID") -> jax.Array:
    return jax.lax.conv_general_dilated(images_nhwc, kernel_hwio, window_strides=(1, 1), padding=padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_jvp
def conv_valid_by_taps(images_nhwc: jax.Array, kernel_hwio: jax.Array) -> jax.Array:
    """Stride-1 VALID conv as one multiply-add per kernel tap and input channel, summed in float32.

    XLA fuses the 27 multiply-adds of a 3x3 conv on RGB input into one loop that vectorises over the output
    channels: for model0's first conv at b128 that loop takes 1.1 ms against 3.9 ms for XLA:CPU's convolution, and
    1.9 ms with the identity product below (model1's: 0.54 ms against 3.8 for the loop); with 16 input channels it
    is 4.5x slower. Gradients go through XLA's convolution (README).
    """
    kernel_height, kernel_width, in_channels, out_channels = kernel_hwio.shape
    out_height = images_nhwc.shape[1] - kernel_height + 1
    out_width = images_nhwc.shape[2] - kernel_width + 1
    images, kernel = images_nhwc.astype(jnp.float32), kernel_hwio.astype(jnp.float32)
    taps = itertools.product(range(kernel_height), range(kernel_width), range(in_channels))
    features = sum(images[:, row:row + out_height, col:col + out_width, channel, None] * kernel[row, col, channel]
                   for row, col, channel in taps)
    # XLA fuses cheap elementwise work into every consumer, so the pool, the ReLU mask and the transposes feeding
    # the weight gradients each recomputed the whole sum (training 1.3x slower than XLA's convolution, evaluation
    # 0.65x). A product with the identity matrix is exact and is a library call XLA does not fuse into anything:
    # the sum is computed once, into one buffer.
    features = jnp.einsum("bhwc,cf->bhwf", features, jnp.eye(out_channels, dtype=jnp.float32))
    return features.astype(images_nhwc.dtype)


def _conv_valid_by_taps_jvp(primals: tuple[jax.Array, jax.Array],
                            tangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # The tangent goes through XLA's convolution, which JAX transposes into XLA's fast backward convolutions (the tap
    # sum's own transpose would be one slow reduction per tap). An unperturbed input, like the images in training,
    # comes as a symbolic zero and costs nothing.
    (images_nhwc, kernel_hwio), (images_tangent, kernel_tangent) = primals, tangents
    features = conv_valid_by_taps(images_nhwc, kernel_hwio)
    tangent = jnp.zeros_like(features)
    if not isinstance(images_tangent, SymbolicZero):
        tangent = tangent + _xla_conv(images_tangent, kernel_hwio)
    if not isinstance(kernel_tangent, SymbolicZero):
        tangent = tangent + _xla_conv(images_nhwc, kernel_tangent)
    return features, tangent


conv_valid_by_taps.defjvp(_conv_valid_by_taps_jvp, symbolic_zeros=True)


def conv_relu_pool(conv: nnx.Conv, images_nhwc: jax.Array) -> jax.Array:
    """max_pool_2x2(relu(conv(x))): the conv, then the bias, ReLU and pool as one block (`bias_relu_pool`)."""
    # The nnx.Conv holds the parameters and settings; its own call would add the bias before the pool.
    kernel = conv.kernel[...]
    _, _, in_channels, out_channels = kernel.shape
    if (conv.padding == "VALID" and in_channels <= TAP_SUM_MAX_INPUT_CHANNELS
            and out_channels <= TAP_SUM_MAX_OUTPUT_CHANNELS):
        features = conv_valid_by_taps(images_nhwc, kernel)
    else:
        features = _xla_conv(images_nhwc, kernel, conv.padding)
    return bias_relu_pool(features, conv.bias[...])


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

    def __call__(self, images_nhwc: jax.Array) -> jax.Array:
        """Logits of (B, 32, 32, 3) images."""
        x = images_nhwc
        for conv in self.convs:
            x = conv_relu_pool(conv, x)
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

"""CPU-tuned forms of the models' conv block (conv, bias, ReLU, 2x2 max-pool), used when a run's devices are CPUs.

They compute what `models.conv_relu_pool` computes (the same values; gradients equal up to float rounding and
which maximum of a tied window receives it) in forms XLA:CPU runs faster; `--kernels auto|xla|cpu` chooses
(`steps.conv_block_for`). Every choice here was measured on a 2-core CPU only: docs/performance.md has the figures.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

# A first conv on few input channels (RGB's 3) runs as a sum over its taps, up to this many output channels: the
# identity product the sum ends with grows with their square.
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
    """2x2/stride-2 max-pool as reshape + max, its gradient routed to each window's first maximum.

    Same values as `nnx.max_pool(x, (2, 2), (2, 2))`. Reshape + max differentiates faster than reduce_window on
    XLA:CPU, and routing to the first maximum (as TensorFlow's MaxPoolGrad does) needs only a 1-byte position per
    window instead of re-reading the input to split ties.
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

    Both orders give the same values (the pool commutes with ReLU and with a per-channel bias); pooling first leaves
    a quarter of the values for the bias and ReLU, which speeds up a forward pass alone (evaluation, predict).
    Differentiated, the tangent rule below is used instead.
    """
    return nnx.relu(max_pool_2x2(features_nhwc) + bias)


@bias_relu_pool.defjvp
def _bias_relu_pool_jvp(primals: tuple[jax.Array, jax.Array],
                        tangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # The block's tangent at the pooled size: the bias gradient then sums a quarter as many values. The primal is
    # computed in the usual order (bias, ReLU, pool), the ReLU mask taken from the pooled output.
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

    XLA:CPU fuses the 27 multiply-adds of a 3x3 conv on RGB input into one loop vectorised over the output channels,
    several times faster than its convolution there; with many input channels it is slower. Gradients go through
    XLA's convolution.
    """
    kernel_height, kernel_width, in_channels, out_channels = kernel_hwio.shape
    out_height = images_nhwc.shape[1] - kernel_height + 1
    out_width = images_nhwc.shape[2] - kernel_width + 1
    images, kernel = images_nhwc.astype(jnp.float32), kernel_hwio.astype(jnp.float32)
    taps = itertools.product(range(kernel_height), range(kernel_width), range(in_channels))
    features = sum(images[:, row:row + out_height, col:col + out_width, channel, None] * kernel[row, col, channel]
                   for row, col, channel in taps)
    # XLA fuses cheap elementwise work into every consumer, so each consumer would recompute the whole sum. A
    # product with the identity is exact and is a library call XLA fuses into nothing: the sum is computed once.
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

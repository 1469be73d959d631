"""The CPU-tuned conv block against the plain Flax one: same values, same derivatives, chosen per backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cifar_jax import cpu_kernels, models
from cifar_jax.cpu_kernels import max_pool_2x2
from cifar_jax.models import create_model, init_params
from cifar_jax.steps import apply_model, conv_block_for


@pytest.mark.parametrize("name", ["model0", pytest.param("model1", marks=pytest.mark.slow)])
def test_cpu_and_xla_kernels_give_the_same_logits_and_gradients(name):
    graphdef, params = init_params(name, seed=1)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10

    def loss(p, block):
        logits = apply_model(graphdef, p, images, conv_block=block)
        return -jax.nn.log_softmax(logits)[jnp.arange(8), labels].mean(), logits

    (cpu_loss, cpu_logits), cpu_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, cpu_kernels.conv_relu_pool), has_aux=True))(params)
    (xla_loss, xla_logits), xla_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, models.conv_relu_pool), has_aux=True))(params)
    np.testing.assert_allclose(cpu_logits, xla_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cpu_loss, xla_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(cpu_grads)) > 1e-3  # not trivially zero


@pytest.mark.parametrize("kernels, platform, expected", [
    ("auto", "cpu", cpu_kernels.conv_relu_pool), ("auto", "gpu", models.conv_relu_pool),
    ("auto", "tpu", models.conv_relu_pool), ("xla", "cpu", models.conv_relu_pool),
    ("cpu", "gpu", cpu_kernels.conv_relu_pool), ("cpu", "cpu", cpu_kernels.conv_relu_pool),
])
def test_auto_picks_the_cpu_kernels_on_cpus_only_and_a_forced_choice_wins(kernels, platform, expected):
    assert conv_block_for(kernels, platform) is expected


def test_fast_max_pool_equals_flax_max_pool_on_odd_sizes():
    images = jax.random.normal(jax.random.key(0), (2, 13, 15, 4))
    np.testing.assert_array_equal(max_pool_2x2(images), nnx.max_pool(images, (2, 2), strides=(2, 2)))
    assert max_pool_2x2(images).shape == (2, 6, 7, 4)


def test_max_pool_gradient_equals_flax_max_pool_gradient_without_ties():
    images = jax.random.normal(jax.random.key(0), (2, 13, 15, 4))
    cotangent = jax.random.normal(jax.random.key(1), (2, 6, 7, 4))
    ours = jax.grad(lambda x: (max_pool_2x2(x) * cotangent).sum())(images)
    flax_grad = jax.grad(lambda x: (nnx.max_pool(x, (2, 2), strides=(2, 2)) * cotangent).sum())(images)
    np.testing.assert_array_equal(ours, flax_grad)
    assert not np.asarray(ours)[:, 12, :, :].any() and not np.asarray(ours)[:, :, 14, :].any()  # dropped odd edges
    per_example = jax.jit(jax.vmap(jax.grad(lambda x, c: (max_pool_2x2(x) * c).sum())))  # as in the train step
    np.testing.assert_array_equal(per_example(images[:, None], cotangent[:, None])[:, 0], ours)


@pytest.mark.slow
def test_max_pool_forward_mode_equals_flax_max_pool_without_ties():
    images = jax.random.normal(jax.random.key(0), (2, 13, 15, 4))
    tangent = jax.random.normal(jax.random.key(1), images.shape)
    ours = jax.jvp(max_pool_2x2, (images,), (tangent,))
    flax_jvp = jax.jvp(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)), (images,), (tangent,))
    np.testing.assert_array_equal(ours[0], flax_jvp[0])
    np.testing.assert_array_equal(ours[1], flax_jvp[1])
    # Forward over reverse mode through a whole model: a Hessian-vector product is finite and not all zero.
    model = create_model("model0")
    params = nnx.state(model, nnx.Param)
    model_inputs = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    loss = lambda p: nnx.merge(nnx.graphdef(model), p)(model_inputs, cpu_kernels.conv_relu_pool).sum()
    hvp = jax.jvp(jax.grad(loss), (params,), (params,))[1]
    leaves = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(hvp)])
    assert np.isfinite(leaves).all() and np.abs(leaves).max() > 0


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_window_like_keras():
    window = np.array([[1.0, 3.0], [3.0, 3.0]], np.float32).reshape(1, 2, 2, 1)
    for dtype in (jnp.float32, jnp.bfloat16):
        grad = jax.grad(lambda x: max_pool_2x2(x).sum())(jnp.asarray(window, dtype))
        assert grad.dtype == dtype
        np.testing.assert_array_equal(np.asarray(grad, np.float32).reshape(2, 2), [[0, 1], [0, 0]])


def test_bias_relu_pool_block_equals_bias_relu_then_pool_in_values_and_derivatives():
    features = jax.random.normal(jax.random.key(0), (3, 14, 14, 4))
    bias = jnp.array([0.3, -0.4, 0.0, 1.2])  # some negative: the order of bias, ReLU and pool matters if it can
    cotangent = jax.random.normal(jax.random.key(1), (3, 7, 7, 4))
    reference = lambda f, b: nnx.max_pool(nnx.relu(f + b), (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(cpu_kernels.bias_relu_pool(features, bias), reference(features, bias))
    ours = jax.grad(lambda f, b: (cpu_kernels.bias_relu_pool(f, b) * cotangent).sum(), argnums=(0, 1))(features, bias)
    usual = jax.grad(lambda f, b: (reference(f, b) * cotangent).sum(), argnums=(0, 1))(features, bias)
    np.testing.assert_array_equal(ours[0], usual[0])
    np.testing.assert_allclose(ours[1], usual[1], rtol=1e-5)  # the bias's sum runs over the pooled values
    assert np.abs(np.asarray(ours[1])).min() > 0

    tangents = (jax.random.normal(jax.random.key(2), features.shape), jnp.array([1.0, -2.0, 0.5, 3.0]))
    ours_jvp = jax.jvp(cpu_kernels.bias_relu_pool, (features, bias), tangents)
    usual_jvp = jax.jvp(reference, (features, bias), tangents)
    np.testing.assert_array_equal(ours_jvp[0], usual_jvp[0])
    np.testing.assert_allclose(ours_jvp[1], usual_jvp[1], rtol=1e-6, atol=1e-6)


def test_a_differentiated_model_computes_the_same_logits_as_inference():
    graphdef, params = nnx.split(create_model("model0"), nnx.Param)
    for index, conv in enumerate(params["convs"].values()):  # non-zero biases (they start at zero)
        conv["bias"][...] = 0.3 * jax.random.normal(jax.random.key(index), conv["bias"].shape)
    images = jax.random.normal(jax.random.key(9), (4, 32, 32, 3))
    logits = lambda p: nnx.merge(graphdef, p)(images, cpu_kernels.conv_relu_pool)
    differentiated, _ = jax.vjp(logits, params)  # the blocks' tangent rules compute these
    np.testing.assert_array_equal(logits(params), differentiated)


def test_first_conv_by_taps_equals_xla_convolution_in_values_and_derivatives():
    images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
    xla_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = jax.jit(cpu_kernels.conv_valid_by_taps)(images, kernel)
    assert ours.shape == (3, 30, 30, 16)
    np.testing.assert_allclose(ours, xla_conv(images, kernel), rtol=1e-5, atol=1e-5)
    # The identity product that keeps the sum in one buffer is exact: same bits as the bare sum of the 27 taps
    # compiled the same way (one fused loop, so the same multiply-adds).
    bare_sum = jax.jit(lambda x, k: sum(x[:, row:row + 30, col:col + 30, channel, None] * k[row, col, channel]
                                        for row in range(3) for col in range(3) for channel in range(3)))
    np.testing.assert_array_equal(ours, bare_sum(images, kernel))

    cotangent = jax.random.normal(jax.random.key(2), ours.shape)
    for argnums in (0, 1, (0, 1)):  # the kernel (training), the images (saliency), both
        grads = jax.grad(lambda x, k: (cpu_kernels.conv_valid_by_taps(x, k) * cotangent).sum(), argnums)(images, kernel)
        expected = jax.grad(lambda x, k: (xla_conv(x, k) * cotangent).sum(), argnums)(images, kernel)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    tangents = (jax.random.normal(jax.random.key(3), images.shape), jax.random.normal(jax.random.key(4), kernel.shape))
    np.testing.assert_allclose(jax.jvp(cpu_kernels.conv_valid_by_taps, (images, kernel), tangents)[1],
                               jax.jvp(xla_conv, (images, kernel), tangents)[1], rtol=1e-5, atol=1e-4)


def test_only_convs_with_few_input_and_output_channels_are_summed_by_taps(monkeypatch):
    model = create_model("model0")
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    tap_convs = []
    monkeypatch.setattr(cpu_kernels, "conv_valid_by_taps",
                        lambda x, k: tap_convs.append(k.shape) or cpu_kernels._xla_conv(x, k))
    model(images, cpu_kernels.conv_relu_pool)
    assert tap_convs == [(3, 3, 3, 16)]  # the first conv only; the 16- and 32-channel inputs go to XLA's convolution
    monkeypatch.setattr(cpu_kernels, "TAP_SUM_MAX_OUTPUT_CHANNELS", 8)  # a first conv wider than this goes to XLA too
    tap_convs.clear()
    model(images, cpu_kernels.conv_relu_pool)
    assert tap_convs == []



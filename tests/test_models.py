import jax
import numpy as np
import pytest
from flax import nnx

from cifar_jax.errors import ConfigError
from cifar_jax.models import MODELS, abstract_params, count_params, create_model, init_params


@pytest.mark.parametrize("name, expected", [("model0", 91_946), ("model1", 3_404_042), ("model2", 3_404_042)])
def test_parameter_counts_match_the_tutorial(name, expected):
    assert count_params(name) == expected
    params = nnx.state(create_model(name), nnx.Param)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_return_ten_logits_per_image(name):
    logits = create_model(name)(np.zeros((3, 32, 32, 3), np.float32))
    assert logits.shape == (3, 10)
    assert logits.dtype == np.float32


def test_layer_shapes_of_model0():
    model = create_model("model0")
    assert [c.kernel.shape for c in model.convs] == [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64)]
    assert [d.kernel.shape for d in model.denses] == [(256, 256), (256, 10)]


def test_same_seed_same_parameters_and_other_seed_differs():
    first, again, other = (nnx.state(create_model("model0", seed), nnx.Param) for seed in (0, 0, 1))
    kernel = lambda state: np.asarray(state["convs"][0]["kernel"][...])
    np.testing.assert_array_equal(kernel(first), kernel(again))
    assert not np.allclose(kernel(first), kernel(other))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'model9'.*model0, model1, model2"):
        create_model("model9")


def test_a_model_without_arguments_is_the_tutorials_plain_flax_network():
    # The conv block a model runs unless told otherwise: Flax's conv, ReLU and max-pool, as the tutorial's Keras layers.
    model = create_model("model0")
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    x = images
    for conv in model.convs:
        x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
    x = nnx.relu(model.denses[0](x.reshape(2, -1)))
    np.testing.assert_array_equal(model(images), model.denses[1](x))


def test_abstract_params_have_the_shapes_init_params_makes():
    _, params = init_params("model1", seed=3)
    abstract = abstract_params("model1")
    assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), abstract) == jax.tree.map(
        lambda leaf: (leaf.shape, leaf.dtype), params)

"""Training recipes: the tutorial and tuned presets, their fields as flags, flip TTA, a recipe run end to end."""
import contextlib
import dataclasses
import importlib

import jax
import numpy as np
import pytest

from cifar_jax import TrainConfig, train
from cifar_jax.cli import build_parser
from cifar_jax.config import RECIPES, conflicting_fields
from cifar_jax.errors import ConfigError
from cifar_jax.evaluate import model_logits
from cifar_jax.flags import given_fields
from cifar_jax.models import count_params, init_params
from cifar_jax.parallel import DeviceSet
from cifar_jax.predict import Predictor
from cifar_jax.steps import BatchedInference, apply_model
from learnable import class_coloured_dataset, photo_batch
from stop_signals import StopAfterSteps

train_module = importlib.import_module("cifar_jax.train")


# ---------------------------------------------------------------- flip TTA


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    images = photo_batch(10)
    graphdef, params = init_params("model0", seed=1)
    devices = DeviceSet.select(4)
    inference = BatchedInference(graphdef, standardize=False, devices=devices, batch_size=8, tta_flip=True)
    logits = inference(devices.replicate(params), images)
    pixels = images.astype(np.float32) / 255
    expected = (apply_model(graphdef, params, pixels) + apply_model(graphdef, params, pixels[:, :, ::-1])) / 2
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert not np.allclose(apply_model(graphdef, params, pixels), logits, atol=1e-3)  # the mirror view counted


# ---------------------------------------------------------------- recipes and config


@pytest.mark.parametrize("model, parameters", [("model0", 91_946), ("model1", 3_404_042), ("model2", 3_404_042)])
def test_tuned_recipes_load_and_keep_the_networks(model, parameters):
    config = TrainConfig(model=model, recipe="tuned").resolved()
    tuned = RECIPES["tuned"][model]
    assert all(getattr(config, name) == value for name, value in tuned.items())
    assert config.augment and config.lr_schedule != "constant"
    assert count_params(model) == parameters  # a recipe changes how a network is trained, never the network


def test_tutorial_recipe_is_the_keras_tutorial_and_explicit_flags_win():
    tutorial = TrainConfig(model="model2").resolved()
    assert (tutorial.epochs, tutorial.batch_size, tutorial.optimizer, tutorial.learning_rate) == (10, 32, "sgd", 1e-2)
    assert (tutorial.lr_schedule, tutorial.augment, tutorial.tta_flip, tutorial.weight_decay) == ("constant", False,
                                                                                                  False, 0.0)
    overridden = TrainConfig(model="model0", recipe="tuned", augment=False, epochs=3, learning_rate=0.5).resolved()
    assert (overridden.augment, overridden.epochs, overridden.learning_rate) == (False, 3, 0.5)
    assert overridden.batch_size == RECIPES["tuned"]["model0"]["batch_size"]


def test_recipe_fields_are_cli_flags():
    args = build_parser().parse_args(["train", "--recipe", "tuned", "--lr-schedule", "onecycle", "--warmup-epochs",
                                      "2.5", "--no-augment", "--tta-flip", "--label-smoothing", "0.1", "--cutout", "0",
                                      "--grad-clip-norm", "1", "--weight-decay", "0.01", "--pad-mode", "zero"])
    assert given_fields(args, TrainConfig) == {
        "recipe": "tuned", "lr_schedule": "onecycle", "warmup_epochs": 2.5, "augment": False, "tta_flip": True,
        "label_smoothing": 0.1, "cutout": 0, "grad_clip_norm": 1.0, "weight_decay": 0.01, "pad_mode": "zero"}


@pytest.mark.parametrize("overrides, message", [
    ({"recipe": "fast"}, "unknown recipe 'fast': choose one of tutorial, tuned"),
    ({"lr_schedule": "step"}, "unknown lr_schedule 'step': choose one of constant, cosine, onecycle"),
    ({"warmup_epochs": 10.0}, r"warmup_epochs must be a number from 0 to less than epochs \(10\), got 10.0"),
    ({"recipe": "tuned", "epochs": 1}, r"less than epochs \(1\), got 1.0 \(the tuned recipe's, if you did not set "
                                       r"it\): give a smaller --warmup-epochs or more --epochs"),
    ({"lr_schedule": "onecycle", "warmup_epochs": 0.0}, "onecycle schedule needs warmup_epochs > 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a non-negative number"),
    ({"grad_clip_norm": float("nan")}, "grad_clip_norm must be a non-negative number"),
    ({"label_smoothing": 1.0}, "label_smoothing must be a number from 0 to less than 1, got 1.0"),
    ({"augment": "yes"}, "augment must be true or false, got 'yes'"),
    ({"crop_padding": 17}, "crop_padding must be an integer from 0 to 16, got 17"),
    ({"pad_mode": "wrap"}, "unknown pad_mode 'wrap': choose one of reflect, zero"),
    ({"cutout": 8}, "cutout 8 only applies to augmented images: add --augment"),
])
def test_bad_recipe_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**overrides).resolved()
    assert "\n" not in str(error.value)


def test_schedule_length_and_recipe_are_part_of_a_run_identity():
    cosine = TrainConfig(recipe="tuned").resolved()
    longer = dataclasses.replace(cosine, epochs=cosine.epochs + 10)
    assert conflicting_fields(cosine, longer) == [f"epochs: {cosine.epochs} in the run vs {cosine.epochs + 10} requested"]
    tutorial = TrainConfig().resolved()
    assert conflicting_fields(tutorial, dataclasses.replace(tutorial, epochs=20)) == []  # a constant rate extends
    assert conflicting_fields(TrainConfig(), tutorial) == []  # a config saved before the recipe fields existed
    assert "augment: False in the run vs True requested" in conflicting_fields(
        tutorial, dataclasses.replace(tutorial, augment=True))


# ---------------------------------------------------------------- training with a recipe


@pytest.fixture
def learnable_data(monkeypatch):
    dataset = class_coloured_dataset(num_train=512, num_test=101)
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)
    return dataset


def recipe_run(tmp_path, name: str, **overrides) -> TrainConfig:
    values = dict(model="model0", epochs=2, batch_size=64, eval_batch_size=40, progress=False, augment=True,
                  cutout=6, lr_schedule="cosine", learning_rate=3e-3, label_smoothing=0.1, grad_clip_norm=5.0,
                  optimizer="adamw", tta_flip=True, workdir=str(tmp_path / name))
    return TrainConfig(**{**values, **overrides})


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])


@pytest.mark.slow
def test_an_augmented_run_learns_and_resumes_exactly(tmp_path, learnable_data, monkeypatch):
    straight = train(recipe_run(tmp_path, "straight"))
    assert straight.history[-1]["test_accuracy"] > 0.5  # chance is 0.1
    # predict sees the images as the run's evaluation did: averaged with their mirror images (tta_flip)
    predicted = Predictor.from_checkpoint(straight.workdir, "latest").predict(learnable_data.test_images)
    flip_averaged = model_logits("model0", straight.params, False, learnable_data.test_images, tta_flip=True)
    np.testing.assert_allclose(predicted.probabilities, jax.nn.softmax(flip_averaged, axis=-1), atol=1e-5)

    with monkeypatch.context() as patch:  # stopped mid-epoch 2 (8 steps per epoch), then resumed
        patch.setattr(train_module, "stop_requests", lambda: contextlib.nullcontext(StopAfterSteps(11)))
        stopped = train(recipe_run(tmp_path, "resumed"))
    assert stopped.interrupted and len(stopped.history) == 1
    resumed = train(recipe_run(tmp_path, "resumed"))
    np.testing.assert_array_equal(flat(resumed.params), flat(straight.params))
    assert resumed.history[-1]["test_accuracy"] == straight.history[-1]["test_accuracy"]

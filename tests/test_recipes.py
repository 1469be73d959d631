"""Training recipes: on-device augmentation, learning-rate schedules, regularisers, flip TTA, the tuned presets."""
import contextlib
import dataclasses
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifar_jax import TrainConfig, train
from cifar_jax.augment import (Augmentation, augment_batch, augmentation_for, crop_with_padding, cut_out,
                               example_keys, flip_left_right)
from cifar_jax.cli import build_parser
from cifar_jax.flags import given_fields
from cifar_jax.config import RECIPES, conflicting_fields
from cifar_jax.errors import ConfigError
from cifar_jax.evaluate import model_logits
from cifar_jax.models import count_params
from cifar_jax.optim import create_optimizer, learning_rate_schedule, steps_per_epoch
from cifar_jax import parallel
from cifar_jax.parallel import DeviceSet
from cifar_jax.predict import Predictor
from cifar_jax.models import init_params
from cifar_jax.steps import (BatchedInference, TrainState, apply_model, build_train_step, cross_entropy_loss,
                             empty_running_metrics)
from learnable import class_coloured_dataset
from stop_signals import StopAfterSteps

train_module = importlib.import_module("cifar_jax.train")
jitted_augment_batch = jax.jit(augment_batch, static_argnums=2)  # one compile instead of many small eager ops


def hand_made_image() -> np.ndarray:
    """A 6x5 RGB image whose every pixel value says where it is: 100*channel + 10*row + col."""
    rows, cols, channels = np.meshgrid(np.arange(6), np.arange(5), np.arange(3), indexing="ij")
    return (100 * channels + 10 * rows + cols).astype(np.uint8)


def photo_batch(num_images: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (num_images, 32, 32, 3)).astype(np.uint8)


# ---------------------------------------------------------------- augmentation


def test_flip_mirrors_columns_only_when_asked():
    image = hand_made_image()
    flipped = np.asarray(flip_left_right(image, jnp.bool_(True)))
    assert flipped[2, 0, 1] == 100 + 20 + 4 and flipped[2, 4, 1] == 100 + 20 + 0
    np.testing.assert_array_equal(flipped, image[:, ::-1, :])
    np.testing.assert_array_equal(flip_left_right(image, jnp.bool_(False)), image)


def test_crop_with_padding_shifts_the_window_and_pads_as_asked():
    image = hand_made_image()
    np.testing.assert_array_equal(crop_with_padding(image, 2, 2, 2, "zero"), image)  # centred window: no shift
    zero = np.asarray(crop_with_padding(image, 0, 0, 2, "zero"))  # window moved 2 up, 2 left
    assert zero.shape == image.shape and zero.dtype == np.uint8
    assert (zero[:2] == 0).all() and (zero[:, :2] == 0).all()
    np.testing.assert_array_equal(zero[2:, 2:], image[:-2, :-2])
    reflect = np.asarray(crop_with_padding(image, 0, 4, 2, "reflect"))  # 2 up, 2 right
    np.testing.assert_array_equal(reflect[2:, :3], image[:-2, 2:])
    # Reflection mirrors without repeating the edge: the columns right of col 4 are cols 3, 2.
    np.testing.assert_array_equal(reflect[2:, 3:5], image[:-2, [3, 2]])
    np.testing.assert_array_equal(reflect[:2, :3], image[[2, 1]][:, 2:])


def test_cutout_zeroes_a_square_clipped_at_the_edges():
    image = np.full((8, 8, 3), 7, np.uint8)
    inside = np.asarray(cut_out(image, 4, 4, 4))
    assert (inside[2:6, 2:6] == 0).all() and (inside == 0).sum() == 4 * 4 * 3
    corner = np.asarray(cut_out(image, 0, 0, 4))
    assert (corner[:2, :2] == 0).all() and (corner == 0).sum() == 2 * 2 * 3


def test_augment_batch_keeps_shape_and_dtype_and_is_a_function_of_seed_step_and_index():
    images = photo_batch()
    indices = jnp.arange(100, 108)
    augmentation = Augmentation(crop_padding=4, pad_mode="reflect", cutout=8)
    augmented = jitted_augment_batch(images, example_keys(0, jnp.int32(5), indices), augmentation)
    assert augmented.shape == images.shape and augmented.dtype == jnp.uint8
    again = jitted_augment_batch(images, example_keys(0, jnp.int32(5), indices), augmentation)
    np.testing.assert_array_equal(augmented, again)
    next_step = jitted_augment_batch(images, example_keys(0, jnp.int32(6), indices), augmentation)
    other_seed = jitted_augment_batch(images, example_keys(1, jnp.int32(5), indices), augmentation)
    assert not np.array_equal(augmented, next_step) and not np.array_equal(augmented, other_seed)
    # An image's draw depends on its dataset index, not on where it sits in the batch (or on which device).
    reversed_batch = jitted_augment_batch(images[::-1], example_keys(0, jnp.int32(5), indices[::-1]), augmentation)
    np.testing.assert_array_equal(reversed_batch, np.asarray(augmented)[::-1])


def test_every_augmented_image_is_a_padded_crop_of_its_original_possibly_mirrored():
    images = photo_batch(6)
    augmented = np.asarray(jitted_augment_batch(images, example_keys(3, jnp.int32(0), jnp.arange(6)),
                                         Augmentation(crop_padding=2, pad_mode="zero")))
    shifted = 0
    for original, result in zip(images, augmented):
        padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
        views = [view for top, left in itertools.product(range(5), repeat=2)
                 for crop in [padded[top:top + 32, left:left + 32]] for view in (crop, crop[:, ::-1])]
        assert any(np.array_equal(result, view) for view in views)
        shifted += not np.array_equal(result, original)
    assert shifted >= 4  # 1 in 50 draws leaves an image as it was


def test_augmentation_is_off_unless_enabled():
    assert augmentation_for(False, 4, "reflect", 0) is None
    assert augmentation_for(True, 2, "zero", 6) == Augmentation(crop_padding=2, pad_mode="zero", flip=True, cutout=6)


# ---------------------------------------------------------------- schedules and optimizer


def schedule_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 10, "learning_rate": 0.1, **overrides}).resolved()


def test_constant_schedule_is_the_plain_rate_and_optimizer_is_unchanged():
    config = schedule_config()
    assert learning_rate_schedule(config, steps_per_epoch=100) == 0.1
    params = {"w": jnp.ones(3)}
    ours, adam = create_optimizer(config, 100), optax.adam(0.1)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(adam.init(params))
    grads = {"w": jnp.array([1.0, -2.0, 3.0])}
    np.testing.assert_array_equal(ours.update(grads, ours.init(params), params)[0]["w"],
                                  adam.update(grads, adam.init(params), params)[0]["w"])


def test_constant_schedule_with_warmup_ramps_linearly_then_holds():
    schedule = learning_rate_schedule(schedule_config(warmup_epochs=2.0), steps_per_epoch=50)
    assert [float(schedule(step)) for step in (0, 50, 100, 999)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(schedule_config(lr_schedule="cosine", warmup_epochs=1.0), steps_per_epoch=100)
    # 100 warm-up steps to the peak, then half a cosine over the remaining 900 steps.
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(550)) == pytest.approx(0.05, rel=1e-4)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)


def test_onecycle_schedule_rises_over_the_warmup_then_anneals():
    config = schedule_config(lr_schedule="onecycle")
    assert config.warmup_epochs == pytest.approx(3.0)  # the default: 0.3 x 10 epochs
    schedule = learning_rate_schedule(config, steps_per_epoch=100)
    assert float(schedule(0)) == pytest.approx(0.1 / 25)
    assert float(schedule(150)) == pytest.approx((0.1 + 0.1 / 25) / 2, rel=1e-4)
    assert float(schedule(300)) == pytest.approx(0.1)
    assert float(schedule(1000)) == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)


def test_weight_decay_and_clipping_change_the_update_as_documented():
    params = {"w": jnp.array([2.0, 0.0])}
    grads = {"w": jnp.array([0.0, 30.0])}
    sgd = create_optimizer(schedule_config(optimizer="sgd", weight_decay=0.5, grad_clip_norm=3.0), 10)
    updates, _ = sgd.update(grads, sgd.init(params), params)
    # Clipped to norm 3 first ([0, 3]), then L2 decay adds 0.5 * w ([1, 0]); SGD steps by -0.1 x that.
    np.testing.assert_allclose(updates["w"], [-0.1, -0.3], rtol=1e-6)
    adamw = create_optimizer(schedule_config(optimizer="adamw", weight_decay=0.5), 10)
    updates, _ = adamw.update({"w": jnp.zeros(2)}, adamw.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 * 2.0, 0.0], rtol=1e-6)  # decoupled: lr x wd x w
    assert schedule_config(optimizer="adamw").weight_decay == 1e-4  # optax's own default when unset


def test_steps_per_epoch_drops_the_partial_batch_and_refuses_a_too_large_batch():
    assert steps_per_epoch(50_000, 128) == 390
    with pytest.raises(ConfigError, match="batch_size 600 is larger than the 512 training images"):
        steps_per_epoch(512, 600)


def test_label_smoothing_mixes_the_uniform_distribution_into_the_targets():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    log_probs = jax.nn.log_softmax(logits)[0]
    smoothed = cross_entropy_loss(logits, jnp.array([0]), label_smoothing=0.3)
    expected = -(0.8 * log_probs[0] + 0.1 * log_probs[1] + 0.1 * log_probs[2])
    assert float(smoothed[0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(cross_entropy_loss(logits, jnp.array([0]))[0]) == pytest.approx(float(-log_probs[0]), rel=1e-6)


@pytest.mark.slow
def test_train_loss_is_reported_without_smoothing_while_the_gradient_follows_it():
    images, labels = photo_batch(16), np.arange(16, dtype=np.int32) % 10
    graphdef, params = init_params("model0", seed=2)
    devices = DeviceSet.select(4)
    plain_loss = float(cross_entropy_loss(apply_model(graphdef, params, images.astype(np.float32) / 255),
                                          labels).mean())
    reported, stepped = {}, {}
    for smoothing in (0.0, 0.3):
        config = TrainConfig(model="model0", batch_size=16, label_smoothing=smoothing, epochs=1).resolved()
        optimizer = create_optimizer(config, steps_per_epoch=1)
        step = build_train_step(config, graphdef, optimizer, devices)
        state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
        state, running = step(*devices.replicate((state, empty_running_metrics(), images, labels)),
                              devices.split(np.arange(16)))
        sums = parallel.unreplicate(running)
        reported[smoothing] = float(sums["loss_sum"]) / int(sums["count"])
        stepped[smoothing] = parallel.unreplicate(state).params
    assert reported[0.3] == pytest.approx(plain_loss, rel=1e-5) and reported[0.0] == pytest.approx(plain_loss, rel=1e-5)
    flat = {smoothing: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
            for smoothing, tree in stepped.items()}
    assert not np.allclose(flat[0.3], flat[0.0], rtol=0, atol=1e-6)  # smoothing changed the update


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

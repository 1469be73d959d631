"""On-device augmentation: crops, flips, cutout, reproducible from (seed, step, image index)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.augment import (Augmentation, augment_batch, augmentation_for, crop_with_padding, cut_out,
                               example_keys, flip_left_right)
from learnable import photo_batch

jitted_augment_batch = jax.jit(augment_batch, static_argnums=2)  # one compile instead of many small eager ops


def hand_made_image() -> np.ndarray:
    """A 6x5 RGB image whose every pixel value says where it is: 100*channel + 10*row + col."""
    rows, cols, channels = np.meshgrid(np.arange(6), np.arange(5), np.arange(3), indexing="ij")
    return (100 * channels + 10 * rows + cols).astype(np.uint8)


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

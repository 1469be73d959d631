"""Data augmentation on the device, inside the jitted train step: random crop with padding, horizontal flip, cutout.

Pure jnp functions on uint8 NHWC batches. Every image's randomness comes from `example_keys(seed, step, indices)`,
a function of (seed, optimizer step, dataset index) only, so a resumed run replays it exactly, nothing extra is
checkpointed, and the result does not depend on how many devices share the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

PAD_MODES = ("reflect", "zero")
# jnp.pad's names for the user-facing pad modes; "zero" pads black pixels (0 before normalisation).
_JNP_PAD_MODE = {"reflect": "reflect", "zero": "constant"}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What to do to each training image; static (hashable), so it is baked into the compiled step."""

    crop_padding: int = 4  # pad each side by this many pixels, then crop a random window of the original size
    pad_mode: str = "reflect"  # "reflect" or "zero"
    flip: bool = True  # mirror left-right with probability 1/2
    cutout: int = 0  # side of a square zeroed at a random centre (may overhang the edge); 0 = off


def example_keys(seed: int, step: jax.Array, image_indices: jax.Array) -> jax.Array:
    """One PRNG key per image of the batch, from (seed, step, the image's index in the training set)."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda index: jax.random.fold_in(step_key, index))(image_indices)


def flip_left_right(image_hwc: jax.Array, flip: jax.Array) -> jax.Array:
    return jnp.where(flip, image_hwc[:, ::-1, :], image_hwc)


def crop_with_padding(image_hwc: jax.Array, top: jax.Array, left: jax.Array, padding: int, pad_mode: str) -> jax.Array:
    """The HxW window at (top, left) of the image padded by `padding` on every side; (padding, padding) = no shift."""
    height, width, channels = image_hwc.shape
    padded = jnp.pad(image_hwc, ((padding, padding), (padding, padding), (0, 0)), mode=_JNP_PAD_MODE[pad_mode])
    return jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))


def cut_out(image_hwc: jax.Array, centre_row: jax.Array, centre_col: jax.Array, size: int) -> jax.Array:
    """Zero a size x size square centred at (centre_row, centre_col), clipped at the image's edges."""
    rows = jnp.arange(image_hwc.shape[0])[:, None]
    cols = jnp.arange(image_hwc.shape[1])[None, :]
    start_row, start_col = centre_row - size // 2, centre_col - size // 2
    inside = (rows >= start_row) & (rows < start_row + size) & (cols >= start_col) & (cols < start_col + size)
    return jnp.where(inside[:, :, None], jnp.zeros_like(image_hwc), image_hwc)


def augment_image(image_hwc: jax.Array, key: jax.Array, augmentation: Augmentation) -> jax.Array:
    crop_key, flip_key, cutout_key = jax.random.split(key, 3)
    pad = augmentation.crop_padding
    if pad:
        top, left = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
        image_hwc = crop_with_padding(image_hwc, top, left, pad, augmentation.pad_mode)
    if augmentation.flip:
        image_hwc = flip_left_right(image_hwc, jax.random.bernoulli(flip_key))
    if augmentation.cutout:
        centre = jax.random.randint(cutout_key, (2,), 0, jnp.array(image_hwc.shape[:2]))
        image_hwc = cut_out(image_hwc, centre[0], centre[1], augmentation.cutout)
    return image_hwc


def augment_batch(images_nhwc: jax.Array, keys: jax.Array, augmentation: Augmentation) -> jax.Array:
    """Each image augmented with its own key; same shape and dtype as the input."""
    return jax.vmap(augment_image, in_axes=(0, 0, None))(images_nhwc, keys, augmentation)


def augmentation_for(enabled: bool, crop_padding: int, pad_mode: str, cutout: int) -> Optional[Augmentation]:
    """The training config's augmentation, or None when it is off (then the step is exactly the un-augmented one)."""
    if not enabled:
        return None
    return Augmentation(crop_padding=crop_padding, pad_mode=pad_mode, flip=True, cutout=cutout)

"""Prediction: images from anywhere (arrays, files, folders, PIL images) → 32×32 uint8 → class probabilities.

Every input is first turned into a 32×32×3 uint8 image on the host (PIL converts the mode and resizes with
antialiasing), so one jitted data-parallel step with a fixed batch shape serves them all: a new number or size of
images never recompiles. Folders are streamed in chunks, so a folder of any size fits in memory, and a bad file
is reported next to the good ones instead of stopping the job.

    predictor = Predictor.from_checkpoint("checkpoints/model0-run", step="best")
    predictor.predict(images_nhwc_uint8).class_names
    for row in predictor.predict_paths("photos/"): print(row.path, row.top_k(3))
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import io
import itertools
import json
import operator
import os
import typing
import warnings
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from flax import nnx
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar_jax import checkpoint
from cifar_jax.config import check_positive_integer, is_whole_number
from cifar_jax.data import CIFAR10_MEAN, CIFAR10_STD
from cifar_jax.errors import CheckpointError, InputError, first_line, one_line
from cifar_jax.models import IMAGE_SHAPE, abstract_model, abstract_params
from cifar_jax.parallel import DeviceSet
from cifar_jax.steps import BatchedInference, check_batch_size

MODEL_SIZE = (IMAGE_SHAPE[1], IMAGE_SHAPE[0])  # (width, height), PIL's order
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # found in folders
# Below PIL's own warning threshold (89M), so a file whose header claims a huge image is refused before decoding.
MAX_IMAGE_PIXELS = 64_000_000
# Antialiased: a large image shrunk to 32×32 keeps its average colours instead of aliasing.
RESAMPLING = Image.Resampling.LANCZOS
ERROR_MODES = ("raise", "skip")
HALF_LEVEL = 0.5 / 255  # of a float pixel in [0, 1]
_HIGH_BIT_DEPTH_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

ImageInput = Union[np.ndarray, str, os.PathLike, Image.Image]


# ---------------------------------------------------------------- results


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most likely (class name, probability) pairs of one image, most likely first."""
    if not is_whole_number(k) or k < 1:
        raise InputError(f"k must be a whole number of classes, at least 1, got {k!r}")
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One row per usable input image, in input order."""

    probabilities: np.ndarray  # (N, num_classes) float32
    inputs: tuple[str, ...]  # what each row came from: a file path, or images[i] for arrays and PIL images
    classes: tuple[str, ...]  # the model's class names; class id i is classes[i]
    errors: tuple[tuple[str, str], ...] = ()  # (input, message) of each input skipped with errors="skip"

    @property
    def class_ids(self) -> np.ndarray:
        return self.probabilities.argmax(-1)

    @property
    def class_names(self) -> list[str]:
        """The predicted class name of each image."""
        return [self.classes[i] for i in self.class_ids]

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        return [top_classes(row, self.classes, k) for row in self.probabilities]

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, index: int) -> "ImagePrediction":
        """One image's result (its `path` is what it came from): label, probability, top_k, to_json."""
        index = operator.index(index)
        return ImagePrediction(self.inputs[index], self.classes, self.probabilities[index])

    def __iter__(self) -> Iterator["ImagePrediction"]:
        return (self[index] for index in range(len(self)))


@dataclasses.dataclass(frozen=True)
class ImagePrediction:
    """The result for one image (a file of `predict_paths`, a row of `Predictions`): probabilities, or the error that
    kept it from being read."""

    path: str
    classes: tuple[str, ...]
    probabilities: Optional[np.ndarray] = None  # (num_classes,) float32; None when `error` is set
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def _predicted(self) -> np.ndarray:
        if not self.ok:
            raise InputError(f"{self.path} has no prediction: {self.error}")
        return self.probabilities

    @property
    def class_id(self) -> int:
        return int(self._predicted().argmax())

    @property
    def label(self) -> str:
        return self.classes[self.class_id]

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.class_id])

    def top_k(self, k: int = 3) -> list[tuple[str, float]]:
        return top_classes(self._predicted(), self.classes, k)

    def to_json(self, k: int = 3) -> dict:
        """The CLI's --json record: path, label, probability, top_k as [name, probability] pairs; or path, error."""
        if not self.ok:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "probability": round(self.probability, 6),
                "top_k": [[name, round(p, 6)] for name, p in self.top_k(k)]}


# ---------------------------------------------------------------- images → 32×32 uint8


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit greys scaled down, transparency composited onto white."""
    if image.mode in _HIGH_BIT_DEPTH_GREY_MODES:
        # convert("RGB") would clip 16-bit values at 255 (a nearly white image); scale 0..65535 to 0..255 instead.
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(np.rint(grey / 257).astype(np.uint8))
    if image.has_transparency_data:
        # What lies under transparent pixels is arbitrary; white is what a viewer shows.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def resize_to_model(image_rgb: Image.Image) -> np.ndarray:
    """An RGB image as the model's 32×32×3 uint8 input (the whole image, stretched if not square)."""
    if image_rgb.size != MODEL_SIZE:
        image_rgb = image_rgb.resize(MODEL_SIZE, RESAMPLING)
    return np.asarray(image_rgb, dtype=np.uint8)


def pil_to_model_image(image: Image.Image) -> np.ndarray:
    """A PIL image, upright as its EXIF orientation says, as the model's 32×32×3 uint8 input."""
    return resize_to_model(to_rgb(ImageOps.exif_transpose(image)))


def read_image_file(path: Union[str, os.PathLike]) -> np.ndarray:
    """The model's 32×32×3 uint8 input from an image file (an animation's first frame); InputError names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:  # a name longer than the filesystem allows, no permission on a folder, ...
        raise InputError(f"{path} cannot be opened ({error.strerror or one_line(error)})") from None
    if path.is_dir():
        raise InputError(f"{path} is a folder: pass image files, or use predict_paths (the CLI does) to walk folders")
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes): not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _refuse_huge(image.size, path)
                if image.format == "JPEG":
                    # libjpeg can decode at 1/2, 1/4 or 1/8 scale: a big photo needs only a fraction of the work.
                    # (Not the same pixels as a full decode resized, so an array of it differs slightly.)
                    image.draft(None, (MODEL_SIZE[0] * 2, MODEL_SIZE[1] * 2))
                return pil_to_model_image(image)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path} claims an image over {MAX_IMAGE_PIXELS:,} pixels: refused as a possible "
                         "decompression bomb; shrink it first") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file PIL can read (expected PNG, JPEG, BMP, GIF, WebP, TIFF…)") from None
    except Exception as error:  # corrupt data can fail anywhere inside a decoder, with any exception type
        raise InputError(f"{path} could not be decoded ({first_line(error)}): "
                         "the file may be truncated or corrupt") from None


def _refuse_huge(size: tuple[int, int], path: Path) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{path} claims {width}×{height} pixels, over the {MAX_IMAGE_PIXELS:,} limit: refused as "
                         "a possible decompression bomb; shrink it first")


Failures = list[tuple[str, InputError]]  # (name of the input or image, what was wrong with it)


def array_to_model_images(array: Any, name: str) -> tuple[np.ndarray, list[str], Failures]:
    """(N,H,W,3) or (H,W,3), uint8 0..255 or float 0..1 → (model images, their names, errors of rows left out).

    A wrong rank, channel count or dtype spoils the whole array (InputError); NaN or out-of-range values
    spoil only their own image.
    """
    array = np.asarray(array)
    images = array[None] if array.ndim == 3 else array
    if images.ndim != 4:
        raise InputError(f"{name} has shape {array.shape}: expected RGB images shaped (N, H, W, 3) or (H, W, 3)")
    if images.shape[-1] != 3 and images.shape[-3] == 3:
        raise InputError(f"{name} has shape {array.shape}, channels first: expected channels last, (N, H, W, 3); "
                         "transpose it, e.g. np.moveaxis(images, -3, -1)")
    if images.shape[-1] != 3:
        raise InputError(f"{name} has {images.shape[-1]} channels (shape {array.shape}): expected 3 (RGB) last; "
                         "convert grey or RGBA images to RGB first, or add the channel axis")
    if 0 in images.shape[1:3]:
        raise InputError(f"{name} has shape {array.shape}: an image needs at least one pixel")
    row_names = [name] if array.ndim == 3 else [f"{name}[{i}]" for i in range(len(images))]
    images_uint8, row_errors = _as_uint8(images, row_names, name)
    bad_rows = sorted(row_errors)
    failures = [(row_names[i], row_errors[i]) for i in bad_rows]
    if bad_rows:
        images_uint8 = np.delete(images_uint8, bad_rows, axis=0)
        row_names = [n for i, n in enumerate(row_names) if i not in row_errors]
    return _resize_array(images_uint8), row_names, failures


def _as_uint8(images: np.ndarray, row_names: list[str], name: str) -> tuple[np.ndarray, dict[int, InputError]]:
    """uint8 as is; floats in [0, 1] rounded to 8 bits (all the model ever saw); bad float rows reported by index."""
    if images.dtype == np.uint8:
        return images, {}
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"{name} has dtype {images.dtype}: pass uint8 pixels (0..255) or floats in [0, 1]")
    flat = images.reshape(len(images), int(np.prod(images.shape[1:])))  # -1 is ambiguous for an empty batch
    has_nan = np.isnan(flat).any(axis=1)
    # Within half an 8-bit level of [0, 1] rounds into it (resampling overshoots by such amounts): clipped, not refused.
    out_of_range = ((flat < -HALF_LEVEL) | (flat > 1 + HALF_LEVEL)).any(axis=1) & ~has_nan
    errors = {int(i): InputError(f"{row_names[i]} contains NaN: pixel values must be numbers in [0, 1]")
              for i in np.flatnonzero(has_nan)}
    for i in np.flatnonzero(out_of_range):
        errors[int(i)] = InputError(
            f"{row_names[i]} has float values outside [0, 1] (min {flat[i].min():g}, max {flat[i].max():g}): "
            "scale float images to [0, 1], or pass uint8 0..255")
    valid = np.where(np.isfinite(images), images, 0)
    return np.rint(np.clip(valid, 0, 1) * 255).astype(np.uint8), errors


def _resize_array(images_uint8: np.ndarray) -> np.ndarray:
    """Through the same PIL resize as files, so an array and a file of the same picture give the same answer (a
    JPEG file of at least 128x128 is the exception: `read_image_file` decodes it at reduced scale, which moves some
    of its 32x32 pixels by a few levels)."""
    if images_uint8.shape[1:3] == IMAGE_SHAPE[:2]:
        return images_uint8
    resized = [resize_to_model(Image.fromarray(image)) for image in images_uint8]
    return np.stack(resized) if resized else np.empty((0,) + IMAGE_SHAPE, np.uint8)


def model_images(source: Any, name: str) -> tuple[np.ndarray, list[str], Failures]:
    """One input of `predict` (array, path or PIL image) → (model images, their names, errors of rows left out)."""
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source)[None], [name], []
    if isinstance(source, Image.Image):
        try:
            return pil_to_model_image(source)[None], [name], []
        except Exception as error:  # a closed image (PIL asserts), a lazy one whose file is gone or damaged
            raise InputError(f"{name} is a PIL image that cannot be read ({one_line(error)}): pass it open, "
                             "before `with Image.open(...)` closes it") from None
    if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        return array_to_model_images(source, name)
    raise InputError(f"{name} is a {type(source).__name__}: pass a numpy array, a file path or a PIL image")


def _named_inputs(images: Any) -> list[tuple[str, Any]]:
    """Each input with the name errors and results call it by: its path, or its position."""
    items = list(enumerate(images)) if isinstance(images, (list, tuple)) else [(None, images)]
    return [(os.fspath(item) if isinstance(item, (str, os.PathLike)) else
             "images" if i is None else f"images[{i}]", item) for i, item in items]


# ---------------------------------------------------------------- folders


def image_files(paths_or_directory: Union[str, os.PathLike, Iterable]) -> Iterator[Path]:
    """Files to predict, lazily: explicit paths as given (any name), folders walked recursively for image files.

    A folder with no image files is yielded itself, so it is reported rather than silently skipped.
    """
    paths = [paths_or_directory] if isinstance(paths_or_directory, (str, os.PathLike)) else paths_or_directory
    if not isinstance(paths, Iterable) or isinstance(paths, (bytes, np.ndarray)):
        raise InputError(f"expected a file or folder path, or a list of them, got {_brief(paths_or_directory)}: "
                         "pass arrays and PIL images to predict(), paths to predict_paths()")
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"expected file or folder paths, got {_brief(path)}: pass arrays and PIL images to "
                             "predict(), paths to predict_paths()")
        path = Path(path)
        if not _is_folder(path):
            yield path  # a missing or unreadable file is reported when it is read
            continue
        found = False
        for file in _walk_images(path):
            found = True
            yield file
        if not found:
            yield path


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name the system refuses: reported as that file's error
        return False


def _brief(value: Any) -> str:
    """A value's type and the start of its repr, on one line (an array's repr spans many)."""
    return f"{type(value).__name__} {' '.join(repr(value).split()):.60}"


def _walk_images(folder: Path) -> Iterator[Path]:
    for root, dirnames, filenames in os.walk(folder):
        dirnames.sort()  # a stable order, so reruns list results the same way
        for filename in sorted(filenames):
            if filename.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(root) / filename


def read_image_path(path: Path) -> np.ndarray:
    """`read_image_file` for what `image_files` yields: a folder among them is one without image files."""
    if _is_folder(path):
        raise InputError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return read_image_file(path)


DecodedImage = Union[np.ndarray, InputError]


def _read_or_error(path: Path) -> DecodedImage:
    try:
        return read_image_path(path)
    except InputError as error:
        return error


def default_decode_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decoded_files(files: Iterable[Path], workers: Optional[int], ahead: int) -> Iterator[tuple[Path, DecodedImage]]:
    """Each file as the model's 32x32 input (or the InputError that kept it from being read), in input order,
    decoded on `workers` threads (default: one per core): Pillow lets go of the GIL while it decodes and resizes.
    At most `ahead` files are decoding or decoded beyond the one handed out, so memory stays bounded whatever the
    number of files. The arguments are checked at once; decoding starts with the first file asked for."""
    workers = default_decode_workers() if workers is None else workers
    check_positive_integer("decode_workers", workers)
    return _decoded_in_order(files, workers, ahead)


def _decoded_in_order(files: Iterable[Path], workers: int, ahead: int) -> Iterator[tuple[Path, DecodedImage]]:
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cifar-jax-decode") as pool:
        pending: collections.deque = collections.deque()
        try:
            for path in files:
                pending.append((path, pool.submit(_read_or_error, path)))
                if len(pending) > ahead:
                    path, decoding = pending.popleft()
                    yield path, decoding.result()
            while pending:
                path, decoding = pending.popleft()
                yield path, decoding.result()
        finally:  # a caller that stops early (an error, a break) leaves nothing decoding
            for _, decoding in pending:
                decoding.cancel()


def shard(files: Iterable[Path], num_shards: int = 1, shard_index: int = 0) -> Iterator[Path]:
    """Every num_shards-th file from shard_index on: N machines (or N array tasks) given the same paths each take
    their own share, and together every file exactly once (the order is deterministic: folders are walked sorted)."""
    check_positive_integer("num_shards", num_shards)
    if not is_whole_number(shard_index) or not 0 <= shard_index < num_shards:
        raise InputError(f"shard_index must be from 0 to num_shards - 1 ({num_shards - 1}), got {shard_index!r}")
    return (path for number, path in enumerate(files) if number % num_shards == shard_index)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# ---------------------------------------------------------------- the model


def _check_errors_mode(errors: str) -> None:
    if errors not in ERROR_MODES:
        raise InputError(f"errors must be 'raise' or 'skip', got {errors!r}")


def _check_normalization(normalization: dict, location: Any) -> None:
    """normalize_images applies the package's constants; a checkpoint trained with others would be misread."""
    expected = {"scale": 1 / 255, "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    for key, value in expected.items():
        if not np.allclose(normalization.get(key, value), value):
            raise CheckpointError(f"checkpoint in {location} was trained with normalization {key}="
                                  f"{normalization[key]}, but this version applies {value}: predict with the "
                                  "cifar-jax version that trained it")


class Predictor:
    """A restored model ready for images of any kind and number, spread over all local devices.

    `batch_size` images go to the devices per step (all devices together; unset: the backend's evaluation batch),
    padded, so any number of images uses the same compiled step.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: dict, class_names: Sequence[str], standardize: bool,
                 batch_size: Optional[int] = None, devices: Optional[DeviceSet] = None,
                 metadata: Optional[dict] = None, step: Optional[int] = None, tta_flip: bool = False,
                 kernels: str = "auto"):
        devices = devices or DeviceSet.select()
        self.class_names = tuple(class_names)
        self.metadata = metadata or {}
        self.step = step
        self._inference = BatchedInference(graphdef, standardize, devices, batch_size, tta_flip, kernels,
                                           probabilities=True)
        self._params = devices.replicate(params)

    @property
    def batch_size(self) -> int:
        return self._inference.batch_size

    @property
    def devices(self) -> DeviceSet:
        return self._inference.devices

    @property
    def trace_count(self) -> int:
        """How often JAX traced (= compiled) the step: stays 1 whatever number of images the calls pass."""
        return self._inference.trace_count

    @classmethod
    def from_checkpoint(cls, workdir_or_checkpoint: Union[str, os.PathLike], step: Union[str, int] = "best",
                        batch_size: Optional[int] = None, num_devices: Optional[int] = None) -> "Predictor":
        """The model of a run's checkpoint: `step` is 'best' (by test accuracy), 'latest' or a step number."""
        if batch_size is not None:
            check_batch_size(batch_size)
        restored = checkpoint.restore_for_inference(workdir_or_checkpoint, step, abstract_params)
        metadata = restored.metadata
        normalization = metadata["normalization"]
        _check_normalization(normalization, workdir_or_checkpoint)
        graphdef, _ = abstract_model(metadata["model"])
        return cls(graphdef, restored.params, metadata["class_names"], normalization["standardize"],
                   batch_size=batch_size, devices=DeviceSet.select(num_devices), metadata=metadata,
                   step=restored.step, tta_flip=bool(metadata.get("config", {}).get("tta_flip")))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, num_classes) float32 class probabilities of an array of images, read as `predict` reads one:
        (N,H,W,3) or (H,W,3), uint8 or float in [0, 1]; InputError for anything else. (N, 32, 32, 3) uint8, what
        the model takes, goes straight to the devices."""
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == IMAGE_SHAPE):
            images, _, failures = array_to_model_images(images, "images")
            if failures:
                raise failures[0][1]
        return self._inference(self._params, images)

    # ------------------------------------------------------------ public entry points

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], errors: str = "raise") -> Predictions:
        """Class probabilities of images: an array (N,H,W,3)/(H,W,3) uint8 or float in [0, 1], a file path,
        a PIL image, or a list mixing them; any size up to 64 megapixels is resized to 32×32.

        errors="raise" stops at the first bad input (InputError naming it); "skip" leaves it out and lists it
        in the result's `errors`.
        """
        _check_errors_mode(errors)
        blocks, names, failures = [], [], []
        for name, source in _named_inputs(images):
            try:
                block, row_names, row_failures = model_images(source, name)
            except InputError as error:
                block, row_names, row_failures = None, [], [(name, error)]
            if row_failures and errors == "raise":
                raise row_failures[0][1]
            failures += [(failed, str(error)) for failed, error in row_failures]
            if block is not None:
                blocks.append(block)
                names += row_names
        images_uint8 = np.concatenate(blocks) if blocks else np.empty((0,) + IMAGE_SHAPE, np.uint8)
        return Predictions(self.probabilities(images_uint8), tuple(names), self.class_names, tuple(failures))

    def predict_paths(self, paths_or_directory: Union[str, os.PathLike, Iterable], batch_size: Optional[int] = None,
                      errors: str = "skip", decode_workers: Optional[int] = None, num_shards: int = 1,
                      shard_index: int = 0, skip: Collection[str] = ()) -> Iterator[ImagePrediction]:
        """Stream predictions for files and folders (walked recursively), one result per file, in order.

        Files are decoded on `decode_workers` threads (default: every core) up to two batches ahead, while the
        devices work on the batch before; `batch_size` files go to the devices at a time. With `num_shards`, only
        this shard's share of the files (see `shard`); files named in `skip` (their paths as results give them) are
        left out. errors="skip" (default) yields a result with `error` set for a bad file and goes on; "raise" yields
        the results of the files before it, then raises its InputError.
        """
        _check_errors_mode(errors)  # checked now, not when the first result is asked for
        if batch_size is not None:
            check_batch_size(batch_size)
        batch_size = batch_size or self.batch_size
        files = shard(image_files(paths_or_directory), num_shards, shard_index)
        if skip:
            files = (path for path in files if str(path) not in skip)
        decoded = decoded_files(files, decode_workers, ahead=2 * batch_size)
        return self._predicted_files(_chunks(decoded, batch_size), errors)

    def _predicted_files(self, chunks: Iterator[list], errors: str) -> Iterator[ImagePrediction]:
        previous = None
        for decoded in chunks:
            first_bad = next((i for i, (_, image) in enumerate(decoded) if isinstance(image, InputError)), None)
            stop_with = None
            if first_bad is not None and errors == "raise":  # every file before it still gets its result
                stop_with, decoded = decoded[first_bad][1], decoded[:first_bad]
            good = [image for _, image in decoded if not isinstance(image, InputError)]
            launched = self._inference.launch(self._params, np.stack(good)) if good else []
            if previous is not None:
                yield from self._path_results(*previous)
            previous = (decoded, launched)
            if stop_with is not None:
                yield from self._path_results(*previous)
                raise stop_with
        if previous is not None:
            yield from self._path_results(*previous)

    def _path_results(self, decoded: list, launched: list) -> Iterator[ImagePrediction]:
        probabilities = iter(self._inference.gather(launched))
        for path, image in decoded:
            if isinstance(image, InputError):
                yield ImagePrediction(str(path), self.class_names, error=str(image))
            else:
                yield ImagePrediction(str(path), self.class_names, probabilities=next(probabilities))


# ---------------------------------------------------------------- results to a file, as they come


class PredictionsFile:
    """Results written as they come, one line each, flushed at once: JSON lines (`.jsonl`/`.json`) or CSV (`.csv`).

    A job killed midway keeps every line it wrote; `resume=True` reads them back so a rerun skips those files (give
    the same paths as the first run) and appends the rest; a line the kill cut short is written again. An existing
    file is never overwritten, none is created before the first result, and a file that is not one of earlier
    results is refused untouched.
    """

    CSV_COLUMNS = ("path", "label", "probability", "top_k", "error")

    def __init__(self, path: Union[str, os.PathLike], top_k: int = 3, resume: bool = False):
        self.path, self.top_k = Path(path), top_k
        self.kind = self._kind(self.path)
        if self.path.exists() and not resume:
            raise InputError(f"{self.path} already exists: add --resume to finish it, or choose another --output")
        self.done: dict[str, bool] = {}  # path → whether its earlier result was an error
        self._complete_bytes = None
        if resume and self.path.exists():
            self.done, self._complete_bytes = self._earlier_results()
        self.file = self.csv = None

    @staticmethod
    def _kind(path: Path) -> str:
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv"):
            raise InputError(f"--output {path}: name it .jsonl (JSON lines) or .csv")
        return "csv" if suffix == ".csv" else "jsonl"

    def _earlier_results(self) -> tuple[dict[str, bool], int]:
        """{path: failed} of the complete lines, and their length in bytes (a line cut short is dropped later)."""
        try:
            data = self.path.read_bytes()
            complete = data[:data.rfind(b"\n") + 1]
            text = complete.decode("utf-8", "surrogateescape")
            if self.kind == "csv":
                reader = csv.DictReader(io.StringIO(text, newline=""))
                rows = list(reader)
                if text and tuple(reader.fieldnames or ()) != self.CSV_COLUMNS:
                    raise ValueError(f"its columns are not {', '.join(self.CSV_COLUMNS)}")
                return {row["path"]: bool(row["error"]) for row in rows}, len(complete)
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            return {record["path"]: "error" in record for record in records}, len(complete)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{self.path} is not a file of earlier results ({one_line(error)}): choose another "
                             "--output") from None

    def write(self, result: ImagePrediction) -> None:
        if self.file is None:
            self._open()
        record = result.to_json(self.top_k)
        try:
            if self.csv is None:
                self.file.write(json.dumps(record) + "\n")
            else:
                top = ";".join(f"{name}:{p}" for name, p in record.get("top_k", []))
                self.csv.writerow([record["path"], record.get("label", ""), record.get("probability", ""), top,
                                   record.get("error", "")])
            self.file.flush()
        except OSError as error:
            self._refuse(error)

    def _open(self) -> None:
        try:
            if self._complete_bytes is not None and self._complete_bytes != self.path.stat().st_size:
                with open(self.path, "r+b") as file:  # the line a kill cut short: it is written again whole
                    file.truncate(self._complete_bytes)
            header = self.kind == "csv" and (not self.path.exists() or self.path.stat().st_size == 0)
            self.file = open(self.path, "a", newline="", encoding="utf-8", errors="surrogateescape")
        except OSError as error:
            self._refuse(error)
        if self.kind == "csv":
            self.csv = csv.writer(self.file)
            if header:
                self.csv.writerow(self.CSV_COLUMNS)

    def _refuse(self, error: OSError) -> typing.NoReturn:
        raise InputError(f"cannot write {self.path} ({error.strerror or one_line(error)}): free disk space or choose "
                         "another --output; --resume continues it") from None

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as error:
                self._refuse(error)

    def __enter__(self) -> "PredictionsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""CIFAR-10 as uint8 NHWC arrays in host memory, from a prepared TFDS dataset, an official archive, a download,
or random pixels for smoke tests.

Images stay uint8 on the host (4x smaller than float32); `normalize_images` makes floats on the device, inside
the jitted step. The official archives are parsed with numpy alone: no TensorFlow, one pass over the gzip stream.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import io
import os
import pickle
import socket
import tarfile
import threading
import urllib.parse
import urllib.request
import warnings
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

import jax.numpy as jnp
import numpy as np

from cifar_jax.errors import DataError, one_line

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the 50,000 training images on the [0, 1] scale (the commonly published values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DATA_SOURCES = ("auto", "tfds", "archive", "download", "synthetic")
SYNTHETIC_SOURCE = "synthetic (random pixels; not CIFAR-10)"

# Module constants rather than arguments so that tests can point the download at a local or dead address.
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# The sha256 TFDS registers for DOWNLOAD_URL (tensorflow_datasets/url_checksums/cifar10.txt).
DOWNLOAD_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
# Seconds allowed for the name lookup, the connection and each read: with no network, fail fast.
DOWNLOAD_TIMEOUT_S = 10.0

_PIXELS_PER_IMAGE = 32 * 32 * 3
_BINARY_RECORD_BYTES = 1 + _PIXELS_PER_IMAGE  # one label byte, then the red, green and blue 32x32 planes
_TFDS_NAME = "cifar10"


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class Cifar10:
    """The whole data set in host memory: images (N, 32, 32, 3) uint8 NHWC, labels (N,) int32 class ids."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple = CLASS_NAMES
    source: str = ""  # where the arrays came from, for reports: "tfds:<dir>", "archive:<path>", SYNTHETIC_SOURCE

    @functools.cached_property  # computed once per data set, though every checkpoint records it
    def fingerprint(self) -> dict:
        """What identifies the contents whatever their order or where they were read from: image counts, train
        images per class, and pixel sums (a run resumed on other data would silently mix two data sets)."""
        return {
            "train_images": len(self.train_labels),
            "test_images": len(self.test_labels),
            "train_per_class": np.bincount(self.train_labels, minlength=len(CLASS_NAMES)).tolist(),
            "pixel_sums": [int(self.train_images.sum(dtype=np.uint64)), int(self.test_images.sum(dtype=np.uint64))],
        }


def check_dataset(dataset: Any, needs: str = "test") -> Cifar10:
    """A data set handed in from Python, checked as the loaders check theirs: a Cifar10 of uint8 NHWC 32×32 RGB
    images with labels 0-9 and at least one example in the `needs` split."""
    if not isinstance(dataset, Cifar10):
        raise DataError(f"expected a cifar_jax.data.Cifar10, got {type(dataset).__name__}: build one with "
                        "Cifar10(train_images, train_labels, test_images, test_labels), or load_cifar10(...)")
    images, labels = getattr(dataset, f"{needs}_images"), getattr(dataset, f"{needs}_labels")
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
        raise DataError(f"the data set's {needs} images are {images.dtype} {images.shape} for {len(labels)} labels: "
                        "expected uint8 (N, 32, 32, 3), one label each")
    if not len(labels):
        raise DataError(f"the data set has no {needs} images")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise DataError(f"the data set's {needs} labels must be class ids 0-9, got {labels.dtype} from "
                        f"{labels.min()} to {labels.max()}")
    return dataset


def default_data_dir() -> Path:
    """Where TFDS keeps data sets: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


def normalize_images(images_uint8, standardize: bool = False):
    """uint8 images -> float32 in [0, 1]; with `standardize`, per-channel (x - mean) / std. Pure, for jitted code."""
    images = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    if standardize:
        images = (images - jnp.asarray(CIFAR10_MEAN, jnp.float32)) / jnp.asarray(CIFAR10_STD, jnp.float32)
    return images


def synthetic_cifar10(num_train: int = 50000, num_test: int = 10000, seed: int = 0) -> Cifar10:
    """Random pixels and labels of CIFAR-10's shapes: for smoke tests and timing, never for accuracy."""
    rng = np.random.default_rng(seed)
    return Cifar10(
        train_images=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
        train_labels=rng.integers(0, len(CLASS_NAMES), num_train).astype(np.int32),
        test_images=rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
        test_labels=rng.integers(0, len(CLASS_NAMES), num_test).astype(np.int32),
        source=SYNTHETIC_SOURCE,
    )


def load_cifar10(data_dir: Union[str, os.PathLike, None] = None, source: str = "auto") -> Cifar10:
    """Loads CIFAR-10 from `source`; "auto" tries, in order: a TFDS-prepared `cifar10` in data_dir, an official
    archive (packed or unpacked) in data_dir or data_dir/downloads/manual, then a download into data_dir."""
    if source not in DATA_SOURCES:
        raise DataError(f"unknown data source {source!r}: choose one of {', '.join(DATA_SOURCES)}")
    if source == "synthetic":
        return synthetic_cifar10()
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} is a file, not a folder: pass the folder that holds the dataset")
    if source in ("auto", "tfds"):
        version_dir = _prepared_tfds_dir(data_dir)
        if version_dir is not None:
            return _load_tfds(version_dir)
        if source == "tfds":
            raise DataError(f"no cifar10 prepared by TFDS in array_record or parquet format under "
                            f"{data_dir / _TFDS_NAME}: prepare it with TFDS, or use the 'archive' or 'auto' source")
    if source in ("auto", "archive"):
        found = _find_archive(data_dir)
        if found is not None:
            return _load_archive(*found)
        if source == "archive":
            raise DataError(f"no CIFAR-10 archive in {data_dir}: place {_BINARY.archive_name} or "
                            f"{_PYTHON.archive_name} (packed or unpacked) in {data_dir} or {data_dir / 'downloads' / 'manual'}")
    return _load_archive(_download_official_archive(data_dir), _BINARY, hand_placed=False)


# ---- Decoding one batch file (both official formats) -------------------------------------------------------------

def _planes_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) rows of red, green and blue 32x32 planes -> (N, 32, 32, 3)."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _checked_labels(labels, where: str) -> np.ndarray:
    try:
        labels = np.asarray(labels)
    except ValueError:  # ragged nested lists
        labels = np.asarray([None])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} holds labels that are not class ids (numbers 0-9): the file is corrupt or not "
                        "CIFAR-10; replace it with a fresh copy")
    out_of_range = labels[(labels < 0) | (labels >= len(CLASS_NAMES))]
    if out_of_range.size:
        raise DataError(f"{where} holds label {out_of_range[0]}, but CIFAR-10 labels are 0-9: "
                        "the file is corrupt; replace it with a fresh copy")
    return labels.astype(np.int32)


def _decode_binary_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if len(blob) % _BINARY_RECORD_BYTES:
        raise DataError(f"{where} has {len(blob)} bytes, not a whole number of {_BINARY_RECORD_BYTES}-byte records: "
                        "the file is truncated or corrupt; replace it with a fresh copy")
    records = np.frombuffer(blob, np.uint8).reshape(-1, _BINARY_RECORD_BYTES)
    return _planes_to_nhwc(records[:, 1:]), _checked_labels(records[:, 0], where)


class _BatchUnpickler(pickle.Unpickler):
    """Admits only the globals an official python batch holds (the pieces of one numpy array): a plain
    pickle.load would call whatever a doctored file names, os.system included."""
    _RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR-10 files never hold")
        return self._ALLOWED[module, name]


def _decode_python_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()  # the files come from Python 2
    except Exception as error:  # a damaged pickle fails in many ways; all mean the same to the user
        raise DataError(f"{where} is not a CIFAR-10 python batch ({one_line(error)}): "
                        "replace it with a fresh copy of the official archive") from None
    rows = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(rows, np.ndarray) and rows.dtype == np.uint8 and rows.ndim == 2
            and rows.shape[1] == _PIXELS_PER_IMAGE and isinstance(labels, list) and len(labels) == len(rows)):
        raise DataError(f"{where} lacks the b'data' (N, 3072) uint8 array or the N b'labels' of a CIFAR-10 python "
                        "batch: replace it with a fresh copy of the official archive")
    return _planes_to_nhwc(rows), _checked_labels(labels, where)


@dataclasses.dataclass(frozen=True)
class _ArchiveFormat:
    """One of the two official archive layouts."""
    archive_name: str  # the file to place, e.g. cifar-10-binary.tar.gz
    folder: str  # the folder its members sit in, and that unpacking it creates
    train_members: tuple
    test_member: str
    official_sha256: str
    decode_batch: Callable[[bytes, str], tuple]  # (file bytes, where for messages) -> (images, labels)


_BINARY = _ArchiveFormat("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                         tuple(f"data_batch_{number}.bin" for number in range(1, 6)), "test_batch.bin",
                         DOWNLOAD_SHA256, _decode_binary_batch)
# The python archive's sha256 is not registered in TFDS; this is the one Keras checks for the same file.
_PYTHON = _ArchiveFormat("cifar-10-python.tar.gz", "cifar-10-batches-py",
                         tuple(f"data_batch_{number}" for number in range(1, 6)), "test_batch",
                         "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", _decode_python_batch)


# ---- Official archives, packed or unpacked ---------------------------------------------------------------------

def _find_archive(data_dir: Path) -> Optional[tuple[Path, _ArchiveFormat]]:
    """The first official archive or unpacked folder in data_dir, then in data_dir/downloads/manual (TFDS's place)."""
    for folder in (data_dir, data_dir / "downloads" / "manual"):
        for archive_format in (_BINARY, _PYTHON):
            if (folder / archive_format.archive_name).is_file():
                return folder / archive_format.archive_name, archive_format
            if (folder / archive_format.folder).is_dir():
                return folder / archive_format.folder, archive_format
    return None


def _read_tar_gz_members(archive_bytes: bytes, archive_format: _ArchiveFormat, where: Path) -> dict[str, bytes]:
    """{member name: bytes} of the archive's batch files, in one pass over the gzip stream."""
    wanted = {(archive_format.folder, name) for name in (*archive_format.train_members, archive_format.test_member)}
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r:gz") as tar:
            for member in tar:
                folder_and_name = PurePosixPath(member.name).parts[-2:]
                if member.isfile() and folder_and_name in wanted:
                    members[folder_and_name[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(f"{where} is not a readable .tar.gz ({one_line(error)}): it is truncated or corrupt; "
                        f"delete it and place a fresh copy of {archive_format.archive_name}") from None
    return members


def _read_folder_members(folder: Path, archive_format: _ArchiveFormat) -> dict[str, bytes]:
    names = (*archive_format.train_members, archive_format.test_member)
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def _warn_if_unofficial(archive_bytes: bytes, path: Path, archive_format: _ArchiveFormat) -> None:
    digest = hashlib.sha256(archive_bytes).hexdigest()
    if digest != archive_format.official_sha256:
        warnings.warn(f"{path} is not the official {archive_format.archive_name} (sha256 {digest}, official "
                      f"{archive_format.official_sha256}); using it anyway because it was placed by hand", stacklevel=4)


def _check_equal_batches(path: Path, archive_format: _ArchiveFormat, image_counts: dict[str, int]) -> None:
    """The training batch files split the images evenly (10,000 each in the official archive): a file cut exactly at
    a record boundary still decodes, but holds fewer."""
    shortest = min(image_counts, key=image_counts.get)
    if max(image_counts.values()) - image_counts[shortest] > 1:
        raise DataError(f"{path}: {shortest} holds {image_counts[shortest]} images, the other batch files up to "
                        f"{max(image_counts.values())}: it is truncated; replace it with a fresh copy of "
                        f"{archive_format.archive_name}")


def _load_archive(path: Path, archive_format: _ArchiveFormat, hand_placed: bool = True) -> Cifar10:
    """Reads a packed (.tar.gz) or unpacked archive; a hand-placed packed one is trusted, with a warning if unofficial."""
    if path.is_dir():
        members = _read_folder_members(path, archive_format)
    else:
        archive_bytes = path.read_bytes()
        if hand_placed:
            _warn_if_unofficial(archive_bytes, path, archive_format)
        members = _read_tar_gz_members(archive_bytes, archive_format, path)
    split_members = {"train": archive_format.train_members, "test": (archive_format.test_member,)}
    arrays = {}
    for split, names in split_members.items():
        missing = [name for name in names if name not in members]
        if missing:
            raise DataError(f"{path} lacks {archive_format.folder}/{missing[0]}: it is incomplete; "
                            f"replace it with a fresh copy of {archive_format.archive_name}")
        batches = [archive_format.decode_batch(members[name], f"{path}: {name}") for name in names]
        _check_equal_batches(path, archive_format, {name: len(labels) for name, (_, labels) in zip(names, batches)})
        arrays[split] = (np.concatenate([images for images, _ in batches]),
                         np.concatenate([labels for _, labels in batches]))
    for split, (_, labels) in arrays.items():
        if not len(labels):
            raise DataError(f"{path} holds no {split} images (its {', '.join(split_members[split])} "
                            f"{'is' if split == 'test' else 'are'} empty): replace it with a fresh copy of "
                            f"{archive_format.archive_name}")
    return Cifar10(*arrays["train"], *arrays["test"], class_names=CLASS_NAMES, source=f"archive:{path}")


# ---- Download ---------------------------------------------------------------------------------------------------

def _check_reachable(url: str, timeout_s: float) -> None:
    """Raises OSError unless url's host (or its proxy) accepts a connection within timeout_s. urllib's own timeout
    does not cover the name lookup, which with no network can hang for minutes."""
    target = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname):
        target = urllib.parse.urlsplit(proxy)
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict = {}

    def connect():
        try:
            socket.create_connection((target.hostname, port), timeout=timeout_s).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=connect, daemon=True)  # daemon: a hung lookup must not keep Python alive
    thread.start()
    thread.join(timeout_s)
    if "ok" not in outcome:
        raise outcome.get("error") or TimeoutError(f"no answer from {target.hostname} within {timeout_s:g} s")


def _fetch(url: str, destination: Path, timeout_s: float) -> str:
    """Streams url into destination with a progress bar; returns the sha256 of what arrived."""
    from tqdm import tqdm  # imported here: only downloads draw progress bars

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(destination, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {destination.name}") as progress:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                progress.update(len(chunk))
    return digest.hexdigest()


def _download_official_archive(data_dir: Path) -> Path:
    """DOWNLOAD_URL -> data_dir/cifar-10-binary.tar.gz, kept only if its sha256 is DOWNLOAD_SHA256."""
    destination = data_dir / _BINARY.archive_name
    if destination.is_file():
        if hashlib.sha256(destination.read_bytes()).hexdigest() == DOWNLOAD_SHA256:
            return destination
        raise DataError(f"{destination} exists but is not the official archive: move it away to download a "
                        "fresh copy, or load it with the 'archive' source")
    partial = destination.with_name(destination.name + ".part")
    try:
        _check_reachable(DOWNLOAD_URL, DOWNLOAD_TIMEOUT_S)
        data_dir.mkdir(parents=True, exist_ok=True)
        digest = _fetch(DOWNLOAD_URL, partial, DOWNLOAD_TIMEOUT_S)
    except (OSError, http.client.HTTPException, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise DataError(f"CIFAR-10 is not in {data_dir} and downloading {DOWNLOAD_URL} failed ({one_line(error)}): "
                        f"place {_BINARY.archive_name} (or {_PYTHON.archive_name}) in {data_dir} and run again") from None
    if digest != DOWNLOAD_SHA256:
        partial.unlink()
        raise DataError(f"the download from {DOWNLOAD_URL} has sha256 {digest}, not the official {DOWNLOAD_SHA256}, "
                        f"so it was deleted: try again, or place {_BINARY.archive_name} in {data_dir} by hand")
    partial.replace(destination)
    return destination


# ---- A dataset prepared by TFDS ---------------------------------------------------------------------------------

def _version_key(folder: Path) -> tuple:
    return tuple(int(part) for part in folder.name.split("."))


def _prepared_tfds_dir(data_dir: Path) -> Optional[Path]:
    """The newest data_dir/cifar10/<version> holding a finished TFDS preparation that TFDS can read without
    TensorFlow (array_record or parquet shards). Decided from file names alone, so TFDS is never asked for a
    dataset it does not have: asked, it would start a download."""
    candidates = [info.parent for info in (data_dir / _TFDS_NAME).glob("*/dataset_info.json")
                  if info.parent.name.replace(".", "").isdigit()]  # skips TFDS's half-written *.incomplete* folders

    def has_shards(folder: Path, split: str) -> bool:
        return any(any(folder.glob(f"{_TFDS_NAME}-{split}.{file_format}*")) for file_format in ("array_record", "parquet"))

    complete = [folder for folder in candidates if has_shards(folder, "train") and has_shards(folder, "test")]
    return max(complete, key=_version_key, default=None)


def _read_tfds_split(split_source, where: str) -> tuple[np.ndarray, np.ndarray]:
    # Record by record: the batched __getitems__ is broken under tfds.testing.mock_data, which tests rely on.
    examples = [split_source[index] for index in range(len(split_source))]
    images = np.stack([np.asarray(example["image"], np.uint8) for example in examples])
    if images.shape[1:] != (32, 32, 3):
        raise DataError(f"{where} holds images of shape {images.shape[1:]}, not (32, 32, 3): prepare it again")
    return images, _checked_labels([example["label"] for example in examples], where)


def _load_tfds(version_dir: Path) -> Cifar10:
    import tensorflow_datasets as tfds  # imported here: it costs half a second and most runs read an archive

    try:
        train_source, test_source = tfds.data_source(f"{_TFDS_NAME}:{version_dir.name}", split=["train", "test"],
                                                     data_dir=version_dir.parent.parent, download=False)
        train = _read_tfds_split(train_source, f"{version_dir} (train)")
        test = _read_tfds_split(test_source, f"{version_dir} (test)")
    except DataError:
        raise
    except Exception as error:  # TFDS fails in many ways on damaged files; all mean the same to the user
        raise DataError(f"reading the TFDS dataset in {version_dir} failed ({one_line(error)}): prepare it again, "
                        f"or remove {version_dir} to load an official archive instead") from None
    return Cifar10(*train, *test, class_names=CLASS_NAMES, source=f"tfds:{version_dir}")

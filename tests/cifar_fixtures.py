"""Tiny CIFAR-10 data sets written in the official layouts, for tests that must not touch real data.

Typical use (any test file under tests/ can `import cifar_fixtures`):

    data = tiny_dataset()                                   # 30 train + 10 test images, known pixels
    write_binary_archive(tmp_path / "cifar-10-binary.tar.gz", *data)
    loaded = load_cifar10(tmp_path)                         # gives back exactly `data`

The array arguments everywhere are, in order: train_images (N,32,32,3) uint8 NHWC, train_labels (N,) ints,
test_images, test_labels. Train records are spread over data_batch_1..5 like the official files.
"""
import io
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cifar_jax.data import CLASS_NAMES

BINARY_FOLDER = "cifar-10-batches-bin"
PYTHON_FOLDER = "cifar-10-batches-py"


class TinyData(NamedTuple):
    """A small data set; unpack it straight into the writers: `write_binary_archive(path, *data)`."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def tiny_dataset(num_train: int = 30, num_test: int = 10, seed: int = 0) -> TinyData:
    """Random uint8 images (N,32,32,3) and int32 labels in 0..9, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    return TinyData(
        rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, num_train).astype(np.int32),
        rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, num_test).astype(np.int32),
    )


def _rows_of_planes(images_nhwc: np.ndarray) -> np.ndarray:
    """(N,32,32,3) -> (N,3072): the red plane, then green, then blue, as in the official files."""
    return np.ascontiguousarray(np.asarray(images_nhwc, np.uint8).transpose(0, 3, 1, 2)).reshape(len(images_nhwc), 3072)


def _train_batches(train_images, train_labels):
    """Five (images, labels) chunks named data_batch_1..5, as evenly split as the count allows."""
    chunks = zip(np.array_split(np.asarray(train_images), 5), np.array_split(np.asarray(train_labels), 5))
    return {f"data_batch_{number}": chunk for number, chunk in enumerate(chunks, start=1)}


def binary_records(images_nhwc, labels) -> bytes:
    """The official binary record layout: per image one label byte, then 3072 pixel bytes."""
    labels_column = np.asarray(labels, np.uint8).reshape(-1, 1)
    return np.concatenate([labels_column, _rows_of_planes(images_nhwc)], axis=1).tobytes()


def python_batch(images_nhwc, labels, batch_label: str = "tiny batch") -> bytes:
    """One official python batch: a pickled dict with bytes keys, pixels as a (N,3072) uint8 array."""
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(label) for label in labels],
        b"data": _rows_of_planes(images_nhwc),
        b"filenames": [f"image_{index}.png".encode() for index in range(len(labels))],
    }
    # Protocol 3 pickles an array through the same three globals as the official (Python 2) files;
    # the official files name the numpy module by its old path, so write that too.
    return pickle.dumps(batch, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def binary_members(train_images, train_labels, test_images, test_labels) -> dict:
    """{member path: bytes} of cifar-10-binary.tar.gz for these arrays."""
    members = {f"{BINARY_FOLDER}/{name}.bin": binary_records(*chunk)
               for name, chunk in _train_batches(train_images, train_labels).items()}
    members[f"{BINARY_FOLDER}/test_batch.bin"] = binary_records(test_images, test_labels)
    members[f"{BINARY_FOLDER}/batches.meta.txt"] = ("\n".join(CLASS_NAMES) + "\n\n").encode()
    return members


def python_members(train_images, train_labels, test_images, test_labels) -> dict:
    """{member path: bytes} of cifar-10-python.tar.gz for these arrays."""
    members = {f"{PYTHON_FOLDER}/{name}": python_batch(*chunk, batch_label=name)
               for name, chunk in _train_batches(train_images, train_labels).items()}
    members[f"{PYTHON_FOLDER}/test_batch"] = python_batch(test_images, test_labels, batch_label="test_batch")
    meta = {b"label_names": [name.encode() for name in CLASS_NAMES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    members[f"{PYTHON_FOLDER}/batches.meta"] = pickle.dumps(meta, protocol=3)
    return members


def write_tar_gz(path, members: dict) -> Path:
    """Writes {member path: bytes} as a .tar.gz at `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(blob), 0o644
            tar.addfile(info, io.BytesIO(blob))
    return path


def write_folder(root, members: dict) -> Path:
    """Writes {member path: bytes} as files under `root`, as if the archive had been unpacked there."""
    root = Path(root)
    for name, blob in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


def write_binary_archive(path, train_images, train_labels, test_images, test_labels) -> Path:
    """cifar-10-binary.tar.gz at `path` (name it so, in the data dir, for the loader to find it)."""
    return write_tar_gz(path, binary_members(train_images, train_labels, test_images, test_labels))


def write_python_archive(path, train_images, train_labels, test_images, test_labels) -> Path:
    """cifar-10-python.tar.gz at `path` (name it so, in the data dir, for the loader to find it)."""
    return write_tar_gz(path, python_members(train_images, train_labels, test_images, test_labels))


def write_binary_folder(data_dir, train_images, train_labels, test_images, test_labels) -> Path:
    """Unpacked binary archive: data_dir/cifar-10-batches-bin/*.bin. Returns that folder."""
    write_folder(data_dir, binary_members(train_images, train_labels, test_images, test_labels))
    return Path(data_dir) / BINARY_FOLDER


def write_python_folder(data_dir, train_images, train_labels, test_images, test_labels) -> Path:
    """Unpacked python archive: data_dir/cifar-10-batches-py/*. Returns that folder."""
    write_folder(data_dir, python_members(train_images, train_labels, test_images, test_labels))
    return Path(data_dir) / PYTHON_FOLDER

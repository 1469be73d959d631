"""Tests of cifar_jax.data on tiny data written in the official layouts: no network, no real CIFAR-10."""
import contextlib
import functools
import hashlib
import http.server
import importlib.resources
import os
import pickle
import threading
import time
import warnings

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cifar_fixtures
from cifar_jax import data
from cifar_jax.data import (CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, Cifar10, default_data_dir, load_cifar10,
                            normalize_images, synthetic_cifar10)
from cifar_jax.errors import DataError

TINY = cifar_fixtures.tiny_dataset()


def assert_same_data(loaded: Cifar10, expected: cifar_fixtures.TinyData) -> None:
    for name in expected._fields:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(expected, name), err_msg=name)
    assert loaded.train_images.dtype == np.uint8 and loaded.train_images.shape == (30, 32, 32, 3)
    assert loaded.train_labels.dtype == np.int32 and loaded.test_labels.dtype == np.int32
    assert loaded.class_names == CLASS_NAMES


def assert_one_line_error(error_info, *fragments) -> None:
    message = str(error_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"


# ---- Official archives: every layout gives the same arrays -----------------------------------------------------

def _binary_archive(folder, arrays):
    cifar_fixtures.write_binary_archive(folder / "cifar-10-binary.tar.gz", *arrays)


def _python_archive(folder, arrays):
    cifar_fixtures.write_python_archive(folder / "cifar-10-python.tar.gz", *arrays)


LAYOUTS = {
    "binary archive": _binary_archive,
    "python archive": _python_archive,
    "binary folder": lambda folder, arrays: cifar_fixtures.write_binary_folder(folder, *arrays),
    "python folder": lambda folder, arrays: cifar_fixtures.write_python_folder(folder, *arrays),
}


@pytest.mark.parametrize("subfolder", ["", "downloads/manual"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_archive_layout_round_trips_exactly(tmp_path, layout, subfolder):
    place = tmp_path / subfolder
    place.mkdir(parents=True, exist_ok=True)
    LAYOUTS[layout](place, TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny archives are unofficial by design; tested below
        loaded = load_cifar10(tmp_path, source="archive")
    assert_same_data(loaded, TINY)
    assert loaded.source.startswith(f"archive:{place}")


def test_binary_records_land_in_nhwc_with_rgb_planes_in_order(tmp_path):
    # Written byte by byte, independently of the fixtures: red plane, green plane, blue plane, each row-major.
    red, green, blue = np.full(1024, 10, np.uint8), np.full(1024, 20, np.uint8), np.full(1024, 30, np.uint8)
    red[0], red[1 * 32 + 2] = 200, 201  # pixel (row 0, col 0) and (row 1, col 2)
    record = bytes([7]) + red.tobytes() + green.tobytes() + blue.tobytes()
    members = cifar_fixtures.binary_members(*cifar_fixtures.tiny_dataset(5, 1))
    members["cifar-10-batches-bin/test_batch.bin"] = record
    cifar_fixtures.write_folder(tmp_path, members)
    image = load_cifar10(tmp_path, source="archive").test_images[0]
    assert image.shape == (32, 32, 3)
    assert image[0, 0, 0] == 200 and image[1, 2, 0] == 201 and image[0, 1, 0] == 10
    assert (image[..., 1] == 20).all() and (image[..., 2] == 30).all()


def test_python_batch_channels_match_binary_batch(tmp_path):
    images = np.zeros((1, 32, 32, 3), np.uint8)
    images[0, 3, 4] = (11, 22, 33)
    cifar_fixtures.write_python_folder(tmp_path, np.repeat(images, 5, 0), np.arange(5), images, [9])
    loaded = load_cifar10(tmp_path, source="archive")
    assert tuple(loaded.test_images[0, 3, 4]) == (11, 22, 33) and loaded.test_images.sum() == 66
    np.testing.assert_array_equal(loaded.train_labels, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(loaded.test_labels, [9])


def test_records_from_all_five_batches_keep_their_order(tmp_path):
    arrays = cifar_fixtures.tiny_dataset(num_train=12, num_test=3, seed=5)  # uneven: batches of 3,3,2,2,2
    _binary_archive(tmp_path, arrays)
    with pytest.warns(UserWarning):
        loaded = load_cifar10(tmp_path)
    np.testing.assert_array_equal(loaded.train_labels, arrays.train_labels)
    np.testing.assert_array_equal(loaded.train_images[-1], arrays.train_images[-1])


def test_archive_in_data_dir_wins_over_downloads_manual(tmp_path):
    other = cifar_fixtures.tiny_dataset(seed=1)
    cifar_fixtures.write_binary_folder(tmp_path, *TINY)
    cifar_fixtures.write_binary_folder(tmp_path / "downloads" / "manual", *other)
    assert_same_data(load_cifar10(tmp_path), TINY)


def test_hand_placed_unofficial_archive_is_used_with_a_warning(tmp_path):
    _binary_archive(tmp_path, TINY)
    with pytest.warns(UserWarning, match=r"not the official cifar-10-binary\.tar\.gz .* placed by hand"):
        loaded = load_cifar10(str(tmp_path))
    assert_same_data(loaded, TINY)


def test_unpacked_folder_loads_without_warning(tmp_path):
    cifar_fixtures.write_binary_folder(tmp_path, *TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_data(load_cifar10(tmp_path), TINY)


def test_binary_sha256_is_the_one_tfds_registers():
    registered = importlib.resources.files("tensorflow_datasets").joinpath("url_checksums/cifar10.txt").read_text()
    url, size, sha256, _ = registered.split("\n")[0].split("\t")
    assert (url, sha256) == (data.DOWNLOAD_URL, data.DOWNLOAD_SHA256)


# ---- Corrupt or hostile inputs ---------------------------------------------------------------------------------

def test_truncated_gzip_is_refused(tmp_path):
    path = cifar_fixtures.write_binary_archive(tmp_path / "cifar-10-binary.tar.gz", *TINY)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning), pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, path, "truncated or corrupt", "cifar-10-binary.tar.gz")


def test_record_file_of_wrong_size_is_refused(tmp_path):
    folder = cifar_fixtures.write_binary_folder(tmp_path, *TINY)
    with open(folder / "data_batch_2.bin", "ab") as batch:
        batch.write(b"12345")
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, "data_batch_2.bin", 6 * 3073 + 5, "3073-byte records")


def test_a_batch_file_cut_at_a_record_boundary_is_refused(tmp_path):
    folder = cifar_fixtures.write_binary_folder(tmp_path, *TINY)  # 6 training images per batch file
    os.truncate(folder / "data_batch_3.bin", 3 * 3073)
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, "data_batch_3.bin holds 3 images, the other batch files up to 6", "truncated",
                          "cifar-10-binary.tar.gz")


@pytest.mark.parametrize("write", [cifar_fixtures.write_binary_folder, cifar_fixtures.write_python_folder])
def test_label_out_of_range_is_refused(tmp_path, write):
    write(tmp_path, TINY.train_images, TINY.train_labels, TINY.test_images, np.full(10, 11))
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, "test_batch", "label 11", "0-9")


def test_missing_member_is_named(tmp_path):
    members = cifar_fixtures.binary_members(*TINY)
    del members["cifar-10-batches-bin/data_batch_3.bin"]
    cifar_fixtures.write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.warns(UserWarning), pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, "lacks cifar-10-batches-bin/data_batch_3.bin", "cifar-10-binary.tar.gz")


class _RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_that_calls_os_system_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    members = cifar_fixtures.python_members(*TINY)
    members["cifar-10-batches-py/data_batch_1"] = pickle.dumps({b"data": _RunsAShellCommand(f"touch {marker}")})
    assert b"system" in members["cifar-10-batches-py/data_batch_1"]  # the payload really is there
    cifar_fixtures.write_tar_gz(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.warns(UserWarning), pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, "data_batch_1", "system", "not a CIFAR-10 python batch")
    assert not marker.exists()


def test_python_batch_without_pixels_is_refused(tmp_path):
    members = cifar_fixtures.python_members(*TINY)
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"labels": [1, 2]}, protocol=3)
    cifar_fixtures.write_folder(tmp_path, members)
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    assert_one_line_error(error, "test_batch", "b'data'")


# ---- Download: local server, dead address, hung name lookup -----------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(folder):
    """An HTTP server on 127.0.0.1 for `folder`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_and_keeps_the_archive(tmp_path, monkeypatch):
    served = cifar_fixtures.write_binary_archive(tmp_path / "server" / "cifar-10-binary.tar.gz", *TINY)
    data_dir = tmp_path / "data"
    with serving(served.parent) as base_url:
        monkeypatch.setattr(data, "DOWNLOAD_URL", f"{base_url}/cifar-10-binary.tar.gz")
        monkeypatch.setattr(data, "DOWNLOAD_SHA256", hashlib.sha256(served.read_bytes()).hexdigest())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a verified download is trusted silently
            loaded = load_cifar10(data_dir, source="download")
    assert_same_data(loaded, TINY)
    assert (data_dir / "cifar-10-binary.tar.gz").read_bytes() == served.read_bytes()
    assert sorted(path.name for path in data_dir.iterdir()) == ["cifar-10-binary.tar.gz"]


def test_download_with_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    served = cifar_fixtures.write_binary_archive(tmp_path / "server" / "cifar-10-binary.tar.gz", *TINY)
    data_dir = tmp_path / "data"
    with serving(served.parent) as base_url:
        monkeypatch.setattr(data, "DOWNLOAD_URL", f"{base_url}/cifar-10-binary.tar.gz")
        with pytest.raises(DataError) as error:
            load_cifar10(data_dir)
    assert_one_line_error(error, "sha256", data.DOWNLOAD_SHA256, "deleted", data_dir)
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("source", ["auto", "download"])
def test_offline_fails_fast_naming_file_and_folder(tmp_path, monkeypatch, source):
    monkeypatch.setattr(data, "DOWNLOAD_URL", "http://127.0.0.1:9/cifar-10-binary.tar.gz")  # discard port: refused
    started = time.monotonic()
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path / "empty", source=source)
    assert time.monotonic() - started < 30
    assert_one_line_error(error, "place cifar-10-binary.tar.gz (or cifar-10-python.tar.gz)", f"in {tmp_path / 'empty'} ")
    assert not (tmp_path / "empty").exists()


def test_hung_name_lookup_gives_up_after_the_timeout(tmp_path, monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(data.socket, "create_connection", hang)
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(DataError) as error:
            load_cifar10(tmp_path, source="download")
    finally:
        release.set()
    assert time.monotonic() - started < 5
    assert_one_line_error(error, "within 0.5 s", "cifar-10-binary.tar.gz", tmp_path)


def test_existing_unofficial_file_is_not_overwritten_by_download(tmp_path):
    path = cifar_fixtures.write_binary_archive(tmp_path / "cifar-10-binary.tar.gz", *TINY)
    before = path.read_bytes()
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, source="download")
    assert_one_line_error(error, path, "not the official archive", "'archive' source")
    assert path.read_bytes() == before


# ---- TFDS ------------------------------------------------------------------------------------------------------

def fake_tfds_preparation(data_dir, version="3.0.2", file_format="array_record"):
    """The file names of a finished TFDS preparation (contents are mocked by tfds.testing.mock_data)."""
    folder = data_dir / "cifar10" / version
    folder.mkdir(parents=True)
    for name in ["dataset_info.json", f"cifar10-train.{file_format}-00000-of-00001",
                 f"cifar10-test.{file_format}-00000-of-00001"]:
        (folder / name).touch()
    return folder


def test_tfds_prepared_dataset_is_read_with_data_source(tmp_path):
    folder = fake_tfds_preparation(tmp_path)
    cifar_fixtures.write_binary_folder(tmp_path, *TINY)  # present too: TFDS comes first
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        loaded = load_cifar10(tmp_path)
    assert loaded.source == f"tfds:{folder}"
    assert loaded.train_images.shape == (6, 32, 32, 3) and loaded.test_images.shape == (6, 32, 32, 3)
    assert loaded.train_images.dtype == np.uint8 and loaded.train_images.std() > 50  # random pixels, not blank
    assert loaded.train_labels.dtype == np.int32 and loaded.train_labels.shape == (6,)
    assert ((loaded.train_labels >= 0) & (loaded.train_labels < 10)).all()
    assert loaded.class_names == CLASS_NAMES


def test_tfds_preparation_without_random_access_shards_is_skipped(tmp_path):
    fake_tfds_preparation(tmp_path, file_format="tfrecord")  # needs TensorFlow to read
    fake_tfds_preparation(tmp_path, version="3.0.2.incompleteABC")  # TFDS's half-written folder
    cifar_fixtures.write_binary_folder(tmp_path, *TINY)
    assert load_cifar10(tmp_path).source.startswith("archive:")
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, source="tfds")
    assert_one_line_error(error, tmp_path / "cifar10", "array_record")


def test_newest_tfds_version_is_chosen(tmp_path):
    fake_tfds_preparation(tmp_path, version="3.0.2")
    newest = fake_tfds_preparation(tmp_path, version="3.0.10")
    assert data._prepared_tfds_dir(tmp_path) == newest


# ---- Synthetic data, normalisation, defaults ---------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_labelled_as_such():
    first, again, other = synthetic_cifar10(40, 8, seed=3), synthetic_cifar10(40, 8, seed=3), synthetic_cifar10(40, 8, seed=4)
    assert first.train_images.shape == (40, 32, 32, 3) and first.test_images.shape == (8, 32, 32, 3)
    assert first.train_images.dtype == np.uint8 and first.train_labels.dtype == np.int32
    assert set(np.unique(first.train_labels)) <= set(range(10))
    np.testing.assert_array_equal(first.train_images, again.train_images)
    np.testing.assert_array_equal(first.test_labels, again.test_labels)
    assert not np.array_equal(first.train_images, other.train_images)
    assert "synthetic" in first.source and "not CIFAR-10" in first.source


def test_synthetic_source_has_full_size():
    loaded = load_cifar10(source="synthetic")
    assert loaded.train_images.shape == (50000, 32, 32, 3) and loaded.test_labels.shape == (10000,)
    assert loaded.source == data.SYNTHETIC_SOURCE


def test_normalize_images_scales_and_standardizes_per_channel():
    images = np.array([[[[0, 255, 51], [255, 0, 102]]]], np.uint8)  # (1, 1, 2, 3)
    scaled = normalize_images(images)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[0, 0, 0], [0.0, 1.0, 0.2], rtol=1e-6)
    standardized = jax.jit(normalize_images, static_argnums=1)(images, True)
    expected = (images / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    np.testing.assert_allclose(standardized, expected, rtol=1e-5)
    np.testing.assert_allclose(standardized[0, 0, 0], [-1.98947, 2.12649, -0.94228], rtol=1e-4)


def test_normalisation_constants_are_the_published_ones():
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert CLASS_NAMES[0] == "airplane" and CLASS_NAMES[9] == "truck" and len(set(CLASS_NAMES)) == 10


def test_default_data_dir_follows_tfds(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert default_data_dir() == data.Path.home() / "tensorflow_datasets"


def test_unknown_source_is_refused():
    with pytest.raises(DataError) as error:
        load_cifar10(source="imagenet")
    assert_one_line_error(error, "'imagenet'", "auto, tfds, archive, download, synthetic")


def test_fixture_data_is_reproducible():
    again = cifar_fixtures.tiny_dataset()
    for name in TINY._fields:
        np.testing.assert_array_equal(getattr(TINY, name), getattr(again, name))
    assert TINY.train_images.shape == (30, 32, 32, 3) and TINY.test_labels.shape == (10,)

"""Plots and report.md: every picture is a real PNG of a sensible size, and the report links only files that exist."""
import dataclasses
import re
import sys

import numpy as np
import pytest
from PIL import Image

from cifar_jax import cli, plots
from cifar_jax import report as report_module
from cifar_jax.data import CLASS_NAMES
from cifar_jax.evaluate import confusion_matrix, evaluate
from cifar_jax.report import predict_photos, report_markdown
from cifar_jax.rundir import PLOT_FILES
from learnable import class_coloured_dataset
from test_evaluate import NUM_TEST

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path, min_width=400):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= 200
        return image.size


@pytest.fixture(scope="module")
def predicted_test_set():
    """Test images with labels and predictions that are right about 70 % of the time, cat/dog mixed up most."""
    dataset = class_coloured_dataset(num_train=4, num_test=200, seed=1)
    rng = np.random.default_rng(0)
    labels = dataset.test_labels
    predictions = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, 10, len(labels)))
    predictions = np.where((labels == 3) & (rng.random(len(labels)) < 0.5), 5, predictions)
    return dataset.test_images, labels, predictions


HISTORY = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.1 / e, "train_accuracy": 0.3 + 0.1 * e,
            "test_accuracy": 0.28 + 0.08 * e} for e in (1, 2, 3)]


@pytest.mark.parametrize("history", [HISTORY, HISTORY[:1], []], ids=["three_epochs", "one_epoch", "none"])
def test_training_curves_png(tmp_path, history):
    path = plots.plot_training_curves(history, tmp_path / "nested" / "curves.png")
    assert path == tmp_path / "nested" / "curves.png"
    width, height = assert_valid_png(path)
    assert width > height  # two panels side by side


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png(tmp_path, predicted_test_set, normalize):
    _, labels, predictions = predicted_test_set
    confusion = confusion_matrix(labels, predictions, 10)
    assert_valid_png(plots.plot_confusion_matrix(confusion, CLASS_NAMES, tmp_path / "cm.png", normalize=normalize))


def test_row_normalized_rows_sum_to_one_and_empty_rows_stay_zero():
    shares = plots.row_normalized(np.array([[3, 1], [0, 0]]))
    np.testing.assert_allclose(shares, [[0.75, 0.25], [0.0, 0.0]])


def test_prediction_grid_and_confused_pairs_pngs(tmp_path, predicted_test_set):
    images, labels, predictions = predicted_test_set
    grid = plots.plot_prediction_grid(images, labels, predictions, CLASS_NAMES, tmp_path / "grid.png")
    pairs = plots.plot_confused_pairs(images, labels, predictions, CLASS_NAMES, tmp_path / "pairs.png")
    assert_valid_png(grid)
    assert_valid_png(pairs)
    # Same seed, same picture: the random choice of test images is reproducible.
    again = plots.plot_prediction_grid(images, labels, predictions, CLASS_NAMES, tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(again)))


def test_confused_pairs_with_no_mistakes_still_draws(tmp_path, predicted_test_set):
    images, labels, _ = predicted_test_set
    assert_valid_png(plots.plot_confused_pairs(images, labels, labels, CLASS_NAMES, tmp_path / "none.png"))


def test_image_predictions_png(tmp_path, predicted_test_set):
    images = predicted_test_set[0][:3]
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), size=3)
    path = plots.plot_image_predictions(images, probabilities, CLASS_NAMES, ["a.png", "b.jpg", "c.png"],
                                        tmp_path / "photos.png")
    width, height = assert_valid_png(path)
    assert height > width / 2  # one row per image


def test_no_pyplot_figures_are_left_open(tmp_path, predicted_test_set):
    images, labels, predictions = predicted_test_set
    plots.plot_prediction_grid(images, labels, predictions, CLASS_NAMES, tmp_path / "grid.png")
    plots.plot_training_curves(HISTORY, tmp_path / "curves.png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []


def write_photos(folder):
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for name, size in (("red_square.png", (64, 64)), ("wide_photo.jpg", (120, 40))):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        paths.append(folder / name)
    return paths


def linked_files(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.mark.slow
def test_cli_plot_draws_everything_and_the_report_links_only_existing_files(trained_run, tmp_path, capsys):
    photos = write_photos(tmp_path / "photos")
    workdir = trained_run.workdir
    argv = ["plot", "--workdir", str(workdir), "--images"] + [str(p) for p in photos]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for file in PLOT_FILES.values():
        assert_valid_png(workdir / "plots" / file)
        assert str(workdir / "plots" / file) in printed
    report = (workdir / "report.md").read_text()
    links = linked_files(report)
    assert sorted(links) == sorted(f"plots/{file}" for file in PLOT_FILES.values())
    assert all((workdir / link).is_file() for link in links)
    assert "91,946" in report  # model0's parameter count
    assert f"{NUM_TEST:,} test images" in report
    assert "not CIFAR-10" not in report  # the fixture's data is a (tiny) CIFAR-10 archive, not synthetic


def test_plot_images_walks_folders_like_predict_and_plots_at_most_a_page(trained_run, tmp_path, monkeypatch):
    photos = write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "more").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "photos" / "more" / "black.png")
    shown = predict_photos(trained_run.workdir, "latest", [tmp_path / "photos", photos[0]])
    assert shown.names == ["red_square.png", "wide_photo.jpg", "black.png", "red_square.png"]
    assert shown.images_nhwc_uint8.shape == (4, 32, 32, 3) and shown.probabilities.shape == (4, 10)
    np.testing.assert_allclose(shown.probabilities.sum(axis=1), 1, rtol=1e-5)
    assert not shown.images_nhwc_uint8[2].any() and shown.images_nhwc_uint8[0].any()  # black.png from the subfolder

    monkeypatch.setattr(report_module, "MAX_PLOTTED_PHOTOS", 2)
    with pytest.warns(UserWarning, match="plotting the first 2 images"):
        assert len(predict_photos(trained_run.workdir, "latest", [tmp_path / "photos", photos[0]]).names) == 2


def test_plot_images_leaves_out_what_cannot_be_read_and_says_so(trained_run, tmp_path):
    write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning) as warned:
        shown = predict_photos(trained_run.workdir, "latest", [tmp_path / "photos", tmp_path / "empty"])
    assert shown.names == ["red_square.png", "wide_photo.jpg"]
    messages = [str(warning.message) for warning in warned]
    assert len(messages) == 2 and "broken.png could not be decoded" in messages[0]
    assert messages[1] == f"--images: left out {tmp_path / 'empty'} holds no image files (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff)"
    with pytest.warns(UserWarning, match="broken.png"):
        assert predict_photos(trained_run.workdir, "latest", [tmp_path / "photos" / "broken.png"]) is None


def test_report_without_photos_leaves_that_section_out(trained_run, tmp_path):
    result = evaluate(trained_run.workdir)
    plot_paths = {"training_curves": trained_run.workdir / "plots" / "training_curves.png"}
    metadata = {"model": "model0", "epoch": 2, "config": {"epochs": 2}, "metrics": trained_run.history[-1]}
    markdown = report_markdown(trained_run.workdir, metadata, result, trained_run.history, plot_paths)
    assert linked_files(markdown) == ["plots/training_curves.png"]
    assert "## Your images" not in markdown
    assert f"| accuracy | {trained_run.history[-1]['train_accuracy']:.4f} | {result.test_accuracy:.4f} |" in markdown


def test_report_on_synthetic_data_says_the_numbers_are_not_cifar10(trained_run):
    result = dataclasses.replace(evaluate(trained_run.workdir), data_source="synthetic: random pixels")
    metadata = {"model": "model0", "epoch": 2, "config": {"epochs": 2}}
    markdown = report_markdown(trained_run.workdir, metadata, result, trained_run.history, {})
    assert "not CIFAR-10" in markdown.split("##")[0]  # said at the top, before any section

"""Evaluation: the counting on hand-made examples, then a trained run evaluated on every test image."""
import dataclasses
import json

import numpy as np
import pytest

from cifar_jax import cli
from cifar_jax.data import CLASS_NAMES
from cifar_jax.errors import CheckpointError, ConfigError, DataError
from cifar_jax.evaluate import (confusion_matrix, eval_batch_size, evaluate, format_result, most_confused_pairs,
                                per_class_metrics)
from cifar_fixtures import write_binary_archive
from learnable import class_coloured_dataset

NUM_TEST = 101  # test images in the shared `trained_run` fixture (conftest.py)


def test_confusion_matrix_and_per_class_figures_on_a_hand_computed_example():
    labels = np.array([0, 0, 1, 1, 1, 2, 3])
    predictions = np.array([0, 1, 1, 1, 0, 2, 2])
    confusion = confusion_matrix(labels, predictions, num_classes=4)
    np.testing.assert_array_equal(confusion, [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]])
    metrics = per_class_metrics(confusion, ["a", "b", "c", "d"])
    assert [m.name for m in metrics] == ["a", "b", "c", "d"]
    assert [m.support for m in metrics] == [2, 3, 1, 1]
    assert [m.recall for m in metrics] == pytest.approx([1 / 2, 2 / 3, 1.0, 0.0])
    assert [m.accuracy for m in metrics] == [m.recall for m in metrics]
    # "d" is never predicted: no precision to speak of, reported as 0 rather than NaN (JSON has no NaN).
    assert [m.precision for m in metrics] == pytest.approx([1 / 2, 2 / 3, 1 / 2, 0.0])


def test_most_confused_pairs_count_both_directions():
    confusion = np.array([[5, 1, 0], [4, 3, 2], [0, 2, 9]])
    assert most_confused_pairs(confusion, top=2) == [(0, 1, 5), (1, 2, 4)]
    assert most_confused_pairs(np.diag([3, 4, 5]), top=3) == []  # nothing confused, nothing listed


@pytest.mark.parametrize("requested, num_examples, num_devices, expected", [
    (1000, 10_000, 4, 1000), (1000, 100, 4, 100), (40, 100, 3, 42), (7, 3, 4, 4)])
def test_eval_batch_splits_over_devices_and_never_exceeds_what_the_data_needs(requested, num_examples,
                                                                              num_devices, expected):
    assert eval_batch_size(requested, num_examples, num_devices) == expected


def test_evaluation_covers_every_test_image_and_agrees_with_the_run(trained_run):
    result = evaluate(trained_run.workdir, step="latest")
    confusion = result.confusion_matrix
    assert confusion.shape == (10, 10)
    assert confusion.sum() == result.num_examples == NUM_TEST
    assert np.trace(confusion) / NUM_TEST == pytest.approx(result.test_accuracy)
    assert result.test_accuracy > 0.5  # class-coloured images are easy; chance is 0.1
    last_epoch = trained_run.history[-1]
    assert result.test_accuracy == pytest.approx(last_epoch["test_accuracy"])
    assert result.test_loss == pytest.approx(last_epoch["test_loss"], abs=1e-5)
    for index, row in enumerate(result.per_class):
        assert row.support == confusion[index].sum() == np.sum(result.labels == index)
        assert row.recall == pytest.approx(confusion[index, index] / max(confusion[index].sum(), 1))
        assert row.precision == pytest.approx(confusion[index, index] / max(confusion[:, index].sum(), 1))
    np.testing.assert_array_equal(confusion, confusion_matrix(result.labels, result.predictions, 10))


def test_four_devices_give_the_same_evaluation_as_one(trained_run):
    one = evaluate(trained_run.workdir, num_devices=1)
    four = evaluate(trained_run.workdir, num_devices=4)
    np.testing.assert_array_equal(one.confusion_matrix, four.confusion_matrix)
    assert one.test_loss == pytest.approx(four.test_loss, abs=1e-5)
    np.testing.assert_array_equal(one.predictions, four.predictions)


def test_zero_devices_is_refused_with_the_same_words_as_training(trained_run):
    with pytest.raises(ConfigError, match="num_devices must be a positive integer, got 0"):
        evaluate(trained_run.workdir, num_devices=0)


def test_data_dir_overrides_the_runs_own_dataset(trained_run, tmp_path):
    other = class_coloured_dataset(num_train=10, num_test=37, seed=5)
    write_binary_archive(tmp_path / "cifar-10-binary.tar.gz", other.train_images, other.train_labels,
                         other.test_images, other.test_labels)
    result = evaluate(trained_run.workdir, data_dir=str(tmp_path))
    assert result.num_examples == 37 == result.confusion_matrix.sum()
    np.testing.assert_array_equal(result.labels, other.test_labels)


def test_cli_evaluate_json_is_one_object_with_the_metrics(trained_run, capsys):
    assert cli.main(["evaluate", "--workdir", str(trained_run.workdir), "--step", "latest", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"test_loss", "test_accuracy", "per_class", "confusion_matrix"} <= set(report)
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == NUM_TEST
    assert report["test_accuracy"] == pytest.approx(np.trace(confusion) / NUM_TEST)
    assert list(report["per_class"]) == list(CLASS_NAMES)
    cat = report["per_class"]["cat"]
    assert set(cat) == {"accuracy", "precision", "recall", "support"}
    assert cat["support"] == confusion[3].sum()


def test_cli_evaluate_prints_readable_tables(trained_run, capsys):
    assert cli.main(["evaluate", "--workdir", str(trained_run.workdir)]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "precision" in text and "confusion matrix" in text
    assert f"on {NUM_TEST:,} test images" in text
    table_rows = [line for line in text.splitlines() if line.startswith("automobile")]
    assert len(table_rows) == 2  # one in the per-class table, one in the confusion matrix


def test_format_result_matches_the_numbers(trained_run):
    result = evaluate(trained_run.workdir)
    text = format_result(result)
    assert f"test accuracy {result.test_accuracy:.4f}" in text
    truck_row = next(line for line in text.splitlines()[-10:] if line.startswith("truck"))
    assert [int(count) for count in truck_row.split()[1:]] == result.confusion_matrix[9].tolist()


def test_cli_evaluate_without_checkpoints_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["evaluate", "--workdir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("cifar-jax: error: no checkpoints folder") and error.count("\n") == 1


@pytest.mark.parametrize("workdir, step, message", [
    (None, "best", "expected the workdir of a training run \\(a folder path\\), got None"),
    ("run", 8.9, "step must be 'best', 'latest' or a whole step number, got 8.9"),
    ("run", True, "step must be 'best', 'latest' or a whole step number, got True"),
    ("run", "-1", "step must be 'best', 'latest' or a whole step number, got '-1'"),
])
def test_a_wrong_workdir_or_step_is_a_checkpoint_error(trained_run, workdir, step, message):
    with pytest.raises(CheckpointError, match=message):
        evaluate(trained_run.workdir if workdir == "run" else workdir, step=step)


def test_a_data_set_from_python_is_checked(trained_run):
    dataset = class_coloured_dataset(num_train=8, num_test=8)
    with pytest.raises(DataError, match="expected a cifar_jax.data.Cifar10, got ndarray"):
        evaluate(trained_run.workdir, dataset=dataset.test_images)
    with pytest.raises(DataError, match="test labels must be class ids 0-9, got int32 from 12 to 12"):
        evaluate(trained_run.workdir, dataset=dataclasses.replace(dataset, test_labels=np.full(8, 12, np.int32)))
    with pytest.raises(DataError, match="the data set has no test images"):
        evaluate(trained_run.workdir, dataset=dataclasses.replace(dataset, test_images=dataset.test_images[:0],
                                                                  test_labels=dataset.test_labels[:0]))

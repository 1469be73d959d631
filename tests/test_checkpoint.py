"""Checkpoints: retention, fallback from corrupt ones, divergence, model mismatch, device-count changes.

Killing real processes (SIGKILL mid-epoch and mid-save, SIGTERM) is in test_preemption.py.
"""
import dataclasses
import importlib
import json
import logging
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from cifar_jax import checkpoint, train
from cifar_jax.errors import CheckpointError, ConfigError, TrainingDivergedError
from cifar_jax.evaluate import evaluate
from cifar_jax.models import abstract_params
from cifar_jax.predict import Predictor
from learnable import quick_config

train_module = importlib.import_module("cifar_jax.train")
LEARNABLE_SIZES = (256, 40)  # training and test images of the learnable problem






def flat(params):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])


def test_keeps_latest_n_and_the_best_never_the_latest_deleted(tmp_path):
    manager = checkpoint.open_manager(tmp_path / "checkpoints", keep_latest=2)
    params = {"w": np.zeros(3, np.float32)}
    for step, accuracy in zip([1, 2, 3, 4], [0.9, 0.5, 0.6, 0.4]):
        checkpoint.save(manager, step, params, {"step": np.int32(step)}, {"model": "model0"},
                        {"test_accuracy": accuracy})
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [1, 3, 4]
    assert manager.best_step() == 1 and manager.latest_step() == 4
    manager.close()


@pytest.mark.slow
def test_orbax_routine_log_lines_are_dropped_and_the_absl_level_is_left_alone(tmp_path, caplog):
    from absl import logging as absl_logging

    imported = subprocess.run([sys.executable, "-c", "import logging, cifar_jax.checkpoint; "
                               "print(logging.getLogger('absl').level)"], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == str(logging.NOTSET)  # importing the package sets no level
    with caplog.at_level(logging.DEBUG, logger="absl"):
        manager = checkpoint.open_manager(tmp_path / "checkpoints")
        params = {"w": np.zeros(3, np.float32)}
        checkpoint.save(manager, 1, params, {"step": np.int32(1)}, {"model": "model0"})  # mid-epoch: no metrics
        checkpoint.save(manager, 2, params, {"step": np.int32(2)}, {"model": "model0"}, {"test_accuracy": 0.5})
        manager.wait_until_finished()
        manager.close()
        checkpoint.open_manager(tmp_path / "checkpoints", read_only=True).close()
        absl_logging.warning("a user's own absl warning")
        absl_logging.info("a user's own absl info")
    assert [record.getMessage() for record in caplog.records] == ["a user's own absl warning", "a user's own absl info"]


def test_checkpoint_describes_itself(tmp_path, learnable_data):
    result = train(quick_config(tmp_path))
    restored = checkpoint.restore_for_inference(result.workdir, "latest", abstract_params)
    meta = restored.metadata
    assert meta["model"] == "model0" and meta["epoch"] == 2
    assert meta["class_names"][3] == "cat" and meta["normalization"]["scale"] == pytest.approx(1 / 255)
    assert meta["metrics"] == result.history[-1] and meta["history"] == result.history
    assert meta["config"]["learning_rate"] == 1e-3 and meta["versions"]["jax"] == jax.__version__
    np.testing.assert_array_equal(flat(restored.params), flat(result.params))


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["params", "metadata"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, learnable_data, damaged):
    config = quick_config(tmp_path)
    straight = train(quick_config(tmp_path, workdir=str(tmp_path / "straight")))
    first = train(config)
    latest = max(int(p.name) for p in (first.workdir / "checkpoints").iterdir() if p.name.isdigit())
    for data_file in (first.workdir / "checkpoints" / str(latest) / damaged).rglob("*"):
        if data_file.is_file() and data_file.stat().st_size > 0:
            data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # truncate
    with pytest.warns(UserWarning, match=f"checkpoint {latest} .* is unreadable .* falling back to the previous one$"):
        resumed = train(config)
    # It redid epoch 2 from epoch 1's checkpoint and ended exactly where the uninterrupted run did.
    np.testing.assert_array_equal(flat(resumed.params), flat(straight.params))


@pytest.mark.slow
def test_a_corrupt_only_checkpoint_is_set_aside_and_the_runs_results_are_kept(tmp_path, learnable_data):
    config = quick_config(tmp_path, epochs=1)
    fresh = train(config)
    metrics = (fresh.workdir / "metrics.jsonl").read_text()
    for data_file in (fresh.workdir / "checkpoints").glob("*/params/**/*"):
        if data_file.is_file() and data_file.stat().st_size > 0:
            data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.warns(UserWarning, match="falling back to the start: there is no earlier one$"):
        with pytest.raises(CheckpointError, match=r"no usable checkpoint .* \(unreadable ones are moved to "
                                                  r"corrupt_checkpoints/\), and .* holds results: they are kept"):
            train(config)
    assert (fresh.workdir / "metrics.jsonl").read_text() == metrics  # not overwritten by a fresh run
    assert len(list((fresh.workdir / "corrupt_checkpoints").iterdir())) == 1  # kept aside, not deleted
    again = train(dataclasses.replace(config, workdir=str(tmp_path / "new")))
    np.testing.assert_array_equal(flat(again.params), flat(fresh.params))


def test_a_save_cut_short_before_the_first_checkpoint_does_not_let_a_fresh_run_over_results(tmp_path,
                                                                                          learnable_data):
    config = quick_config(tmp_path, epochs=1)
    first = train(config)
    for step in (first.workdir / "checkpoints").iterdir():  # as if kill -9 had struck the first save
        step.rename(step.with_name(f"{step.name}.orbax-checkpoint-tmp-1"))
    metrics = (first.workdir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="no usable checkpoint .* holds results: they are kept"):
        train(config)
    assert (first.workdir / "metrics.jsonl").read_text() == metrics


def test_a_run_whose_config_json_is_gone_is_not_overwritten_by_another_run(tmp_path, learnable_data):
    first = train(quick_config(tmp_path, epochs=2))
    (first.workdir / "config.json").unlink()
    before = {p: p.read_bytes() for p in first.workdir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"holds checkpoints of a different run \(.*optimizer: 'adam' in the run "
                                              r"vs 'sgd' requested.*use a new --workdir"):
        train(quick_config(tmp_path, epochs=3, optimizer="sgd", learning_rate=0.01))
    assert {p: p.read_bytes() for p in first.workdir.rglob("*") if p.is_file()} == before  # nothing moved
    assert not (first.workdir / "corrupt_checkpoints").exists()
    resumed = train(quick_config(tmp_path, epochs=3))  # the run's own settings still resume it
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, learnable_data, monkeypatch):
    config = quick_config(tmp_path, epochs=1)
    good = train(config)
    monkeypatch.setattr(train_module, "create_optimizer", lambda config, steps_per_epoch: optax.adam(1e30))  # same state layout, explodes
    with pytest.raises(TrainingDivergedError, match=r"NaN/Inf in epoch 2 at step \d+"):
        train(quick_config(tmp_path, epochs=2))
    restored = checkpoint.restore_for_inference(good.workdir, "latest", abstract_params)
    assert restored.metadata["epoch"] == 1
    np.testing.assert_array_equal(flat(restored.params), flat(good.params))


@pytest.mark.slow
def test_resuming_on_other_data_is_refused_but_the_same_data_read_elsewhere_resumes(tmp_path, learnable_data,
                                                                                    monkeypatch):
    train(quick_config(tmp_path, epochs=1))
    saved_config = (tmp_path / "run" / "config.json").read_text()
    other = dataclasses.replace(learnable_data, train_images=255 - learnable_data.train_images, source="synthetic")
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": other)
    with pytest.raises(CheckpointError, match=r"was trained on other data \(test: class-coloured noise, 256 training images\) than "
                                              r"synthetic \(256\): resume it with its own --data and --data-dir"):
        train(quick_config(tmp_path, epochs=2))
    assert (tmp_path / "run" / "config.json").read_text() == saved_config

    order = np.random.default_rng(0).permutation(len(learnable_data.train_labels))
    moved = dataclasses.replace(learnable_data, train_images=learnable_data.train_images[order],
                                train_labels=learnable_data.train_labels[order], source="archive:/elsewhere")
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": moved)
    assert [row["epoch"] for row in train(quick_config(tmp_path, epochs=2)).history] == [1, 2]


def test_a_workdir_named_checkpoints_keeps_its_checkpoints_inside(tmp_path, learnable_data):
    result = train(quick_config(tmp_path, epochs=1, workdir=str(tmp_path / "checkpoints")))
    assert sorted(p.name for p in result.workdir.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "plots",
                                                                "tensorboard"]
    restored = checkpoint.restore_for_inference(result.workdir, "latest", abstract_params)
    np.testing.assert_array_equal(flat(restored.params), flat(result.params))


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=1))
    (tmp_path / "run" / "config.json").unlink()  # only the checkpoint says which model it is
    with pytest.raises(CheckpointError, match="holds checkpoints of model0, not model1"):
        train(quick_config(tmp_path, model="model1"))
    assert not (tmp_path / "run" / "config.json").exists()


def test_conflicting_config_names_both_values_and_overwrites_nothing(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=1))
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"model: 'model0' in the run vs 'model1' requested"):
        train(quick_config(tmp_path, model="model1"))
    assert (tmp_path / "run" / "config.json").read_text() == saved


@pytest.mark.slow
def test_saved_on_four_devices_resumes_on_one(tmp_path, learnable_data):
    four = train(quick_config(tmp_path, epochs=1, num_devices=4))
    resumed = train(quick_config(tmp_path, epochs=2, num_devices=1))
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[0] == four.history[0]
    reference = train(quick_config(tmp_path, epochs=2, num_devices=4, workdir=str(tmp_path / "reference")))
    # Only the reduction order differs between 4 devices and 1.
    assert np.max(np.abs(flat(resumed.params) - flat(reference.params))) < 1e-4


def test_missing_checkpoint_for_inference_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints folder at .*pass the --workdir of a training run"):
        checkpoint.restore_for_inference(tmp_path / "nothing", "best", abstract_params)


METADATA_DAMAGE = [(key, damage) for key in ("model", "config", "class_names", "normalization", "epoch",
                                             "step_in_epoch", "history") for damage in ("removed", "mistyped")]


def damage_metadata(step_dir, key, damage):
    path = step_dir / "metadata" / "metadata"
    record = json.loads(path.read_text())
    if damage == "removed":
        del record[key]
    else:
        record[key] = [1, 2] if not isinstance(record[key], list) else "not a list"
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("key, damage", METADATA_DAMAGE)
def test_a_checkpoint_record_with_a_field_removed_or_mistyped_is_unreadable_in_one_line(trained_run, tmp_path, key,
                                                                                        damage):
    workdir = tmp_path / "copy"
    shutil.copytree(trained_run.workdir, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        damage_metadata(step_dir, key, damage)
    for read in (lambda: checkpoint.restore_for_inference(workdir, "latest", abstract_params),
                 lambda: Predictor.from_checkpoint(workdir), lambda: evaluate(workdir)):
        with pytest.raises(CheckpointError, match=rf"checkpoint \d+ in .* could not be read .*{key}.*: choose another"):
            read()


def test_a_record_whose_config_values_have_the_wrong_type_is_unreadable_in_one_line(trained_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained_run.workdir, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        path = step_dir / "metadata" / "metadata"
        record = json.loads(path.read_text())
        record["config"]["eval_batch_size"] = "abc"
        path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"could not be read .*eval_batch_size='abc', not a int"):
        evaluate(workdir)


def test_a_run_folder_named_by_digits_under_checkpoints_is_a_run_not_a_step(trained_run, tmp_path):
    workdir = tmp_path / "checkpoints" / "123456"  # --workdir checkpoints/$SLURM_JOB_ID
    shutil.copytree(trained_run.workdir, workdir)
    assert evaluate(workdir).num_examples == evaluate(trained_run.workdir).num_examples


def test_resuming_past_a_record_cut_down_to_the_model_falls_back_to_the_previous_checkpoint(tmp_path,
                                                                                           learnable_data):
    config = quick_config(tmp_path, epochs=2)
    first = train(config)
    latest = max(int(p.name) for p in (first.workdir / "checkpoints").iterdir())
    (first.workdir / "checkpoints" / str(latest) / "metadata" / "metadata").write_text('{"model": "model0"}')
    with pytest.warns(UserWarning, match=f"checkpoint {latest} .* is unreadable .*'config' is missing.* previous one"):
        resumed = train(config)
    assert [row["epoch"] for row in resumed.history] == [1, 2]

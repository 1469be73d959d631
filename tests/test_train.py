import contextlib
import dataclasses
import importlib
import json
import math
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import TrainConfig, train
from cifar_jax import rundir
from cifar_jax.errors import ConfigError, DataError, TrainingDivergedError
from cifar_jax.steps import all_finite
from cifar_jax.train import epoch_order
from learnable import quick_config
from stop_signals import StopAfterSteps

# `cifar_jax.train` the attribute is the train() function; the module itself is reached this way.
train_module = importlib.import_module("cifar_jax.train")

METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate",
               "epoch_seconds", "images_per_second"}






def flat(params):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])


def test_loss_falls_and_accuracy_rises_well_above_chance(tmp_path, learnable_data):
    result = train(quick_config(tmp_path, epochs=3))
    history = result.history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_loss"] < 1.0 < np.log(10)
    assert history[-1]["test_accuracy"] > 0.8  # chance is 0.1
    assert all(row["images_per_second"] > 0 and row["epoch_seconds"] > 0 for row in history)


def test_metrics_and_config_files_are_written(tmp_path, learnable_data):
    result = train(quick_config(tmp_path))
    lines = (result.workdir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2 and all(set(row) == METRIC_KEYS for row in rows)
    assert rows == result.history
    saved = json.loads((result.workdir / "config.json").read_text())
    assert saved["model"] == "model0" and saved["optimizer"] == "adam" and saved["learning_rate"] == 1e-3


@pytest.mark.slow
def test_four_devices_give_the_same_parameters_as_one(tmp_path, learnable_data):
    assert jax.local_device_count() >= 4, "conftest asks for 4 simulated CPU devices"
    # SGD: its update is linear in the gradient (a wrong device average shows), and unlike Adam's m/sqrt(v) it does
    # not blow the rounding of near-zero gradient sums (summed in another order on 4 devices) up to learning-rate size.
    sgd = dict(optimizer="sgd", learning_rate=0.05, epochs=1)
    one = train(quick_config(tmp_path, num_devices=1, workdir=str(tmp_path / "one"), **sgd))
    four = train(quick_config(tmp_path, num_devices=4, workdir=str(tmp_path / "four"), **sgd))
    assert np.max(np.abs(flat(one.params) - flat(four.params))) <= 1e-5
    assert one.history[0]["train_loss"] == pytest.approx(four.history[0]["train_loss"], abs=1e-5)
    assert one.history[0]["test_accuracy"] == four.history[0]["test_accuracy"]


def test_epoch_order_is_a_reproducible_permutation_that_changes_per_epoch():
    first = epoch_order(seed=0, epoch=0, num_examples=100)
    np.testing.assert_array_equal(np.sort(first), np.arange(100))
    np.testing.assert_array_equal(first, epoch_order(0, 0, 100))
    assert not np.array_equal(first, epoch_order(0, 1, 100))
    assert not np.array_equal(first, epoch_order(1, 0, 100))


@pytest.mark.slow
def test_same_seed_reproduces_a_run_exactly(tmp_path, learnable_data):
    first = train(quick_config(tmp_path, epochs=1, workdir=str(tmp_path / "a")))
    second = train(quick_config(tmp_path, epochs=1, workdir=str(tmp_path / "b")))
    np.testing.assert_array_equal(flat(first.params), flat(second.params))


@pytest.mark.slow
def test_resuming_ends_with_the_same_parameters_as_an_uninterrupted_run(tmp_path, learnable_data):
    straight = train(quick_config(tmp_path, epochs=3, workdir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(quick_config(tmp_path, epochs=1, workdir=resumed_dir))
    resumed = train(quick_config(tmp_path, epochs=3, workdir=resumed_dir))
    np.testing.assert_array_equal(flat(straight.params), flat(resumed.params))
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["test_accuracy"] == straight.history[-1]["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("checks_before_stop, finished_epochs, steps_in", [(15, 1, 0), (20, 1, 5)])
def test_a_run_stopped_on_any_step_resumes_to_the_same_parameters(tmp_path, learnable_data, monkeypatch,
                                                                   checks_before_stop, finished_epochs, steps_in):
    # 16 steps per epoch: a stop on step 16 (an epoch's last) finishes that epoch; on step 21 it saves mid-epoch.
    straight = train(quick_config(tmp_path, workdir=str(tmp_path / "straight")))
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "stop_requests", lambda: contextlib.nullcontext(StopAfterSteps(checks_before_stop)))
        stopped = train(quick_config(tmp_path, workdir=str(tmp_path / "stopped")))
    assert stopped.interrupted and len(stopped.history) == finished_epochs
    latest = json.loads(max((tmp_path / "stopped" / "checkpoints").iterdir(), key=lambda p: int(p.name))
                        .joinpath("metadata", "metadata").read_text())
    assert (latest["epoch"], latest["step_in_epoch"]) == (finished_epochs, steps_in)
    resumed = train(quick_config(tmp_path, workdir=str(tmp_path / "stopped")))
    assert not resumed.interrupted and [row["epoch"] for row in resumed.history] == [1, 2]
    np.testing.assert_array_equal(flat(straight.params), flat(resumed.params))


def test_train_runs_in_a_thread_other_than_the_main_one(tmp_path, learnable_data):
    results = []
    worker = threading.Thread(target=lambda: results.append(train(quick_config(tmp_path, epochs=1))))
    worker.start()
    worker.join()
    assert len(results) == 1 and [row["epoch"] for row in results[0].history] == [1]


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again(tmp_path, learnable_data):
    config = quick_config(tmp_path, epochs=1)
    first = train(config)
    again = train(config)
    assert again.history == first.history
    np.testing.assert_array_equal(flat(first.params), flat(again.params))


def test_asking_a_run_for_fewer_epochs_than_it_trained_is_refused_and_its_config_kept(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=2))
    saved_config = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"has already trained 2 epochs, more than the 1 asked for: ask for "
                                          r"--epochs 2 or more"):
        train(quick_config(tmp_path, epochs=1))
    assert (tmp_path / "run" / "config.json").read_text() == saved_config


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_element_in_any_leaf(bad_value):
    tree = {"kernel": np.ones((3, 3), np.float32), "bias": np.zeros(3, np.float32)}
    assert bool(all_finite(tree))
    tree["bias"][1] = bad_value
    assert not bool(all_finite(tree))


@pytest.mark.slow
def test_huge_learning_rate_stops_with_a_clear_error(tmp_path, learnable_data):
    with pytest.raises(TrainingDivergedError, match=r"NaN/Inf in epoch 1 at step \d+"):
        train(quick_config(tmp_path, learning_rate=1e12, optimizer="sgd"))
    # It diverged before its first checkpoint, so the folder holds nothing to keep: the same one takes a new try.
    retried = train(quick_config(tmp_path, learning_rate=1e-2, optimizer="sgd", epochs=1))
    assert len(retried.history) == 1 and math.isfinite(retried.history[0]["train_loss"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["learning_rate"] == 1e-2


@pytest.mark.slow
def test_a_bad_gradient_on_an_epochs_last_step_is_caught_before_its_checkpoint(tmp_path, learnable_data, monkeypatch):
    # The step checks only its loss; a NaN gradient whose step's loss was finite shows in the parameters, which the
    # loop checks before it saves. Here the update of the epoch's last step is NaN: no later loss would see it.
    import optax

    steps_per_epoch = len(learnable_data.train_labels) // 32

    def nan_update_on_step(bad_step: int) -> optax.GradientTransformation:
        def update(updates, count, params=None):
            return jax.tree.map(lambda u: jnp.where(count + 1 == bad_step, jnp.nan, u), updates), count + 1
        return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)

    monkeypatch.setattr(train_module, "create_optimizer",
                        lambda config, steps: optax.chain(optax.adam(1e-3), nan_update_on_step(steps_per_epoch)))
    with pytest.raises(TrainingDivergedError, match=rf"NaN/Inf in epoch 1 at step {steps_per_epoch} of the run"):
        train(quick_config(tmp_path, epochs=1))
    assert not any((tmp_path / "run" / "checkpoints").glob("*"))  # nothing NaN was saved


def test_divergence_stops_mid_epoch_without_a_progress_bar(tmp_path, learnable_data, monkeypatch):
    # Every process checks, not just the one that shows progress: the others would wait for it in the next
    # collective and hang.
    steps_run = []
    build = train_module.build_train_step

    def counting_build(*args):
        step = build(*args)
        return lambda *step_args: steps_run.append(1) or step(*step_args)

    monkeypatch.setattr(train_module, "build_train_step", counting_build)
    monkeypatch.setattr(train_module, "PROGRESS_STEPS", 2)
    with pytest.raises(TrainingDivergedError, match=r"NaN/Inf in epoch 1"):
        train(quick_config(tmp_path, learning_rate=1e12, optimizer="sgd", progress=False))
    assert len(steps_run) < 16  # an epoch is 16 steps


@pytest.mark.parametrize("overrides, message", [
    ({"model": "model7"}, "unknown model 'model7'"),
    ({"batch_size": 30}, "batch_size 30 does not split evenly over 4 devices"),
    ({"learning_rate": -0.1}, "learning_rate must be a positive number"),
    ({"learning_rate": True}, "learning_rate must be a positive number, got True"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ({"num_devices": 64}, "num_devices 64 is not available"),
    ({"num_devices": "2"}, "num_devices must be a positive integer, got '2'"),
    ({"model": ["model0"]}, r"unknown model \['model0'\]"),
    ({"standardize": "no"}, "standardize must be true or false, got 'no'"),
    ({"resume": "no"}, "resume must be true or false, got 'no'"),
    ({"data_dir": 123}, "data_dir must be a folder path, got 123"),
])
def test_invalid_config_fails_before_any_compute(tmp_path, overrides, message, monkeypatch):
    monkeypatch.setattr(train_module, "load_cifar10", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ConfigError, match=message):
        train(quick_config(tmp_path, **overrides))
    assert not (tmp_path / "run").exists()


def test_a_run_whose_data_is_missing_leaves_no_folder_behind(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise DataError("no CIFAR-10 archive in /nowhere")

    monkeypatch.setattr(train_module, "load_cifar10", missing)
    with pytest.raises(DataError, match="no CIFAR-10 archive"):
        train(quick_config(tmp_path, workdir=str(tmp_path / "runs" / "new")))
    assert not (tmp_path / "runs").exists()


def test_train_takes_a_config_object():
    with pytest.raises(ConfigError, match="train\\(\\) takes a TrainConfig, got dict: .*TrainConfig.from_dict"):
        train({"model": "model0"})


def test_folders_may_be_given_as_paths(tmp_path, learnable_data):
    result = train(quick_config(tmp_path, epochs=1, workdir=tmp_path / "run", data_dir=tmp_path / "data"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["workdir"], saved["data_dir"]) == (str(tmp_path / "run"), str(tmp_path / "data"))
    assert [row["epoch"] for row in result.history] == [1]


def test_a_relative_data_folder_is_saved_absolute(tmp_path, learnable_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(quick_config(tmp_path, epochs=1, data_dir="data/cifar"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "data" / "cifar")


def test_workdir_of_a_different_run_is_refused(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=r"holds a different run \(learning_rate: 0.001 in the run vs 0.01"):
        train(quick_config(tmp_path, epochs=1, learning_rate=0.01))
    with pytest.raises(ConfigError, match="already has checkpoints and --no-resume was given"):
        train(quick_config(tmp_path, epochs=2, resume=False))


@pytest.mark.parametrize("file_in_the_way", ["run", "run/checkpoints"])
def test_a_file_where_the_run_folders_go_is_refused_and_kept(tmp_path, file_in_the_way, monkeypatch):
    monkeypatch.setattr(train_module, "load_cifar10", lambda *a, **k: pytest.fail("data was loaded"))
    (tmp_path / file_in_the_way).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file_in_the_way).write_text("a user's file")
    with pytest.raises(ConfigError, match=f"{tmp_path / file_in_the_way} is a file, not a folder: choose a new"):
        train(quick_config(tmp_path))
    assert (tmp_path / file_in_the_way).read_text() == "a user's file"


def test_a_workdir_under_a_file_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "load_cifar10", lambda *a, **k: pytest.fail("data was loaded"))
    (tmp_path / "notes.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'notes.txt'} is a file, not a folder: choose a new --workdir"):
        train(quick_config(tmp_path, workdir=str(tmp_path / "notes.txt" / "runs" / "run")))
    assert (tmp_path / "notes.txt").read_text() == "a user's file"


def test_numpy_numbers_in_the_config_train_and_save_as_plain_numbers(tmp_path, learnable_data):
    config = quick_config(tmp_path, epochs=np.int64(1), batch_size=np.int32(32), seed=np.int64(3),
                          learning_rate=np.float32(0.002), label_smoothing=np.float64(0.1))
    result = train(config)
    saved = json.loads((result.workdir / "config.json").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["seed"]) == (1, 32, 3)
    assert saved["learning_rate"] == pytest.approx(0.002) and saved["label_smoothing"] == 0.1


@pytest.mark.slow
def test_runs_without_a_workdir_started_in_the_same_second_get_their_own_folders(tmp_path, learnable_data,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261125-120000")
    first = train(quick_config(tmp_path, epochs=1, workdir=None))
    second = train(quick_config(tmp_path, epochs=1, workdir=None, learning_rate=0.002))
    assert (str(first.workdir), str(second.workdir)) == ("checkpoints/model0-20261125-120000",
                                                         "checkpoints/model0-20261125-120000-2")
    assert json.loads((first.workdir / "config.json").read_text())["learning_rate"] == 1e-3
    assert json.loads((second.workdir / "config.json").read_text())["learning_rate"] == 0.002


def test_a_run_over_several_processes_needs_a_workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module.distributed, "is_multi_process", lambda: True)
    monkeypatch.setattr(train_module, "load_cifar10", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ConfigError, match="a run over several processes needs --workdir"):
        train(quick_config(tmp_path, workdir=None))


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_writes_nothing(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=1))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with rundir.exclusive_use(tmp_path / "run"):  # as a run training there now holds it
        with pytest.raises(ConfigError, match=f"{tmp_path / 'run'} is in use by another training run: wait for it"):
            train(quick_config(tmp_path, epochs=2))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert [row["epoch"] for row in train(quick_config(tmp_path, epochs=2)).history] == [1, 2]  # free again


def test_results_whose_checkpoints_are_gone_are_not_overwritten(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=1))
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"holds results \(metrics.jsonl\) but no checkpoint to resume from"):
        train(quick_config(tmp_path, epochs=1))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_a_runs_checkpoints_folder_is_not_taken_for_a_new_run(tmp_path, learnable_data):
    train(quick_config(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=f"is the checkpoints folder of the run in {tmp_path / 'run'}: resume"):
        train(quick_config(tmp_path, epochs=1, workdir=str(tmp_path / "run" / "checkpoints")))


def test_a_batch_larger_than_the_data_leaves_no_folder_behind(tmp_path, learnable_data):
    with pytest.raises(ConfigError, match="batch_size 1024 is larger than the 512 training images"):
        train(quick_config(tmp_path, batch_size=1024))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("garbage", ["{'model': ", "[1, 2]"])
def test_an_unreadable_run_config_is_one_clear_error_and_is_kept(tmp_path, garbage, monkeypatch):
    monkeypatch.setattr(train_module, "load_cifar10", lambda *a, **k: pytest.fail("data was loaded"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(garbage)
    with pytest.raises(ConfigError, match=r"config.json (is not a readable run config|holds list, not a run config)"):
        train(quick_config(tmp_path))
    assert (tmp_path / "run" / "config.json").read_text() == garbage


def test_model2_preset_is_sgd_at_0_01():
    config = TrainConfig(model="model2").resolved()
    assert (config.optimizer, config.learning_rate) == ("sgd", 0.01)
    assert dataclasses.replace(TrainConfig(model="model2"), learning_rate=0.1).resolved().learning_rate == 0.1

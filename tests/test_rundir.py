"""The run folder: its files written whole or not at all, its history read back, the checks before a run starts."""
import json

import pytest

from cifar_jax import TrainConfig, rundir
from cifar_jax.errors import ConfigError, InputError, RunFolderError
from cifar_jax.rundir import read_history

HISTORY = [{"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.2, "test_loss": 2.1, "test_accuracy": 0.19,
            "epoch_seconds": 3.5, "images_per_second": 14000.0}]


def test_history_comes_from_metrics_jsonl_else_the_checkpoint(trained_run, tmp_path):
    assert read_history(trained_run.workdir) == trained_run.history
    assert read_history(tmp_path, HISTORY) == HISTORY


def test_a_garbled_metrics_file_is_one_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(HISTORY[0]) + '\n{"epoch": 2, "train_lo\n')
    with pytest.raises(InputError, match=r"metrics.jsonl line 2 is not a metrics row .*: move the file away"):
        read_history(tmp_path, HISTORY)


def test_an_atomic_write_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rundir.write_history(tmp_path, HISTORY)
    assert [json.loads(line) for line in path.read_text().splitlines()] == HISTORY

    def full_disk(self, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full_disk)
    with pytest.raises(RunFolderError, match="No space left on device"):
        rundir.write_history(tmp_path, HISTORY * 2)
    monkeypatch.undo()
    assert [json.loads(line) for line in path.read_text().splitlines()] == HISTORY


def test_a_config_round_trips_and_an_unreadable_one_is_refused(tmp_path):
    assert rundir.saved_config(tmp_path) is None
    config = TrainConfig(model="model1", epochs=3, workdir=str(tmp_path))
    rundir.write_config(tmp_path, config)
    assert rundir.saved_config(tmp_path) == config
    (tmp_path / rundir.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not a readable run config"):
        rundir.saved_config(tmp_path)


def test_the_layout_is_named_once(tmp_path):
    assert rundir.checkpoints_dir(tmp_path / "run") == (tmp_path / "run" / "checkpoints").absolute()
    assert rundir.plot_path(tmp_path, "training_curves") == tmp_path / "plots" / "training_curves.png"


def test_a_folder_in_use_is_refused_until_it_is_free(tmp_path):
    with rundir.exclusive_use(tmp_path):
        with pytest.raises(ConfigError, match="is in use by another training run"):
            with rundir.exclusive_use(tmp_path):
                pass
    with rundir.exclusive_use(tmp_path):  # free again
        pass

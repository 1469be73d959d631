"""The loop's hooks: called in order with the epoch's metrics, able to stop a run cleanly, and the built-in three."""
import importlib
import json

import numpy as np
import pytest

from cifar_jax import Callback, TrainConfig, train
from cifar_jax.callbacks import epoch_line
from cifar_jax.train import default_callbacks
from cifar_jax.optim import learning_rate_schedule
from learnable import quick_config

train_module = importlib.import_module("cifar_jax.train")
LEARNABLE_SIZES = (256, 40)  # training and test images of the learnable problem






class Recorder(Callback):
    def __init__(self, stop_after_epoch=None):
        self.calls, self.stop_after_epoch = [], stop_after_epoch

    def on_train_start(self, run):
        self.calls.append(("start", len(run.history)))

    def on_train_progress(self, run, global_step, metrics):
        self.calls.append(("progress", global_step, sorted(metrics)))

    def on_epoch_end(self, run, metrics):
        self.calls.append(("epoch", metrics["epoch"], metrics is run.history[-1]))
        if metrics["epoch"] == self.stop_after_epoch:
            run.request_stop("test accuracy too low")

    def on_train_end(self, run):
        self.calls.append(("end", len(run.history)))


def test_callbacks_are_called_in_order_with_each_epochs_metrics(tmp_path, learnable_data, monkeypatch):
    monkeypatch.setattr(train_module, "PROGRESS_STEPS", 4)  # an epoch is 8 steps
    recorder = Recorder()
    result = train(quick_config(tmp_path, epochs=2), callbacks=[recorder])
    keys = ["train_accuracy", "train_loss"]
    assert recorder.calls == [("start", 0), ("progress", 4, keys), ("progress", 8, keys), ("epoch", 1, True),
                              ("progress", 12, keys), ("progress", 16, keys), ("epoch", 2, True), ("end", 2)]
    assert result.stopped_by is None and not result.interrupted


def test_a_callback_stops_the_run_cleanly_after_its_epoch_and_the_run_resumes(tmp_path, learnable_data):
    recorder = Recorder(stop_after_epoch=1)
    # checkpoint_every 5: the stopped epoch is saved anyway, so nothing trained is lost
    stopped = train(quick_config(tmp_path, epochs=3, checkpoint_every=5), callbacks=[recorder])
    assert stopped.stopped_by == "test accuracy too low" and not stopped.interrupted
    assert [row["epoch"] for row in stopped.history] == [1]
    assert recorder.calls[-1] == ("end", 1)
    lines = (stopped.workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert sorted(int(p.name) for p in (stopped.workdir / "checkpoints").iterdir()) == [8]  # epoch 1's last step
    resumed = train(quick_config(tmp_path, epochs=3, checkpoint_every=5))
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3] and resumed.stopped_by is None


def test_a_stop_asked_in_the_last_epoch_just_finishes(tmp_path, learnable_data):
    result = train(quick_config(tmp_path, epochs=2), callbacks=[Recorder(stop_after_epoch=2)])
    assert result.stopped_by is None and [row["epoch"] for row in result.history] == [1, 2]


def test_each_epoch_records_the_learning_rate_of_its_last_step(tmp_path, learnable_data):
    config = quick_config(tmp_path, epochs=3, lr_schedule="cosine", learning_rate=0.01, warmup_epochs=1.0)
    result = train(config)
    schedule = learning_rate_schedule(config.resolved(), steps_per_epoch=8)
    expected = [float(schedule(8 * epoch - 1)) for epoch in (1, 2, 3)]
    np.testing.assert_allclose([row["learning_rate"] for row in result.history], expected, rtol=1e-6)
    assert expected[0] > expected[1] > expected[2]  # cosine decay after the warm-up
    constant = train(quick_config(tmp_path, epochs=1, workdir=str(tmp_path / "constant")))
    assert constant.history[0]["learning_rate"] == pytest.approx(1e-3)


def test_the_built_in_callbacks_write_the_metrics_the_line_and_the_curves(tmp_path, learnable_data, capsys):
    names = ["MetricsFile", "EpochLog", "TrainingCurves"]
    assert [type(c).__name__ for c in default_callbacks(TrainConfig())] == names + ["TensorBoardSummaries"]
    assert [type(c).__name__ for c in default_callbacks(TrainConfig(tensorboard=False))] == names
    result = train(quick_config(tmp_path, epochs=1))
    assert epoch_line(result.history[0]) in capsys.readouterr().out.splitlines()
    assert (result.workdir / "plots" / "training_curves.png").stat().st_size > 1000

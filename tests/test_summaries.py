"""TensorBoard summaries and profiler traces: what a run writes, read back as TensorBoard reads it."""
import importlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cifar_jax import Callback, TrainConfig, cli, train
from cifar_jax.summaries import EPOCH_SCALARS, HPARAMS_RUN
from learnable import quick_config

train_module = importlib.import_module("cifar_jax.train")
LEARNABLE_SIZES = (256, 40)  # training and test images of the learnable problem
STEPS_PER_EPOCH = 8  # 256 training images at batch 32






def events(logdir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def metrics_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_every_epoch_scalar_equals_metrics_jsonl_at_the_optimizer_step(tmp_path, learnable_data):
    result = train(quick_config(tmp_path))
    logged = events(result.workdir / "tensorboard")
    rows = metrics_rows(result.workdir)
    for name in EPOCH_SCALARS:
        scalars = logged.Scalars(f"epoch/{name}")
        assert [event.step for event in scalars] == [row["epoch"] * STEPS_PER_EPOCH for row in rows]
        np.testing.assert_allclose([event.value for event in scalars], [row[name] for row in rows], rtol=1e-6)


def test_the_running_train_metrics_are_logged_every_few_hundred_steps(tmp_path, learnable_data, monkeypatch):
    monkeypatch.setattr(train_module, "PROGRESS_STEPS", 2)
    monkeypatch.setattr("cifar_jax.summaries.RUNNING_EVERY_STEPS", 4)
    result = train(quick_config(tmp_path))
    logged = events(result.workdir / "tensorboard")
    assert [event.step for event in logged.Scalars("running/train_loss")] == [4, 8, 12, 16]
    assert all(0 <= event.value <= 1 for event in logged.Scalars("running/train_accuracy"))


def hparams_of(logdir: Path) -> tuple[dict, dict]:
    """(hyperparameters, metrics) of a run's HParams row."""
    logged = events(logdir / HPARAMS_RUN)
    content = logged.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(blob) for blob in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(blob).HasField("session_start_info"))
    hparams = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for name, value in start.session_start_info.hparams.items()}
    metrics = {tag: logged.Scalars(tag)[-1].value for tag in logged.Tags()["scalars"]}
    return hparams, metrics


def test_the_hparams_row_holds_the_config_and_the_results(tmp_path, learnable_data):
    result = train(quick_config(tmp_path, learning_rate=0.002))
    hparams, metrics = hparams_of(result.workdir / "tensorboard")
    assert hparams["model"] == "model0" and hparams["learning_rate"] == pytest.approx(0.002)
    assert hparams["augment"] is False and hparams["data_dir"] == "unset" and hparams["epochs"] == 2
    assert metrics["hparam/test_accuracy"] == pytest.approx(result.history[-1]["test_accuracy"])
    assert metrics["hparam/epochs_trained"] == 2


class KilledAfter(Callback):
    """Ends the process's work abruptly after an epoch's summaries are written and before any later checkpoint."""

    class Killed(BaseException):
        pass

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, run, metrics):
        if metrics["epoch"] == self.epoch:
            raise self.Killed


def test_a_killed_and_resumed_run_has_each_step_once(tmp_path, learnable_data):
    config = quick_config(tmp_path, epochs=4, checkpoint_every=2)
    with pytest.raises(KilledAfter.Killed):
        train(config, callbacks=[KilledAfter(epoch=3)])  # epoch 3 logged, its checkpoint never written
    resumed = train(config)  # from epoch 2's checkpoint: epoch 3 is trained and logged again
    logged = events(resumed.workdir / "tensorboard")
    for tag in ("epoch/test_accuracy", "epoch/train_loss"):
        steps = [event.step for event in logged.Scalars(tag)]
        assert steps == [8, 16, 24, 32], tag
    rows = metrics_rows(resumed.workdir)
    np.testing.assert_allclose([e.value for e in logged.Scalars("epoch/test_loss")], [r["test_loss"] for r in rows],
                               rtol=1e-6)
    hparams, metrics = hparams_of(resumed.workdir / "tensorboard")
    assert metrics["hparam/epochs_trained"] == 4  # one row, rewritten at the end


def test_no_summaries_with_tensorboard_off(tmp_path, learnable_data):
    result = train(quick_config(tmp_path, epochs=1, tensorboard=False))
    assert not (result.workdir / "tensorboard").exists()


@pytest.mark.slow
def test_plot_and_evaluate_show_the_confusion_matrix_and_test_predictions(trained_run, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(trained_run.workdir, workdir)
    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    images = events(workdir / "tensorboard").Tags()["images"]
    assert sorted(images) == ["evaluation/confusion_matrix", "evaluation/test_predictions"]
    shutil.rmtree(workdir / "tensorboard")
    assert cli.main(["plot", "--workdir", str(workdir)]) == 0
    logged = events(workdir / "tensorboard")
    image = logged.Images("evaluation/confusion_matrix")[-1]
    assert image.width > 300 and image.height > 300


# ---------------------------------------------------------------- profiler


def test_profile_steps_leave_a_trace_and_none_runs_without_them(tmp_path, learnable_data, monkeypatch):
    traced = train(quick_config(tmp_path, epochs=1, profile_steps="2:4"))
    assert list((traced.workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    started = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *args, **kwargs: started.append(args))
    plain = train(quick_config(tmp_path, epochs=1, workdir=str(tmp_path / "plain")))
    assert started == [] and not (plain.workdir / "profile").exists()


@pytest.mark.parametrize("value", ["4:2", "3", "a:b", "-1:3"])
def test_a_bad_profile_range_is_one_line(tmp_path, value):
    from cifar_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="profile_steps must be START:END with 0 <= START < END"):
        TrainConfig(profile_steps=value).resolved()


# ---------------------------------------------------------------- TensorBoard itself


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_a_real_tensorboard_serves_the_runs_test_accuracy(tmp_path, learnable_data):
    result = train(quick_config(tmp_path))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(result.workdir), "--host",
                               "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, tags = time.monotonic() + 60, {}
        while "epoch/test_accuracy" not in tags.get("tensorboard", {}) and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
            except OSError:
                continue
        points = get_json(f"{base}/data/plugin/scalars/scalars?run=tensorboard&tag=epoch/test_accuracy")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [step for _, step, _ in points] == [8, 16]
    np.testing.assert_allclose([value for _, _, value in points],
                               [row["test_accuracy"] for row in metrics_rows(result.workdir)], rtol=1e-6)

"""Real processes, really killed: SIGKILL mid-epoch and mid-save, SIGTERM; the resumed run must end exactly where
an uninterrupted one does."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cifar_fixtures import write_binary_archive
from cifar_jax import checkpoint
from cifar_jax.models import abstract_params
from learnable import class_coloured_dataset

pytestmark = pytest.mark.slow  # every test here runs processes end to end

TIMEOUT = 120


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    dataset = class_coloured_dataset(num_train=2048, num_test=64, seed=5)
    folder = tmp_path_factory.mktemp("preemption_data")
    write_binary_archive(folder / "cifar-10-binary.tar.gz", dataset.train_images, dataset.train_labels,
                         dataset.test_images, dataset.test_labels)
    return folder


def start_training(data_dir: Path, workdir: Path, model: str = "model0", epochs: int = 3) -> subprocess.Popen:
    # One device per process keeps these runs quick; bit-identity needs the same device count on both sides.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cifar_jax", "train", "--model", model, "--epochs", str(epochs),
               "--batch-size", "16", "--eval-batch-size", "64", "--data-dir", str(data_dir),
               "--workdir", str(workdir), "--no-progress"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, expected_status: int = 0) -> str:
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == expected_status, output
    return output


def committed_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def wait_for(condition, what: str, process: subprocess.Popen, poll: float = 0.002):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"training ended before {what}: {process.stdout.read()}")
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def final_params(workdir: Path):
    restored = checkpoint.restore_for_inference(workdir, "latest", abstract_params)
    return restored.metadata, np.concatenate([np.ravel(x) for x in jax.tree.leaves(restored.params)])


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    results = {}
    for model in ("model0", "model1"):
        workdir = tmp_path_factory.mktemp("straight") / model
        finish(start_training(data_dir, workdir, model))
        results[model] = final_params(workdir)
    return results


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(data_dir, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    process = start_training(data_dir, workdir)
    wait_for(lambda: committed_steps(workdir), "the first checkpoint", process)
    process.kill()
    process.wait()
    metrics_lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_lines) < 3, "the kill came after the run had finished"
    finish(start_training(data_dir, workdir))
    metadata, params = final_params(workdir)
    assert metadata["epoch"] == 3 and [row["epoch"] for row in metadata["history"]] == [1, 2, 3]
    np.testing.assert_array_equal(params, uninterrupted["model0"][1])
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3


def test_sigkill_during_a_save_never_uses_the_partial_checkpoint(data_dir, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    process = start_training(data_dir, workdir, model="model1")  # 40 MB per save: a wide window to hit

    def saving():
        folder = workdir / "checkpoints"
        return folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())

    wait_for(saving, "a save in progress", process, poll=0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert partial, "the kill did not land during a save"
    finish(start_training(data_dir, workdir, model="model1"))
    _, params = final_params(workdir)
    np.testing.assert_array_equal(params, uninterrupted["model1"][1])


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(data_dir, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    process = start_training(data_dir, workdir)
    wait_for(lambda: committed_steps(workdir), "the first checkpoint", process)
    process.send_signal(signal.SIGTERM)
    output = finish(process, expected_status=128 + signal.SIGTERM)  # 143, as shells expect: `train && next` stops
    assert "SIGTERM: saved a checkpoint at epoch" in output
    assert f"resume with: cifar-jax train --workdir {workdir}" in output
    interrupted_step = max(committed_steps(workdir))
    assert interrupted_step > committed_steps(workdir)[0]
    finish(start_training(data_dir, workdir))
    _, params = final_params(workdir)
    np.testing.assert_array_equal(params, uninterrupted["model0"][1])

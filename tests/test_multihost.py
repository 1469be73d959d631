"""Multi-host training for real: several `cifar-jax train` processes joined over 127.0.0.1 (JAX's multi-controller
runtime), each with two simulated CPU devices, against one in-process run on this process's four devices."""
import argparse
import dataclasses
import io
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cifar_jax import TrainConfig, checkpoint, cli, distributed, train
from cifar_jax.distributed import DistributedSettings
from cifar_jax.errors import ConfigError
from cifar_jax.flags import given_fields
from cifar_jax.parallel import DeviceSet
from cifar_jax.models import abstract_params

pytestmark = pytest.mark.slow  # every test here runs processes end to end

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 150  # seconds any one subprocess may take before the test fails instead of hanging CI
HEARTBEAT_TIMEOUT = 10  # seconds before JAX declares a silent peer dead
STEPS_PER_EPOCH = 16  # 512 training images of the learnable archive at batch 32
# SGD: its update is linear in the gradient, so the float rounding of 2x2-device sums against 4-device sums stays
# ~1e-8. Adam's m/sqrt(v) blows that rounding up where a gradient is near zero (1e-4 after one epoch), and it is
# blind to a wrong device average (a sum instead of a mean scales m and sqrt(v) alike). At 0.02: at 0.05 this
# problem's training is chaotic enough to grow 1e-8 into 2e-3 in an epoch.
SGD = dict(optimizer="sgd", learning_rate=0.02)
RUN_FLAGS = ["--model", "model0", "--batch-size", "32", "--eval-batch-size", "100", "--no-progress",
             "--optimizer", SGD["optimizer"], "--learning-rate", str(SGD["learning_rate"])]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(distributed.ENV_PREFIX)}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONUNBUFFERED": "1", **extra}


def start_processes(num_processes: int, data_dir: Path, workdir: Path, epochs: int) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    flags = [*RUN_FLAGS, "--epochs", str(epochs), "--data-dir", str(data_dir), "--workdir", str(workdir),
             "--coordinator-address", address, "--num-processes", str(num_processes),
             "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]
    return [subprocess.Popen([sys.executable, "-m", "cifar_jax", "train", *flags, "--process-id", str(i)],
                             env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(num_processes)]


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)


def committed_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def params_at(workdir: Path, step) -> np.ndarray:
    restored = checkpoint.restore_for_inference(workdir, step, abstract_params)
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(restored.params)])


@pytest.fixture(scope="module")
def one_process_run(learnable_data_dir, tmp_path_factory):
    """The reference: this process alone on its four devices, the same model, data, settings and seed, two epochs."""
    assert jax.local_device_count() == 4
    config = TrainConfig(model="model0", epochs=2, batch_size=32, eval_batch_size=100, progress=False,
                         data_dir=str(learnable_data_dir), **SGD,
                         workdir=str(tmp_path_factory.mktemp("runs") / "one-process"))
    return train(config)


# ---------------------------------------------------------------- several real processes


def test_two_processes_train_exactly_like_one_process_with_four_devices(learnable_data_dir, tmp_path,
                                                                         one_process_run):
    workdir = tmp_path / "two-processes"
    command = ["bash", str(REPO / "scripts" / "launch_local.sh"), "2", *RUN_FLAGS, "--epochs", "1",
               "--data-dir", str(learnable_data_dir), "--workdir", str(workdir)]
    done = subprocess.run(command, env=process_env(LAUNCH_LOG_DIR=str(tmp_path / "logs")), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr

    assert committed_steps(workdir) == [STEPS_PER_EPOCH]
    difference = np.abs(params_at(workdir, "latest") - params_at(one_process_run.workdir, STEPS_PER_EPOCH))
    assert difference.max() <= 1e-5
    # Only process 0 reports: one metrics.jsonl row per epoch, the epoch line and the end line on its output only.
    rows = checkpoint.restore_for_inference(workdir, "latest", abstract_params).metadata["history"]
    assert (workdir / "metrics.jsonl").read_text().count("\n") == len(rows) == 1
    assert rows[0]["test_accuracy"] == one_process_run.history[0]["test_accuracy"]
    assert rows[0]["train_loss"] == pytest.approx(one_process_run.history[0]["train_loss"], abs=1e-5)
    assert done.stdout.count("epoch 1:") == 1 and f"run finished: {workdir}" in done.stdout
    other_log = (tmp_path / "logs" / "process-1.log").read_text()
    assert "epoch 1:" not in other_log and "run finished" not in other_log
    # The hand-made archive is not the official one: process 0 warns about it, the others stay quiet.
    assert "is not the official" in done.stderr and "is not the official" not in other_log
    assert (workdir / "plots" / "training_curves.png").is_file()


def test_a_killed_process_stops_the_other_and_the_run_resumes_on_one_process(learnable_data_dir, tmp_path,
                                                                             one_process_run):
    workdir = tmp_path / "killed"
    processes = start_processes(2, learnable_data_dir, workdir, epochs=100)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not committed_steps(workdir):
            assert all(p.poll() is None for p in processes), "a process ended before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint was written in time"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, survivor_errors = processes[0].communicate(timeout=HEARTBEAT_TIMEOUT + 60)
        waited = time.monotonic() - killed_at
    finally:
        stop_all(processes)

    assert processes[0].returncode != 0
    assert waited < HEARTBEAT_TIMEOUT + 30
    # Either a collective failed first, or JAX's heartbeat found the peer gone and aborted the worker: one line
    # either way, without JAX's C++ stack trace (that goes to the runtime log the line names).
    last_line = survivor_errors.strip().splitlines()[-1]
    assert last_line.startswith("cifar-jax: error: process 0 of 2"), survivor_errors[-2000:]
    assert ("lost contact with the others" in last_line
            or "coordination service found another process of the run gone" in last_line), last_line
    assert "Check failure stack trace" not in survivor_errors and "Traceback" not in survivor_errors

    # The last checkpoint is intact and exact; one process with four devices picks the run up from it.
    assert committed_steps(workdir) == [STEPS_PER_EPOCH]  # the kill came before the second could be committed
    reference = one_process_run.workdir
    assert np.abs(params_at(workdir, "latest") - params_at(reference, STEPS_PER_EPOCH)).max() <= 1e-5
    resumed = train(dataclasses.replace(TrainConfig.load(workdir / "config.json"), epochs=2))
    assert not (workdir / "corrupt_checkpoints").exists()
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[1]["test_accuracy"] == one_process_run.history[1]["test_accuracy"]
    assert resumed.history[1]["train_loss"] == pytest.approx(one_process_run.history[1]["train_loss"], abs=1e-4)
    # The class-coloured images are flat, so their max-pool windows tie: a 3e-8 difference at the checkpoint flips
    # which pixel of a window gets the gradient, and grows to ~1e-4 through another epoch.
    assert np.abs(params_at(workdir, "latest") - params_at(reference, 2 * STEPS_PER_EPOCH)).max() <= 1e-3


def test_a_run_started_on_some_devices_resumes_on_several_processes(learnable_data_dir, tmp_path, one_process_run):
    workdir = tmp_path / "two-devices-then-two-processes"
    saved = TrainConfig.load(one_process_run.workdir / "config.json")
    train(dataclasses.replace(saved, epochs=1, num_devices=2, workdir=str(workdir)))
    assert TrainConfig.load(workdir / "config.json").num_devices == 2
    # The reference: the same epoch 1, then epoch 2 on this process's 4 devices (as 2 processes x 2 devices split it).
    reference = tmp_path / "reference"
    shutil.copytree(workdir, reference)
    train(dataclasses.replace(saved, epochs=2, num_devices=4, workdir=str(reference)))

    # Only --workdir and --epochs: every other setting, --num-devices 2 included, comes from the run.
    command = ["bash", str(REPO / "scripts" / "launch_local.sh"), "2", "--workdir", str(workdir), "--epochs", "2"]
    done = subprocess.run(command, env=process_env(LAUNCH_LOG_DIR=str(tmp_path / "logs")), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert committed_steps(workdir) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    # Tied max-pool windows of the flat images again (see above): at batches of 32 or fewer each pool compares the
    # raw conv outputs, whose last bits differ between 2 processes x 2 devices and 1 x 4, so the tie-break can differ.
    assert np.abs(params_at(workdir, "latest") - params_at(reference, "latest")).max() <= 1e-3


# ---------------------------------------------------------------- settings (this process only)


def parsed(*flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["train", *flags])


def test_flags_override_environment_variables():
    environ = {"CIFAR_JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "CIFAR_JAX_NUM_PROCESSES": "4",
               "CIFAR_JAX_PROCESS_ID": "3", "CIFAR_JAX_HEARTBEAT_TIMEOUT": "20"}
    settings = distributed.settings_from(parsed("--process-id", "2"), environ)
    assert settings == DistributedSettings("10.0.0.1:1234", 4, 2, heartbeat_timeout=20)
    assert settings.is_explicit
    assert not distributed.settings_from(parsed(), {}).is_explicit


@pytest.mark.parametrize("flags, environ, message", [
    (["--num-processes", "2", "--process-id", "2"], {}, "process_id 2 is out of range for 2 processes"),
    (["--coordinator-address", "10.0.0.1"], {}, "has no port: use HOST:PORT"),
    ([], {"CIFAR_JAX_NUM_PROCESSES": "two"}, "CIFAR_JAX_NUM_PROCESSES='two' is not a valid int"),
    (["--num-processes", "0"], {}, "num_processes must be at least 1"),
    (["--heartbeat-timeout", "0"], {}, "heartbeat_timeout must be at least 1 second"),
])
def test_invalid_settings_are_refused_in_one_line(flags, environ, message):
    with pytest.raises(ConfigError, match=message):
        distributed.settings_from(parsed(*flags), environ)


def test_the_process_settings_stay_out_of_the_run_config():
    args = parsed("--workdir", "w", "--num-processes", "2", "--process-id", "1", "--coordinator-address", "h:1")
    assert set(given_fields(args, TrainConfig)) == {"workdir"}


def test_without_a_cluster_the_process_stays_single():
    distributed.initialize(DistributedSettings())  # JAX already runs here, as in any library use
    distributed.initialize(DistributedSettings(num_processes=1))
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()
    assert distributed.agreed_stop("SIGTERM", global_step=7) == "SIGTERM"
    assert distributed.agreed_stop(None, global_step=20) is None
    per_device = np.arange(8.0).reshape(4, 2)
    np.testing.assert_array_equal(DeviceSet.select(4).gather(per_device), per_device)


def test_the_supervisor_keeps_jax_runtime_log_lines_out_of_the_terminal():
    worker_output = [b"\rtraining:  50%|#####     | 8/16", b"\rtraining: 100%|##########| 16/16\n",
                     b"/work/cifar_jax/train.py:307: UserWarning: data hash differs\n", b"  dataset = load()\n",
                     b"E1124 16:52:08.214430   28252 rendezvous.cc:116] waiting for the all-reduce\n",
                     b"1\nThe tasks have crashed.\n\nRPC: /xla.coordination.CoordinationService/PollForError\n",
                     b"F1124 16:52:48.2148", b"35   28252 rendezvous.cc:161] Terminating process\n",
                     b"*** Check failure stack trace: ***\n", b"    @     0x7f721da40634  absl::LogMessage\n",
                     b"cifar-jax: error: the last line"]
    terminal, runtime_log = io.BytesIO(), io.BytesIO()
    logged = distributed._split_runtime_log(worker_output, terminal, runtime_log)  # chunks as the pipe gives them
    assert terminal.getvalue() == (b"\rtraining:  50%|#####     | 8/16\rtraining: 100%|##########| 16/16\n"
                                   b"/work/cifar_jax/train.py:307: UserWarning: data hash differs\n  dataset = load()\n"
                                   b"cifar-jax: error: the last line")
    assert logged == 8 and runtime_log.getvalue().count(b"\n") == 8  # the message's continuation lines too
    assert b"Terminating process" in runtime_log.getvalue() and b"0x7f721da40634" in runtime_log.getvalue()

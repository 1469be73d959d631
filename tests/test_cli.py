"""The command line end to end, as a user runs it: a real `python -m cifar_jax` process on a tiny archive."""
import asyncio
import gc
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import types
import warnings

import pytest

from cifar_jax import cli

METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "epoch_seconds",
               "images_per_second"}


def run_cli(*args, timeout=240, **extra_env):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", **extra_env)
    return subprocess.run([sys.executable, "-m", "cifar_jax", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_train_on_a_tiny_archive_writes_sane_metrics_and_curves(learnable_data_dir, tmp_path):
    workdir = tmp_path / "run"
    done = run_cli("train", "--model", "model0", "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "101",
                   "--data-dir", str(learnable_data_dir), "--workdir", str(workdir), "--seed", "0", "--no-progress",
                   XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"backend: cpu, \d+ device\(s\)", done.stdout.splitlines()[0])  # said first
    # Compiled programs are kept for the next start (the train step among them, and the small eager ones).
    assert len(list((tmp_path / "cache" / "cifar-jax" / "xla-compilation-cache").iterdir())) >= 3
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) == METRIC_KEYS
        assert all(math.isfinite(row[key]) for key in METRIC_KEYS)
        assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1
        assert row["images_per_second"] > 0 and row["epoch_seconds"] > 0
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((workdir / "config.json").read_text())["learning_rate"] == 1e-3
    assert (workdir / "plots" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"run finished: {workdir}" in done.stdout
    startup = re.search(r"first step done ([0-9.]+) s after the run started", done.stdout)
    assert startup and 0 < float(startup.group(1)) < 120, done.stdout
    assert done.stdout.index("first step done") < done.stdout.index("epoch 1:")  # reported once, at the first step
    assert done.stdout.count("first step done") == 1


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--model", "model9"], "unknown model 'model9': choose one of model0, model1, model2"),
    (["--learning-rate", "-1"], "learning_rate must be a positive number, got -1.0"),
    (["--data-dir", "/nonexistent/cifar", "--data", "archive"], "cifar-10-binary.tar.gz"),
    (["--data-dir", "/etc/passwd"], "data dir /etc/passwd is a file, not a folder: pass the folder that holds"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten' (see cifar-jax train --help)"),
    (["--epoks", "3"], "unrecognized arguments: --epoks 3; did you mean --epochs? (see cifar-jax train --help)"),
    (["--lr", "0.01"], "unrecognized arguments: --lr 0.01; did you mean --learning-rate or --lr-schedule?"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    done = run_cli("train", "--workdir", str(tmp_path / "run"), "--no-progress", *args, timeout=120)
    assert done.returncode == 2
    # Nothing but the error line (and the tiny archive's warning that it is not the official one)
    lines = [line for line in done.stderr.strip().splitlines() if "is not the official" not in line]
    assert len(lines) == 1 and lines[0].startswith("cifar-jax: error: ") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_help_lists_every_subcommand():
    done = run_cli("--help", timeout=60)
    assert done.returncode == 0
    for command in ("train", "evaluate", "plot", "predict"):
        assert command in done.stdout


def test_train_help_gives_defaults_but_no_none_for_the_recipes_options(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: model0)" in text and "unset takes the recipe's (tutorial: 10)" in text


def test_the_compilation_cache_goes_under_the_user_cache_unless_jax_is_told_otherwise(tmp_path):
    assert cli.compilation_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "cifar-jax" / "xla-compilation-cache")
    assert cli.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/elsewhere", "XDG_CACHE_HOME": "x"}) is None


def test_benchmark_compiles_cold_while_the_other_commands_use_the_cache(tmp_path, monkeypatch, capsys):
    enabled = []
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: enabled.append(True))
    missing = str(tmp_path / "no-data")
    assert cli.main(["benchmark", "--data", "auto", "--data-dir", missing]) == 2
    assert enabled == []
    assert cli.main(["evaluate", "--workdir", missing]) == 2
    assert enabled == [True]
    assert capsys.readouterr().err.count("cifar-jax: error:") == 2


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_one_line_even_with_reads_still_in_flight(trained_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained_run.workdir, workdir)
    for data_file in (workdir / "checkpoints").glob("*/params/ocdbt.process_*/d/*"):  # the arrays' bytes
        data_file.write_bytes(data_file.read_bytes()[:20])  # cut short: the many concurrent reads all fail
    done = run_cli("evaluate", "--workdir", str(workdir), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"cifar-jax: error: checkpoint \d+ in .* could not be read", lines[0]), done.stderr


def test_only_late_event_loop_callbacks_are_silenced(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "__unraisablehook__", lambda unraisable: reported.append(str(unraisable.exc_value)))
    for message in ("Event loop is closed", "a real problem"):
        cli.ignore_late_async_callbacks(types.SimpleNamespace(exc_value=RuntimeError(message), object=None))

    async def a_library_read():
        pass

    read = a_library_read()
    cli.ignore_late_async_callbacks(types.SimpleNamespace(exc_value=Exception("Encountered error while reading"),
                                                          object=read))
    read.close()
    assert reported == ["a real problem"]



def test_abandoned_async_reads_failing_later_are_not_logged_but_other_asyncio_errors_are(monkeypatch, caplog):
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cli.speak_in_one_line_per_problem()

    async def read_cut_short():
        raise ValueError("OUT_OF_RANGE: Requested byte range is not valid")

    loop = asyncio.new_event_loop()
    async def gather_reads():
        return asyncio.gather(read_cut_short(), read_cut_short())

    abandoned = loop.create_task(read_cut_short())
    abandoned_gathering = loop.run_until_complete(gather_reads())
    loop.run_until_complete(asyncio.sleep(0.01))  # they fail; nobody awaits them
    loop.close()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del abandoned, abandoned_gathering
        gc.collect()  # asyncio reports an unretrieved exception when the task or future is collected
        asyncio_log.error("an asyncio error of another kind")
    assert [record.getMessage() for record in caplog.records] == ["an asyncio error of another kind"]

FAILING_SAVE = """
import sys
from cifar_jax import rundir
rundir.check_workdir = lambda config: None  # let the file below stand in the way
from cifar_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_error_line_and_the_process_ends(learnable_data_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("a file where Orbax writes: every save fails in its background writer")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", FAILING_SAVE, "train", "--model", "model0", "--epochs", "2",
                           "--data-dir", str(learnable_data_dir), "--workdir", str(workdir), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env)  # Orbax's threads once hung it here
    assert done.returncode == 2
    # Nothing but the error line (and the tiny archive's warning that it is not the official one)
    lines = [line for line in done.stderr.strip().splitlines() if "is not the official" not in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"cifar-jax: error: could not write a checkpoint in {workdir / 'checkpoints'} (NotADirectoryError"), lines

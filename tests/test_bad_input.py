"""Bad input of every kind gets one line of ours that says what to do, and nothing already saved is lost.

Each test covers a class of input, not only the example that first showed it.
"""
import dataclasses
import errno
import importlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import cifar_fixtures
from cifar_jax import TrainConfig, cli, rundir, train
from cifar_jax.data import load_cifar10
from cifar_jax.errors import CifarJaxError, ConfigError, DataError, InputError, RunFolderError
from cifar_jax.predict import Predictor
from learnable import class_coloured_dataset

train_module = importlib.import_module("cifar_jax.train")

WRONG_VALUES = [[1], {}, None, 10**30, -5, "x", float("nan"), True, 0.5, ["cosine"]]


class ReachedTraining(BaseException):  # not an Exception: passes the CLI's last line of defence
    """Raised in place of the training loop: the config passed every check."""


@pytest.fixture
def checks_only(monkeypatch):
    """train() with tiny data that stops where training would begin."""
    dataset = class_coloured_dataset(num_train=64, num_test=8)
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)

    def no_loop(*args, **kwargs):
        raise ReachedTraining

    monkeypatch.setattr(train_module, "EpochLoop", no_loop)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_config_field_refuses_wrong_values_with_our_own_error(field, tmp_path, checks_only, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for number, value in enumerate(WRONG_VALUES):
        workdir = tmp_path / f"run{number}"
        values = {"workdir": str(workdir), "batch_size": 8, "epochs": 1, "progress": False, field: value}
        if field == "workdir" and value is None:
            continue  # an unset workdir is valid: a fresh folder under checkpoints/
        try:
            train(TrainConfig(**values))
        except (CifarJaxError, ReachedTraining):
            pass  # anything else (TypeError, OverflowError, ...) fails the test with its traceback
        if isinstance(workdir, Path) and workdir.exists():
            assert any(p.is_file() for p in workdir.rglob("*")), f"{field}={value!r} left an empty folder behind"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_flag_refuses_wrong_values_in_one_line(field, tmp_path, checks_only, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a value given to --workdir (or an empty one: checkpoints/...) lands in here
    flag = "--" + field.replace("_", "-")
    for number, value in enumerate(["[1]", "-5", "1e400", "x", "nan", str(10**30), ""]):
        status = run_cli_in_process(["train", "--workdir", str(tmp_path / f"run{number}"), flag, value])
        error = capsys.readouterr().err
        lines = [line for line in error.splitlines() if line.strip()]
        assert status in (0, 2, "training"), (flag, value, error)
        assert all(line.startswith("cifar-jax: ") for line in lines) and "Traceback" not in error, (flag, value, error)
        assert not any("bug in cifar-jax" in line for line in lines), (flag, value, error)


def run_cli_in_process(argv):
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse's own refusals
        return stop.code
    except ReachedTraining:
        return "training"


@pytest.mark.parametrize("values, message", [
    ({"seed": 2**64}, "seed must be an integer from 0 to 4,294,967,295"),
    ({"seed": 2**32}, "seed must be an integer from 0 to 4,294,967,295"),  # JAX would read it as seed 0
    ({"eval_batch_size": 10**12}, "eval_batch_size must be at most 65,536"),
    ({"epochs": 10**12}, "epochs must be at most 1,000,000"),
    ({"lr_schedule": ["cosine"]}, r"unknown lr_schedule \['cosine'\]"),
    ({"optimizer": ["adam"], "weight_decay": None}, r"unknown optimizer \['adam'\]"),
    ({"dtype": {"float": 32}}, "unknown dtype"),
    ({"crop_padding": [4]}, "crop_padding must be an integer"),
])
def test_values_the_config_could_not_use_are_refused_before_a_folder_is_made(values, message, tmp_path, checks_only):
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(workdir=str(tmp_path / "run"), **values))
    assert not (tmp_path / "run").exists()


def test_epochs_beyond_the_step_counter_are_refused(tmp_path, monkeypatch):
    dataset = class_coloured_dataset(num_train=4096, num_test=8)
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)
    with pytest.raises(ConfigError, match=r"1,000,000 epochs of 4,096 steps exceed the 2,147,483,647 steps"):
        train(TrainConfig(workdir=str(tmp_path / "run"), epochs=1_000_000, batch_size=1, num_devices=1))
    assert not (tmp_path / "run").exists()


def test_config_values_from_a_json_or_toml_file_of_lists_are_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "model0", "lr_schedule": ["cosine"]}))
    with pytest.raises(ConfigError, match=r"config.json holds a value no run saved: unknown lr_schedule \['cosine'\]"
                                          r".*fix that value in the file"):
        rundir.saved_config(tmp_path / "run")


def test_a_bad_value_in_a_runs_config_json_says_it_came_from_there(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "model0", "batch_size": -3}))
    assert cli.main(["train", "--workdir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"cifar-jax: error: {tmp_path / 'run' / 'config.json'} holds a value no run saved: batch_size "
                     "must be a positive integer, got -3; fix that value in the file, or train into a new --workdir")


def test_a_folder_the_system_refuses_to_make_is_one_line(tmp_path, checks_only):
    with pytest.raises(ConfigError, match=r"cannot make the run folder /proc/cifar-jax-run .*choose a --workdir"):
        train(TrainConfig(workdir="/proc/cifar-jax-run", batch_size=8))


# ---------------------------------------------------------------- data archives


@pytest.mark.parametrize("emptied, message", [
    (("test_batch.bin",), r"holds no test images \(its test_batch.bin is empty\)"),
    (("test_batch.bin", *(f"data_batch_{i}.bin" for i in range(1, 6))), "holds no train images"),
])
def test_archives_without_images_say_so_before_training(tmp_path, emptied, message):
    members = cifar_fixtures.binary_members(*cifar_fixtures.tiny_dataset())
    members = {name: b"" if name.endswith(emptied) else blob for name, blob in members.items()}
    cifar_fixtures.write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.warns(UserWarning, match="not the official"), pytest.raises(DataError, match=message):
        load_cifar10(tmp_path, "archive")


@pytest.mark.parametrize("labels", [["cat"] * 10, [0.5] * 10, [[1, 2]] * 10, [1, [2]] + [3] * 8])
def test_python_batches_whose_labels_are_not_class_ids_are_refused(tmp_path, labels):
    data = cifar_fixtures.tiny_dataset()
    members = cifar_fixtures.python_members(*data)
    test_name = next(name for name in members if name.endswith("test_batch"))
    members[test_name] = pickle_batch(data.test_images, labels)
    cifar_fixtures.write_tar_gz(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.warns(UserWarning, match="not the official"), pytest.raises(
            DataError, match="test_batch holds labels that are not class ids"):
        load_cifar10(tmp_path, "archive")


def pickle_batch(images, labels) -> bytes:
    """An official-looking python batch whose labels are whatever the test gives."""
    import pickle

    batch = pickle.loads(cifar_fixtures.python_batch(images, [0] * len(images)).replace(
        b"numpy.core.multiarray", b"numpy._core.multiarray"))
    batch[b"labels"] = labels
    return pickle.dumps(batch, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


# ---------------------------------------------------------------- run folders: full disks, garbage files


def test_a_full_disk_while_writing_metrics_keeps_the_epochs_checkpoint(tmp_path, monkeypatch):
    dataset = class_coloured_dataset(num_train=64, num_test=8)
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)
    real_write = rundir.write_text_atomically

    def full_after_the_start(path, text):
        if path.name == "metrics.jsonl" and text:
            rundir.raise_unwritable(path, OSError(errno.ENOSPC, "No space left on device"))
        real_write(path, text)

    monkeypatch.setattr(rundir, "write_text_atomically", full_after_the_start)
    config = TrainConfig(workdir=str(tmp_path / "run"), batch_size=8, epochs=2, progress=False)
    with pytest.raises(RunFolderError, match=r"could not write .*metrics.jsonl \(No space left on device\): free "
                                             r"disk space .* run the same command again"):
        train(config)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["8"]  # epoch 1 was saved first
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)
    assert [row["epoch"] for row in train(config).history] == [1, 2]  # and the same command resumes


def test_a_full_disk_while_writing_files_of_the_run_is_one_line(tmp_path, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(RunFolderError, match=r"could not write .*metrics.jsonl \(No space left on device\)"):
        rundir.write_history(tmp_path, [])
    assert not list(tmp_path.iterdir())  # no half-written temporary file left
    monkeypatch.undo()
    from matplotlib.figure import Figure

    from cifar_jax import plots

    monkeypatch.setattr(Figure, "savefig", no_space)
    with pytest.raises(RunFolderError, match=r"could not write .*curves.png \(No space left on device\)"):
        plots.plot_training_curves([], tmp_path / "plots" / "curves.png")


@pytest.mark.parametrize("content", ['{"epoch": 1}\n', "garbage\n", '[1, 2]\n', '{"epoch": "one", "train_loss": 1}\n'])
def test_a_metrics_file_of_another_shape_is_named_with_its_line(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(InputError, match=r"metrics.jsonl line 1 is not a metrics row \(an object with epoch, "):
        rundir.read_history(tmp_path)


def test_plot_on_a_garbled_metrics_file_names_the_file(trained_run, tmp_path, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(trained_run.workdir, workdir)
    (workdir / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2}\n')
    assert cli.main(["plot", "--workdir", str(workdir)]) == 2
    assert "metrics.jsonl line 1 is not a metrics row" in capsys.readouterr().err


# ---------------------------------------------------------------- predict


def test_paths_the_system_refuses_are_reported_and_the_others_predicted(trained_run, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), "red").save(good)
    too_long = tmp_path / ("x" * 300 + ".png")
    predictor = Predictor.from_checkpoint(trained_run.workdir)
    rows = list(predictor.predict_paths([good, too_long, good]))
    assert [row.ok for row in rows] == [True, False, True]
    assert rows[1].error.endswith("cannot be opened (File name too long)")


def test_a_closed_pil_image_is_an_input_error(trained_run, tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "blue.png")
    with Image.open(tmp_path / "blue.png") as image:
        pass
    predictor = Predictor.from_checkpoint(trained_run.workdir)
    with pytest.raises(InputError, match=r"images is a PIL image that cannot be read \(.+\): pass it open"):
        predictor.predict(image)
    assert predictor.predict([image], errors="skip").errors[0][0] == "images[0]"


@pytest.mark.parametrize("batch_size", [10**12, 0, 2.5])
def test_an_unusable_predict_batch_is_refused(trained_run, batch_size):
    with pytest.raises(InputError, match="batch_size must be a whole number from 1 to 65,536"):
        Predictor.from_checkpoint(trained_run.workdir, batch_size=batch_size)


# ---------------------------------------------------------------- the command line


def test_an_unforeseen_error_is_one_line_with_the_traceback_in_a_log(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something the package did not foresee\nwith a second line")

    monkeypatch.setattr(cli, "_evaluate", broken)
    assert cli.main(["evaluate", "--workdir", "nowhere"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "cifar-jax: error: unexpected RuntimeError: something the package did not foresee. This is a bug")
    log = Path(lines[0].split("its traceback is in ")[1].split(" ")[0])
    assert "Traceback" in log.read_text() and "with a second line" in log.read_text()
    log.unlink()
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "evaluate", "--workdir", "nowhere"])
    monkeypatch.setenv("CIFAR_JAX_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["evaluate", "--workdir", "nowhere"])


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143), (None, 143)])
def test_an_interrupted_run_exits_as_shells_expect(signal_name, status):
    assert cli.interrupted_status(signal_name) == status


@pytest.mark.slow
def test_ctrl_c_while_the_libraries_import_is_one_line_and_stops(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "cifar_jax", "train", "--data", "synthetic", "--workdir",
                                str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # JAX and the libraries take seconds to import
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip() == "cifar-jax: interrupted" and "Traceback" not in err
    assert not (tmp_path / "run").exists()

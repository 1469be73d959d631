"""`cifar-jax benchmark`: every figure present and positive; FLOPs agree with a hand count; bfloat16 still learns."""
import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

from cifar_jax import TrainConfig, train
from cifar_jax.cli import main
from learnable import class_coloured_dataset

train_module = importlib.import_module("cifar_jax.train")
ROOT = Path(__file__).resolve().parents[1]

POSITIVE_KEYS = ("compile_seconds", "train_images_per_second", "epoch_seconds", "flops_per_image",
                 "achieved_flops_per_second", "eval_images_per_second", "predict_images_per_second",
                 "peak_host_memory_bytes", "device_count", "batch_size", "timed_steps")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def model0_benchmark(profile_dir):
    """A short benchmark of model0 on synthetic data, through the CLI, as parsed --json output (traced into
    `profile_dir`)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["benchmark", "--model", "model0", "--batch-size", "32", "--max-steps", "8", "--windows", "2",
                       "--json", "--profile", str(profile_dir)])
    assert status == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_json_has_every_figure_with_positive_values(model0_benchmark):
    for key in POSITIVE_KEYS:
        assert model0_benchmark[key] > 0, key
    assert model0_benchmark["epoch_seconds"] == pytest.approx(50_000 / model0_benchmark["train_images_per_second"])
    assert model0_benchmark["data_source"].startswith("synthetic")
    assert model0_benchmark["device_count"] == 4 and model0_benchmark["device_kind"]
    assert set(model0_benchmark["versions"]) >= {"jax", "jaxlib", "flax"}
    assert model0_benchmark["dtype"] == "float32"
    assert model0_benchmark["timed_steps"] == 8  # --max-steps 8 over --windows 2


def hand_counted_training_flops_per_image() -> int:
    """model0: 2 FLOPs per multiply-add; backward = weight grads (same MACs) + input grads (all but the first conv)."""
    conv_macs = [30 * 30 * 16 * 3 * 3 * 3, 13 * 13 * 32 * 3 * 3 * 16, 4 * 4 * 64 * 3 * 3 * 32]
    dense_macs = [256 * 256, 256 * 10]
    forward = 2 * (sum(conv_macs) + sum(dense_macs))
    return 3 * forward - 2 * conv_macs[0]


@pytest.mark.parametrize("flags, message", [
    (["--windows", "0"], "--windows must be a positive integer, got 0"),
    (["--max-steps", "-5"], "--max-steps must be a positive integer, got -5"),
    (["--epochs", "0"], "--epochs must be a positive number of epochs to time, got 0.0"),
])
def test_settings_that_would_time_nothing_are_refused(flags, message, capsys):
    assert main(["benchmark", *flags]) == 2
    assert capsys.readouterr().err == f"cifar-jax: error: {message}\n"


@pytest.mark.parametrize("epochs, windows, max_steps, expected", [
    (1.0, 5, None, (5, 78)),  # 390 steps: 5 windows of 78
    (1.0, 5, 8, (5, 1)),
    (1.0, 5, 3, (3, 1)),  # the cap wins over the number of windows
    (0.001, 5, None, (5, 1)),  # a fraction of a step still times a step per window
])
def test_timing_windows_never_exceed_the_step_cap(epochs, windows, max_steps, expected):
    from cifar_jax.benchmark import BenchmarkSettings, timing_windows

    settings = BenchmarkSettings(epochs=epochs, windows=windows, max_steps=max_steps)
    assert timing_windows(settings, steps_per_epoch=390) == expected
    count, per_window = expected
    assert count * per_window <= (max_steps or 390)


def test_python_settings_must_be_whole_numbers():
    from cifar_jax.benchmark import BenchmarkSettings
    from cifar_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="--windows must be a positive integer, got 2.5"):
        BenchmarkSettings(windows=2.5)


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_timed_steps(model0_benchmark, profile_dir):
    traces = list((profile_dir / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


@pytest.mark.slow
def test_flops_per_image_match_a_hand_count(model0_benchmark):
    assert hand_counted_training_flops_per_image() == 8_405_760
    assert model0_benchmark["flops_per_image"] == pytest.approx(8_405_760, rel=0.10)


@pytest.mark.slow
def test_bfloat16_learns_as_well_as_float32(tmp_path, monkeypatch):
    dataset = class_coloured_dataset(num_train=512, num_test=101)
    monkeypatch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)
    accuracy = {}
    for dtype in ("float32", "bfloat16"):
        config = TrainConfig(model="model0", epochs=3, batch_size=32, eval_batch_size=40, dtype=dtype,
                             workdir=str(tmp_path / dtype), progress=False)
        accuracy[dtype] = train(config).history[-1]["test_accuracy"]
    assert accuracy["float32"] > 0.8  # chance is 0.1
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.05, accuracy


@pytest.mark.slow
def test_the_table_script_runs_the_models_and_batch_sizes_asked_for(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # One fresh process per cell; every flag the table does not know goes on to `cifar-jax benchmark`.
    assert script.main(["--table", "--models", "model0", "model2", "--batch-sizes", "16", "--max-steps", "2",
                        "--windows", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| model\d ", line)]
    assert [row.split(" | ")[:4] for row in rows] == [["| model0", "16", "float32", "4× cpu"],
                                                      ["| model2", "16", "float32", "4× cpu"]]
    for row in rows:
        train_rate, epoch_seconds = (float(cell.replace(",", "")) for cell in row.split(" | ")[5:7])
        assert train_rate > 0 and epoch_seconds == pytest.approx(50_000 / train_rate, rel=0.02, abs=0.06)

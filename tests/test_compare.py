"""Comparisons: typed grids, both tables, skipping finished runs, resuming after SIGKILL, failed runs recorded,
and the tutorial-reproduction script in parallel workers, all on the tiny learnable archive."""
import csv
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cifar_jax import TrainConfig
from cifar_jax.cli import main
from cifar_jax.compare import (RUN_RECORD_FILE, check_out_dir, compare, comparison_from_options, parse_grid_option, plan_runs,
                               run_name, typed_grid)
from cifar_jax import distributed, sweep
from cifar_jax.errors import CheckpointSaveError, ConfigError

MODEL0_PARAMS, MODEL1_PARAMS = 91_946, 3_404_042
TIMEOUT = 240
ROOT = Path(__file__).resolve().parents[1]
# The module, for monkeypatching; imported by name so a `compare` function exported by the package cannot shadow it.
compare_module = importlib.import_module("cifar_jax.compare")


def base_config(data_dir, **overrides) -> TrainConfig:
    values = dict(model="model0", epochs=1, batch_size=32, eval_batch_size=100, progress=False, data_dir=str(data_dir))
    return TrainConfig(**{**values, **overrides})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_files(workdir: Path) -> dict[str, bytes]:
    """Every file of a run (checkpoints included) with its bytes: unchanged means not trained again."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def study_trials(out: Path) -> list:
    import optuna

    study = optuna.load_study(study_name=sweep.study_name(out), storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials()


def trained_once_each(out: Path) -> set[str]:
    """The runs of the comparison's study, asserting each was trained by exactly one finished trial."""
    finished = [trial.user_attrs["run"] for trial in study_trials(out) if trial.state.name == "COMPLETE"]
    assert len(finished) == len(set(finished)), finished
    return set(finished)


# ---------------------------------------------------------------- grids and files (no training)


def test_grid_values_take_the_config_fields_types():
    grid = typed_grid(dict([parse_grid_option("learning-rate=1e-3, 0.01"), parse_grid_option("batch_size=32,128"),
                            parse_grid_option("standardize=true,no"), parse_grid_option("optimizer=sgd,none")]))
    assert grid == {"learning_rate": [0.001, 0.01], "batch_size": [32, 128], "standardize": [True, False],
                    "optimizer": ["sgd", None]}
    assert [type(v) for v in grid["learning_rate"] + grid["batch_size"]] == [float, float, int, int]
    assert typed_grid({"learning_rate": [1, 2e-3], "seed": 3}) == {"learning_rate": [1.0, 0.002], "seed": [3]}


def test_a_grid_from_numpy_or_a_range_gives_plain_python_values():
    grid = typed_grid({"learning_rate": np.geomspace(1e-3, 1e-1, 3), "seed": range(2), "batch_size": np.int64(64),
                       "label_smoothing": [np.float32(0.5)], "standardize": np.array([True, False])})
    assert grid == {"learning_rate": pytest.approx([1e-3, 1e-2, 1e-1]), "seed": [0, 1], "batch_size": [64],
                    "label_smoothing": [0.5], "standardize": [True, False]}
    assert {type(value) for values in grid.values() for value in values} == {float, int, bool}
    assert run_name({"learning_rate": grid["learning_rate"][0]}) == "learning_rate=0.001"


@pytest.mark.parametrize("grid, message", [
    ({"learnin_rate": ["1"]}, "unknown config field 'learnin_rate' in the comparison: known fields are "),
    ({"workdir": ["a"]}, "workdir is set by the comparison itself (each run trains, and resumes, in OUT/runs/NAME)"),
    ({"batch_size": ["32.5"]}, "batch_size='32.5' is not a valid int"),
    ({"batch_size": [32.0]}, "batch_size=32.0 is not a valid int"),
    ({"learning_rate": []}, "the grid gives no value for learning_rate"),
])
def test_bad_grids_are_one_line_config_errors(grid, message):
    with pytest.raises(ConfigError) as raised:
        typed_grid(grid)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    if "known fields are" in message:
        assert "learning_rate" in str(raised.value) and "batch_size" in str(raised.value)


def test_a_toml_or_json_file_gives_the_comparison_and_flags_override_it(tmp_path):
    (tmp_path / "c.toml").write_text('out = "cmp"\n[base]\nepochs = 3\nbatch_size = 64\n'
                                     '[grid]\nmodel = ["model0", "model1"]\nlearning_rate = [1e-3, 1e-2]\n')
    (tmp_path / "c.json").write_text(json.dumps({"base": {"epochs": 3, "batch_size": 64},
                                                 "grid": {"model": ["model0", "model1"], "learning_rate": [1e-3, 1e-2]},
                                                 "out": "cmp"}))
    for name in ("c.toml", "c.json"):
        spec = comparison_from_options(str(tmp_path / name), {"epochs": 2}, None, ["learning_rate=3e-4"], None)
        base, grid = spec.base, spec.grid
        assert (base.epochs, base.batch_size, spec.out, spec.workers, spec.prune) == (2, 64, "cmp", 1, "none")
        assert grid == {"model": ["model0", "model1"], "learning_rate": [3e-4]}
    runs = plan_runs(base, grid, tmp_path / "cmp")
    assert [run.name for run in runs] == ["model=model0,learning_rate=0.0003", "model=model1,learning_rate=0.0003"]
    assert runs[1].config.workdir == str(tmp_path / "cmp" / "runs" / "model=model1,learning_rate=0.0003")
    with pytest.raises(ConfigError, match="both by --models and --grid model"):
        comparison_from_options(None, {}, "model0", ["model=model1"], "cmp")


def test_a_toml_file_can_hold_a_search_its_trials_and_sampler(tmp_path):
    (tmp_path / "s.toml").write_text('out = "cmp"\ntrials = 12\nsampler = "random"\nworkers = 2\nprune = "median"\n'
                                     '[search]\nlearning_rate = "log:1e-4:1e-2"\ncutout = "int:0:8"\n')
    spec = comparison_from_options(str(tmp_path / "s.toml"), {}, "model0", [], None,
                                   search_options=["label_smoothing=uniform:0:0.2"])
    assert (spec.trials, spec.sampler, spec.workers, spec.prune) == (12, "random", 2, "median")
    assert spec.search == {"learning_rate": "log:1e-4:1e-2", "cutout": "int:0:8", "label_smoothing": "uniform:0:0.2"}
    dimensions = compare_module.typed_search(spec.search)
    assert [(d.kind, d.low, d.high) for d in dimensions.values()] == [("log", 1e-4, 1e-2), ("int", 0, 8),
                                                                      ("uniform", 0.0, 0.2)]


# ---------------------------------------------------------------- a real 2x2 grid, killed mid-way and completed


def committed_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def grid_arguments(data_dir: Path, out: Path) -> list[str]:
    # One device: many tiny steps over 4 simulated devices on 2 busy cores can stall XLA's CPU all-reduce.
    return ["compare", "--models", "model0", "--grid", "learning_rate=1e-3,2e-3", "--grid", "epochs=1,3",
            "--batch-size", "8", "--eval-batch-size", "101", "--num-devices", "1", "--data-dir", str(data_dir),
            "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def killed_grid(learnable_data_dir, tmp_path_factory):
    """`cifar-jax compare` on a 2x2 grid in a real process, SIGKILLed once the second run has saved its first epoch;
    what the runs held then; then the same command again, in this process, to completion."""
    out = tmp_path_factory.mktemp("compare") / "grid"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cifar_jax", *grid_arguments(learnable_data_dir, out)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, second = (out / "runs" / f"model=model0,learning_rate=0.001,epochs={epochs}" for epochs in (1, 3))
    deadline = time.monotonic() + TIMEOUT
    while not committed_steps(second):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "timed out waiting for the second run's first checkpoint"
        time.sleep(0.005)
    process.kill()
    process.wait()
    process.stdout.close()
    at_kill = {"first_record": json.loads((first / RUN_RECORD_FILE).read_text()), "first_files": run_files(first),
               "second_record": (second / RUN_RECORD_FILE).exists(), "second_metrics": metrics(second),
               "others": sorted(p.name for p in (out / "runs").iterdir())}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "STALE_AFTER_SECONDS", 0)  # the killed worker's trial: stale at once
        exit_code = main(grid_arguments(learnable_data_dir, out))
    return out, at_kill, exit_code


@pytest.mark.slow
def test_sigkill_mid_grid_then_rerunning_completes_it(killed_grid):
    out, at_kill, exit_code = killed_grid
    first, second = (out / "runs" / f"model=model0,learning_rate=0.001,epochs={epochs}" for epochs in (1, 3))
    assert at_kill["first_record"]["status"] == "finished"
    assert not at_kill["second_record"] and len(at_kill["second_metrics"]) < 3, "the kill came after the run ended"
    assert at_kill["others"] == [first.name, second.name]  # the last two runs had not started
    assert exit_code == 0
    assert run_files(first) == at_kill["first_files"]  # skipped, not trained again
    assert [row["epoch"] for row in metrics(second)] == [1, 2, 3]
    assert metrics(second)[: len(at_kill["second_metrics"])] == at_kill["second_metrics"]  # resumed, not restarted


@pytest.mark.slow
def test_a_two_by_two_grid_writes_both_tables_with_a_row_per_run(killed_grid):
    out, _, _ = killed_grid
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == ["run", "model", "learning_rate", "epochs", "params", "train_accuracy", "train_loss",
                             "test_accuracy", "test_loss", "best_test_accuracy", "best_epoch", "train_seconds",
                             "images_per_second", "status", "error"]
    assert [(row["learning_rate"], row["epochs"]) for row in rows] == [("0.001", "1"), ("0.001", "3"), ("0.002", "1"),
                                                                      ("0.002", "3")]
    assert [(row["model"], int(row["params"]), row["status"], row["error"]) for row in rows] == [
        ("model0", MODEL0_PARAMS, "finished", "")] * 4
    for row in rows:
        history = metrics(out / "runs" / row["run"])
        assert len(history) == int(row["epochs"])
        assert float(row["train_loss"]) == history[-1]["train_loss"]
        assert float(row["test_accuracy"]) == history[-1]["test_accuracy"]
        best = max(history, key=lambda epoch: epoch["test_accuracy"])
        assert (float(row["best_test_accuracy"]), int(row["best_epoch"])) == (best["test_accuracy"], best["epoch"])
        assert float(row["train_seconds"]) == pytest.approx(sum(epoch["epoch_seconds"] for epoch in history))
        assert float(row["images_per_second"]) > 0
    markdown = (out / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| model=")]
    assert len(table) == 4 and all(line.endswith(" | finished |") for line in table)
    assert table[3].startswith("| model=model0,learning_rate=0.002,epochs=3 | model0 | 0.002 | 3 | 91,946 | ")
    assert (out / "test_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![test accuracy and loss per epoch of every run](test_curves.png)" in markdown


@pytest.mark.slow
def test_rerunning_skips_every_finished_run(killed_grid, learnable_data_dir, monkeypatch, capsys):
    out, _, _ = killed_grid
    runs = sorted((out / "runs").iterdir())
    before = {run.name: run_files(run) for run in runs}
    table_before = read_csv(out / "results.csv")

    def must_not_train(config, callbacks=()):
        raise AssertionError(f"trained {config.workdir} again")

    monkeypatch.setattr(compare_module, "train", must_not_train)
    base = base_config(learnable_data_dir, batch_size=8, eval_batch_size=101, num_devices=1)
    rows = compare(base, {"model": ["model0"], "learning_rate": [1e-3, 2e-3], "epochs": [1, 3]}, out)
    assert [row["status"] for row in rows] == ["finished"] * 4
    assert {run.name: run_files(run) for run in runs} == before
    assert read_csv(out / "results.csv") == table_before
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4


# ---------------------------------------------------------------- failures


@pytest.mark.slow
def test_a_failing_run_is_recorded_with_its_error_and_the_others_finish(learnable_data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--models", "model0", "--grid", "learning_rate=-1,1e-3", "--grid", "batch_size=30,32",
                 "--epochs", "1", "--eval-batch-size", "100", "--data-dir", str(learnable_data_dir), "--out", str(out),
                 "--no-progress"])
    assert code == 1
    rows = {row["run"]: row for row in read_csv(out / "results.csv")}
    negative = "learning_rate must be a positive number, got -1.0"
    assert rows["model=model0,learning_rate=-1.0,batch_size=30"]["error"] == negative
    assert rows["model=model0,learning_rate=-1.0,batch_size=32"]["error"] == negative
    assert rows["model=model0,learning_rate=0.001,batch_size=30"]["error"] == (
        "batch_size 30 does not split evenly over 4 devices: use a multiple of 4")
    good = rows.pop("model=model0,learning_rate=0.001,batch_size=32")
    assert good["status"] == "finished" and good["error"] == "" and 0 <= float(good["test_accuracy"]) <= 1
    assert all(row["status"] == "failed" and row["train_loss"] == "" for row in rows.values())
    markdown = (out / "results.md").read_text()
    assert f"- `model=model0,learning_rate=-1.0,batch_size=32`: {negative}" in markdown
    captured = capsys.readouterr()
    assert "4 runs: 3 failed, 1 finished" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        f"cifar-jax: error: 3 of 4 runs failed: each one's error is above and in the status column of {out / 'results.md'}"
        "; run the same command again to retry them")

    # The grid fixed: the runs that failed before training have no results to lose, so leaving them out is fine.
    code = main(["compare", "--models", "model0", "--grid", "learning_rate=1e-3", "--grid", "batch_size=32",
                 "--epochs", "1", "--eval-batch-size", "100", "--data-dir", str(learnable_data_dir), "--out", str(out),
                 "--no-progress"])
    assert code == 0 and [row["run"] for row in read_csv(out / "results.csv")] == [
        "model=model0,learning_rate=0.001,batch_size=32"]
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_a_failed_checkpoint_write_is_recorded_and_ends_the_comparison_at_once(tmp_path, monkeypatch, capsys):
    started = []

    def save_fails(config, callbacks=()):
        started.append(config.workdir)
        raise CheckpointSaveError("could not write a checkpoint in X (disk full): free disk space")

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(compare_module, "train", save_fails)
    monkeypatch.setattr(distributed, "exit_now", exit_now)
    with pytest.raises(SystemExit) as exited:
        main(["compare", "--models", "model0", "--grid", "learning_rate=1e-3,2e-3", "--epochs", "1",
              "--out", str(tmp_path / "cmp"), "--no-progress"])
    assert exited.value.code == 2 and len(started) == 1  # the second run never started
    record = json.loads((Path(started[0]) / RUN_RECORD_FILE).read_text())
    assert (record["status"], record["error"]) == ("failed", "could not write a checkpoint in X (disk full): free "
                                                             "disk space")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "cifar-jax: error: could not write a checkpoint in X (disk full): free disk space")


def test_an_out_folder_of_another_comparison_is_refused_before_anything_changes(tmp_path, capsys):
    out = tmp_path / "cmp"
    earlier_run = out / "runs" / "model=model0"
    earlier_run.mkdir(parents=True)
    (earlier_run / "config.json").write_text(json.dumps(TrainConfig(model="model0", learning_rate=0.01).to_dict()))
    (earlier_run / RUN_RECORD_FILE).write_text('{"status": "finished"}')
    (out / "results.md").write_text("earlier results")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    assert main(["compare", "--models", "model0", "--epochs", "1", "--data", "synthetic", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"cifar-jax: error: {out} holds a comparison with other settings (run model=model0: learning_rate: 0.01 in "
        "the run vs 0.001 requested): use a new --out, or the settings it was run with\n")
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_grid_that_leaves_out_earlier_runs_is_refused_but_one_that_grows_is_not(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "results.csv").write_text("run,model,learning_rate,status,train_loss\n"
                                     "learning_rate=0.001,model0,0.001,finished,1.0\n")
    base = TrainConfig(model="model0", epochs=1, data="synthetic")
    with pytest.raises(ConfigError, match=r"holds a comparison with runs this grid leaves out \(learning_rate=0.001\)"):
        compare(base, {"learning_rate": [1e-2]}, out)
    assert (out / "results.csv").read_text().count("\n") == 2
    runs = plan_runs(base, {"learning_rate": [1e-3, 1e-2]}, out)
    check_out_dir(runs, out)  # a grown grid keeps every earlier row: accepted


def test_a_grid_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="the grid must map config fields to lists of values, .* got list"):
        compare(TrainConfig(), [("learning_rate", [1e-3])], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_an_out_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes").write_text("keep me")
    assert main(["compare", "--models", "model0", "--data", "synthetic", "--out", str(tmp_path / "notes")]) == 2
    assert "is a file, not a folder: choose another --out" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "keep me"


ROW = {"train_loss": 1.0, "train_accuracy": 0.6, "test_loss": 1.1, "test_accuracy": 0.55, "epoch_seconds": 2.0,
       "images_per_second": 100.0}


def finished_run(out: Path, name: str, config: TrainConfig, epochs: int) -> Path:
    """A run folder as a finished comparison run leaves it (config, metrics, record), without training."""
    workdir = out / "runs" / name
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config.resolved().to_dict()))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, **ROW}) + "\n" for e in range(1, epochs + 1)))
    (workdir / RUN_RECORD_FILE).write_text('{"status": "finished"}')
    return workdir


def files_of(folder: Path) -> dict:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_fewer_epochs_than_a_finished_comparison_trained_is_refused_before_anything_changes(tmp_path, capsys):
    out = tmp_path / "cmp"
    finished_run(out, "model=model0", TrainConfig(model="model0", epochs=30), epochs=30)
    (out / "results.csv").write_text("run,model,status,train_loss\nmodel=model0,model0,finished,1.0\n")
    before = files_of(out)
    assert main(["compare", "--models", "model0", "--epochs", "1", "--data", "synthetic", "--out", str(out)]) == 2
    assert ("holds runs trained for more epochs than asked for (run model=model0: 30 epochs, --epochs 1): ask for "
            "--epochs 30 or more") in capsys.readouterr().err
    assert files_of(out) == before  # nothing recorded as failed, no table rewritten


def test_an_out_whose_table_was_deleted_still_keeps_its_runs(tmp_path):
    out = tmp_path / "cmp"
    finished_run(out, "learning_rate=0.001", TrainConfig(model="model0", epochs=1), epochs=1)
    before = files_of(out)
    with pytest.raises(ConfigError, match=r"holds a comparison with runs this grid leaves out \(learning_rate=0.001\)"):
        compare(TrainConfig(model="model0", epochs=1, data="synthetic"), {"learning_rate": [1e-2]}, out)
    assert files_of(out) == before


def test_a_results_csv_that_is_not_a_comparisons_is_refused_not_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("name,score\nalice,3\n")
    with pytest.raises(ConfigError, match="results.csv is not the table of a comparison: choose another --out"):
        compare(TrainConfig(model="model0", epochs=1, data="synthetic"), {"learning_rate": [1e-2]}, out)
    assert (out / "results.csv").read_text() == "name,score\nalice,3\n"


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds a list: expected base, grid, search, out, workers, storage, prune, trials, sampler as keys"),
    ('{"base": [1]}', "base in .* is a list, not a dict"),
    ('{"grid": "lr"}', "grid in .* is a str, not a dict"),
    ('{"out": ["a"]}', "out in .* is a list, not a str"),
    ('{"base": {"learning_rate": [0.1, 0.2]}}', r"learning_rate=\[0.1, 0.2\] is not a valid float"),
])
def test_a_comparison_file_of_the_wrong_shape_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "sweep.json").write_text(content)
    assert main(["compare", "--config", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "cmp")]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and error.count("\n") == 1, error


def test_a_grid_over_many_fields_gets_short_stable_unique_run_names():
    settings = {field: 0.123456789 for field in ("learning_rate", "weight_decay", "label_smoothing", "grad_clip_norm",
                                                  "warmup_epochs")}
    settings.update(model="model0", optimizer="adamw", lr_schedule="cosine", augment=True, cutout=8)
    name = run_name(settings)
    assert len(name) == 120 and name == run_name(dict(settings))
    assert name != run_name({**settings, "cutout": 9}) and name.startswith("learning_rate=0.123456789,")


# ---------------------------------------------------------------- sweeps on an Optuna study


def sweep_arguments(data_dir: Path, out: Path, *more: str) -> list[str]:
    return ["compare", "--models", "model0", "--grid", "learning_rate=1e-3,2e-3", "--grid", "seed=0,1", "--epochs", "1",
            "--batch-size", "32", "--eval-batch-size", "101", "--data-dir", str(data_dir), "--out", str(out),
            "--no-progress", *more]


SWEEP_RUNS = {f"model=model0,learning_rate={lr},seed={seed}" for lr in ("0.001", "0.002") for seed in (0, 1)}


@pytest.mark.slow
def test_two_workers_train_each_grid_point_exactly_once(learnable_data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_arguments(learnable_data_dir, out, "--workers", "2")) == 0
    assert trained_once_each(out) == SWEEP_RUNS and len(study_trials(out)) == 4
    rows = read_csv(out / "results.csv")
    assert sorted(row["run"] for row in rows) == sorted(SWEEP_RUNS) and {row["status"] for row in rows} == {"finished"}
    assert all(len(metrics(out / "runs" / name)) == 1 for name in SWEEP_RUNS)


@pytest.mark.slow
def test_two_compare_processes_on_the_same_out_split_the_sweep(learnable_data_dir, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cifar_jax", *sweep_arguments(learnable_data_dir, out)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=TIMEOUT)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert trained_once_each(out) == SWEEP_RUNS and len(study_trials(out)) == 4
    trained_by = [{name for name in SWEEP_RUNS if f"{name}: training" in output} for output in outputs]
    assert trained_by[0] | trained_by[1] == SWEEP_RUNS and not trained_by[0] & trained_by[1]


@pytest.mark.slow
def test_median_pruning_stops_a_hopeless_run_before_its_last_epoch(learnable_data_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["compare", "--models", "model0", "--grid", "learning_rate=3e-3,2e-3,1e-7", "--epochs", "3",
                 "--batch-size", "32", "--eval-batch-size", "101", "--num-devices", "1", "--data-dir",
                 str(learnable_data_dir), "--out", str(out), "--no-progress", "--prune", "median"])
    assert code == 0
    rows = {row["learning_rate"]: row for row in read_csv(out / "results.csv")}
    assert (rows["0.003"]["status"], rows["0.002"]["status"], rows["1e-07"]["status"]) == ("finished", "finished",
                                                                                            "pruned")
    assert len(metrics(out / "runs" / rows["1e-07"]["run"])) < 3  # stopped early, its epochs so far kept
    assert (out / "runs" / rows["1e-07"]["run"] / "checkpoints").is_dir()
    states = {trial.user_attrs["run"]: trial.state.name for trial in study_trials(out)}
    assert states[rows["1e-07"]["run"]] == "PRUNED"
    # Rerunning trains nothing again: finished and pruned runs are settled.
    main(["compare", "--models", "model0", "--grid", "learning_rate=3e-3,2e-3,1e-7", "--epochs", "3",
          "--batch-size", "32", "--eval-batch-size", "101", "--num-devices", "1", "--data-dir", str(learnable_data_dir),
          "--out", str(out), "--no-progress", "--prune", "median"])
    assert capsys.readouterr().out.count("earlier, skipped") == 3


@pytest.mark.slow
def test_a_journal_file_storage_holds_the_sweep(learnable_data_dir, tmp_path):
    import optuna

    out, journal = tmp_path / "sweep", tmp_path / "shared" / "sweep.journal"
    journal.parent.mkdir()
    assert main(["compare", "--models", "model0", "--epochs", "1", "--batch-size", "32", "--eval-batch-size", "101",
                 "--num-devices", "1", "--data-dir", str(learnable_data_dir), "--out", str(out), "--no-progress",
                 "--storage", str(journal)]) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=sweep.study_name(out), storage=storage)
    assert [(trial.user_attrs["run"], trial.state.name) for trial in study.trials] == [("model=model0", "COMPLETE")]


@pytest.mark.parametrize("storage, message", [
    ("nosuchdb://somewhere/x", "cannot open the storage nosuchdb://somewhere/x"),
    ("postgresql://user@localhost/sweeps", r"needs a database driver .* pip install 'cifar-jax\[postgres\]'"),
])
def test_a_storage_that_cannot_be_used_is_one_line(tmp_path, capsys, storage, message, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psycopg(name, *args, **kwargs):  # as on a machine without the [postgres] extra
        if name.startswith("psycopg"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    assert main(["compare", "--models", "model0", "--epochs", "1", "--data", "synthetic", "--out",
                 str(tmp_path / "cmp"), "--storage", storage]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and error.count("\n") == 1, error


def test_a_storage_holding_another_sweep_under_this_out_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    monkeypatch.setattr(compare_module, "work_on_study", lambda *args, **kwargs: None)  # no training here
    assert main(["compare", "--models", "model0", "--epochs", "1", "--data", "synthetic", "--out", str(out)]) == 0
    assert main(["compare", "--models", "model0", "--epochs", "1", "--data", "synthetic", "--out", str(out),
                 "--grid", "seed=0,1"]) == 2
    assert f"the storage holds a different sweep under the name 'cifar-jax-compare:{tmp_path.name}/cmp'" in (
        capsys.readouterr().err)


def search_arguments(data_dir: Path, out: Path, *more: str) -> list[str]:
    return ["compare", "--models", "model0", "--search", "learning_rate=log:1e-4:1e-2", "--search",
            "batch_size=choice:32,64", "--trials", "3", "--sampler", "random", "--seed", "5", "--epochs", "1",
            "--eval-batch-size", "101", "--num-devices", "1", "--data-dir", str(data_dir), "--out", str(out),
            "--no-progress", *more]


@pytest.mark.slow
def test_a_search_samples_inside_its_bounds_reproducibly_with_seed(learnable_data_dir, tmp_path):
    samples = []
    for name in ("first", "again"):
        out = tmp_path / name
        assert main(search_arguments(learnable_data_dir, out)) == 0
        rows = read_csv(out / "results.csv")
        assert len(rows) == 3 and {row["status"] for row in rows} == {"finished"}
        assert list(rows[0])[:4] == ["run", "model", "learning_rate", "batch_size"]  # the sampled values as columns
        samples.append([(float(row["learning_rate"]), int(row["batch_size"])) for row in rows])
        assert all(1e-4 <= lr <= 1e-2 and batch in (32, 64) for lr, batch in samples[-1])
        assert all((out / file).stat().st_size > 1000 for file in ("optimization_history.png",
                                                                   "param_importances.png",
                                                                   "parallel_coordinate.png"))
    assert samples[0] == samples[1] and len({lr for lr, _ in samples[0]}) == 3
    # A rerun trains nothing more: the search's 3 trials are done.
    assert main(search_arguments(learnable_data_dir, tmp_path / "first")) == 0
    assert len(read_csv(tmp_path / "first" / "results.csv")) == 3


@pytest.mark.parametrize("arguments, message", [
    (["--search", "learning_rate=log:1e-2"], r"learning_rate='log:1e-2'.*LOW and HIGH must be floats"),
    (["--search", "learning_rate=cubic:1:2"], "is not FIELD=KIND:...: use log:LOW:HIGH"),
    (["--search", "learning_rate=log:0:1"], "give LOW < HIGH, both above 0"),
    (["--search", "model=log:1:2"], "model cannot be searched with log: it takes str values; use choice:A,B,C"),
    (["--search", "augment=uniform:0:1"], "augment cannot be searched with uniform: it takes bool values"),
    (["--search", "epochs=int:x:3"], "LOW and HIGH must be ints"),
    (["--search", "learning_rate=log:1e-4:1e-2"], "a search needs --trials N"),
    (["--grid", "learning_rate=1e-3,1e-2", "--trials", "4"], "--trials counts a search's runs"),
    (["--search", "nosuch=log:1:2", "--trials", "2"], "unknown config field 'nosuch'"),
])
def test_a_bad_search_is_one_line(tmp_path, capsys, arguments, message):
    code = main(["compare", "--models", "model0", "--epochs", "1", "--data", "synthetic", "--out",
                 str(tmp_path / "cmp"), *arguments])
    error = capsys.readouterr().err
    assert code == 2 and re.search(message, error) and error.count("\n") == 1, error
    assert not (tmp_path / "cmp").exists()


def test_runs_queued_by_an_earlier_grid_with_other_values_are_left_alone(tmp_path, monkeypatch):
    out, base = tmp_path / "cmp", TrainConfig(model="model0", epochs=1, data="synthetic")
    with monkeypatch.context() as patch:  # interrupted before any run started: both stay queued
        patch.setattr(compare_module, "work_on_study", lambda *args, **kwargs: None)
        compare(base, {"learning_rate": [1e-3, 1e-2]}, out)
    trained = []

    def fake_training(config, callbacks=()):
        trained.append(config.learning_rate)
        return {"status": "finished", "error": None, "test_accuracy": 0.5}

    monkeypatch.setattr(compare_module, "train_run", fake_training)
    compare(base, {"learning_rate": [1e-3, 3e-3]}, out)
    assert sorted(trained) == [1e-3, 3e-3]  # the earlier grid's 1e-2 was not this comparison's to train
    states = sorted((trial.user_attrs["run"], trial.state.name) for trial in study_trials(out))
    assert states == [("learning_rate=0.001", "COMPLETE"), ("learning_rate=0.003", "COMPLETE"),
                      ("learning_rate=0.01", "FAIL")]


# ---------------------------------------------------------------- scripts/reproduce_tutorial.py


@pytest.mark.slow
def test_reproduce_tutorial_script_in_parallel_workers_puts_the_tutorials_numbers_beside_ours(learnable_data_dir,
                                                                                             tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce_tutorial", ROOT / "scripts" / "reproduce_tutorial.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "tutorial"
    # --workers 3: each model taken by one of three worker processes, each seeing one of the 4 simulated devices.
    assert script.main(["--data-dir", str(learnable_data_dir), "--out", str(out), "--epochs", "1", "--workers", "3"]) == 0
    rows = read_csv(out / "results.csv")
    assert [row["model"] for row in rows] == ["model0", "model1", "model2"]
    assert [int(row["params"]) for row in rows] == [int(row["tutorial_params"]) for row in rows] == [
        MODEL0_PARAMS, MODEL1_PARAMS, MODEL1_PARAMS]
    assert [(row["tutorial_train_accuracy"], row["tutorial_train_loss"]) for row in rows] == [
        ("0.7955", "0.573"), ("0.7925", "0.5719"), ("0.5813", "1.1919")]
    assert all(row["status"] == "finished" and 0 <= float(row["train_accuracy"]) <= 1 for row in rows)
    workdirs = [out / "runs" / row["run"] for row in rows]
    saved = [json.loads((workdir / "config.json").read_text()) for workdir in workdirs]
    assert [(c["optimizer"], c["learning_rate"], c["epochs"]) for c in saved] == [
        ("adam", 1e-3, 1), ("adam", 1e-3, 1), ("sgd", 1e-2, 1)]
    assert trained_once_each(out) == {f"model={model}" for model in ("model0", "model1", "model2")}
    markdown = (out / "results.md").read_text()
    assert "| model=model2 | model2 | 3,404,042 | 3,404,042 |" in markdown and "| 0.5813 |" in markdown
    assert "1 epochs, not the tutorial's 10" in markdown


@pytest.mark.slow
def test_reproduce_tutorial_script_times_the_table_on_synthetic_data(tmp_path, monkeypatch, capsys):
    from cifar_jax import data

    spec = importlib.util.spec_from_file_location("reproduce_tutorial", ROOT / "scripts" / "reproduce_tutorial.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # CIFAR-10's shapes at a tenth of a percent of its size, so the three models train in seconds.
    small = data.synthetic_cifar10(num_train=64, num_test=40)
    monkeypatch.setattr(data, "synthetic_cifar10", lambda: small)
    out = tmp_path / "timing"
    assert script.main(["--data", "synthetic", "--out", str(out), "--epochs", "1"]) == 0
    seconds = re.search(r"^wall time of this call: (\d+\.\d) s \(data loading", capsys.readouterr().out, re.M)
    assert seconds and float(seconds.group(1)) > 0
    rows = read_csv(out / "results.csv")
    assert [(row["model"], row["status"]) for row in rows] == [("model0", "finished"), ("model1", "finished"),
                                                              ("model2", "finished")]
    saved = [json.loads((out / "runs" / row["run"] / "config.json").read_text()) for row in rows]
    assert [config["data"] for config in saved] == ["synthetic"] * 3
    assert "> Synthetic data (random pixels): only the times mean anything." in (out / "results.md").read_text()

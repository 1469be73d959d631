"""Train the tutorial's three models with their presets for 10 epochs and set the results beside the tutorial's.

    python scripts/reproduce_tutorial.py --data-dir ~/tensorflow_datasets --out comparisons/tutorial
    python scripts/reproduce_tutorial.py --data synthetic --out comparisons/tutorial-timing   # times only

The tutorial reported, after the 10th epoch (training accuracy / loss): model0 0.7955 / 0.5730, model1
0.7925 / 0.5719, model2 0.5813 / 1.1919, with 91,946 / 3,404,042 / 3,404,042 parameters. Writes
OUT/results.csv and OUT/results.md (ours and the tutorial's numbers side by side) and OUT/test_curves.png; the
runs live in OUT/runs/model=MODEL. Re-running skips finished runs and resumes an interrupted one. At the end it
prints its wall time, data loading and compiles included: the "whole table" figure of the README.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from cifar_jax import CifarJaxError, TrainConfig
from cifar_jax.compare import FAILED, RESULTS_MD, compare, result_columns, write_tables
from cifar_jax.config import PRESETS
from cifar_jax.data import DATA_SOURCES
from cifar_jax.report import is_synthetic

TUTORIAL_EPOCHS = 10
# The tutorial's figures after its 10th epoch.
TUTORIAL_RESULTS = {
    "model0": {"train_accuracy": 0.7955, "train_loss": 0.5730, "params": 91_946},
    "model1": {"train_accuracy": 0.7925, "train_loss": 0.5719, "params": 3_404_042},
    "model2": {"train_accuracy": 0.5813, "train_loss": 1.1919, "params": 3_404_042},
}


def beside_tutorial(row: dict[str, Any]) -> dict[str, Any]:
    """A results row with the tutorial's figures for its model as `tutorial_*` columns."""
    tutorial = TUTORIAL_RESULTS[row["model"]]
    return {**row, **{f"tutorial_{key}": value for key, value in tutorial.items()}}


def table_columns() -> tuple[str, ...]:
    """compare's columns, each tutorial figure right after ours."""
    columns = []
    for column in result_columns(["model"]):
        columns.append(column)
        if column in TUTORIAL_RESULTS["model0"]:
            columns.append(f"tutorial_{column}")
    return tuple(columns)


def notes(epochs: int, data: str) -> list[str]:
    presets = "; ".join(f"{model}: {preset['optimizer']} {preset['learning_rate']:g}"
                        for model, preset in PRESETS.items())
    lines = [f"Each model trained {epochs} epochs, batch 32, with its preset ({presets}). The `tutorial …` columns "
             f"are the tutorial's figures after its {TUTORIAL_EPOCHS}th epoch."]
    if epochs != TUTORIAL_EPOCHS:
        lines += ["", "> [!NOTE]",
                  f"> {epochs} epochs, not the tutorial's {TUTORIAL_EPOCHS}: the figures do not compare."]
    if is_synthetic(data):
        lines += ["", "> [!WARNING]", "> Synthetic data (random pixels): only the times mean anything."]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    parser.add_argument("--data", choices=DATA_SOURCES, default="auto",
                        help="data source (default: auto); synthetic times the table without CIFAR-10")
    parser.add_argument("--out", required=True, help="the comparison folder")
    parser.add_argument("--epochs", type=int, default=TUTORIAL_EPOCHS,
                        help="epochs per model (default: 10, as in the tutorial)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes training the models side by side, one device each (default: 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    base = TrainConfig(recipe="tutorial", epochs=args.epochs, batch_size=32, data=args.data, data_dir=args.data_dir)
    try:
        results = compare(base, {"model": list(TUTORIAL_RESULTS)}, args.out, workers=args.workers)
    except CifarJaxError as error:
        print(f"reproduce_tutorial: error: {error}", file=sys.stderr)
        return 2
    rows = [beside_tutorial(row) for row in results]
    write_tables(Path(args.out), rows, table_columns(), "The tutorial's three models, reproduced",
                 notes(args.epochs, args.data))
    print(f"results: {Path(args.out) / RESULTS_MD}")
    print(f"wall time of this call: {time.perf_counter() - started:.1f} s (data loading and compiles included; "
          "runs finished before it are not retrained)")
    return 1 if any(row["status"] == FAILED for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark one configuration, or the whole table the README reports.

    python scripts/benchmark.py --model model1 --batch-size 128 --json     # = cifar-jax benchmark ...
    python scripts/benchmark.py --table                                    # model0/model1 × batch 32/128 (+ --dtype ...)
    python scripts/benchmark.py --table --models model0 model1 model2 --batch-sizes 32 128 256

`--table` runs each cell in a fresh process (so one cell's memory and compile caches do not colour the next)
and prints a markdown table of training, evaluation and predict images/s.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

TABLE_MODELS = ("model0", "model1")
TABLE_BATCH_SIZES = (32, 128)


def benchmark_cell(model: str, batch_size: int, extra_args: list[str]) -> dict:
    command = [sys.executable, "-m", "cifar_jax", "benchmark", "--model", model, "--batch-size", str(batch_size),
               "--json", *extra_args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"benchmark of {model} at batch {batch_size} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def table(models: list[str], batch_sizes: list[int], extra_args: list[str]) -> str:
    rows = ["| model | batch | dtype | devices | compile s | train img/s | s/epoch | eval img/s | predict img/s | "
            "GFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for batch_size in batch_sizes:
            r = benchmark_cell(model, batch_size, extra_args)
            # The cell's own report names its model and batch: a flag passed on to every cell could override them.
            rows.append(f"| {r['model']} | {r['batch_size']} | {r['dtype']} | {r['device_count']}× {r['device_kind']} | "
                        f"{r['compile_seconds']:.1f} | {r['train_images_per_second']:,.0f} | {r['epoch_seconds']:.1f} | "
                        f"{r['eval_images_per_second']:,.0f} | {r['predict_images_per_second']:,.0f} | "
                        f"{r['achieved_flops_per_second'] / 1e9:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress while the rest runs
    return "\n".join(rows)


def table_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """--table's own options, and the rest (passed on to every cell's `cifar-jax benchmark`)."""
    parser = argparse.ArgumentParser(prog="benchmark.py --table", add_help=False)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(TABLE_MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(TABLE_BATCH_SIZES))
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    if "--table" in argv:
        options, extra_args = table_options(argv)
        print(table(options.models, options.batch_sizes, extra_args))
        return 0
    if {"-h", "--help"} & set(argv):  # this script's own option first, then the command it stands for
        print(__doc__.strip() + "\n\nEvery other flag is `cifar-jax benchmark`'s:\n", flush=True)
    from cifar_jax.cli import main as cli_main

    return cli_main(["benchmark", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

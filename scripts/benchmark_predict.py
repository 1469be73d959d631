"""Images per second of `Predictor.predict` on arrays and of `predict_paths` on a folder of PNG/JPEG files.

    python scripts/benchmark_predict.py --workdir checkpoints/model0-run     # an existing run's checkpoint
    python scripts/benchmark_predict.py                                      # trains a throwaway model0 first

Weights do not change the speed, so without --workdir a one-epoch model0 is trained on synthetic data.
Each figure is the best of --repeats timed runs after one warm-up run (which compiles).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_jax import TrainConfig, train
from cifar_jax.predict import Predictor


def throwaway_run(folder: Path) -> Path:
    config = TrainConfig(model="model0", epochs=1, data="synthetic", progress=False, workdir=str(folder / "run"))
    return train(config).workdir


def write_image_folder(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` random test-like pictures, alternately PNG and JPEG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        picture = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        picture.save(folder / (f"{i:05d}.png" if i % 2 == 0 else f"{i:05d}.jpg"))
    return folder


def best_images_per_second(run_once, num_images: int, repeats: int) -> float:
    run_once()  # compiles; not timed
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - started)
    return num_images / min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a training run to load (default: train a throwaway model0)")
    parser.add_argument("--step", default="best")
    parser.add_argument("--num-arrays", type=int, default=10_000, help="images in the array benchmark")
    parser.add_argument("--num-files", type=int, default=2_000, help="files in the folder benchmark")
    parser.add_argument("--file-sizes", type=int, nargs="+", default=[32, 256], help="side of the files, pixels")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the backend's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        workdir = args.workdir or throwaway_run(scratch)
        predictor = Predictor.from_checkpoint(workdir, args.step, batch_size=args.batch_size)
        images = np.random.default_rng(0).integers(0, 256, (args.num_arrays, 32, 32, 3), dtype=np.uint8)
        figures = {"devices": predictor.devices.num_local, "batch_size": predictor.batch_size,
                   "arrays_images_per_second": best_images_per_second(
                       lambda: predictor.predict(images), args.num_arrays, args.repeats)}
        for size in args.file_sizes:
            folder = write_image_folder(scratch / f"files{size}", args.num_files, size)
            figures[f"files_{size}px_images_per_second"] = best_images_per_second(
                lambda: list(predictor.predict_paths(folder)), args.num_files, args.repeats)
        figures["compilations"] = predictor.trace_count
    print(json.dumps({key: round(value, 1) if isinstance(value, float) else value for key, value in figures.items()}))


if __name__ == "__main__":
    main()

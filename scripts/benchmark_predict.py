"""Batch inference on photo-sized files: `predict_paths` (decoding on every core) against a one-core decode loop.

Makes folders of 12-megapixel JPEGs and 1-megapixel PNGs (large synthetic pictures: smooth shapes plus sensor-like
noise, so they compress like photos), then times, alternated, (a) a plain Python loop that decodes each file on one
core as predict does (PIL, JPEG draft mode, RGB, resize to 32x32) and (b) `Predictor.predict_paths` over the same
files, model included. Prints files/s of each, their ratio and the core count, as one JSON object.

    python scripts/benchmark_predict.py                      # a throwaway model0, 24 + 24 files
    python scripts/benchmark_predict.py --workdir RUN --jpegs 48 --pngs 48
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_jax import TrainConfig, train
from cifar_jax.predict import Predictor, default_decode_workers, image_files, read_image_file


def throwaway_run(folder: Path) -> Path:
    config = TrainConfig(model="model0", epochs=1, data="synthetic", progress=False, tensorboard=False,
                         workdir=str(folder / "run"))
    return train(config).workdir


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields (a tiny random image scaled up) plus fine noise."""
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8))


def write_photos(folder: Path, jpegs: int, pngs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    big, medium = photo_like(4000, 3000, rng), photo_like(1000, 1000, rng)  # 12 MP and 1 MP
    for index in range(jpegs):  # each file differs: a shifted crop of the same picture
        Image.fromarray(np.roll(np.asarray(big), index * 37, axis=1)).save(folder / f"photo{index:03d}.jpg",
                                                                           quality=90)
    for index in range(pngs):
        Image.fromarray(np.roll(np.asarray(medium), index * 37, axis=0)).save(folder / f"scan{index:03d}.png")
    return folder


def files_per_second(run_once, count: int) -> float:
    started = time.perf_counter()
    run_once()
    return count / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a training run to load (default: train a throwaway model0)")
    parser.add_argument("--jpegs", type=int, default=24, help="12-megapixel JPEG files (default: 24)")
    parser.add_argument("--pngs", type=int, default=24, help="1-megapixel PNG files (default: 24)")
    parser.add_argument("--decode-workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds; the medians count (default: 3)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        workdir = args.workdir or throwaway_run(scratch)
        folder = write_photos(scratch / "photos", args.jpegs, args.pngs)
        files = list(image_files(folder))
        predictor = Predictor.from_checkpoint(workdir)
        workers = args.decode_workers or default_decode_workers()
        one_core = lambda: [read_image_file(path) for path in files]  # noqa: E731
        on_all_cores = lambda: list(predictor.predict_paths(folder, decode_workers=workers))  # noqa: E731
        on_all_cores()  # compiles the step, warms the file cache
        loop, predicted = [], []
        for _ in range(args.rounds):
            loop.append(files_per_second(one_core, len(files)))
            predicted.append(files_per_second(on_all_cores, len(files)))
    figures = {
        "cores": default_decode_workers(), "decode_workers": workers, "files": len(files),
        "one_core_loop_files_per_second": statistics.median(loop),
        "predict_files_per_second": statistics.median(predicted),
        "ratio": statistics.median(p / l for p, l in zip(predicted, loop)),
        "rounds": {"one_core_loop": [round(x, 1) for x in loop], "predict": [round(x, 1) for x in predicted]},
    }
    print(json.dumps({key: round(value, 2) if isinstance(value, float) else value for key, value in figures.items()}))


if __name__ == "__main__":
    main()

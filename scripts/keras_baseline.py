"""Keras 3 `fit` throughput of the same networks, for the README's "how much faster than Keras" column.

    pip install tensorflow-cpu      # not a cifar-jax dependency: install it in a separate environment
    python scripts/keras_baseline.py --model model0 --batch-size 32 [--epochs 3] [--json]

Same layers as `cifar_jax.models` (checked by parameter count), Adam at 1e-3, 50,000 random CIFAR-shaped float32
images already in memory (as `cifar-jax benchmark` times the step on data already on the device). Reports images/s
of every epoch after the first (which includes tracing) and their median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

NETWORKS = {"model0": ((16, 32, 64), (256,), 91_946), "model1": ((8, 16, 32), (3000, 1000), 3_404_042)}
EPOCH_IMAGES = 50_000


def build(model_name: str):
    import keras
    from keras import layers

    conv_widths, dense_widths, expected_params = NETWORKS[model_name]
    blocks = [block for width in conv_widths for block in (layers.Conv2D(width, 3, activation="relu"),
                                                           layers.MaxPooling2D())]
    model = keras.Sequential([keras.Input((32, 32, 3)), *blocks, layers.Flatten(),
                              *[layers.Dense(width, activation="relu") for width in dense_widths], layers.Dense(10)])
    assert model.count_params() == expected_params, (model.count_params(), expected_params)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(NETWORKS), default="model0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs + 1 (the first is not counted)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not timed")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import numpy as np
    except ImportError:
        sys.exit("keras_baseline: needs TensorFlow and Keras: pip install tensorflow-cpu (in its own environment)")

    model = build(args.model)
    rng = np.random.default_rng(0)
    images = rng.random((EPOCH_IMAGES, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, EPOCH_IMAGES)
    epoch_seconds = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)

    model.fit(images, labels, batch_size=args.batch_size, epochs=args.epochs, verbose=0, callbacks=[EpochTimer()])
    rates = [EPOCH_IMAGES / seconds for seconds in epoch_seconds[1:]]
    result = {"model": args.model, "batch_size": args.batch_size, "keras_version": keras.__version__,
              "epoch_images_per_second": rates, "train_images_per_second": statistics.median(rates)}
    print(json.dumps(result) if args.json else
          f"Keras {keras.__version__} fit, {args.model} batch {args.batch_size}: "
          f"{result['train_images_per_second']:,.0f} img/s (epochs: {', '.join(f'{r:,.0f}' for r in rates)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

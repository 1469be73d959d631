"""A small problem the models can learn in seconds: each class has its own colour, plus noise."""
import numpy as np

from cifar_jax.config import TrainConfig
from cifar_jax.data import CLASS_NAMES, Cifar10


def class_coloured_images(labels: np.ndarray, rng: np.random.Generator, noise: float = 40.0) -> np.ndarray:
    palette = np.random.default_rng(1234).integers(0, 256, (10, 3))
    images = palette[labels][:, None, None, :] + rng.normal(0, noise, (len(labels), 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def class_coloured_dataset(num_train: int = 512, num_test: int = 100, seed: int = 0) -> Cifar10:
    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, 10, num_train).astype(np.int32)
    test_labels = rng.integers(0, 10, num_test).astype(np.int32)
    return Cifar10(
        train_images=class_coloured_images(train_labels, rng),
        train_labels=train_labels,
        test_images=class_coloured_images(test_labels, rng),
        test_labels=test_labels,
        class_names=CLASS_NAMES,
        source="test: class-coloured noise",
    )


def photo_batch(num_images: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (num_images, 32, 32, 3)).astype(np.uint8)


def quick_config(tmp_path, **overrides) -> TrainConfig:
    """A model0 run of 2 epochs at batch 32 into TMP/run, without a progress bar; any field overridden."""
    values = dict(model="model0", epochs=2, batch_size=32, eval_batch_size=40, workdir=str(tmp_path / "run"),
                  progress=False)
    return TrainConfig(**{**values, **overrides})

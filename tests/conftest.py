"""Shared test setup. Four simulated CPU devices unless the caller chose otherwise: set before JAX is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (imported after XLA_FLAGS on purpose)


@pytest.fixture(scope="session")
def learnable_data_dir(tmp_path_factory):
    """A data dir holding the learnable class-coloured problem as an official binary archive (512 train, 101 test)."""
    from cifar_fixtures import write_binary_archive
    from learnable import class_coloured_dataset

    dataset = class_coloured_dataset(num_train=512, num_test=101)
    data_dir = tmp_path_factory.mktemp("cifar10")
    write_binary_archive(data_dir / "cifar-10-binary.tar.gz", dataset.train_images, dataset.train_labels,
                         dataset.test_images, dataset.test_labels)
    return data_dir


@pytest.fixture(scope="session")
def trained_run(learnable_data_dir, tmp_path_factory):
    """A model0 run trained for 2 epochs on the learnable archive; returns its TrainResult (.workdir, .params)."""
    from cifar_jax import TrainConfig, train

    config = TrainConfig(model="model0", epochs=2, batch_size=32, eval_batch_size=100, progress=False,
                         data_dir=str(learnable_data_dir), workdir=str(tmp_path_factory.mktemp("runs") / "model0"))
    return train(config)


@pytest.fixture
def learnable_data(monkeypatch, request):
    """train() reads a small learnable problem instead of CIFAR-10 (the loader has its own tests): 512 training and
    101 test images, or the test module's LEARNABLE_SIZES."""
    import importlib

    from learnable import class_coloured_dataset

    num_train, num_test = getattr(request.module, "LEARNABLE_SIZES", (512, 101))
    dataset = class_coloured_dataset(num_train=num_train, num_test=num_test)
    monkeypatch.setattr(importlib.import_module("cifar_jax.train"), "load_cifar10",
                        lambda data_dir=None, source="auto": dataset)
    return dataset

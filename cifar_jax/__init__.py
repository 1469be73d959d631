"""cifar-jax: a JAX/Flax trainer for small CIFAR-10 classifiers.

The package reads as the pipeline: data → models → train (steps, loop) → checkpoint → evaluate/predict → plots.
"""
from cifar_jax import xla_flags

xla_flags.add_cpu_defaults()  # before anything starts JAX's CPU backend

from cifar_jax.config import TrainConfig  # noqa: E402
from cifar_jax.errors import CifarJaxError  # noqa: E402
from cifar_jax.train import TrainResult, train  # noqa: E402

__all__ = ["TrainConfig", "TrainResult", "CifarJaxError", "train"]

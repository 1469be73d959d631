"""cifar-jax: a JAX/Flax trainer for small CIFAR-10 classifiers.

The package reads as the pipeline: config → data → models (+ cpu_kernels) → steps → train (the loop) →
checkpoint / rundir → evaluate / predict → plots / report → compare → cli.
"""
from cifar_jax import backends

backends.add_cpu_xla_flags()  # before anything starts JAX's CPU backend

from cifar_jax.callbacks import Callback  # noqa: E402
from cifar_jax.config import TrainConfig  # noqa: E402
from cifar_jax.errors import CifarJaxError  # noqa: E402
from cifar_jax.train import TrainResult, train  # noqa: E402

__all__ = ["Callback", "TrainConfig", "TrainResult", "CifarJaxError", "train"]

"""cifar-jax: a JAX/Flax trainer for small CIFAR-10 classifiers.

The package reads as the pipeline: data → models → train (steps, loop) → checkpoint → evaluate/predict → plots.
"""
from cifar_jax.config import TrainConfig
from cifar_jax.errors import CifarJaxError
from cifar_jax.train import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "CifarJaxError", "train"]

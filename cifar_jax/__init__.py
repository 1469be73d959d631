"""cifar-jax: a JAX/Flax trainer for small CIFAR-10 classifiers.

The package reads as the pipeline: config → data → models (+ cpu_kernels) → steps → train (the loop) →
checkpoint / rundir → evaluate / predict → plots / report → compare → cli.
"""
import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _started_as_the_command() -> bool:
    """`cifar-jax ...` or `python -m cifar_jax ...`, not a program that imports the package."""
    return (_os.path.basename(_sys.argv[0] if _sys.argv else "") == "cifar-jax"
            or list(getattr(_sys, "orig_argv", []))[1:3] == ["-m", "cifar_jax"])


def _exit_interrupted(_signum, _frame) -> None:
    # Ctrl-C while JAX and the libraries import: nothing is saved yet, so stop at once, in one line.
    print("cifar-jax: interrupted", file=_sys.stderr, flush=True)
    _os._exit(130)


if _started_as_the_command() and _threading.current_thread() is _threading.main_thread():
    _signal.signal(_signal.SIGINT, _exit_interrupted)  # cli.main hands Ctrl-C back to Python once imports are done

from cifar_jax import backends  # noqa: E402

backends.add_cpu_xla_flags()  # before anything starts JAX's CPU backend

from cifar_jax.callbacks import Callback  # noqa: E402
from cifar_jax.config import TrainConfig  # noqa: E402
from cifar_jax.errors import CifarJaxError  # noqa: E402
from cifar_jax.train import TrainResult, train  # noqa: E402

__all__ = ["Callback", "TrainConfig", "TrainResult", "CifarJaxError", "train"]

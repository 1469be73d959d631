"""What differs between CPUs and accelerators, in one place: the defaults tuned per backend, the XLA:CPU flags, and
what a command says about the backend it runs on.

The CPU values were measured on a 2-core CPU (docs/performance.md); the accelerator values are plain choices,
not yet measured on a GPU or TPU. This module imports nothing heavy: the flags must be set before JAX starts.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from importlib import metadata
from typing import Callable, Mapping, MutableMapping, Optional

KERNEL_CHOICES = ("auto", "xla", "cpu")


@dataclasses.dataclass(frozen=True)
class BackendDefaults:
    """Defaults that depend on the kind of device a run uses."""

    # Images per evaluation/predict step, all devices together. On the CPU a batch of 1,000 outgrew the caches
    # (256 ran model0's evaluation 2.2x faster).
    eval_batch_size: int
    # At most this many programs queued ahead of the devices. XLA:CPU's in-process all-reduce deadlocked with
    # hundreds queued on 2 simulated devices; waiting every 10 steps kept the devices busy all the same.
    max_queued_programs: int
    # Which forms of the model's blocks `--kernels auto` runs: the CPU-tuned ones (cpu_kernels.py) or the plain
    # Flax ops (models.py) that XLA's GPU/TPU backends and cuDNN are tuned for.
    kernels: str


CPU_DEFAULTS = BackendDefaults(eval_batch_size=256, max_queued_programs=10, kernels="cpu")
ACCELERATOR_DEFAULTS = BackendDefaults(eval_batch_size=1024, max_queued_programs=64, kernels="xla")

# XLA:CPU flags: YNNPACK's convolution fusions ran each convolution on one thread; leaving convolutions to XLA's own
# kernels trained model0 1.3x faster on 2 cores. Experimental, so added only for the jaxlib series measured (XLA
# aborts on a flag it does not know).
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
CPU_XLA_FLAGS_JAXLIB_SERIES = "0.10."
# Packages whose presence means JAX will pick an accelerator rather than the CPU.
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin", "jax-rocm60-plugin", "libtpu")


def defaults_for(platform: str) -> BackendDefaults:
    """The defaults for a JAX platform name ('cpu', 'gpu', 'tpu', ...)."""
    return CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS


def resolve_kernels(kernels: str, platform: str) -> str:
    """'cpu' or 'xla': what --kernels asks for, with 'auto' chosen by the backend."""
    return defaults_for(platform).kernels if kernels == "auto" else kernels


# ---------------------------------------------------------------- XLA:CPU flags, before JAX starts


def _installed(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def expects_cpu_backend(environ: Mapping[str, str] = os.environ,
                        installed: Callable[[str], Optional[str]] = _installed) -> bool:
    """Whether JAX will run on the CPU, judged before it starts: JAX_PLATFORMS puts cpu first, or no accelerator
    plugin is installed."""
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(installed(plugin) for plugin in ACCELERATOR_PLUGINS)


def with_cpu_xla_flags(xla_flags: str, jaxlib_version: Optional[str]) -> str:
    """`xla_flags` plus each CPU flag it does not already set (nothing added for other jaxlib series)."""
    if not (jaxlib_version or "").startswith(CPU_XLA_FLAGS_JAXLIB_SERIES):
        return xla_flags
    given = {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def add_cpu_xla_flags(environ: MutableMapping[str, str] = os.environ,
                      installed: Callable[[str], Optional[str]] = _installed) -> None:
    """On a CPU-only set-up, add the CPU flags to XLA_FLAGS; takes effect if JAX has not started its backend yet
    (importing cifar_jax first guarantees it). A user's own setting of the same flag wins."""
    if expects_cpu_backend(environ, installed):
        environ["XLA_FLAGS"] = with_cpu_xla_flags(environ.get("XLA_FLAGS", ""), installed("jaxlib"))


# ---------------------------------------------------------------- what a command says when it starts


def gpu_visible(which: Callable[[str], Optional[str]] = shutil.which) -> bool:
    """Whether this machine shows an NVIDIA GPU (its driver's `nvidia-smi` is installed)."""
    return which("nvidia-smi") is not None


def startup_line(platform: str, device_count: int, process_count: int = 1) -> str:
    """The backend a command runs on and how many devices it uses."""
    processes = f" over {process_count} processes" if process_count > 1 else ""
    return f"backend: {platform}, {device_count} device(s){processes}"


def cpu_fallback_warning(platform: str, gpu_is_visible: bool,
                         environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """One line when a GPU is there but JAX runs on the CPU without being asked to (no CUDA plugin installed)."""
    if platform != "cpu" or not gpu_is_visible or environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    return ("a GPU is visible (nvidia-smi) but JAX runs on the CPU: install JAX's GPU build with "
            "pip install -e '.[cuda12]' (or '.[cuda13]'), or set JAX_PLATFORMS=cpu to run on the CPU on purpose")

"""XLA:CPU settings the package measured to be faster, added to XLA_FLAGS before JAX starts its CPU backend.

YNNPACK convolution fusions (XLA:CPU's default in jax 0.10) ran each convolution on one thread here: a profile of
model0's train step on 2 cores showed the two threads busy half the time each. With convolutions left to XLA's own
multi-threaded kernels (YNNPACK kept for dots), training ran 1.3x faster at model0 b128 (4,579 · 5,347 -> 6,820 ·
7,080 img/s) and evaluation 1.2x (interleaved A/B, `cifar-jax benchmark`, README). Only CPU flags: GPUs and TPUs
ignore them. A user's own setting of the same flag wins.
"""
from __future__ import annotations

import os
from typing import MutableMapping

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def with_cpu_defaults(xla_flags: str) -> str:
    """`xla_flags` plus each default flag it does not already set."""
    given = {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in CPU_DEFAULTS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def add_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Takes effect if JAX has not started its CPU backend yet (importing cifar_jax first guarantees it)."""
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))

"""XLA:CPU settings the package measured to be faster, added to XLA_FLAGS before JAX starts its CPU backend.

YNNPACK convolution fusions (XLA:CPU's default in jax 0.10) ran each convolution on one thread here: a profile of
model0's train step on 2 cores showed the two threads busy half the time each. With convolutions left to XLA's own
multi-threaded kernels (YNNPACK kept for dots), training ran 1.3x faster at model0 b128 (4,579 · 5,347 -> 6,820 ·
7,080 img/s) and evaluation 1.2x (interleaved A/B, `cifar-jax benchmark`, README). Only CPU flags: GPUs and TPUs
ignore them. A user's own setting of the same flag wins. XLA aborts on a flag it does not know, and this one is
experimental, so it is added only for the jaxlib series it was measured with.
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import MutableMapping, Optional

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
MEASURED_JAXLIB_SERIES = "0.10."


def with_cpu_defaults(xla_flags: str, jaxlib_version: Optional[str] = None) -> str:
    """`xla_flags` plus each default flag it does not already set (nothing added for other jaxlib series)."""
    if jaxlib_version is None:
        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:  # JAX itself will say what is missing, in its own words
            return xla_flags
    if not jaxlib_version.startswith(MEASURED_JAXLIB_SERIES):
        return xla_flags
    given = {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in CPU_DEFAULTS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def add_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Takes effect if JAX has not started its CPU backend yet (importing cifar_jax first guarantees it)."""
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))

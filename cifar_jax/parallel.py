"""Devices and data parallelism: one process per host, `jax.pmap` over the devices a run uses.

Arrays fed to a pmapped function carry a leading axis, one entry per local device; parameters and the dataset
are replicated along it, each step's batch indices are split along it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils

from cifar_jax.errors import ConfigError

AXIS_NAME = "devices"  # the pmap axis that gradients and metrics are averaged over


def is_main_process() -> bool:
    """Only process 0 writes metrics, logs, plots and progress bars."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class DeviceSet:
    """The devices one run is spread over: this process's `local` ones, out of `global_count` in all processes."""

    local: tuple
    global_count: int

    @classmethod
    def select(cls, num_devices: Optional[int] = None) -> "DeviceSet":
        """All devices of every process, or (single process only) the first `num_devices` local ones."""
        if num_devices is None:
            return cls(tuple(jax.local_devices()), jax.device_count())
        available = jax.local_device_count()
        if jax.process_count() > 1:
            raise ConfigError("num_devices cannot be set in a multi-process run: every device takes part")
        if not 1 <= num_devices <= available:
            raise ConfigError(f"num_devices {num_devices} is not available: this machine has {available} device(s)")
        return cls(tuple(jax.local_devices()[:num_devices]), num_devices)

    @property
    def num_local(self) -> int:
        return len(self.local)

    def replicate(self, tree: Any) -> Any:
        """Copy a pytree onto every local device (leading axis = device)."""
        return jax_utils.replicate(tree, devices=list(self.local))

    def split(self, global_batch: np.ndarray) -> np.ndarray:
        """(global_batch, ...) → (num_local, global_batch / global_count, ...): this process's share, by device.

        Devices are numbered process by process, so process p owns rows p*L ... p*L+L-1 (L local devices).
        """
        rows = global_batch.reshape((self.global_count, -1) + global_batch.shape[1:])
        start = jax.process_index() * self.num_local
        return rows[start:start + self.num_local]

    def gather(self, per_device: jax.Array) -> np.ndarray:
        """A pmapped output (leading axis = this process's devices) for every device of the run, as host numpy.

        Each process holds only its own devices' rows; in a multi-process run they are gathered from all.
        """
        if jax.process_count() == 1:
            return np.asarray(per_device)
        return np.asarray(multihost_utils.process_allgather(per_device, tiled=True))

    def pmap(self, step: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """pmap a per-device step; inside it, `lax.pmean(x, AXIS_NAME)` averages over all devices of the run."""
        devices = list(self.local) if jax.process_count() == 1 else None
        return jax.pmap(step, axis_name=AXIS_NAME, devices=devices, donate_argnums=donate_argnums)


def unreplicate(tree: Any) -> Any:
    """The first local device's copy of a replicated pytree, fetched to host numpy arrays.

    A plain copy from one device: indexing (`x[0]`) would launch a program over every local device, which in a
    multi-process run can interleave with the collectives still in flight and deadlock.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)

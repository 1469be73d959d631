"""Devices and data parallelism: one process per host, one SPMD program over every device of the run.

The per-device steps are plain functions, as `jax.pmap` would take them, and collectives inside them
(`lax.pmean(x, AXIS_NAME)`) average over all devices. They run as `jit(shard_map(...))` over a one-axis mesh:
parameters, optimizer state and the dataset are replicated global arrays, each step's batch indices are split
along the mesh axis. `pmap` is itself `jit(shard_map)` in current JAX, and the leading device axis of its arrays
made model1 2.2x slower on the CPU (docs/performance.md).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cifar_jax.backends import BackendDefaults, defaults_for
from cifar_jax.config import check_positive_integer
from cifar_jax.errors import ConfigError

AXIS_NAME = "devices"  # the mesh axis that gradients and metrics are averaged over


def is_main_process() -> bool:
    """Only process 0 writes metrics, logs, plots and progress bars."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class DeviceSet:
    """The devices one run is spread over: all of them (`devices`, process by process) and this process's (`local`)."""

    devices: tuple
    local: tuple

    @classmethod
    def select(cls, num_devices: Optional[int] = None) -> "DeviceSet":
        """All devices of every process, or (single process only) the first `num_devices` local ones."""
        if num_devices is None:
            # Process by process, so process p's devices hold rows p*L ... p*L+L-1 of every batch (L local devices).
            everyone = tuple(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
            return cls(everyone, tuple(jax.local_devices()))
        check_positive_integer("num_devices", num_devices)
        available = jax.local_device_count()
        if jax.process_count() > 1:
            raise ConfigError("num_devices cannot be set in a multi-process run: every device takes part")
        if num_devices > available:
            raise ConfigError(f"num_devices {num_devices} is not available: this machine has {available} device(s)")
        chosen = tuple(jax.local_devices()[:num_devices])
        return cls(chosen, chosen)

    @property
    def global_count(self) -> int:
        return len(self.devices)

    @property
    def num_local(self) -> int:
        return len(self.local)

    @property
    def platform(self) -> str:
        """'cpu', 'gpu', 'tpu', ...: the backend every device of the run is on."""
        return self.devices[0].platform

    @property
    def defaults(self) -> BackendDefaults:
        return defaults_for(self.platform)

    def wait_every_few_programs(self, programs_queued: int, latest: Any) -> None:
        """For a loop that keeps only its newest output (donated state): every `max_queued_programs` programs, wait
        for it, so no more than that run ahead of the devices."""
        if programs_queued % self.defaults.max_queued_programs == 0:
            jax.block_until_ready(latest)

    def wait_if_queue_full(self, launched: Sequence[Any]) -> None:
        """Call after queueing each program whose output (or a tuple holding it) is appended to `launched`: waits for
        the one queued `max_queued_programs` ago, so no more than that run ahead of the devices."""
        cap = self.defaults.max_queued_programs
        if len(launched) > cap:
            jax.block_until_ready(launched[-cap - 1])

    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.devices), (AXIS_NAME,))

    def _sharding(self, split_rows: bool) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(AXIS_NAME) if split_rows else PartitionSpec())

    def replicate(self, tree: Any) -> Any:
        """Every leaf as one global array with a full copy on each device of the run."""
        sharding = self._sharding(split_rows=False)

        def put(leaf):
            host = np.asarray(leaf)
            return jax.make_array_from_process_local_data(sharding, host, host.shape)

        return jax.tree.map(put, tree)

    def split(self, global_batch: np.ndarray) -> jax.Array:
        """A global batch (every process passes the same one) as a global array whose rows are spread evenly over
        the devices; each process hands over only its own devices' rows."""
        rows_per_process = len(global_batch) // self.global_count * self.num_local
        start = jax.process_index() * rows_per_process
        own_rows = global_batch[start:start + rows_per_process]
        return jax.make_array_from_process_local_data(self._sharding(split_rows=True), own_rows, global_batch.shape)

    def gather(self, rows: Any) -> np.ndarray:
        """A row-split output of `data_parallel` (or a host array) as host numpy, with the rows of every process."""
        if jax.process_count() == 1 or isinstance(rows, np.ndarray):
            return np.asarray(rows)
        return np.asarray(multihost_utils.process_allgather(rows, tiled=True))

    def data_parallel(self, step: Callable, split_argnums: tuple[int, ...], split_output: bool = False,
                      donate_argnums: tuple[int, ...] = ()) -> Callable:
        """Compile a per-device step to run on every device at once.

        Arguments listed in `split_argnums` arrive as this device's rows; the others whole (replicated). The output
        is either replicated (the step makes it so with collectives, e.g. averaged gradients) or, with
        `split_output`, each device's rows of a row-split result.
        """
        if self.global_count == 1:
            # Nothing to split: vmap over an axis of size 1 binds AXIS_NAME (collectives become identities), faster
            # than a one-device shard_map on the CPU (docs/performance.md).
            single = jax.vmap(step, in_axes=None, out_axes=None, axis_size=1, axis_name=AXIS_NAME)
            return jax.jit(single, donate_argnums=donate_argnums)
        num_args = len(inspect.signature(step).parameters)
        in_specs = tuple(PartitionSpec(AXIS_NAME) if i in split_argnums else PartitionSpec() for i in range(num_args))
        out_specs = PartitionSpec(AXIS_NAME) if split_output else PartitionSpec()
        # check_vma=False keeps pmap's semantics: gradients stay per device until the step averages them itself.
        spmd_step = jax.shard_map(step, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        return jax.jit(spmd_step, donate_argnums=donate_argnums)


def unreplicate(tree: Any) -> Any:
    """A replicated pytree as host numpy arrays, copied from this process's first device.

    A plain copy from one device: reading the global array would launch a program over every device, which in a
    multi-process run can interleave with the collectives still in flight and deadlock.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                        tree)

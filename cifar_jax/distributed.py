"""Multi-host runs on JAX's multi-controller runtime: one process per host, one SPMD program over every device of all.

The process settings (where the coordinator listens, how many processes, which one this is) come from flags or
CIFAR_JAX_* environment variables and are not part of a run's TrainConfig: the same run may be resumed on any
number of processes. `initialize` must run before anything touches a device.

When a peer dies, the others stop in one of two ways, both bounded in time and with a non-zero exit:
- a collective or barrier fails at once (JaxRuntimeError): training turns that into `PeerLostError`, one line,
  and the CLI exits at once, since an orderly shutdown would wait at JAX's shutdown barrier for the dead peer;
- a collective just waits for the dead peer: JAX's coordination service misses its heartbeats for
  `heartbeat_timeout` seconds (or loses process 0, which runs it) and ends every other process itself, with
  "Terminating process because the JAX distributed service detected fatal errors ... another task died".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from typing import Iterator, Mapping, Optional

import jax
import numpy as np

from cifar_jax.errors import CifarJaxError, ConfigError

ENV_PREFIX = "CIFAR_JAX_"
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 100  # JAX's own default: a silent peer is declared dead after this
DEFAULT_INITIALIZATION_TIMEOUT_SECONDS = 300  # JAX's own default: how long to wait for every process to connect
STOP_CHECK_STEPS = 20  # how often the processes of a run agree on a stop request; each check waits for all


class DistributedError(CifarJaxError):
    """The processes of a multi-process run could not start or go on working together."""


class PeerLostError(DistributedError):
    """Another process of a multi-process run stopped, so this one cannot go on."""


def _setting(default, kind: type, help_text: str):
    return dataclasses.field(default=default, metadata={"type": kind, "help": help_text})


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process run; the first three all unset = cluster auto-detection or single.

    Every field is a `train` flag (--coordinator-address ...) and a CIFAR_JAX_<FIELD> environment variable.
    """

    coordinator_address: Optional[str] = _setting(None, str, "HOST:PORT of process 0's coordinator, the same on "
                                                             "every process")
    num_processes: Optional[int] = _setting(None, int, "processes in the run, one per host (1: single process)")
    process_id: Optional[int] = _setting(None, int, "this process's number, 0 ... num_processes-1 (0 runs the "
                                                    "coordinator)")
    heartbeat_timeout: int = _setting(DEFAULT_HEARTBEAT_TIMEOUT_SECONDS, int,
                                      "seconds of silence after which JAX counts a peer as dead")
    initialization_timeout: int = _setting(DEFAULT_INITIALIZATION_TIMEOUT_SECONDS, int,
                                           "seconds to wait for every process to connect")

    @property
    def is_explicit(self) -> bool:
        return any(value is not None for value in (self.coordinator_address, self.num_processes, self.process_id))

    def validate(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"num_processes must be at least 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ConfigError(f"process_id must be 0 or more, got {self.process_id}")
        if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
            raise ConfigError(f"process_id {self.process_id} is out of range for {self.num_processes} processes: "
                              f"use 0 ... {self.num_processes - 1}")
        address = self.coordinator_address
        if address is not None and not address.rpartition(":")[2].isdigit():
            raise ConfigError(f"coordinator address {address!r} has no port: use HOST:PORT, e.g. 10.0.0.1:1234")
        for name in ("heartbeat_timeout", "initialization_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 second, got {getattr(self, name)}")


# ---------------------------------------------------------------- flags and environment


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting (unset flags stay None, so the environment and the defaults can fill them in)."""
    group = parser.add_argument_group(
        "multi-host", "process settings, not part of the run; each also read from CIFAR_JAX_<NAME>. Unset, JAX's "
        "cluster auto-detection applies (SLURM, Open MPI, TPU pods), else this is a single-process run")
    for field in dataclasses.fields(DistributedSettings):
        default = "" if field.default is None else f" (default: {field.default})"
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=field.metadata["type"],
                           default=None, metavar=field.name.upper(), help=field.metadata["help"] + default)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> DistributedSettings:
    """Flags first, then CIFAR_JAX_* environment variables, then the defaults."""
    values = {}
    for field in dataclasses.fields(DistributedSettings):
        value, variable = getattr(args, field.name, None), ENV_PREFIX + field.name.upper()
        if value is None and environ.get(variable, "") != "":
            try:
                value = field.metadata["type"](environ[variable])
            except ValueError:
                raise ConfigError(f"{variable}={environ[variable]!r} is not a valid "
                                  f"{field.metadata['type'].__name__}") from None
        if value is not None:
            values[field.name] = value
    settings = DistributedSettings(**values)
    settings.validate()
    return settings


# ---------------------------------------------------------------- joining the run


def initialize(settings: DistributedSettings) -> None:
    """Join the multi-process run the settings describe; with none, let JAX detect a cluster or stay single.

    Must run before anything touches a device. `num_processes=1` alone means a plain single process.
    """
    if jax.distributed.is_initialized() or settings == DistributedSettings(num_processes=1):
        return
    timeouts = {"heartbeat_timeout_seconds": settings.heartbeat_timeout,
                "initialization_timeout": settings.initialization_timeout}
    if not settings.is_explicit:
        _initialize_if_cluster_detected(timeouts)
        return
    try:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                                   **timeouts)
    except ValueError as error:  # JAX could not fill the unset ones in from a cluster environment
        raise ConfigError(f"incomplete multi-process settings ({error}): give --coordinator-address, "
                          "--num-processes and --process-id together (or CIFAR_JAX_* variables)") from None
    except jax.errors.JaxRuntimeError as error:  # e.g. process 0 found the coordinator's port taken
        raise DistributedError(
            f"process {settings.process_id} could not start or join the coordinator at "
            f"{settings.coordinator_address} ({first_line(error)}): use a free port on process 0's host, "
            "and the same --coordinator-address on every process") from None


def _initialize_if_cluster_detected(timeouts: dict) -> None:
    """JAX's cluster auto-detection (SLURM, Open MPI, TPU pods); outside a cluster, or in a process whose JAX
    backend already started (library use, tests), the run stays single-process."""
    try:
        jax.distributed.initialize(**timeouts)
    except ValueError:  # no cluster environment found: nothing to join
        return
    except RuntimeError as error:
        if "must be called before" not in str(error):
            raise


def is_multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (a no-op in a single process); names must be unique per run."""
    if is_multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agreed_stop(requested: Optional[str], global_step: int) -> Optional[str]:
    """The stop request (a signal's name) to act on after `global_step`, the same on every process.

    A single process acts on its own request at once. Several agree every STOP_CHECK_STEPS steps: a process that
    stopped alone to save would leave the others waiting in the next step's collective.
    """
    if not is_multi_process():
        return requested
    if global_step % STOP_CHECK_STEPS:
        return None
    from jax.experimental import multihost_utils

    if not multihost_utils.process_allgather(np.int32(requested is not None)).any():
        return None
    return requested or "stop requested on another process"


# ---------------------------------------------------------------- a peer dies


@contextlib.contextmanager
def peer_failures_as_errors(what_to_do: str) -> Iterator[None]:
    """In a multi-process run, a runtime error of a collective or barrier means a peer is gone: say so in one line."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if not is_multi_process():
            raise
        raise PeerLostError(
            f"process {jax.process_index()} of {jax.process_count()} lost contact with the others "
            f"({first_line(error)}): another process has probably stopped, see its log; {what_to_do}") from None


def exit_after_peer_loss(status: int) -> None:
    """End this process now, skipping JAX's shutdown barrier, which would wait for the dead peer and abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]

"""Multi-host runs on JAX's multi-controller runtime: one process per host, one SPMD program over every device of all.

The process settings (where the coordinator listens, how many processes, which one this is) come from flags or
CIFAR_JAX_* environment variables and are not part of a run's TrainConfig: the same run may be resumed on any
number of processes. `initialize` must run before anything touches a device.

When a peer dies, the others stop in one of two ways, both bounded in time and with a non-zero exit:
- a collective or barrier fails at once (JaxRuntimeError): training turns that into `PeerLostError`, one line,
  and the CLI exits at once, since an orderly shutdown would wait at JAX's shutdown barrier for the dead peer;
- a collective just waits for the dead peer: JAX's coordination service misses its heartbeats for
  `heartbeat_timeout` seconds (or loses process 0, which runs it) and aborts every other process itself, with a
  C++ stack trace that Python cannot catch. So `cifar-jax train` runs each process of an explicit multi-process
  run as a worker under a small supervisor (`run_supervised`), which keeps JAX's runtime log out of the terminal
  and reports such an end in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from cifar_jax.errors import CheckpointSaveError, CifarJaxError, ConfigError, RunFolderError, first_line
from cifar_jax.flags import add_dataclass_flags, field_types

ENV_PREFIX = "CIFAR_JAX_"
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 100  # JAX's own default: a silent peer is declared dead after this
DEFAULT_INITIALIZATION_TIMEOUT_SECONDS = 300  # JAX's own default: how long to wait for every process to connect
STOP_CHECK_STEPS = 20  # how often the processes of a run agree on a stop request; each check waits for all
SUPERVISOR_ENV = "CIFAR_JAX_SUPERVISOR_PID"  # set in a worker: the pid of the supervisor it must not outlive
# Lines of JAX's C++ runtime log (absl format: "E1124 16:52:08.214430   28252 file.cc:116] ...") and of the stack
# trace a fatal one ends with.
_RUNTIME_LOG_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d|\*\*\* Check failure|\s+@\s+0x")
_MAYBE_RUNTIME_LOG_LINE = re.compile(rb"[IWEF]\d{0,4}(?: |$)|\*|\s+@|\s*$")  # an unfinished line that may be one
# What the worker's Python side writes to stderr: progress bars, our one-line errors, warnings. A line that is
# neither this nor a new runtime log line, right after one, continues that (multi-line) runtime message.
_PYTHON_OUTPUT_LINE = re.compile(rb"\r|cifar-jax: |Traceback |\S+:\d+: \w*Warning: ")


class DistributedError(CifarJaxError):
    """The processes of a multi-process run could not start or go on working together."""


class PeerLostError(DistributedError):
    """Another process of a multi-process run stopped, so this one cannot go on."""


def _setting(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process run; the first three all unset = cluster auto-detection or single.

    Every field is a `train` flag (--coordinator-address ...) and a CIFAR_JAX_<FIELD> environment variable.
    """

    coordinator_address: Optional[str] = _setting(None, "HOST:PORT of process 0's coordinator, the same on "
                                                           "every process")
    num_processes: Optional[int] = _setting(None, "processes in the run, one per host (1: single process)")
    process_id: Optional[int] = _setting(None, "this process's number, 0 ... num_processes-1 (0 runs the "
                                                  "coordinator)")
    heartbeat_timeout: int = _setting(DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
                                      "seconds of silence after which JAX counts a peer as dead")
    initialization_timeout: int = _setting(DEFAULT_INITIALIZATION_TIMEOUT_SECONDS,
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
    add_dataclass_flags(group, DistributedSettings)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> DistributedSettings:
    """Flags first, then CIFAR_JAX_* environment variables, then the defaults."""
    values = {}
    for name, kind in field_types(DistributedSettings).items():
        value, variable = getattr(args, name, None), ENV_PREFIX + name.upper()
        if value is None and environ.get(variable, "") != "":
            try:
                value = kind(environ[variable])
            except ValueError:
                raise ConfigError(f"{variable}={environ[variable]!r} is not a valid {kind.__name__}") from None
        if value is not None:
            values[name] = value
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


def value_of_process_zero(reason: Optional[str]) -> Optional[str]:
    """A stop reason every process acts on alike: process 0's (others learn only that it has one)."""
    if not is_multi_process():
        return reason
    from jax.experimental import multihost_utils

    if not multihost_utils.broadcast_one_to_all(np.int32(reason is not None)):
        return None
    return reason or "stopped by a callback on process 0"


@contextlib.contextmanager
def signals_handled_by(handler: Callable, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Handle SIGINT/SIGTERM with `handler` inside the block, then restore the previous handlers (main thread only)."""
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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


def exiting_at_once_on_stuck_threads(work: Callable[[], Any]) -> Any:
    """`work()`; after a lost peer or a failed write (a checkpoint, a file of the run), the error line and an
    immediate exit: threads left waiting (JAX's shutdown barrier, Orbax's writer, the other processes of a run in
    their next collective) would hang a normal one."""
    try:
        return work()
    except (PeerLostError, CheckpointSaveError, RunFolderError) as error:
        print(f"cifar-jax: error: {error}", file=sys.stderr)
        exit_now(2)


def exit_now(status: int) -> None:
    """End this process now, skipping what a normal exit waits for: JAX's shutdown barrier after a peer died (it
    would wait for the dead peer and abort), Orbax's writer threads after a failed save (they wait forever)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ---------------------------------------------------------------- the supervisor of a multi-process run's worker


def needs_supervisor(settings: DistributedSettings) -> bool:
    """An explicit run of several processes, and this process is not already the worker of one."""
    return settings.is_explicit and settings.num_processes != 1 and SUPERVISOR_ENV not in os.environ


def run_supervised(argv: Sequence[str], settings: DistributedSettings) -> int:
    """Run `cifar-jax ARGV` as this process's worker; return its exit status, or raise one line if it was aborted.

    The worker's stdout and its own stderr pass straight through; JAX's runtime log lines go to a file, named in
    the error. SIGINT and SIGTERM are passed on, so the worker saves a checkpoint and stops as usual.
    """
    log_path = Path(tempfile.gettempdir()) / f"cifar-jax-process-{settings.process_id}-{os.getpid()}.log"
    worker = subprocess.Popen([sys.executable, "-m", "cifar_jax", *argv], stderr=subprocess.PIPE,
                              env={**os.environ, SUPERVISOR_ENV: str(os.getpid())})
    pass_on = lambda signum, _frame: worker.send_signal(signum)  # noqa: E731 (a repeated signal is harmless)
    with signals_handled_by(pass_on), open(log_path, "wb") as runtime_log:
        chunks = iter(lambda: os.read(worker.stderr.fileno(), 65536), b"")  # as they come, not line by line
        logged_lines = _split_runtime_log(chunks, sys.stderr.buffer, runtime_log)
        status = worker.wait()
    if not logged_lines:
        log_path.unlink()
    if status >= 0:
        return status
    runtime_log_text = log_path.read_text(errors="replace") if logged_lines else ""
    if "another task died" in runtime_log_text or "distributed service detected fatal errors" in runtime_log_text:
        cause = "JAX's coordination service found another process of the run gone (stopped, killed or unreachable)"
    else:
        cause = f"its worker was ended by {signal.Signals(-status).name}"
    raise PeerLostError(
        f"process {settings.process_id} of {settings.num_processes} stopped: {cause}; the checkpoints already "
        "saved are intact: run the same command on every process to resume"
        + (f" (JAX's log: {log_path})" if logged_lines else ""))


def _split_runtime_log(chunks: Iterable[bytes], terminal: BinaryIO, runtime_log: BinaryIO) -> int:
    """Copy the worker's stderr to the terminal as it comes (progress bars included), except JAX's runtime log
    lines, which go to `runtime_log`; returns how many went there."""
    logged, pending, in_runtime_message = 0, b"", False
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            in_runtime_message = bool(_RUNTIME_LOG_LINE.match(line)
                                      or in_runtime_message and not _PYTHON_OUTPUT_LINE.match(line))
            if in_runtime_message:
                runtime_log.write(line + b"\n")
                logged += 1
            else:
                terminal.write(line + b"\n")
        if not _MAYBE_RUNTIME_LOG_LINE.match(pending):  # e.g. a progress bar redrawn in place: show it now
            terminal.write(pending)
            pending = b""
        terminal.flush()
        runtime_log.flush()
    terminal.write(pending)
    terminal.flush()
    return logged


def signal_on_parent_death(parent_pid: int, signum: int) -> bool:
    """Linux: have the kernel send this process `signum` when its parent dies, so a killed parent leaves no orphan
    working on. False if the parent is already gone (it died before this took effect)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # no prctl: elsewhere the child outlives a killed parent
        pass
    return os.getppid() == parent_pid


def exit_with_supervisor() -> None:
    """In a worker: die with the supervisor, so killing a run's process (what a scheduler does) kills its worker."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor and not signal_on_parent_death(int(supervisor), signal.SIGKILL):
        os._exit(1)

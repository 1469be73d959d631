"""A jax.profiler trace of chosen optimizer steps, written where TensorBoard's profile plugin and Perfetto read it
(DIR/plugins/profile/<date>/<host>.xplane.pb and .trace.json.gz)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import jax

from cifar_jax.errors import one_line


class StepTrace:
    """Traces optimizer steps start ... end-1 of a run (the first of them a resumed run reaches); nothing otherwise."""

    def __init__(self, step_range: Optional[tuple[int, int]], logdir: Path):
        self.step_range, self.logdir = step_range, logdir
        self.active = self.done = False

    def before_step(self, steps_taken: int) -> None:
        if self.step_range is None or self.active or self.done:
            return
        start, end = self.step_range
        if start <= steps_taken < end:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after_step(self, steps_taken: int, latest: Any) -> None:
        if self.active and steps_taken >= self.step_range[1]:
            self.stop(latest)

    def stop(self, latest: Any) -> None:
        """End the trace (if one is running) once the device has finished the traced steps."""
        if self.active:
            try:
                jax.block_until_ready(latest)
            except Exception:  # a step that failed mid-trace (its donated state gone): the trace still ends
                pass
            self.active, self.done = False, True
            try:
                jax.profiler.stop_trace()
            except Exception as error:  # writing the trace failed (a full disk): the run's own outcome stands
                warnings.warn(f"no profiler trace written to {self.logdir}: {one_line(error)}")

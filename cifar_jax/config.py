"""One typed training config, the per-model presets, and validation with messages that say what to do."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from cifar_jax.errors import ConfigError
from cifar_jax.models import MODELS

OPTIMIZERS = ("adam", "adamw", "sgd")
DATA_SOURCES = ("auto", "tfds", "archive", "download", "synthetic")
DEFAULT_RUNS_DIR = Path("checkpoints")

# The tutorial's training settings per model; `learning_rate`/`optimizer` left unset take these.
# model2 is model1's network; plain SGD at 0.01 (Keras's 'sgd' default) reproduces its weaker tutorial result.
PRESETS: dict[str, dict[str, Any]] = {
    "model0": {"optimizer": "adam", "learning_rate": 1e-3},
    "model1": {"optimizer": "adam", "learning_rate": 1e-3},
    "model2": {"optimizer": "sgd", "learning_rate": 1e-2},
}


def _field(default, help_text: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help_text, **metadata})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as WORKDIR/config.json. Every field is a CLI flag."""

    model: str = _field("model0", "network to train: model0, model1 or model2")
    epochs: int = _field(10, "number of passes over the training set")
    batch_size: int = _field(32, "global batch size, split evenly over all devices (the tutorial's Keras default)")
    learning_rate: Optional[float] = _field(None, "step size; unset takes the model's preset (1e-3 Adam; model2: 1e-2 SGD)")
    optimizer: Optional[str] = _field(None, "adam, adamw or sgd; unset takes the model's preset")
    seed: int = _field(0, "seeds parameter init and the data order, so a run is reproducible")
    data: str = _field("auto", "where the data comes from: auto, tfds, archive, download, or synthetic (random pixels)")
    data_dir: Optional[str] = _field(None, "dataset folder; unset uses $TFDS_DATA_DIR, else ~/tensorflow_datasets")
    workdir: Optional[str] = _field(None, "run folder for metrics, checkpoints and plots; unset makes checkpoints/MODEL-TIME")
    standardize: bool = _field(False, "per-channel standardise with CIFAR-10's mean/std (the tutorial only divides by 255)")
    eval_batch_size: int = _field(1000, "global batch size for evaluation; the last batch is padded, never dropped")
    checkpoint_every: int = _field(1, "save a checkpoint every N epochs (and always after the last one)")
    keep_checkpoints: int = _field(3, "how many latest checkpoints to keep; the best by test accuracy is kept too")
    resume: bool = _field(True, "continue from WORKDIR's latest checkpoint; --no-resume refuses a workdir that has one")
    progress: bool = _field(True, "show a progress bar with live loss and accuracy")
    num_devices: Optional[int] = _field(None, "use only the first N local devices; unset uses every device")

    def resolved(self) -> "TrainConfig":
        """A copy with the model's presets filled in and every value checked (device counts are checked later)."""
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        preset = PRESETS[self.model]
        config = dataclasses.replace(
            self,
            optimizer=self.optimizer or preset["optimizer"],
            learning_rate=preset["learning_rate"] if self.learning_rate is None else self.learning_rate,
        )
        config.validate()
        return config

    def validate(self) -> None:
        positive_ints = ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "keep_checkpoints")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_devices is not None and (not isinstance(self.num_devices, int) or self.num_devices < 1):
            raise ConfigError(f"num_devices must be a positive integer, got {self.num_devices!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        rate = self.learning_rate
        if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ConfigError(f"learning_rate must be a positive number, got {rate!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.data not in DATA_SOURCES:
            raise ConfigError(f"unknown data source {self.data!r}: choose one of {', '.join(DATA_SOURCES)}")

    def check_devices(self, num_devices: int) -> None:
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value % num_devices:
                raise ConfigError(
                    f"{name} {value} does not split evenly over {num_devices} devices: "
                    f"use a multiple of {num_devices}"
                )

    def with_workdir(self) -> "TrainConfig":
        """A copy whose workdir is set: a fresh timestamped folder under checkpoints/ when none was given."""
        if self.workdir:
            return self
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return dataclasses.replace(self, workdir=str(DEFAULT_RUNS_DIR / f"{self.model}-{stamp}"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}: known fields are {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# Fields that define what a run computes: resuming with a different value would silently mix two runs.
RUN_IDENTITY_FIELDS = ("model", "batch_size", "learning_rate", "optimizer", "seed", "standardize")


def conflicting_fields(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Identity fields whose requested value differs from the saved run's, described as 'name: saved vs requested'."""
    return [
        f"{name}: {getattr(saved, name)!r} in the run vs {getattr(requested, name)!r} requested"
        for name in RUN_IDENTITY_FIELDS
        if getattr(saved, name) != getattr(requested, name)
    ]

"""One typed training config, the per-model presets, and validation with messages that say what to do."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cifar_jax.augment import PAD_MODES
from cifar_jax.backends import KERNEL_CHOICES
from cifar_jax.data import DATA_SOURCES
from cifar_jax.errors import ConfigError, one_line
from cifar_jax.models import IMAGE_SHAPE, MODELS

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
COMPUTE_DTYPES = ("float32", "bfloat16")
DEFAULT_RUNS_DIR = Path("checkpoints")

# The tutorial's training settings per model; `learning_rate`/`optimizer` left unset take these.
# model2 is model1's network; plain SGD at 0.01 (Keras's 'sgd' default) reproduces its weaker tutorial result.
PRESETS: dict[str, dict[str, Any]] = {
    "model0": {"optimizer": "adam", "learning_rate": 1e-3},
    "model1": {"optimizer": "adam", "learning_rate": 1e-3},
    "model2": {"optimizer": "sgd", "learning_rate": 1e-2},
}

# The Keras tutorial's recipe apart from the per-model PRESETS: batch 32, 10 epochs, constant rate, nothing else.
_TUTORIAL_RECIPE: dict[str, Any] = {"epochs": 10, "batch_size": 32, "lr_schedule": "constant", "label_smoothing": 0.0,
                                    "grad_clip_norm": 0.0, "augment": False, "cutout": 0, "tta_flip": False}

# What the comparison runs on real CIFAR-10 chose for both networks (docs/recipes.md has the table and commands):
# crop+flip augmentation, Adam at 3e-3 with a 1-epoch warm-up and cosine decay, 30 epochs of batch 128, and test
# metrics with the mirror view averaged in: model0 ends at 0.767 test accuracy (0.787 with the flip view), model1 at
# 0.733 (0.756).
_TUNED_RECIPE: dict[str, Any] = {"epochs": 30, "batch_size": 128, "optimizer": "adam", "learning_rate": 3e-3,
                                 "lr_schedule": "cosine", "warmup_epochs": 1.0, "augment": True, "tta_flip": True}

# Training recipes: per model, the values of the fields a run leaves unset (explicit flags always win).
# model2 is model1's network (it differed only in the tutorial's optimizer), so its tuned recipe is model1's.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "tutorial": {model: {**_TUTORIAL_RECIPE, **preset} for model, preset in PRESETS.items()},
    "tuned": {model: {**_TUTORIAL_RECIPE, **_TUNED_RECIPE} for model in PRESETS},
}
# Unset after the recipe: warm-up as a fraction of the epochs (one-cycle's rising phase: optax's 30%), and
# weight decay as optax's own default for adamw (1e-4), none otherwise.
DEFAULT_WARMUP_FRACTION = {"constant": 0.0, "cosine": 0.0, "onecycle": 0.3}
# Upper bounds of values a run could not use: JAX's keys keep 32 bits of a seed (2**32 would repeat seed 0), the
# step counter is int32, and an evaluation batch beyond this only exhausts memory.
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 1_000_000
MAX_TOTAL_STEPS = 2**31 - 1
MAX_EVAL_BATCH_SIZE = 65_536
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-4}


def _field(default, help_text: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help_text, **metadata})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as WORKDIR/config.json. Every field is a CLI flag."""

    model: str = _field("model0", "network to train: model0, model1 or model2")
    recipe: str = _field("tutorial", "training recipe: tutorial (the Keras tutorial's settings) or tuned (per model, "
                         "chosen on real data: docs/recipes.md); it fills every option below left unset")
    epochs: Optional[int] = _field(None, "number of passes over the training set; unset takes the recipe's (tutorial: 10)")
    batch_size: Optional[int] = _field(None, "global batch size, split evenly over all devices; unset takes the "
                                       "recipe's (tutorial: 32, Keras's default)")
    learning_rate: Optional[float] = _field(None, "(peak) step size; unset takes the recipe's (tutorial: 1e-3 Adam; "
                                            "model2: 1e-2 SGD)")
    optimizer: Optional[str] = _field(None, "adam, adamw or sgd; unset takes the recipe's")
    lr_schedule: Optional[str] = _field(None, "constant, cosine (warm-up, then cosine decay to 0) or onecycle; "
                                        "unset takes the recipe's (tutorial: constant)")
    warmup_epochs: Optional[float] = _field(None, "epochs of linear warm-up from 0 (onecycle: its rising phase); "
                                            "unset takes the recipe's, else 0 (onecycle: 0.3 x epochs)")
    weight_decay: Optional[float] = _field(None, "decoupled weight decay with adamw, L2 decay with adam and sgd; unset "
                                           "takes the recipe's, else 1e-4 with adamw (optax's default), 0 otherwise")
    label_smoothing: Optional[float] = _field(None, "mix this much of the uniform distribution into the one-hot "
                                              "targets, from 0 to <1; unset takes the recipe's (tutorial: 0)")
    grad_clip_norm: Optional[float] = _field(None, "clip the averaged gradient to this global norm, 0 = never; "
                                             "unset takes the recipe's (tutorial: 0)")
    augment: Optional[bool] = _field(None, "random crop (padded by --crop-padding) and horizontal flip of training "
                                     "images, on the device; unset takes the recipe's (tutorial: off)")
    crop_padding: int = _field(4, "pixels of padding on each side before the random 32x32 crop (with --augment)")
    pad_mode: str = _field("reflect", "how --augment pads before cropping: reflect or zero (black pixels)")
    cutout: Optional[int] = _field(None, "with --augment, black out a random square of this side, 0 = off; unset "
                                   "takes the recipe's (tutorial: 0)")
    tta_flip: Optional[bool] = _field(None, "test metrics average each test image's logits with its mirror "
                                      "image's; unset takes the recipe's (tutorial: off)")
    seed: int = _field(0, "seeds parameter init and the data order, so a run is reproducible")
    data: str = _field("auto", "where the data comes from: auto, tfds, archive, download, or synthetic (random pixels)")
    data_dir: Optional[str] = _field(None, "dataset folder; unset uses $TFDS_DATA_DIR, else ~/tensorflow_datasets")
    workdir: Optional[str] = _field(None, "run folder for metrics, checkpoints and plots; unset makes checkpoints/MODEL-TIME")
    standardize: bool = _field(False, "per-channel standardise with CIFAR-10's mean/std (the tutorial only divides by 255)")
    eval_batch_size: Optional[int] = _field(None, "global batch size for evaluation, the last batch padded, never "
                                            "dropped; unset takes the backend's (CPU: 256, GPU/TPU: 1024)")
    checkpoint_every: int = _field(1, "save a checkpoint every N epochs (and always after the last one)")
    keep_checkpoints: int = _field(3, "how many latest checkpoints to keep; the best by test accuracy is kept too")
    resume: bool = _field(True, "continue from WORKDIR's latest checkpoint; --no-resume refuses a workdir that has one")
    progress: bool = _field(True, "show a progress bar with live loss and accuracy")
    num_devices: Optional[int] = _field(None, "use only the first N local devices; unset uses every device")
    dtype: str = _field("float32", "compute dtype of the forward and backward pass: float32, or bfloat16 (weights, "
                        "optimizer and loss stay float32)")
    tensorboard: bool = _field(True, "write TensorBoard summaries (curves, hyperparameters) under WORKDIR/tensorboard")
    profile_steps: Optional[str] = _field(None, "START:END: trace optimizer steps START to END-1 of this run with "
                                          "jax.profiler into WORKDIR/profile (TensorBoard's profile plugin, Perfetto)")
    kernels: str = _field("auto", "forms of the conv blocks: cpu (tuned for XLA:CPU), xla (plain Flax ops, what GPUs "
                          "and TPUs are tuned for), or auto (cpu on CPUs, xla elsewhere); results agree within float "
                          "rounding")

    def resolved(self) -> "TrainConfig":
        """A copy with the recipe's values in every unset field and every value checked (devices are checked later)."""
        if not isinstance(self.model, str) or self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if not isinstance(self.recipe, str) or self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe][self.model]
        config = dataclasses.replace(self, **{name: value for name, value in recipe.items() if getattr(self, name) is None})
        # numpy scalars (from a sweep's np.linspace, say) as the Python numbers JSON can save
        config = dataclasses.replace(config, **{field.name: getattr(config, field.name).item()
                                                for field in dataclasses.fields(config)
                                                if isinstance(getattr(config, field.name), np.generic)})
        config = config._with_fallback_defaults()
        config.validate()
        # Folders as text: the config is saved as JSON, and a pathlib.Path is what a Python caller often passes.
        # The data folder absolute, so that evaluating or resuming the run from another folder finds the same data.
        folders = {name: os.fspath(getattr(config, name)) for name in ("workdir", "data_dir")
                   if getattr(config, name) is not None}
        if "data_dir" in folders:
            folders["data_dir"] = os.path.abspath(os.path.expanduser(folders["data_dir"]))
        return dataclasses.replace(config, **folders)

    def _with_fallback_defaults(self) -> "TrainConfig":
        """Warm-up and weight decay that neither the flags nor the recipe set take their per-schedule/optimizer default."""
        warmup, decay = self.warmup_epochs, self.weight_decay
        schedule, optimizer = (value if isinstance(value, str) else None for value in (self.lr_schedule, self.optimizer))
        if warmup is None and schedule in DEFAULT_WARMUP_FRACTION and isinstance(self.epochs, int):
            warmup = DEFAULT_WARMUP_FRACTION[schedule] * self.epochs
        if decay is None:
            decay = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0)
        return dataclasses.replace(self, warmup_epochs=warmup, weight_decay=decay)

    def validate(self) -> None:
        positive_ints = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints")
        for name in positive_ints:
            check_positive_integer(name, getattr(self, name))
        check_positive_integer("epochs", self.epochs, MAX_EPOCHS)
        if self.eval_batch_size is not None:
            check_positive_integer("eval_batch_size", self.eval_batch_size, MAX_EVAL_BATCH_SIZE)
        for name in ("workdir", "data_dir"):
            if not isinstance(getattr(self, name), (str, os.PathLike, type(None))):
                raise ConfigError(f"{name} must be a folder path, got {getattr(self, name)!r}")
        if self.num_devices is not None:
            check_positive_integer("num_devices", self.num_devices)
        if not is_whole_number(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED:,}, got {self.seed!r}")
        rate = self.learning_rate
        if rate is not None and not (_is_number(rate) and rate > 0):
            raise ConfigError(f"learning_rate must be a positive number, got {rate!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"unknown kernels {self.kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
        if self.data not in DATA_SOURCES:
            raise ConfigError(f"unknown data source {self.data!r}: choose one of {', '.join(DATA_SOURCES)}")
        self._validate_recipe_fields()

    def _validate_recipe_fields(self) -> None:
        """Schedule, regularisation and augmentation values (called once the recipe has filled them in)."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if not (_is_number(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            raise ConfigError(f"warmup_epochs must be a number from 0 to less than epochs ({self.epochs}), "
                              f"got {self.warmup_epochs!r} (the {self.recipe} recipe's, if you did not set it): "
                              "give a smaller --warmup-epochs or more --epochs")
        if self.lr_schedule == "onecycle" and not self.warmup_epochs:
            raise ConfigError("the onecycle schedule needs warmup_epochs > 0 (its rising phase): "
                              "leave --warmup-epochs unset for 0.3 x epochs")
        for name in ("weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number (0 = off), got {value!r}")
        if not (_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ConfigError(f"label_smoothing must be a number from 0 to less than 1, got {self.label_smoothing!r}")
        if self.profile_steps is not None:
            profile_step_range(self.profile_steps)
        for name in ("augment", "tta_flip", "standardize", "resume", "progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._validate_augmentation()

    def _validate_augmentation(self) -> None:
        max_padding = IMAGE_SHAPE[0] // 2
        if not (is_whole_number(self.crop_padding) and 0 <= self.crop_padding <= max_padding):
            raise ConfigError(f"crop_padding must be an integer from 0 to {max_padding}, got {self.crop_padding!r}")
        if self.pad_mode not in PAD_MODES:
            raise ConfigError(f"unknown pad_mode {self.pad_mode!r}: choose one of {', '.join(PAD_MODES)}")
        if not (is_whole_number(self.cutout) and 0 <= self.cutout <= IMAGE_SHAPE[0]):
            raise ConfigError(f"cutout must be an integer from 0 to {IMAGE_SHAPE[0]} (0 = off), got {self.cutout!r}")
        if self.cutout and not self.augment:
            raise ConfigError(f"cutout {self.cutout} only applies to augmented images: add --augment, or drop --cutout")

    def for_devices(self, num_devices: int, default_eval_batch_size: int) -> "TrainConfig":
        """A copy with the backend's evaluation batch if none was set, checked against the device count."""
        config = self
        if config.eval_batch_size is None:  # the backend's, rounded up to split over the devices
            per_device = math.ceil(default_eval_batch_size / num_devices)
            config = dataclasses.replace(config, eval_batch_size=per_device * num_devices)
        config.check_devices(num_devices)
        return config

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
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path} is not a readable run config ({one_line(error)}): restore it "
                              "from a backup, or train into a new --workdir") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} holds {type(values).__name__}, not a run config: restore it from a backup, "
                              "or train into a new --workdir")
        return cls.from_dict(values)


def profile_step_range(text: Any) -> tuple[int, int]:
    """'START:END' as (START, END), 0 <= START < END."""
    start, _, end = text.partition(":") if isinstance(text, str) else ("", "", "")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise ConfigError(f"profile_steps must be START:END with 0 <= START < END, e.g. 10:20, got {text!r}")
    return int(start), int(end)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole_number(value: Any) -> bool:
    """A Python or numpy integer, not a bool (True would pass as 1) and not a float such as 8.0."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_integer(name: str, value: Any, maximum: Optional[int] = None) -> None:
    if not is_whole_number(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:,}, got {value:,}")


# Fields that define what a run computes: resuming with a different value would silently mix two runs.
RUN_IDENTITY_FIELDS = ("model", "batch_size", "learning_rate", "optimizer", "seed", "standardize", "recipe",
                       "lr_schedule", "warmup_epochs", "weight_decay", "label_smoothing", "grad_clip_norm", "augment",
                       "crop_padding", "pad_mode", "cutout", "tta_flip", "dtype")


def identity_fields(config: TrainConfig) -> tuple[str, ...]:
    """RUN_IDENTITY_FIELDS, plus epochs when a decaying schedule's length depends on it (a constant rate can extend)."""
    return RUN_IDENTITY_FIELDS + (("epochs",) if config.lr_schedule in ("cosine", "onecycle") else ())


def conflicting_fields(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Identity fields whose requested value differs from the saved run's, described as 'name: saved vs requested'."""
    saved = saved.resolved()  # a run saved before a field existed ran with that field's recipe value
    return [
        f"{name}: {getattr(saved, name)!r} in the run vs {getattr(requested, name)!r} requested"
        for name in identity_fields(saved)
        if getattr(saved, name) != getattr(requested, name)
    ]

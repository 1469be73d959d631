"""The optimizer a config asks for: Optax learning-rate schedule, weight decay and gradient clipping, in one place.

Schedules count optimizer steps, so they need the steps per epoch (training images // global batch).
"""
from __future__ import annotations

from typing import Union

import optax

from cifar_jax.config import TrainConfig
from cifar_jax.errors import ConfigError


def steps_per_epoch(num_train_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; the last partial batch is dropped."""
    steps = num_train_examples // batch_size
    if steps == 0:
        raise ConfigError(f"batch_size {batch_size} is larger than the {num_train_examples} training images")
    return steps


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> Union[float, optax.Schedule]:
    """Step size per optimizer step; a plain float for the tutorial's constant rate (its optimizer stays unchanged)."""
    peak = config.learning_rate
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end_value=0.0)
    if config.lr_schedule == "onecycle":
        # Rises from peak/25 to peak over the warm-up, then anneals to peak/25e4 (optax's one-cycle defaults).
        return optax.cosine_onecycle_schedule(total_steps, peak, pct_start=warmup_steps / total_steps)
    if warmup_steps:
        return optax.linear_schedule(0.0, peak, warmup_steps)  # holds `peak` after the warm-up
    return peak


def create_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The resolved config's optimizer; with no decay, clipping or schedule it is exactly the tutorial's."""
    rate = learning_rate_schedule(config, steps_per_epoch)
    if config.optimizer == "adamw":
        optimizer = optax.adamw(rate, weight_decay=config.weight_decay)
    else:
        optimizer = optax.sgd(rate) if config.optimizer == "sgd" else optax.adam(rate)
        if config.weight_decay:  # classic (coupled) L2 decay: added to the gradient before the optimizer sees it
            optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)
    if config.grad_clip_norm:
        # Gradients reach the optimizer already averaged over devices, so this clips the global batch's norm.
        optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer


def rate_at(rate: Union[float, optax.Schedule], step: int) -> float:
    """The step size a schedule (or constant rate) gives at optimizer step `step`."""
    return float(rate(step)) if callable(rate) else float(rate)

"""How fast is it, measured: compile time, steady-state training and inference throughput, FLOPs, memory.

Everything is timed on the real code paths: the training loop's own data-parallel step (built by
`steps.build_train_step`), the `BatchedInference` the loop evaluates with, and `Predictor.predict` on arrays.
Throughput is the median of several timed windows after a warm-up; the device is synchronised at each window's
end, so asynchronous dispatch cannot flatter the figure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import checkpoint, optim, parallel
from cifar_jax.backends import resolve_kernels
from cifar_jax.config import TrainConfig, check_positive_integer
from cifar_jax.errors import ConfigError
from cifar_jax.data import CLASS_NAMES, Cifar10, load_cifar10
from cifar_jax.models import init_params
from cifar_jax.predict import Predictor
from cifar_jax.steps import BatchedInference, TrainState, build_train_step, empty_running_metrics
from cifar_jax.train import epoch_order

EPOCH_IMAGES = 50_000  # "seconds per epoch" is always for CIFAR-10's full training set
WARMUP_STEPS = 10


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What to time beyond the TrainConfig: how long, in how many windows."""

    epochs: float = 1.0  # training time measured, in epochs of the dataset (after warm-up)
    windows: int = 5  # the timed training is split in this many windows; the median counts
    max_steps: Optional[int] = None  # cap on timed training steps (short smoke runs)
    inference_repeats: int = 3
    profile_dir: Optional[str] = None  # a jax.profiler trace of the timed training steps goes here

    def __post_init__(self):
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"--epochs must be a positive number of epochs to time, got {self.epochs!r}")
        for name in ("windows", "inference_repeats") + (("max_steps",) if self.max_steps is not None else ()):
            check_positive_integer(f"--{name.replace('_', '-')}", getattr(self, name))


def peak_host_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_device_memory_bytes(devices: parallel.DeviceSet) -> Optional[int]:
    """Peak bytes in use on the first device, where the backend reports it (GPUs, TPUs; not the CPU)."""
    stats = devices.local[0].memory_stats() if hasattr(devices.local[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def flops_of(compiled: Any) -> float:
    """FLOPs of one call of a compiled (per-device) program, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)) if analysis else 0.0


def median_rate(run_window: Callable[[int], Any], items_per_window: int, windows: int) -> float:
    """Median items/s over `windows` calls of run_window(window_index); each waits for the device at its end."""
    rates = []
    for window in range(windows):
        started = time.perf_counter()
        jax.block_until_ready(run_window(window))
        rates.append(items_per_window / (time.perf_counter() - started))
    return statistics.median(rates)


# ---------------------------------------------------------------- training


def timing_windows(settings: BenchmarkSettings, steps_per_epoch: int) -> tuple[int, int]:
    """(windows, steps per window): `settings.epochs` of steps split into the windows (at least a step each), never
    more than --max-steps (fewer windows, of one step each, when the cap is below the number of windows)."""
    timed_steps = max(settings.windows, round(settings.epochs * steps_per_epoch))
    if settings.max_steps:
        timed_steps = min(timed_steps, settings.max_steps)
    windows = min(settings.windows, timed_steps)
    return windows, timed_steps // windows


def _training_setup(config: TrainConfig, dataset: Cifar10, devices: parallel.DeviceSet):
    steps_per_epoch = optim.steps_per_epoch(len(dataset.train_labels), config.batch_size)
    optimizer = optim.create_optimizer(config, steps_per_epoch)
    graphdef, params = init_params(config.model, config.seed)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    step = build_train_step(config, graphdef, optimizer, devices)
    arrays = devices.replicate((state, empty_running_metrics(), dataset.train_images, dataset.train_labels))
    return graphdef, params, step, arrays, steps_per_epoch


def time_training(config: TrainConfig, dataset: Cifar10, devices: parallel.DeviceSet,
                  settings: BenchmarkSettings) -> dict[str, Any]:
    graphdef, params, step, (state, running, images, labels), steps_per_epoch = _training_setup(config, dataset, devices)
    order = epoch_order(config.seed, 0, len(dataset.train_labels))

    def batch(step_index: int) -> np.ndarray:
        start = (step_index % steps_per_epoch) * config.batch_size
        return devices.split(order[start:start + config.batch_size])

    started = time.perf_counter()
    compiled = step.lower(state, running, images, labels, batch(0)).compile()
    compile_seconds = time.perf_counter() - started
    carry = [state, running]

    def run_steps(first: int, count: int):
        for index in range(first, first + count):
            carry[0], carry[1] = compiled(carry[0], carry[1], images, labels, batch(index))
            devices.wait_every_few_programs(index + 1, carry[0])  # as the training loop does
        return carry[0]

    jax.block_until_ready(run_steps(0, WARMUP_STEPS))
    windows, steps_per_window = timing_windows(settings, steps_per_epoch)
    tracing = jax.profiler.trace(settings.profile_dir) if settings.profile_dir else contextlib.nullcontext()
    with tracing:
        images_per_second = median_rate(lambda w: run_steps(WARMUP_STEPS + w * steps_per_window, steps_per_window),
                                        steps_per_window * config.batch_size, windows)
    flops_per_image = flops_of(compiled) / (config.batch_size // devices.global_count)
    return {
        "compile_seconds": compile_seconds,
        "train_images_per_second": images_per_second,
        "epoch_seconds": EPOCH_IMAGES / images_per_second,
        "flops_per_image": flops_per_image,
        "achieved_flops_per_second": flops_per_image * images_per_second,
        "timed_steps": steps_per_window * windows,
        "_graphdef": graphdef,
        "_params": parallel.unreplicate(carry[0]).params,
    }


# ---------------------------------------------------------------- inference


def time_evaluation(config: TrainConfig, graphdef, params: dict, dataset: Cifar10, devices: parallel.DeviceSet,
                    repeats: int) -> float:
    inference = BatchedInference(graphdef, config.standardize, devices, config.eval_batch_size, config.tta_flip,
                                 config.kernels)
    params_replicated, images = devices.replicate(params), dataset.test_images
    inference(params_replicated, images)  # compiles
    return median_rate(lambda _: inference(params_replicated, images), len(images), repeats)


def time_prediction(config: TrainConfig, graphdef, params: dict, dataset: Cifar10, devices: parallel.DeviceSet,
                    repeats: int) -> float:
    predictor = Predictor(graphdef, params, CLASS_NAMES, config.standardize, devices=devices,
                          tta_flip=config.tta_flip, kernels=config.kernels)
    predictor.predict(dataset.test_images[:predictor.batch_size])  # compiles
    return median_rate(lambda _: predictor.predict(dataset.test_images).probabilities, len(dataset.test_images),
                       repeats)


# ---------------------------------------------------------------- the whole benchmark


def run_benchmark(config: TrainConfig, settings: BenchmarkSettings = BenchmarkSettings()) -> dict[str, Any]:
    """Every figure of `cifar-jax benchmark` as one flat dict (the --json output)."""
    config = config.resolved()
    devices = parallel.DeviceSet.select(config.num_devices)
    config = config.for_devices(devices.global_count, devices.defaults.eval_batch_size)
    dataset = load_cifar10(config.data_dir, config.data)
    training = time_training(config, dataset, devices, settings)
    graphdef, params = training.pop("_graphdef"), training.pop("_params")
    result = {
        "model": config.model,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
        "data_source": dataset.source,
        "device_kind": devices.local[0].device_kind,
        "device_count": devices.global_count,
        "kernels": resolve_kernels(config.kernels, devices.platform),
        **training,
        "eval_images_per_second": time_evaluation(config, graphdef, params, dataset, devices,
                                                  settings.inference_repeats),
        "predict_images_per_second": time_prediction(config, graphdef, params, dataset, devices,
                                                     settings.inference_repeats),
        "peak_host_memory_bytes": peak_host_memory_bytes(),
        "versions": checkpoint.package_versions(),
    }
    device_memory = peak_device_memory_bytes(devices)
    if device_memory is not None:
        result["peak_device_memory_bytes"] = device_memory
    return result


def format_benchmark(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']} · batch {result['batch_size']} · {result['dtype']} · {result['kernels']} kernels · "
        f"{result['device_count']}× {result['device_kind']} · data {result['data_source']}",
        f"compile                 {result['compile_seconds']:.2f} s",
        f"training                {result['train_images_per_second']:,.0f} img/s "
        f"({result['epoch_seconds']:.1f} s per 50,000-image epoch; median of windows over {result['timed_steps']} steps)",
        f"evaluation              {result['eval_images_per_second']:,.0f} img/s",
        f"predict (arrays)        {result['predict_images_per_second']:,.0f} img/s",
        f"FLOPs per train image   {result['flops_per_image'] / 1e6:.2f} MFLOP "
        f"(achieved {result['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s)",
        f"peak host memory        {result['peak_host_memory_bytes'] / 2**20:,.0f} MiB",
    ]
    if "peak_device_memory_bytes" in result:
        lines.append(f"peak device memory      {result['peak_device_memory_bytes'] / 2**20:,.0f} MiB")
    lines.append("versions                " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    return "\n".join(lines)

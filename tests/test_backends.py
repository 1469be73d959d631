"""What differs per backend: CPU defaults in one place, the XLA:CPU flags only for a CPU run, the start-up line."""
import os

import pytest

from cifar_jax import backends
from cifar_jax.backends import ACCELERATOR_DEFAULTS, CPU_DEFAULTS
from cifar_jax.parallel import DeviceSet

YNN = "--xla_cpu_experimental_ynn_fusion_type="


def test_cpu_xla_flags_are_added_unless_the_user_set_them():
    assert backends.with_cpu_xla_flags("", "0.10.2") == YNN + "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    assert backends.with_cpu_xla_flags("--xla_force_host_platform_device_count=4", "0.10.2") == (
        "--xla_force_host_platform_device_count=4 " + YNN + "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert backends.with_cpu_xla_flags(YNN + "LIBRARY_FUSION_TYPE_DOT", "0.10.2") == YNN + "LIBRARY_FUSION_TYPE_DOT"
    # XLA aborts on flags it does not know: another jaxlib series, or none installed, gets none.
    assert backends.with_cpu_xla_flags("--a=1", "0.11.0") == "--a=1"
    assert backends.with_cpu_xla_flags("--a=1", None) == "--a=1"
    # Importing cifar_jax already added whatever applies here.
    assert backends.with_cpu_xla_flags(os.environ["XLA_FLAGS"], "0.10.2") == os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("environ, plugins, expected", [
    ({}, (), True),  # nothing but jaxlib: JAX runs on the CPU
    ({}, ("jax-cuda12-plugin",), False),  # JAX will take the GPU
    ({}, ("libtpu",), False),
    ({"JAX_PLATFORMS": "cpu"}, ("jax-cuda12-plugin",), True),  # asked for the CPU, plugin or not
    ({"JAX_PLATFORMS": "cuda,cpu"}, (), False),
])
def test_the_cpu_flags_go_only_to_a_run_that_will_use_the_cpu(environ, plugins, expected):
    installed = lambda package: "0.10.2" if package == "jaxlib" or package in plugins else None  # noqa: E731
    assert backends.expects_cpu_backend(environ, installed) is expected
    environ = dict(environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    backends.add_cpu_xla_flags(environ, installed)
    assert (YNN in environ["XLA_FLAGS"]) is expected
    assert environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2")


def test_defaults_per_backend_and_kernels_auto():
    assert backends.defaults_for("cpu") is CPU_DEFAULTS
    assert backends.defaults_for("gpu") is backends.defaults_for("tpu") is ACCELERATOR_DEFAULTS
    assert (CPU_DEFAULTS.eval_batch_size, CPU_DEFAULTS.max_queued_programs) == (256, 10)
    assert [backends.resolve_kernels("auto", p) for p in ("cpu", "gpu", "tpu")] == ["cpu", "xla", "xla"]
    assert backends.resolve_kernels("xla", "cpu") == "xla" and backends.resolve_kernels("cpu", "gpu") == "cpu"
    assert DeviceSet.select(1).defaults is CPU_DEFAULTS  # this machine's devices are CPUs


def test_no_more_than_the_backends_limit_of_programs_is_queued_ahead():
    """Hundreds of queued programs deadlocked XLA:CPU's in-process all-reduce; the loops wait as they queue."""
    waited = []
    limit = CPU_DEFAULTS.max_queued_programs

    class QueuedOutput:
        def __init__(self, number):
            self.number = number

        def block_until_ready(self):
            waited.append(self.number)
            return self

    devices, launched = DeviceSet.select(1), []
    for number in range(limit + 5):
        launched.append((QueuedOutput(number), "rows"))
        devices.wait_if_queue_full(launched)
        assert number - (waited[-1] if waited else -1) <= limit
    assert waited == list(range(5))
    waited.clear()
    for number in range(1, 3 * limit + 1):
        devices.wait_every_few_programs(number, QueuedOutput(number))
    assert waited == [limit, 2 * limit, 3 * limit]


def test_startup_line_and_the_warning_for_a_gpu_left_idle():
    assert backends.startup_line("cpu", 4) == "backend: cpu, 4 device(s)"
    assert backends.startup_line("gpu", 16, 2) == "backend: gpu, 16 device(s) over 2 processes"
    assert backends.gpu_visible(lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert not backends.gpu_visible(lambda name: None)
    warning = backends.cpu_fallback_warning("cpu", gpu_is_visible=True, environ={})
    assert warning.startswith("a GPU is visible (nvidia-smi) but JAX runs on the CPU") and "[cuda12]" in warning
    assert "\n" not in warning
    assert backends.cpu_fallback_warning("gpu", True, {}) is None
    assert backends.cpu_fallback_warning("cpu", False, {}) is None
    assert backends.cpu_fallback_warning("cpu", True, {"JAX_PLATFORMS": "cpu"}) is None  # on purpose

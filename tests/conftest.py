import os

# The suite runs on CPU with 8 simulated devices (multi-device tests run in-process; every other
# test uses the default device) and with XLA's backend optimisation off: the tests are dominated
# by compiling many small programs, which this makes about 20% faster; results are unchanged
# within every tolerance asserted. Set before JAX creates its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test in float64 (orders and parity are measured in double precision)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


#: drop compiled programs when the process holds more memory mappings than this (the kernel's
#: limit, vm.max_map_count, is 65530 by default)
MAX_MAPPINGS = 30000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a test module when the process holds many memory
    mappings. Every XLA:CPU executable holds some; the whole suite compiles thousands of them and,
    kept alive in one process, they exceed the kernel's limit on mappings, at which point a later
    compilation crashes the process. Below the threshold they are kept: later modules reuse them."""
    yield
    if _mappings() > MAX_MAPPINGS:
        jax.clear_caches()

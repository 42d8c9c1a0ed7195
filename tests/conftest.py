import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in float64 (orders and parity are measured in double precision)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every XLA:CPU executable holds memory
    mappings; the whole suite compiles thousands of them and, kept alive in one process, they
    exceed the kernel's limit on mappings (vm.max_map_count, 65530 by default), at which point a
    later compilation crashes the process."""
    yield
    jax.clear_caches()

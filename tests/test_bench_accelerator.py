"""The launch counter of ``scripts/bench_accelerator`` (its GPU figures go into the README)."""

import importlib.util
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_accelerator"


@pytest.fixture(scope="module")
def bench():
    loader = SourceFileLoader("bench_accelerator", str(SCRIPT))
    spec = importlib.util.spec_from_loader("bench_accelerator", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_accelerator"] = module
    loader.exec_module(module)
    yield module
    del sys.modules["bench_accelerator"]


def _loop(n, unroll=1):
    def f(x):
        def body(x, _):
            return jnp.tanh(x @ x.T) @ x + 1.0, None
        return jax.lax.scan(body, x, None, length=n, unroll=unroll)[0]
    return f


def test_launches_grow_linearly_with_the_loop_trip_count(bench):
    x = jnp.ones((8, 8))
    totals = []
    for n in (10, 20, 30):
        _, hlo = bench.compiled(_loop(n), x)
        totals.append(bench.kernels_per_eval(hlo, n) * n)
    per_step = (totals[1] - totals[0]) / 10  # the body and the loop condition, once per iteration
    assert per_step >= 3  # two matrix products and the loop's condition at least
    assert (totals[2] - totals[1]) / 10 == pytest.approx(per_step, abs=0.05)  # (counts are rounded per step)
    assert totals[0] == pytest.approx(10 * per_step, abs=per_step)  # little outside the loop


def test_unrolled_loop_is_counted_without_a_while(bench):
    x = jnp.ones((8, 8))
    _, rolled = bench.compiled(_loop(10), x)
    _, unrolled = bench.compiled(_loop(10, unroll=True), x)
    assert " while(" in rolled and " while(" not in unrolled
    assert bench.kernels_per_eval(unrolled, 10) == pytest.approx(bench.kernels_per_eval(rolled, 10), rel=0.5)

"""The plan of a solve (fastsample.plan): a linear solver's per-step coefficients computed on the host.
The fused loop equals the solver's own steps (contract tests over the registry: test_contracts.py);
here: what the plan holds, that its scalar work leaves the loop (also inside a caller's jit with
``nfe=``), and traced grids."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.learned import ProgramSolver, extract_program
from fastsample.models import GaussianMixture
from fastsample.plan import Unsupported, make_plan
from fastsample.solvers import HB, TimeShift, UniC


@pytest.fixture(autouse=True)
def _float64(x64):
    """Parity to rounding is measured in float64."""


def _setup(process, batch=8):
    denoiser = GaussianMixture.digits(covariance="diag").denoiser(process)
    x = fs.prior(process, jax.random.PRNGKey(3), (batch, 64), jnp.float64)
    return denoiser, x


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_history_shifts_are_copies_and_the_model_sees_x_itself():
    process = fs.EDM()
    g = fs.grid(process, 10, "karras", solver="dpmpp_2m")
    plan = make_plan(fs.get_solver("dpmpp_2m"), process, g)
    (tables,) = plan.phases
    # basis (x, previous output, new output): the call is at x, x' combines all three, the
    # history slot becomes the new output; the history starts empty
    assert tables.terms == (-1, (0, 1, 2), -3)
    assert plan.init == (0.0,)
    np.testing.assert_array_equal(tables.tau[:, 0], g.times[:-1])


def test_phased_solvers_plan_each_phase():
    """Heun's last step onto t = 0 is an Euler step (one call); PNDM's first three steps make four."""
    process = fs.EDM()
    heun = make_plan(fs.get_solver("heun"), process, fs.grid(process, 9, "karras", solver="heun", final_zero=True))
    assert [(p.steps, p.num_calls) for p in heun.phases] == [(4, 2), (1, 1)]
    pndm = make_plan(fs.get_solver("pndm"), process, fs.grid(process, 14, "karras", solver="pndm"))
    assert [(p.steps, p.num_calls) for p in pndm.phases] == [(3, 4), (2, 1)]


def _loop_ops(fn, *args, names=("exp", "log", "expm1", "log1p", "pow")) -> int:
    """Transcendental operations inside the bodies of the program's scans."""
    def count(jaxpr, inside):
        total = 0
        for eqn in jaxpr.eqns:
            if inside and eqn.primitive.name in names:
                total += 1
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", None)
                if sub is not None:
                    total += count(getattr(sub, "jaxpr", sub), inside or eqn.primitive.name == "scan")
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr, False)


def _size(fn, *args) -> int:
    def count(jaxpr):
        return sum(1 + sum(count(getattr(p.jaxpr, "jaxpr", p.jaxpr)) for p in e.params.values() if hasattr(p, "jaxpr"))
                   for e in jaxpr.eqns)

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_a_jitted_sampler_with_nfe_has_no_scalar_work_in_the_loop_and_its_size_does_not_grow():
    """``jax.jit(lambda x: fs.sample(den, x, s, nfe=10))``: the grid and the plan are computed on the
    host while tracing, so the loop holds only the model's own transcendentals, and the program is
    the same size at NFE 10 and 40."""
    process = fs.VPDiscrete.ddpm_linear()
    denoiser, x = _setup(process)
    ts = np.asarray(fs.grid(process, 10, "karras", solver="ddim").times)
    bare = _loop_ops(lambda x: jax.lax.scan(lambda x, t: (denoiser(x, t), None), x, ts[:-1])[0], x)
    for name in ("dpmpp_2m", "unipc", "ipndm", "deis"):
        known = _loop_ops(lambda x, name=name: fs.sample(denoiser, x, name, nfe=10, schedule="karras"), x)
        plain = _loop_ops(lambda x, name=name: fs.sample(denoiser, x, name, nfe=10, schedule="karras", fused=False), x)
        assert known == bare < plain, name  # only the model's own; the solver's log-SNRs and phi-functions left
        sizes = [_size(lambda x, n=n, name=name: fs.sample(denoiser, x, name, nfe=n, schedule="karras"), x)
                 for n in (10, 40)]
        assert sizes[0] == sizes[1], (name, sizes)


def test_traced_grids_give_the_same_samples_and_gradients():
    process = fs.EDM()
    denoiser, x = _setup(process, batch=4)
    ts = jnp.asarray(fs.grid(process, 5, "karras", solver="dpmpp_2m").times)

    def loss(ts, fused):
        return jnp.sum(fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts, fused=fused) ** 2)

    a = jax.jit(lambda ts: fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts))(ts)
    assert _rel(a, fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts, fused=False)) < 1e-12
    assert _rel(a, fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts)) < 1e-12  # concrete: from the plan
    g_fused, g_plain = jax.grad(loss)(ts, True), jax.grad(loss)(ts, False)
    assert _rel(g_fused, g_plain) < 1e-10
    assert float(jnp.max(jnp.abs(g_plain))) > 0


def test_wrappers_and_programs_run_from_plans():
    process = fs.EDM()
    denoiser, x = _setup(process)
    g = fs.grid(process, 8, "karras", solver="dpmpp_2m")
    program = ProgramSolver.from_program(extract_program("unipc", process, g))
    for solver in (HB(fs.get_solver("dpmpp_2m"), beta=0.8), UniC(fs.get_solver("dpmpp_3m")), program):
        make_plan(solver, process, g if solver is not program else program.fitted_grid(process, None))
        kw = dict(grid=g) if solver is not program else {}
        plain = fs.sample(denoiser, x, solver, fused=False, **kw)
        assert _rel(fs.sample(denoiser, x, solver, **kw), plain) < 1e-12
        assert _rel(jax.jit(lambda x, solver=solver, kw=kw: fs.sample(denoiser, x, solver, **kw))(x), plain) < 1e-12


@pytest.mark.parametrize("solver, why", [
    (TimeShift(fs.get_solver("ddim"), window=4), "not an AbstractLinearSolver"),
    (fs.get_solver("ddpm"), "stochastic"),
    (HB(TimeShift(fs.get_solver("ddim"), window=4)), "not an AbstractLinearSolver"),
])
def test_solvers_outside_the_contract_have_no_plan_and_still_sample(solver, why):
    process = fs.EDM()
    denoiser, x = _setup(process)
    g = fs.grid(process, 8, "karras", solver=solver)
    with pytest.raises(Unsupported, match=why):
        make_plan(solver, process, g)
    key = jax.random.PRNGKey(0)
    a = fs.sample(denoiser, x, solver, grid=g, key=key)
    assert _rel(a, fs.sample(denoiser, x, solver, grid=g, key=key, fused=False)) == 0.0


_HELD_IN_FLOAT32 = """
import jax, fastsample as fs
from fastsample.models import GaussianMixture
process = fs.VPDiscrete.ddpm_linear()
denoiser = GaussianMixture.ring(n=4).denoiser(process)
x = fs.prior(process, jax.random.PRNGKey(0), (4, 2))
first = fs.grid(process, nfe=6, schedule="karras", solver="ddim")
held = jax.jit(lambda x: fs.sample(denoiser, x, "ddim", grid=first))
held(x)
ts = fs.grid(process, nfe=6, schedule="logsnr_uniform", solver="ddim").times
y = jax.jit(lambda x: fs.sample(denoiser, x, "ddim", timesteps=ts))(x)
z = fs.sample(denoiser, x, "ddim", timesteps=ts, fused=False)
print(float(abs(y - z).max() / abs(z).max()))
"""


def test_a_plan_is_computed_in_float64_while_a_jit_holds_the_process_in_float32():
    """A caller's jit that closes over a ``VPDiscrete`` (NumPy float64 tables) keeps a float32 copy
    of them; a later plan on another grid still gets float64 arrays (JAX 0.10 handed it the float32
    copy: ``RuntimeProgramInputMismatch``). In a fresh process: this test process's state hides it."""
    proc = subprocess.run([sys.executable, "-c", _HELD_IN_FLOAT32], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5

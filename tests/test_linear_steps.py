"""Per-step linear tables (fastsample.linear_steps): the fused sampling loop equals the solver's
own steps, in values and gradients, and its scalar work leaves the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.learned import ProgramSolver, extract_program
from fastsample.linear_steps import Unsupported, concrete_tables, step_tables
from fastsample.models import GaussianMixture
from fastsample.sample import resolve_grid
from fastsample.solvers import HB, TimeShift, UniC


@pytest.fixture(autouse=True)
def _float64(x64):
    """Parity to rounding is measured in float64."""

TABLED = ["ddim", "euler", "midpoint", "dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m", "deis", "ipndm",
          "lms", "unipc", "unipc_3"]


def _setup(process, batch=8):
    denoiser = GaussianMixture.digits().denoiser(process)
    x = fs.prior(process, jax.random.PRNGKey(3), (batch, 64), jnp.float64)
    return denoiser, x


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_every_deterministic_registry_solver_declares_linear_steps_or_uses_control_flow():
    tabled = {n for n in fs.available_solvers() if n != "dpm_solver_v3"
              and getattr(fs.get_solver(n), "linear_steps", False)}
    assert tabled == set(TABLED)


@pytest.mark.parametrize("name, final_zero", [(name, False) for name in TABLED] + [
    (name, True) for name in ("dpmpp_2m", "unipc")])
def test_fused_loop_equals_the_solvers_own_steps(name, final_zero):
    process = fs.VPDiscrete.ddpm_linear() if name in ("deis", "unipc_3") else fs.EDM()
    denoiser, x = _setup(process)
    nfe = 10 if name != "midpoint" else 8
    kw = dict(nfe=nfe, schedule="logsnr_uniform", final_zero=final_zero)
    fused = fs.sample(denoiser, x, name, **kw)
    plain = fs.sample(denoiser, x, name, fused=False, **kw)
    assert _rel(fused, plain) < 1e-12


def test_wrappers_and_programs_run_from_tables():
    process = fs.EDM()
    denoiser, x = _setup(process)
    _, ts, steps, _ = resolve_grid(fs.get_solver("dpmpp_2m"), process, 8, "karras", None, False, None)
    program = ProgramSolver.from_program(extract_program(fs.get_solver("unipc"), process, np.asarray(ts)))
    for solver in (HB(fs.get_solver("dpmpp_2m"), beta=0.8), UniC(fs.get_solver("dpmpp_3m")), program):
        step_tables(solver, process, ts, x.shape, x.dtype, steps)  # fits: no Unsupported
        kw = dict(nfe=8, schedule="karras") if solver is not program else {}
        plain = fs.sample(denoiser, x, solver, fused=False, **kw)
        assert _rel(fs.sample(denoiser, x, solver, **kw), plain) < 1e-12
        if solver is program:  # inside jit: from constant tables
            assert _rel(jax.jit(lambda x: fs.sample(denoiser, x, program))(x), plain) < 1e-12


@pytest.mark.parametrize("solver, why", [
    (TimeShift(fs.get_solver("ddim"), window=4), "does not declare linear_steps"),
    (fs.get_solver("heun"), "does not declare linear_steps"),
    (fs.get_solver("dpm_solver_2"), "does not declare linear_steps"),
])
def test_solvers_outside_the_contract_are_refused_and_still_sample(solver, why):
    process = fs.EDM()
    denoiser, x = _setup(process)
    _, ts, steps, _ = resolve_grid(solver, process, 8, "karras", None, False, None)
    with pytest.raises(Unsupported, match=why):
        step_tables(solver, process, ts, x.shape, x.dtype, steps)
    a = fs.sample(denoiser, x, solver, nfe=8, schedule="karras")
    assert _rel(a, fs.sample(denoiser, x, solver, nfe=8, schedule="karras", fused=False)) == 0.0


def _tables_while_tracing(solver, process, ts, steps):
    seen = []

    def trace(x):
        seen.append(concrete_tables(solver, process, ts, x.shape, x.dtype, steps))
        return x

    jax.make_jaxpr(trace)(jnp.zeros((4, 64)))
    return seen[0]


def test_history_shifts_are_copies_and_the_model_sees_x_itself():
    process = fs.EDM()
    solver, ts, steps, _ = resolve_grid(fs.get_solver("dpmpp_2m"), process, 10, "karras", None, False, None)
    assert concrete_tables(solver, process, ts, (4, 64), jnp.float64, steps) is None  # not tracing
    tables = _tables_while_tracing(solver, process, ts, steps)
    # basis (x, previous output, new output): the call is at x, x' combines all three, the
    # history slot becomes the new output
    assert tables.terms == (-1, (0, 1, 2), -3)
    np.testing.assert_array_equal(np.asarray(tables.tau)[:, 0], np.asarray(ts)[:-1])
    assert not isinstance(tables.X, jax.core.Tracer)


def _loop_transcendentals(fn, *args) -> int:
    """exp / log / expm1 / log1p / pow operations inside the body of the program's outermost scan."""
    def count(jaxpr, inside):
        total = 0
        for eqn in jaxpr.eqns:
            if inside and eqn.primitive.name in ("exp", "log", "expm1", "log1p", "pow"):
                total += 1
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", None)
                if sub is not None:
                    total += count(getattr(sub, "jaxpr", sub), inside or eqn.primitive.name == "scan")
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr, False)


def test_a_grid_known_while_tracing_leaves_no_scalar_work_in_the_loop():
    process = fs.VPDiscrete.ddpm_linear()
    denoiser, x = _setup(process)
    ts = np.asarray(fs.get_timesteps(process, 10, "karras"), np.float64)  # concrete: known while tracing
    bare = _loop_transcendentals(lambda x: jax.lax.scan(lambda x, t: (denoiser(x, t), None), x, ts[:-1])[0], x)
    for name in ("dpmpp_2m", "unipc"):
        known = _loop_transcendentals(lambda x, name=name: fs.sample(denoiser, x, name, timesteps=ts), x)
        plain = _loop_transcendentals(lambda x, name=name: fs.sample(denoiser, x, name, timesteps=ts, fused=False), x)
        assert known == bare < plain  # only the model's own; the solver's log-SNRs and phi-functions left


def test_traced_grids_give_the_same_samples_and_gradients():
    process = fs.EDM()
    denoiser, x = _setup(process, batch=4)
    _, ts, _, _ = resolve_grid(fs.get_solver("dpmpp_2m"), process, 5, "karras", None, False, None)
    ts = jnp.asarray(ts, jnp.float64)

    def loss(ts, fused):
        return jnp.sum(fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts, fused=fused) ** 2)

    a = jax.jit(lambda ts: fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts))(ts)
    assert _rel(a, fs.sample(denoiser, x, "dpmpp_2m", timesteps=ts, fused=False)) < 1e-12
    g_fused, g_plain = jax.grad(loss)(ts, True), jax.grad(loss)(ts, False)
    assert _rel(g_fused, g_plain) < 1e-10
    assert float(jnp.max(jnp.abs(g_plain))) > 0

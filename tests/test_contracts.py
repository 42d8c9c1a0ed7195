"""Contracts every registered solver keeps, tested over ``fastsample.available_solvers()``: a solver
registered is a solver tested. Family files test only what is specific to a family (orders,
parity with published implementations, reductions).

Each property runs on one standard problem (a 2-D ring mixture under EDM, float64) with one
module-level counting model, so that properties share compiled programs."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.learned import ProgramSolver, extract_program
from fastsample.models import GaussianMixture
from fastsample.sampling import resolve
from fastsample.solvers import AbstractLinearSolver, supports
from fastsample.solvers.ems import EMS

PROCESS = fs.EDM()
MIXTURE = GaussianMixture.ring(n=4, radius=2.0, std=0.3)
KEY = jax.random.key(5)
CALLS = []


def _model(x, t, cond):
    jax.debug.callback(lambda: CALLS.append(1))  # a host callback: evaluations in untaken branches do not count
    return MIXTURE.x0(x, *PROCESS.alpha_sigma(t)).astype(x.dtype)


#: constructor options of solvers that need them (restart: an interval inside every grid below)
OPTIONS = {
    "dpm_solver_v3": lambda: {"ems": EMS.trivial(PROCESS, (2,))},
    "edm_stochastic": lambda: {"S_churn": 20.0},
    "restart": lambda: {"intervals": (0.5, 2.0), "K": 1, "restart_steps": 2},
}


def make(name):
    return fs.get_solver(name, **OPTIONS.get(name, dict)())


FIXED = [n for n in fs.available_solvers() if isinstance(make(n), fs.AbstractFastSolver)]
DETERMINISTIC = [n for n in FIXED if not isinstance(make(n), fs.AbstractStochasticSolver)]
STOCHASTIC = [n for n in FIXED if n not in DETERMINISTIC]
LINEAR = [n for n in DETERMINISTIC if supports(make(n), AbstractLinearSolver)]
ADAPTIVE = [n for n in fs.available_solvers() if n not in FIXED]


@pytest.fixture(autouse=True)
def _float64(x64):
    """Contracts are measured in float64."""


def _denoiser():
    return fs.Denoiser(_model, PROCESS, "x0")


def _x_T(batch=3):
    return fs.prior(PROCESS, jax.random.PRNGKey(1), (batch, 2), jnp.float64)


def _nfe(solver, steps, final_zero):
    """The NFE of ``steps`` steps (a budget solver: any budget of about that size)."""
    try:
        return solver.nfe(steps, final_zero)
    except ValueError:
        return 2 * steps + 1


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_the_registry_is_classified():
    """Every registered name is a fixed-grid solver (deterministic or stochastic) or an adaptive one."""
    assert set(FIXED) | set(ADAPTIVE) == set(fs.available_solvers()) and ADAPTIVE == ["dpm_solver_adaptive"]
    assert {"ddim", "dpmpp_2m", "unipc", "heun", "pndm", "dpm_solver_fast"} <= set(LINEAR)
    assert "dpm_solver_v3" in DETERMINISTIC and "dpm_solver_v3" not in LINEAR  # per-feature coefficients
    assert {"ddpm", "restart", "sa_solver"} <= set(STOCHASTIC)


@pytest.mark.parametrize("final_zero", [False, True])
@pytest.mark.parametrize("name", FIXED)
def test_reported_nfe_equals_model_calls_and_the_result_is_finite(name, final_zero):
    """The 16-step Karras grid to ``t_min`` that the other contracts use (warm-up and steady state:
    one compiled program for all of them); the shortest grid onto ``t = 0`` (its first step is its
    last; restart's interval must be crossed by a step that ends above ``t = 0``, so two steps)."""
    solver = make(name)
    for steps in [16] if not final_zero else [solver.min_steps() + (name == "restart")]:
        CALLS.clear()
        nfe = _nfe(solver, steps, final_zero)
        sol = fs.solve(_denoiser(), _x_T(), solver, nfe=nfe, schedule="karras", final_zero=final_zero, key=KEY)
        sol.x.block_until_ready()
        jax.effects_barrier()
        assert sol.stats["nfe"] == nfe == len(CALLS), (name, steps, sol.stats, len(CALLS))
        assert sol.stats["steps"] == sol.grid.steps and sol.grid.ends_at_zero == final_zero
        assert np.all(np.isfinite(np.asarray(sol.x))), (name, steps)


@pytest.mark.parametrize("name", FIXED)
def test_too_small_budgets_are_refused_with_the_minimum(name):
    solver = make(name)
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        fs.sample(_denoiser(), _x_T(), solver, nfe=0, key=KEY)
    lowest = _nfe(solver, solver.min_steps(), False)
    if lowest > 1 and name != "dpm_solver_fast":
        with pytest.raises(ValueError, match=rf"nfe={lowest - 1} is below {solver.name}'s minimum of {lowest}"):
            fs.sample(_denoiser(), _x_T(), solver, nfe=lowest - 1, key=KEY)


def _grid(solver, steps=16):
    """A 16-step Karras grid (16 >= 15: no lower-order-final steps, which diffeqsolve cannot know)."""
    return fs.grid(PROCESS, _nfe(solver, steps, False), "karras", solver=solver)


@pytest.mark.parametrize("name", LINEAR)
def test_the_plan_equals_the_solvers_own_steps_and_its_program(name):
    """fused (from the plan) = fused=False (``update`` in every step) to rounding, and the solver's
    whole-run linear program (``extract_program``) samples the same."""
    solver = make(name)
    g = _grid(solver)
    d, x = _denoiser(), _x_T()
    fused = fs.sample(d, x, solver, grid=g)
    assert _rel(fused, fs.sample(d, x, solver, grid=g, fused=False)) < 1e-12
    program = ProgramSolver.from_program(extract_program(resolve(solver, PROCESS, grid=g)[0], PROCESS, g))
    assert _rel(fs.sample(d, x, program), fused) < 1e-10


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_the_scan_driver_equals_diffeqsolve_with_step_to(name):
    solver = make(name)
    g = _grid(solver)
    solver = resolve(solver, PROCESS, grid=g)[0]  # configured for the budget
    d, x = _denoiser(), _x_T()
    ts = jnp.asarray(g.times)
    sol = diffrax.diffeqsolve(fs.ProbabilityFlowTerm(d), solver, ts[0], ts[-1], None, x,
                              stepsize_controller=diffrax.StepTo(ts), max_steps=len(ts))
    assert _rel(sol.ys[-1], fs.sample(d, x, solver, grid=g)) < 1e-10


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_float32_agrees_with_float64(name):
    solver = make(name)
    g = _grid(solver)
    d = _denoiser()
    x64 = fs.sample(d, _x_T(), solver, grid=g)
    x32 = fs.sample(d, _x_T().astype(jnp.float32), solver, grid=g)
    assert x32.dtype == jnp.float32 and _rel(x32, x64) < 2e-4, (name, _rel(x32, x64))


@pytest.mark.parametrize("name", FIXED)
def test_new_grid_values_and_guidance_scale_do_not_retrace(name):
    solver = make(name)
    traces = []

    def model(x, t, cond):
        traces.append(1)  # runs once per trace
        return _model(x, t, None) * (1 + 0 * cond)

    counts = []
    for scale, ts in [(1.0, [60.0, 5.0, 0.5, 0.02]), (3.0, [50.0, 4.0, 0.3, 0.01]), (7.5, [40.0, 2.0, 0.2, 0.005])]:
        d = fs.Denoiser(model, PROCESS, "x0", guidance_scale=scale, uncond=jnp.zeros(2))
        grid = fs.Grid.from_times(np.asarray(ts), PROCESS, budget=_nfe(solver, 3, False))
        fs.sample(d, _x_T(), solver, grid=grid, cond=jnp.ones((3, 2)), key=KEY)
        counts.append(len(traces))
    assert counts[0] > 0 and counts[0] == counts[1] == counts[2], counts


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samples_depend_only_on_key_and_index(name):
    """Sample ``b`` depends on ``(key, b)`` only: the same key is bitwise reproducible, a smaller batch
    gives the first samples, another key other samples; a key is required."""
    solver = make(name)
    d, x = _denoiser(), _x_T(5)
    nfe = _nfe(solver, 6, False)
    full = fs.sample(d, x, solver, nfe=nfe, key=KEY)
    np.testing.assert_array_equal(full, fs.sample(d, x, solver, nfe=nfe, key=KEY))
    np.testing.assert_allclose(fs.sample(d, x[:3], solver, nfe=nfe, key=KEY), full[:3], rtol=1e-12, atol=1e-12)
    assert float(jnp.min(jnp.abs(fs.sample(d, x, solver, nfe=nfe, key=jax.random.key(6)) - full))) > 0
    with pytest.raises(ValueError, match=f"{solver.name} is a stochastic solver: pass a PRNG key"):
        fs.sample(d, x, solver, nfe=nfe)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_solvers_report_their_model_calls(name):
    CALLS.clear()
    sol = fs.solve(_denoiser(), _x_T(), name, final_zero=True)
    sol.x.block_until_ready()
    jax.effects_barrier()
    assert sol.stats["nfe"] == len(CALLS) > 0 and bool(sol.stats["reached"]) and sol.grid.times[-1] == 0.0
    with pytest.raises(ValueError, match=f"{name} chooses its own steps"):
        fs.solve(_denoiser(), _x_T(), name, saveat=fs.SaveAt(steps=True))

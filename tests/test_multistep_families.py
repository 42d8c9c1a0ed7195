"""DEIS (tAB), LMS, iPNDM and PNDM: convergence orders, reductions, closed forms, NFE accounting."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.solvers.deis import DEIS, lagrange_exp_weights
from fastsample.solvers.dpm_solver import DPMSolverMultistep
from fastsample.solvers.exponential import History, phi, prediction_step
from fastsample.solvers.linear_multistep import IPNDM, LMS, PNDM

RING = GaussianMixture.ring(n=8, radius=2.0, std=0.3)
PROCS = {"vp": fs.VPLinear(), "edm": fs.EDM()}


def _fitted_order(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def _rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


@eqx.filter_jit
def _step(solver, d, t0, t1, x, state):
    return solver.update(d, t0, t1, x, None, state)


def _solve_with_exact_warmup(solver, d, x_start, ts, k):
    """Integrate over ``ts`` with the first ``k - 1`` steps replaced by exact ones: those steps only
    fill the history with model outputs at reference states, and the method proper starts at
    ``ts[k - 1]`` from the reference state there with an exact history."""
    state = solver.init_state(d, x_start, None, ts[-1], ts.shape[0] - 1)
    x = x_start
    for j in range(ts.shape[0] - 1):
        x1, state = _step(solver, d, ts[j], ts[j + 1], x, state)
        x = fs.reference_solve(d, x_start, t_start=float(ts[0]), t_end=float(ts[j + 1])) if j < k - 1 else x1
    return x


# Fitted global orders with an exact warm-up. A k-step method started by lower-order steps has a
# global error limited by the first steps' local errors: with the solvers' own warm-up, orders 3
# and 4 of all three families measure 2.05-2.13 on the grids below. Each family runs on a grid
# where its coefficients are consistent: DEIS (variable-step by construction) and LMS (variable
# steps in t) on VPLinear's log-SNR-uniform grid, which is non-uniform in t; iPNDM's fixed
# equal-step coefficients need steps equal in sigma / alpha (where DDIM is Euler), hence EDM with a
# sigma-uniform grid (karras, rho = 1): on other smooth grids iPNDM and PNDM are second order
# (measured 1.9-2.1 for orders 3 and 4 on VPLinear's log-SNR grid). Measured with the exact
# warm-up over 16-128 steps (asymptotic from 16 steps on; checked to 256): deis 1.97 / 3.03 / 3.99,
# lms 1.98 / 3.01 / 3.77, ipndm 2.00 / 2.84 / 3.94 for orders 2 / 3 / 4.
FAMILIES = {
    "deis": (DEIS, "vp", "logsnr_uniform", {}, (0.5, 0.1)),
    "lms": (LMS, "vp", "logsnr_uniform", {}, (0.5, 0.1)),
    "ipndm": (IPNDM, "edm", "karras", {"rho": 1.0}, (1.0, 0.3)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", [2, 3, 4])
def test_convergence_order_with_exact_warmup(x64, family, order):
    # DEIS's `order` is the number of interpolation points: the paper's tAB-k is order = k + 1,
    # of global order k + 1.
    cls, proc, schedule, options, (t_start, t_end) = FAMILIES[family]
    p = PROCS[proc]
    d = RING.denoiser(p)
    x_start = fs.reference_solve(d, fs.prior(p, jax.random.PRNGKey(3), (16, 2)), t_end=t_start)
    ref = fs.reference_solve(d, x_start, t_start=t_start, t_end=t_end)
    solver = cls(order=order)
    steps = np.array([16, 32, 64, 128])
    errors = []
    for n in steps:
        ts = jnp.asarray(fs.get_timesteps(p, int(n), schedule, t_start=t_start, t_end=t_end, **options))
        errors.append(_rms(_solve_with_exact_warmup(solver, d, x_start, ts, order), ref))
    assert abs(_fitted_order(errors, steps) - order) < 0.35, errors


@pytest.mark.parametrize("solver,order,proc,schedule,options,steps", [
    # DEIS over the whole VP range from the prior: the high-noise start is nearly linear, so the
    # DDIM warm-up does not limit the order (measured 2.92, and 2.81 in the time basis; order 4:
    # 4.23 and 3.71, over 64-256 steps)
    (DEIS(order=3), 3, "vp", "logsnr_uniform", {}, (64, 128, 256)),
    (DEIS(order=3, basis="t"), 3, "vp", "logsnr_uniform", {}, (64, 128, 256)),
    # PNDM's pseudo Runge-Kutta warm-up is classical RK4 in sigma for EDM (measured 4.08)
    (PNDM(), 4, "edm", "karras", {"rho": 1.0, "t_start": 1.0, "t_end": 0.25}, (8, 16, 32, 64)),
])
def test_convergence_order_of_plain_sampling(x64, solver, order, proc, schedule, options, steps):
    p = PROCS[proc]
    d = RING.denoiser(p)
    t_start, t_end = options.get("t_start", p.t_max), options.get("t_end", p.t_min)
    x_T = fs.prior(p, jax.random.PRNGKey(3), (16, 2))
    if t_start != p.t_max:
        x_T = fs.reference_solve(d, x_T, t_end=t_start)
    ref = fs.reference_solve(d, x_T, t_start=t_start, t_end=t_end)
    errors = [_rms(fs.sample(d, x_T, solver, nfe=solver.nfe(n), schedule=schedule, schedule_options=options), ref)
              for n in steps]
    assert abs(_fitted_order(errors, np.array(steps)) - order) < 0.35, errors


# ------------------------------------------------------------------------------ reductions


@pytest.mark.parametrize("final_zero", [False, True])
def test_order_one_deis_and_ipndm_are_ddim(x64, final_zero):
    p = PROCS["vp"]
    d = RING.denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(0), (8, 2))
    ddim = fs.sample(d, x_T, "ddim", nfe=10, final_zero=final_zero)
    for solver in (DEIS(order=1), DEIS(order=1, basis="t"), DEIS(order=1, prediction="x0"), IPNDM(order=1)):
        x = fs.sample(d, x_T, solver, nfe=10, final_zero=final_zero)
        np.testing.assert_allclose(x, ddim, rtol=1e-12, atol=1e-12, err_msg=str(solver))


@pytest.mark.parametrize("proc,schedule,final_zero", [
    ("vp", "time_uniform", False), ("edm", "karras", False), ("edm", "karras", True),
])
def test_order_one_lms_is_euler(x64, proc, schedule, final_zero):
    # (a step to t = 0 is DDIM for LMS, which equals Euler's step there for EDM, not for VP)
    p = PROCS[proc]
    d = RING.denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(0), (8, 2))
    x = fs.sample(d, x_T, LMS(order=1), nfe=10, schedule=schedule, final_zero=final_zero)
    euler = fs.sample(d, x_T, "euler", nfe=10, schedule=schedule, final_zero=final_zero)
    np.testing.assert_allclose(x, euler, rtol=1e-12, atol=1e-12)


def test_equivalences_between_families(x64):
    """On EDM (alpha = 1, t = sigma, drift = eps) DEIS in the time basis integrates the same
    polynomial in t as LMS, and on a sigma-uniform grid LMS's coefficients are iPNDM's."""
    p = PROCS["edm"]
    d = RING.denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(1), (8, 2))
    for k in (2, 4):
        lms = fs.sample(d, x_T, LMS(order=k), nfe=12, schedule="karras")
        deis = fs.sample(d, x_T, DEIS(order=k, basis="t", lower_order_final=False), nfe=12, schedule="karras")
        np.testing.assert_allclose(deis, lms, rtol=1e-10, atol=1e-10)
        uniform = dict(schedule="karras", schedule_options={"rho": 1.0, "t_start": 2.0, "t_end": 0.5})
        np.testing.assert_allclose(fs.sample(d, x_T, IPNDM(order=k), nfe=12, **uniform),
                                   fs.sample(d, x_T, LMS(order=k), nfe=12, **uniform), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("h", [-3.0, -0.4, -1e-3, 1e-3, 0.3, 2.5])
def test_quadrature_weights_equal_the_phi_function_integrals(x64, h):
    """Order 2 and 3 in ell: int_0^1 e^{-h(1-s)} s^k ds = k! phi_{k+1}(-h), so with the interpolant
    ``m0 + s d1 + s^2 d2`` (divided differences on nodes 0, -r0, -(r0 + r1)) the weights are
    h (phi_1 m0 + phi_2 d1 + 2 phi_3 d2)."""
    h = jnp.asarray(h)
    r0, r1 = jnp.asarray(0.8), jnp.asarray(1.3)
    p1, p2, p3 = (phi(k, -h) for k in (1, 2, 3))
    w2 = lagrange_exp_weights(h, [jnp.zeros(()), -r0])
    np.testing.assert_allclose(w2, [h * (p1 + p2 / r0), -h * p2 / r0], rtol=1e-12, atol=1e-15)
    d10 = np.array([1 / r0, -1 / r0, 0.0])
    d11 = np.array([0.0, 1 / r1, -1 / r1])
    d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
    d2 = (d10 - d11) / (r0 + r1)
    expected = h * (p1 * np.array([1.0, 0.0, 0.0]) + p2 * d1 + 2.0 * p3 * d2)
    w3 = lagrange_exp_weights(h, [jnp.zeros(()), -r0, -r0 - r1])
    np.testing.assert_allclose(w3, expected, rtol=1e-11, atol=1e-15)


def test_deis_data_prediction_order_two_is_dpmpp_2m_taylor(x64):
    p = PROCS["vp"]
    d = RING.denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(2), (8, 2))
    for fz in (False, True):
        a = fs.sample(d, x_T, DEIS(order=2, prediction="x0"), nfe=9, final_zero=fz)
        b = fs.sample(d, x_T, DPMSolverMultistep(order=2, prediction="x0", solver_type="heun"), nfe=9, final_zero=fz)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_deis_noise_prediction_matches_the_log_rho_closed_form(x64):
    """diffusers' DEISMultistepScheduler fits eps linearly in log rho (rho = sigma / alpha) and
    integrates d rho exactly: x1 = alpha1 (x / alpha0 + c0 m0 + c1 m1) with
    c_j = int_{rho0}^{rho1} l_j(log rho) d rho, from int (log rho - a) d rho = rho (log rho - 1 - a)."""
    p = PROCS["vp"]
    t_prev, t0, t1 = 0.7, 0.5, 0.35
    lp, l0, l1 = (float(jnp.log(p.sigma_edm(jnp.asarray(t)))) for t in (t_prev, t0, t1))
    rho0, rho1 = np.exp(l0), np.exp(l1)
    G = lambda rho, a: rho * (np.log(rho) - 1.0 - a)
    c0 = (G(rho1, lp) - G(rho0, lp)) / (l0 - lp)
    c1 = (G(rho1, l0) - G(rho0, l0)) / (lp - l0)
    solver = DEIS(order=2)
    c = prediction_step(p, jnp.asarray(t0), jnp.asarray(t1), "eps")
    state = History(jnp.zeros((1, 2)), jnp.asarray([lp]), jnp.asarray(1), jnp.asarray(1), jnp.asarray(-1),
                    jnp.asarray(0.0))
    b = solver.weights(p, c, state, jnp.asarray(2))
    a1 = float(p.alpha(jnp.asarray(t1)))
    np.testing.assert_allclose(c.beta1 * b, [a1 * c0, a1 * c1], rtol=1e-12)


# ------------------------------------------------------------------------------ NFE, NaN, retracing

SOLVERS = {
    "deis": DEIS(), "deis_t": DEIS(basis="t", order=2), "ipndm": IPNDM(), "lms": LMS(), "pndm": PNDM(),
}


def test_pndm_nfe_accounting():
    s = PNDM()
    assert [s.nfe(n) for n in range(1, 7)] == [4, 8, 12, 13, 14, 15]
    assert [s.nfe(n, True) for n in range(1, 7)] == [1, 5, 9, 13, 14, 15]
    assert s.steps_for_nfe(20) == 11
    with pytest.raises(ValueError, match="pndm cannot use exactly nfe=10"):
        s.steps_for_nfe(10)


@pytest.mark.parametrize("name", SOLVERS)
def test_final_zero_has_no_nan(x64, name):
    solver = SOLVERS[name]
    for p, schedule in ((fs.VPLinear(), "logsnr_uniform"), (fs.EDM(), "karras")):
        d = RING.denoiser(p)
        x_T = fs.prior(p, jax.random.PRNGKey(4), (8, 2))
        x = fs.sample(d, x_T, solver, nfe=solver.nfe(6, True), schedule=schedule, final_zero=True)
        assert np.all(np.isfinite(np.asarray(x))), (name, type(p).__name__)


def test_data_prediction_solvers_start_at_flow_matching_pure_noise(x64):
    """At t = 1 (alpha = 0, lambda = -inf) only data-prediction and drift forms are finite; the
    history entry at lambda = -inf must not poison later DEIS steps."""
    p = fs.FlowMatching()
    d = RING.denoiser(p)
    x_T = jax.random.normal(jax.random.PRNGKey(5), (8, 2))
    for solver in (DEIS(prediction="x0"), DEIS(prediction="x0", basis="t"), LMS()):
        x = fs.sample(d, x_T, solver, nfe=8, schedule="time_uniform")
        assert np.all(np.isfinite(np.asarray(x))), solver


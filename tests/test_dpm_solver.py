"""DPM-Solver / DPM-Solver++: orders, reductions, published formulas, NFE and edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.solvers import DPMSolverMultistep
from fastsample.solvers.exponential import History, phi


@pytest.fixture(scope="module")
def ring_problem():
    with jax.enable_x64(True):
        p = fs.VPLinear()
        d = GaussianMixture.ring(n=8, radius=2.0, std=0.3).denoiser(p)
        x_T = fs.prior(p, jax.random.PRNGKey(3), (64, 2), jnp.float64)
        ref = fs.reference_solve(d, x_T)
    return p, d, x_T, ref


def _order(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# Singlestep and second-order multistep methods show their order from the driver directly.
# Steps 16..128 on a uniform log-SNR grid are in the asymptotic regime for this mixture.
@pytest.mark.parametrize("name,order", [
    ("dpm_solver_2", 2), ("dpm_solver_3", 3), ("dpmpp_2s", 2), ("dpmpp_3s", 3),
    ("dpmpp_2m", 2), ("dpm_solver_2m", 2),
])
def test_convergence_order(x64, ring_problem, name, order):
    p, d, x_T, ref = ring_problem
    s = fs.get_solver(name)
    steps = np.array([16, 32, 64, 128])
    errors = [float(jnp.sqrt(jnp.mean((fs.sample(d, x_T, s, nfe=s.nfe(int(n)), schedule="logsnr_uniform") - ref) ** 2)))
              for n in steps]
    assert abs(_order(errors, steps) - order) < 0.35, errors


@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("exact,expected", [(True, 3), (False, 2)])
def test_third_order_multistep_with_exact_history(x64, ring_problem, prediction, exact, expected):
    """A multistep method started with a lower-order warm-up has its global error limited by
    the warm-up's local error (order 1 first step => order 2). The method's own order is measured
    the standard way: start on the exact trajectory with exact earlier model outputs. The
    published 3M update (exact=False) is second order; the corrected one third order."""
    p, d, x_T, _ = ring_problem
    s = DPMSolverMultistep(order=3, prediction=prediction, lower_order_final=False, exact_third_order=exact)
    lam_a, lam_b = -3.0, 4.0
    sign = 1.0 if prediction == "x0" else -1.0
    errors, steps = [], np.array([16, 32, 64, 128])
    x_end = fs.reference_solve(d, x_T, t_end=float(p.t_from_log_snr(lam_b)))
    for n in steps:
        h = (lam_b - lam_a) / n
        lams = lam_a + h * np.arange(-2, n + 1)
        ts = p.t_from_log_snr(jnp.asarray(lams))
        xs = [fs.reference_solve(d, x_T, t_end=float(t)) for t in ts[:3]]
        ms = [d.predict(x, t, target=prediction) for x, t in zip(xs[:2], ts[:2], strict=True)]
        state = History(jnp.stack([ms[1], ms[0]]), sign * jnp.asarray([lams[1], lams[0]]),
                        jnp.asarray(2, jnp.int32), jnp.asarray(0, jnp.int32), jnp.asarray(-1, jnp.int32),
                        ts[-1])

        def body(carry, i, ts=ts):
            x, st = carry
            return s.update(d, ts[i], ts[i + 1], x, None, st), None

        (x, _), _ = jax.lax.scan(body, (xs[2], state), jnp.arange(2, n + 2))
        errors.append(float(jnp.sqrt(jnp.mean((x - x_end) ** 2))))
    assert abs(_order(errors, steps) - expected) < 0.35, errors


def test_multistep_weights_integrate_polynomials_exactly(x64):
    """x1 = (s1/s0) x + s1 int e^lambda m(lambda) dlambda: order-k weights must be exact for
    outputs that are polynomials of degree k-1 in lambda (the published 3M update: degree 1)."""
    from fastsample.solvers._shared import dpm_weights

    l0, h, lm1, lm2 = 0.3, 0.7, -0.2, -1.1
    r0, r1 = (l0 - lm1) / h, (lm1 - lm2) / h
    nodes = np.polynomial.legendre.leggauss(30)
    u = l0 + h * (nodes[0] + 1) / 2
    for order, d2, exact_degree in [(2, 1.0, 1), (3, 2.0, 2), (3, 1.0, 1)]:
        w = np.asarray(dpm_weights(jnp.asarray(h), jnp.asarray(r0), jnp.asarray(r1), order, False, 3, d2))
        for degree in range(3):
            exact = np.sum(nodes[1] * h / 2 * np.exp(u - (l0 + h)) * u**degree)
            approx = np.dot(w, np.array([l0, lm1, lm2]) ** degree)
            if degree <= exact_degree:
                assert abs(approx - exact) < 1e-12, (order, d2, degree)
            else:
                assert abs(approx - exact) > 1e-4, (order, d2, degree)


@pytest.mark.parametrize("name", ["dpm_solver_1", "dpmpp_2m", "dpm_solver_2m", "dpmpp_3m"])
def test_first_order_members_equal_ddim(x64, ring_problem, name):
    p, d, x_T, _ = ring_problem
    s = fs.get_solver(name)
    if isinstance(s, DPMSolverMultistep):
        s = DPMSolverMultistep(order=1, prediction=s.prediction)
    for nfe in (1, 3, 10):
        np.testing.assert_allclose(fs.sample(d, x_T, s, nfe=nfe), fs.sample(d, x_T, "ddim", nfe=nfe),
                                   rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_matches_the_published_update(x64, ring_problem):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), written out here in lambda form:
    x_i = (s_i/s_{i-1}) x - a_i (e^{-h_i} - 1) D_i, D_i = (1 + 1/(2 r_i)) m_{i-1} - 1/(2 r_i) m_{i-2}."""
    p, d, x_T, _ = ring_problem
    ts = np.asarray(fs.get_timesteps(p, 6, "logsnr_uniform"))
    x, ms = x_T, []
    for i in range(1, len(ts)):
        m = d(x, ts[i - 1])
        a1, s1 = p.alpha_sigma(ts[i])
        s0 = p.sigma(ts[i - 1])
        lam = lambda t: float(p.log_snr(t))
        h = lam(ts[i]) - lam(ts[i - 1])
        if not ms or i == len(ts) - 1:  # warm-up and lower_order_final (6 < 15 steps)
            D = m
        else:
            r = (lam(ts[i - 1]) - lam(ts[i - 2])) / h
            D = (1 + 1 / (2 * r)) * m - 1 / (2 * r) * ms[-1]
        x = (s1 / s0) * x - a1 * (np.exp(-h) - 1) * D
        ms.append(m)
    np.testing.assert_allclose(fs.sample(d, x_T, "dpmpp_2m", nfe=6, schedule="logsnr_uniform"), x, rtol=1e-11,
                               atol=1e-11)


def test_phi_functions_are_accurate_near_zero(x64):
    z = jnp.asarray([-1e-8, -1e-3, -0.5, -0.999, -1.001, -3.0, 2.0])
    np.testing.assert_allclose(phi(1, z), np.expm1(np.asarray(z)) / np.asarray(z), rtol=1e-13)
    zz = np.asarray(z, dtype=np.longdouble)
    exact2 = (np.expm1(zz) - zz) / zz**2
    exact3 = (np.expm1(zz) - zz - zz**2 / 2) / zz**3
    np.testing.assert_allclose(phi(2, z), exact2.astype(np.float64), rtol=1e-8)
    np.testing.assert_allclose(phi(3, z)[1:], exact3.astype(np.float64)[1:], rtol=1e-6)
    np.testing.assert_allclose(phi(3, jnp.asarray(-1e-8)), 1 / 6, rtol=1e-7)


SOLVERS = ["dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_3s", "dpmpp_2m", "dpmpp_3m", "dpm_solver_3m"]


def test_singlestep_refuses_a_start_at_pure_noise():
    d = fs.Denoiser(lambda x, t, c: 0 * x, fs.FlowMatching(), "x0")
    with pytest.raises(ValueError, match=r"dpmpp_2s needs a grid that starts at a finite log-SNR"):
        fs.sample(d, jnp.ones((1, 2)), "dpmpp_2s", nfe=5, schedule="time_uniform")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m"])
def test_flow_matching_from_pure_noise_to_data(x64, name):
    """Data-prediction solvers start at alpha = 0 and end at sigma = 0 without NaN; for
    single-point data they are exact."""
    point = jnp.asarray([0.3, -0.2])
    d = fs.Denoiser(lambda x, t, c: jnp.broadcast_to(point, x.shape) + 0 * x, fs.FlowMatching(), "x0")
    x = fs.sample(d, jax.random.normal(jax.random.PRNGKey(0), (4, 2)), name, nfe=fs.get_solver(name).nfe(5, True),
                  schedule="time_uniform")
    np.testing.assert_allclose(x, jnp.broadcast_to(point, x.shape), atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="order must be in 1..3; got 4"):
        DPMSolverMultistep(order=4)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun'"):
        DPMSolverMultistep(solver_type="rk")
    with pytest.raises(ValueError, match=r"dpm_solver_3 cannot use exactly nfe=10; reachable NFE: \[3, 6, 9"):
        fs.sample(fs.Denoiser(lambda x, t, c: x, fs.VPLinear(), "x0"), jnp.ones((1, 2)), "dpm_solver_3", nfe=10)


def test_exact_third_order_equals_deis_with_data_prediction(x64, ring_problem):
    """Both integrate the exponential weight against the quadratic through the last three
    outputs in log-SNR: the corrected 3M update (with the Taylor, "heun", second-order warm-up
    step) and DEIS(3, x0) are the same method."""
    from fastsample.solvers import DEIS

    p, d, x_T, _ = ring_problem
    a = fs.sample(d, x_T, DPMSolverMultistep(order=3, prediction="x0", exact_third_order=True, solver_type="heun"),
                  nfe=12)
    b = fs.sample(d, x_T, DEIS(order=3, prediction="x0"), nfe=12)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_step_size_meets_tighter_tolerances(x64, ring_problem, order):
    p, d, x_T, ref = ring_problem
    errors, nfes = [], []
    for rtol in (0.05, 0.005, 0.0005):
        info = fs.solve(d, x_T, "dpm_solver_adaptive", nfe=None,
                            solver_options=dict(order=order, rtol=rtol, atol=1e-5))
        x = info.x
        errors.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
        nfes.append(info.stats["nfe"])
    assert errors[0] > errors[1] > errors[2] and nfes[0] < nfes[1] < nfes[2], (errors, nfes)
    assert errors[2] < 1e-3


def test_adaptive_reports_the_model_calls_it_made_and_its_budget():
    calls = []

    def model(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return 0.5 * x

    d = fs.Denoiser(model, fs.VPLinear(), "x0")
    info = fs.solve(d, jnp.ones((2, 2)), "dpm_solver_adaptive", nfe=None, final_zero=True)
    x = info.x
    x.block_until_ready()
    jax.effects_barrier()
    assert info.stats["nfe"] == len(calls) > 0 and np.all(np.isfinite(np.asarray(x)))
    with pytest.raises(ValueError, match=r"did not reach t_end=0.001 within nfe=6 model evaluations"):
        fs.sample(d, jnp.ones((2, 2)), "dpm_solver_adaptive", nfe=6)


def test_convergence_order_on_the_64d_digits_mixture(x64):
    """The same orders in 64-D (diagonal digits mixture under VPLinear, uniform log-SNR grid).
    Its sharp components put the asymptotic regime at 64..256 steps."""
    p = fs.VPLinear()
    d = GaussianMixture.digits(covariance="diag").denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(0), (32, 64))
    ref = fs.reference_solve(d, x_T)
    steps = np.array([64, 128, 256])
    for name, order in [("ddim", 1), ("dpmpp_2m", 2), ("dpm_solver_3", 3)]:
        s = fs.get_solver(name)
        errors = [float(jnp.sqrt(jnp.mean((fs.sample(d, x_T, s, nfe=s.nfe(int(n)), schedule="logsnr_uniform")
                                           - ref) ** 2))) for n in steps]
        assert abs(_order(errors, steps) - order) < 0.35, (name, errors)


def test_dpm_solver_fast_spends_any_budget_exactly(x64, ring_problem):
    from fastsample.solvers import DPMSolverSinglestep
    from fastsample.solvers.dpm_solver import fast_orders

    assert fast_orders(3, 9) == (3, 3, 2, 1) and fast_orders(3, 10) == (3, 3, 3, 1)
    assert fast_orders(3, 11) == (3, 3, 3, 2) and fast_orders(2, 7) == (2, 2, 2, 1)
    p, d, x_T, _ = ring_problem
    info = fs.solve(d, x_T, "dpm_solver_fast", nfe=11, schedule="logsnr_uniform")
    x = info.x
    assert (info.stats["nfe"], info.stats["steps"]) == (11, 4)
    # the same as chaining singlestep steps of orders 3, 3, 3, 2 on the same grid
    ts, y = info.grid.times, x_T
    for i, k in enumerate((3, 3, 3, 2)):
        y, _ = DPMSolverSinglestep(order=k, prediction="eps").update(d, ts[i], ts[i + 1], y, None, None)
    np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("final_zero", [False, True])
def test_dpm_solver_fast_model_calls(final_zero):
    from _helpers import counting

    model, calls = counting(lambda x, t, c: 0.5 * x)
    d = fs.Denoiser(model, fs.VPLinear(), "x0")
    for nfe in (1, 8):  # every budget is spent exactly (one more budget: test_contracts.py)
        calls.clear()
        info = fs.solve(d, jnp.ones((2, 2)), "dpm_solver_fast", nfe=nfe, final_zero=final_zero)
        x = info.x
        x.block_until_ready()
        jax.effects_barrier()
        assert info.stats["nfe"] == nfe == len(calls) and np.all(np.isfinite(np.asarray(x)))
    with pytest.raises(ValueError, match="dpm_solver_fast is configured for 0 steps"):
        fs.sample(d, jnp.ones((2, 2)), "dpm_solver_fast", nfe=None, timesteps=jnp.array([1.0, 0.5, 0.1]))

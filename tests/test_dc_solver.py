"""DC-Solver: unit ratios reproduce the base solvers, the compensation is Lagrange interpolation
at the shifted time, fitted ratios beat the base on held-out noise, and the cascade polynomial
regression reproduces and interpolates searched ratios."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_nfe_matches_calls, counting

import fastsample as fs
from fastsample.learned import ReferenceSet, load_solver, make_reference, save_solver
from fastsample.learned.dc_solver import CascadeRegression, DCSolver, compensate, fit_dc_solver, lagrange_weights
from fastsample.models import ClassConditionalMixture, GaussianMixture
from fastsample.solvers.exponential import History


def _ring(process, n=16):
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (n, 2), jnp.float64)
    return denoiser, x_T


@pytest.mark.parametrize("base", ["unipc", "dpmpp_2m", "dpmpp_3m"])
def test_unit_ratios_reproduce_the_base_solver(x64, base):
    process = fs.VPDiscrete.ddpm_linear()
    denoiser, x_T = _ring(process)
    want = fs.sample(denoiser, x_T, base, nfe=6, schedule="logsnr_uniform", final_zero=True)
    got = fs.sample(denoiser, x_T, DCSolver(base, steps=6), nfe=6, schedule="logsnr_uniform", final_zero=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)
    # the first dc_order ratios have no effect (too few outputs to interpolate); later ones do
    early = DCSolver(base, jnp.array([0.3, 1.7, 1.0, 1.0, 1.0, 1.0]))
    late = DCSolver(base, jnp.array([1.0, 1.0, 1.0, 0.8, 1.0, 1.0]))
    got_early = fs.sample(denoiser, x_T, early, nfe=6, schedule="logsnr_uniform", final_zero=True)
    got_late = fs.sample(denoiser, x_T, late, nfe=6, schedule="logsnr_uniform", final_zero=True)
    np.testing.assert_allclose(np.asarray(got_early), np.asarray(want), rtol=0, atol=1e-12)
    assert float(jnp.max(jnp.abs(got_late - want))) > 1e-3


def _history(values, nodes, x):
    """A History holding ``values`` (oldest first) produced at ``nodes``."""
    hist = History.empty(len(values), x, 0.0, None)
    for v, s in zip(values, nodes, strict=True):
        hist = hist.push(v, jnp.asarray(s, x.dtype))
    return hist


def test_compensation_is_lagrange_interpolation_at_the_shifted_time(x64):
    coef = jnp.array([[0.3, -1.0, 2.0], [1.5, 0.2, -0.7], [-0.4, 0.9, 0.25]])  # three quadratics in t
    quadratic = lambda t: coef[:, 0] + coef[:, 1] * t + coef[:, 2] * t**2
    cubic = lambda t: quadratic(t) + 3.0 * t**3
    s0, s1, s2 = 0.5, 0.62, 0.8  # newest first (time decreases while sampling)
    ratio = 0.7
    tau = s1 + ratio * (s0 - s1)
    x = jnp.zeros(3)
    for poly, exact in ((quadratic, True), (cubic, False)):
        hist = _history([poly(s2), poly(s1)], [s2, s1], x)
        got = compensate(poly(s0), jnp.asarray(s0), hist, jnp.asarray(ratio), 2)
        err = float(jnp.max(jnp.abs(got - poly(tau))))
        assert (err < 1e-13) if exact else (err > 1e-3)
    # degree 1 (two nodes) is exact on lines only
    line = lambda t: coef[:, 0] + coef[:, 1] * t
    got = compensate(line(s0), jnp.asarray(s0), _history([line(s1)], [s1], x), jnp.asarray(ratio), 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(line(tau)), atol=1e-13)
    # ratio 1 returns the newest output exactly; too short a history returns it whatever the ratio
    hist = _history([cubic(s2), cubic(s1)], [s2, s1], x)
    assert jnp.array_equal(compensate(cubic(s0), jnp.asarray(s0), hist, jnp.asarray(1.0), 2), cubic(s0))
    short = _history([cubic(s2), cubic(s1)], [s2, s1], x)._replace(count=jnp.asarray(1))
    assert jnp.array_equal(compensate(cubic(s0), jnp.asarray(s0), short, jnp.asarray(0.5), 2), cubic(s0))
    w = lagrange_weights([0.1, 0.4, 0.9, 1.3], 0.7)
    assert abs(float(jnp.sum(w)) - 1.0) < 1e-14
    assert jnp.array_equal(lagrange_weights([0.1, 0.4, 0.9], 0.1), jnp.array([1.0, 0.0, 0.0]))


def test_compensated_step_uses_the_interpolant_at_tau(x64):
    """Inside a predictor-only solver, the first compensated step is the base step fed the
    interpolated output: model outputs quadratic in t make the interpolant exact, ``p(tau)``."""
    process = fs.VPDiscrete.ddpm_linear()
    coef = jnp.array([0.3, -1.2, 0.8])
    p = lambda t: (coef[0] + coef[1] * t + coef[2] * t**2) * jnp.array([1.0, -2.0])
    denoiser = fs.Denoiser(lambda x, t, cond: jnp.broadcast_to(p(t), x.shape).astype(x.dtype), process, "x0")
    ts = jnp.asarray(fs.get_timesteps(process, 5, "time_uniform"), jnp.float64)
    x = jnp.ones((1, 2))
    ratio = 0.55
    dc = DCSolver("dpmpp_2m", jnp.array([1.0, 1.0, ratio, 1.0, 1.0]))
    base = dc.base
    s_dc = dc.init_state(denoiser, x, None, ts[-1], 5)
    s_b = base.init_state(denoiser, x, None, ts[-1], 5)
    x_dc = x_b = x
    for i in range(2):
        x_dc, s_dc = dc.update(denoiser, ts[i], ts[i + 1], x_dc, None, s_dc)
        x_b, s_b = base.update(denoiser, ts[i], ts[i + 1], x_b, None, s_b)
    tau = ts[1] + ratio * (ts[2] - ts[1])
    want, _ = base.advance(process, ts[2], ts[3], x_b, jnp.broadcast_to(p(tau), x.shape), s_b)
    got, _ = dc.update(denoiser, ts[2], ts[3], x_dc, None, s_dc)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-13)
    plain, _ = base.update(denoiser, ts[2], ts[3], x_b, None, s_b)
    assert float(jnp.max(jnp.abs(plain - want))) > 1e-4


def test_nfe_is_the_base_solvers():
    process = fs.VPDiscrete.ddpm_linear()
    model, calls = counting(GaussianMixture.ring(n=4).denoiser(process).model)
    denoiser = fs.Denoiser(model, process, "x0")
    assert_nfe_matches_calls(denoiser, DCSolver("unipc", jnp.array([1.0, 1.0, 0.9, 1.1, 1.0])), calls, [5], True)


def test_errors(x64):
    with pytest.raises(ValueError, match="deterministic multistep solver"):
        DCSolver("heun", steps=4)
    with pytest.raises(ValueError, match="number of steps"):
        DCSolver("unipc")
    with pytest.raises(ValueError, match="dc_order"):
        DCSolver("unipc", steps=4, dc_order=0)
    with pytest.raises(ValueError, match="variable must be one of t, lambda"):
        DCSolver("unipc", steps=4, variable="sigma")
    with pytest.raises(ValueError, match="1-D array"):
        DCSolver("unipc", jnp.ones((2, 3)))
    process = fs.VPDiscrete.ddpm_linear()
    denoiser, x_T = _ring(process, n=2)
    with pytest.raises(ValueError, match="has 4 ratios .* the grid has 5 steps"):
        fs.sample(denoiser, x_T, DCSolver("unipc", steps=4), nfe=5)
    fitted = DCSolver("unipc", steps=4, timesteps=fs.get_timesteps(process, 4, "time_uniform"), process="VPDiscrete")
    with pytest.raises(ValueError, match="fitted for nfe=4; got nfe=6"):
        fs.sample(denoiser, x_T, fitted, nfe=6)
    with pytest.raises(ValueError, match="fitted for process VPDiscrete; got FlowMatching"):
        fs.sample(GaussianMixture.ring(n=4).denoiser(fs.FlowMatching()), x_T, fitted)
    empty = jnp.zeros((0,))
    ref = ReferenceSet(x_T, x_T, float(process.t_max), 0.0, empty, empty, empty)  # no trajectory
    with pytest.raises(ValueError, match="trajectory_points"):
        fit_dc_solver(denoiser, ref, ref, 5)
    with pytest.raises(ValueError, match="objective must be one of greedy, endpoint"):
        fit_dc_solver(denoiser, ref, ref, 5, objective="global")


def _guided_toy():
    classes = [GaussianMixture([[2.0, 0.0], [0.0, 2.0]], [0.1, 0.2]), GaussianMixture([[-2.0, 0.0], [0.0, -2.0]],
                                                                                     [0.3, 0.05])]
    return ClassConditionalMixture(classes, [0.6, 0.4])


@pytest.mark.slow
def test_fitted_ratios_beat_the_base_and_save_as_a_program(x64, tmp_path):
    """The paper's greedy search on 10 noises under guidance (w = 3) lowers the held-out RMSE of
    UniPC at NFE 5 (time-uniform grid, the reference code's default); the fitted solver samples
    through ``fastsample.sample`` on its grid, and its program saves, loads and samples the same."""
    process = fs.VPDiscrete.ddpm_linear()
    denoiser = _guided_toy().guided_denoiser(process, 0, 3.0)
    train = make_reference(denoiser, jax.random.PRNGKey(1), 10, (2,), trajectory_points=100, dtype=jnp.float64)
    val = make_reference(denoiser, jax.random.PRNGKey(2), 64, (2,), dtype=jnp.float64)
    solver, report = fit_dc_solver(denoiser, train, val, 5, base="unipc", schedule="time_uniform", iterations=30)
    assert report.fitted_rmse < 0.7 * report.base_rmse
    assert [h["step"] for h in report.history] == [2, 3, 4]
    assert all(h["loss_fitted"] <= h["loss_base"] for h in report.history)
    assert np.all(report.ratios[:2] == 1.0) and np.any(np.abs(report.ratios[2:] - 1.0) > 1e-2)
    x = fs.sample(denoiser, val.x_T, solver)
    assert abs(float(jnp.sqrt(jnp.mean((x - val.x_end) ** 2))) - report.fitted_rmse) < 1e-12
    program = solver.to_program_solver(denoiser)
    loaded = load_solver(save_solver(tmp_path / "dc", program, extra={"ratios": report.ratios.tolist()}))
    assert loaded.method == "dc_solver" and loaded.base == "unipc"
    np.testing.assert_allclose(np.asarray(fs.sample(denoiser, val.x_T, loaded)), np.asarray(x), atol=1e-10)


def _synthetic_ratios(nfe, scale, theta, warmup=2):
    """Ratios from a known cascade polynomial (degrees 2, 2, 2) -- the first ``warmup`` are 1."""
    i = np.arange(nfe)
    x, g, nu = (i + 1) / nfe, scale / 12.0, nfe / 50.0
    r = sum(theta[a, b, c] * x**a * g**b * nu**c for a in range(3) for b in range(3) for c in range(3))
    return np.where(i < warmup, 1.0, r)


def test_cascade_regression_reproduces_and_interpolates():
    theta = np.random.default_rng(0).normal(size=(3, 3, 3)) * 0.3
    # a single budget: the NFE direction is undetermined (minimum-norm fit), the rest is exact
    configs = [(5, 1.5), (5, 3.0), (5, 7.5)]
    ratios = [_synthetic_ratios(n, w, theta) for n, w in configs]
    cpr = CascadeRegression.fit(configs, ratios)
    for (n, w), r in zip(configs, ratios, strict=True):
        np.testing.assert_allclose(cpr.predict(n, w), r, atol=1e-10)
    np.testing.assert_allclose(cpr.predict(5, 5.0), _synthetic_ratios(5, 5.0, theta), atol=1e-10)
    # budgets and scales: an unseen (NFE, scale) pair is predicted exactly
    configs = [(n, w) for n in (5, 8, 10) for w in (1.5, 3.0, 7.5)]
    cpr = CascadeRegression.fit(configs, [_synthetic_ratios(n, w, theta) for n, w in configs])
    np.testing.assert_allclose(cpr.predict(6, 5.0), _synthetic_ratios(6, 5.0, theta), atol=1e-9)
    assert cpr.degrees == (2, 2, 2) and np.all(cpr.predict(6, 5.0)[:2] == 1.0)
    # too low a degree in the guidance scale cannot reproduce quadratic dependence
    linear = CascadeRegression.fit(configs, [_synthetic_ratios(n, w, theta) for n, w in configs], degrees=(2, 1, 2))
    assert np.max(np.abs(linear.predict(6, 5.0) - _synthetic_ratios(6, 5.0, theta))) > 1e-3
    # the predicted ratios drive a DC solver directly
    assert DCSolver("unipc", jnp.asarray(cpr.predict(6, 5.0))).steps == 6


def test_cascade_regression_errors():
    with pytest.raises(ValueError, match="one ratio array per configuration"):
        CascadeRegression.fit([(5, 1.0)], [])
    with pytest.raises(ValueError, match="needs 5 finite ratios"):
        CascadeRegression.fit([(5, 1.0)], [np.ones(4)])
    with pytest.raises(ValueError, match="above warmup=2"):
        CascadeRegression.fit([(2, 1.0)], [np.ones(2)])
    with pytest.raises(ValueError, match="degrees must be three non-negative integers"):
        CascadeRegression.fit([(5, 1.0)], [np.ones(5)], degrees=(2, 2))
    cpr = CascadeRegression.fit([(5, 1.0)], [np.ones(5)])
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        cpr.predict(0, 1.0)

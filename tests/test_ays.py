"""Align Your Steps (fastsample.learned.ays): closed forms on Gaussian data, the Monte-Carlo KLUB,
hierarchical refinement, early stopping and error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.learned import ays
from fastsample.models import GaussianMixture

S_MIN, S_MAX = 0.002, 80.0


def _gaussian(c, dim, n=2000):
    mixture = GaussianMixture.gaussian(np.zeros(dim), c * c)
    return mixture.denoiser(fs.EDM(S_MIN, S_MAX)), mixture.sample(jax.random.PRNGKey(1), n)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_coordinate_refinement_recovers_the_ddim_closed_form(x64, c):
    """Theorem 3.1: for data N(0, c^2 I) and DDIM, t_i = c tan(lerp(atan(t_min/c), atan(t_max/c), i/n))."""
    closed = ays.gaussian_euler_optimum(c, S_MIN, S_MAX, 10)
    r = np.arange(11) / 10
    np.testing.assert_allclose(closed[::-1], c * np.tan((1 - r) * np.arctan(S_MIN / c) + r * np.arctan(S_MAX / c)))
    found, _ = ays.refine_schedule(ays.gaussian_euler_kl_cost(c), np.geomspace(S_MAX, S_MIN, 11), sweeps=40)
    np.testing.assert_allclose(found, closed, rtol=0.02)
    assert np.max(np.abs(found / closed - 1)) < 0.005


def test_ddim_cost_is_the_log_of_ddims_variance_ratio(x64):
    """The cost summed over a grid is -2 log(r), r = DDIM's output scale over the exact one (App. A.1)."""
    c = 0.7
    mixture = GaussianMixture.gaussian(np.zeros(1), c * c)
    process = fs.EDM(S_MIN, S_MAX)
    sigmas = np.array([S_MAX, 9.0, 2.0, 0.5, 0.1, S_MIN])
    x = fs.sample(mixture.denoiser(process), jnp.ones((1, 1)), "ddim", timesteps=jnp.asarray(sigmas))
    ratio = float(x[0, 0]) * np.sqrt((c**2 + S_MAX**2) / (c**2 + S_MIN**2))
    cost = np.sum(ays.gaussian_euler_kl_cost(c)(sigmas[1:], sigmas[:-1]))
    np.testing.assert_allclose(cost, -2 * np.log(ratio), rtol=1e-10)


def test_klub_estimator_matches_lemma_3_3(x64):
    """Monte-Carlo KLUB (importance sampling, eq. 15) against the integrated closed form (eq. 13)."""
    c = 0.5
    denoiser, data = _gaussian(c, 16)
    sigmas = np.array([S_MAX, 5.0, 1.0, 0.3, 0.05, S_MIN])
    exact = ays.gaussian_klub_cost(c)(sigmas[1:], sigmas[:-1])
    cost = ays.klub_cost(denoiser, data, key=jax.random.PRNGKey(0), num_samples=4096)
    np.testing.assert_allclose(cost(sigmas[1:], sigmas[:-1]), exact, rtol=0.04)
    # the exact interval cost is the integral it claims to be (trapezoid in log sigma)
    lo, hi = 0.3, 1.0
    s = np.geomspace(lo, hi, 20001)
    f = c**4 * s**-3 * (1 / (s**2 + c**2) - 1 / (hi**2 + c**2)) * s
    np.testing.assert_allclose(ays.gaussian_klub_cost(c)(lo, hi), np.trapezoid(f, np.log(s)), rtol=1e-7)


def test_gaussian_klub_optimum_is_stationary_and_not_the_ddim_optimum(x64):
    c = 0.5
    opt = ays.gaussian_klub_optimum(c, S_MIN, S_MAX, 10)
    cost = ays.gaussian_klub_cost(c)

    def total(s):
        return np.sum(cost(s[1:], s[:-1]))

    for i in range(1, 10):
        for f in (0.99, 1.01):
            moved = opt.copy()
            moved[i] *= f
            assert total(moved) > total(opt)
    # App. A.3: the KLUB optimum differs from Theorem 3.1's (here by a factor of ~10 at t_1)
    assert np.max(np.abs(opt / ays.gaussian_euler_optimum(c, S_MIN, S_MAX, 10) - 1)) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("c", [0.5, 2.0])
def test_optimize_ays_recovers_the_klub_optimum_of_gaussian_data(x64, c):
    """The Monte-Carlo KLUB optimiser finds the KLUB's own Gaussian optimum (not Theorem 3.1's, see above)."""
    denoiser, data = _gaussian(c, 32, n=20000)
    result = ays.optimize_ays(denoiser, data, 10, key=jax.random.PRNGKey(4), refinements=0, num_samples=2048,
                              sweeps=25, patience=None, num_candidates=9, average=8)
    np.testing.assert_allclose(result.sigmas, ays.gaussian_klub_optimum(c, S_MIN, S_MAX, 10), rtol=0.02)


@pytest.mark.slow
def test_hierarchical_refinement_and_use_as_a_schedule(x64):
    process = fs.VPDiscrete.ddpm_linear()
    mixture = GaussianMixture.ring(n=4)
    denoiser = mixture.denoiser(process)
    data = mixture.sample(jax.random.PRNGKey(0), 400)
    result = ays.optimize_ays(denoiser, data, 10, key=jax.random.PRNGKey(1), num_samples=16, val_samples=16,
                              sweeps=1, refine_sweeps=1, num_candidates=3)
    assert [s.shape[0] - 1 for s in result.stages] == [10, 20, 40]
    for coarse, fine in zip(result.stages[:-1], result.stages[1:], strict=True):
        np.testing.assert_array_equal(fine[::2], coarse)  # subdivision freezes the old points
    assert sorted({h["stage"] for h in result.history}) == [0, 1, 2]
    assert {h["steps"] for h in result.history if h["stage"] == 2} == {40}
    ts = result.timesteps
    assert ts.shape == (41,) and ts[0] == process.t_max and ts[-1] == process.t_min
    np.testing.assert_allclose(fs.get_timesteps(process, 40, "ays", sigmas=result.sigmas), ts, rtol=1e-6)
    np.testing.assert_allclose(result.timesteps_for(process, 40), ts, rtol=1e-6)
    x_T = fs.prior(process, jax.random.PRNGKey(2), (8, 2), jnp.float64)
    assert np.all(np.isfinite(fs.sample(denoiser, x_T, "dpmpp_2m", timesteps=jnp.asarray(ts))))


def test_flow_matching_needs_finite_ends_and_then_works(x64):
    process = fs.FlowMatching()
    mixture = GaussianMixture.ring(n=4)
    denoiser = mixture.denoiser(process)
    data = mixture.sample(jax.random.PRNGKey(0), 200)
    with pytest.raises(ValueError, match="sigma_max must be finite.*FlowMatching"):
        ays.optimize_ays(denoiser, data, 4, key=jax.random.PRNGKey(0))
    result = ays.optimize_ays(denoiser, data, 4, key=jax.random.PRNGKey(0), sigma_max=50.0, sigma_min=0.01,
                              refinements=1, num_samples=16, val_samples=16, sweeps=1, refine_sweeps=1,
                              num_candidates=3)
    ts = result.timesteps
    np.testing.assert_allclose(ts[[0, -1]], [50 / 51, 0.01 / 1.01], rtol=1e-9)
    assert np.all(np.diff(ts) < 0)


def test_early_stopping_keeps_the_best_held_out_schedule(x64):
    denoiser, data = _gaussian(1.0, 4)
    key = jax.random.PRNGKey(5)
    result = ays.optimize_ays(denoiser, data[:200], 10, key=key, refinements=0, num_samples=16, val_samples=64,
                              sweeps=60, patience=2, average=0, num_candidates=5)
    vals = [h["val_klub"] for h in result.history]
    best = int(np.argmin(vals))
    assert len(vals) - 1 < 60  # stopped early ...
    assert len(vals) - 1 - best == 2  # ... exactly `patience` sweeps after the best
    assert result.val_klub[0] == vals[best]
    # the returned schedule is the one with that held-out value (recomputed independently)
    val = data[:200][150:]
    again = ays.klub(denoiser, val, result.sigmas, key=jax.random.split(key)[1], num_samples=64)
    np.testing.assert_allclose(again, vals[best], rtol=1e-10)


def test_errors(x64):
    denoiser, data = _gaussian(1.0, 2)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"data must be an array of data samples x0 of shape \(M >= 2"):
        ays.optimize_ays(denoiser, data[0], 10, key=key)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2; got 1"):
        ays.optimize_ays(denoiser, data, 1, key=key)
    with pytest.raises(ValueError, match="init has 5 sigmas; num_steps=10 needs 11"):
        ays.optimize_ays(denoiser, data, 10, key=key, init=np.geomspace(S_MAX, S_MIN, 5))
    with pytest.raises(ValueError, match="init must be 'logsnr_uniform', 'karras' or an array"):
        ays.optimize_ays(denoiser, data, 10, key=key, init="cosine")
    with pytest.raises(ValueError, match=r"sigma_max\] = \[0.002.*, 100.0\] leaves the EDM noise range of EDM"):
        ays.optimize_ays(denoiser, data, 10, key=key, sigma_max=100.0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        ays.optimize_ays(denoiser, data, 10, key=key, val_fraction=1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ays.klub(denoiser, data, [0.1, 1.0], key=key)
    with pytest.raises(ValueError, match="num_candidates must be odd"):
        ays.refine_schedule(ays.gaussian_euler_kl_cost(1.0), [2.0, 1.0, 0.5], num_candidates=4)
    with pytest.raises(ValueError, match="patience needs a held-out `validate`"):
        ays.refine_schedule(ays.gaussian_euler_kl_cost(1.0), [2.0, 1.0, 0.5], patience=2)
    with pytest.raises(ValueError, match=r"free indices must be interior points in \[1, 1\]"):
        ays.refine_schedule(ays.gaussian_euler_kl_cost(1.0), [2.0, 1.0, 0.5], free=[0])

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import sqrtm

import fastsample as fs
from fastsample import data, metrics
from fastsample.models import GaussianMixture

# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", sorted(data.TOYS))
def test_toys_shapes_determinism_and_scale(name):
    x = np.asarray(data.load(name, 2000, seed=3))
    assert x.shape == (2000, 2)
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, np.asarray(data.load(name, 2000, seed=3)))
    np.testing.assert_array_equal(x, np.asarray(data.TOYS[name](jax.random.PRNGKey(3), 2000)))
    assert not np.allclose(x, np.asarray(data.load(name, 2000, seed=4)))
    # roughly standardised
    assert np.all(np.abs(x.mean(0)) < 0.4), x.mean(0)
    assert np.all((x.std(0) > 0.7) & (x.std(0) < 1.3)), x.std(0)


def test_checkerboard_only_black_squares():
    x = np.asarray(data.checkerboard(0, 5000))
    assert np.all(np.abs(x) <= 2.0)
    cells = np.floor(x).astype(int)
    parity = (cells[:, 0] + cells[:, 1]) % 2
    assert np.all(parity == parity[0])


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown toy.*checkerboard.*eight_gaussians.*moons.*rings.*swiss_roll"):
        data.load("spirals", 10)


def test_digits_split():
    xa, ya = data.digits("all")
    assert xa.shape == (1797, 64) and ya.shape == (1797,)
    assert xa.min() == -1.0 and xa.max() == 1.0
    xtr, ytr = data.digits("train", seed=1)
    xte, yte = data.digits("test", seed=1)
    assert xte.shape[0] == round(0.2 * 1797) and xtr.shape[0] + xte.shape[0] == 1797
    for x in (xtr, xte):
        assert np.all((x >= -1) & (x <= 1))
    # disjoint and covering: the rows of train + test are a permutation of all rows
    key = lambda x, y: sorted(map(bytes, np.concatenate([x, y[:, None]], 1)))
    assert key(np.concatenate([xtr, xte]), np.concatenate([ytr, yte])) == key(xa, ya)
    np.testing.assert_array_equal(xtr, data.digits("train", seed=1)[0])
    assert not np.array_equal(xte, data.digits("test", seed=2)[0])


# ---------------------------------------------------------------------------- metrics


def test_rmse_psnr_closed_form(x64):
    ref = jnp.zeros((4, 5))
    x = ref + 0.1
    np.testing.assert_allclose(metrics.rmse(x, ref), 0.1, rtol=1e-14)
    np.testing.assert_allclose(metrics.psnr(x, ref), 20 * np.log10(2.0 / 0.1), rtol=1e-14)
    np.testing.assert_allclose(metrics.psnr(x, ref, data_range=1.0), 20.0, rtol=1e-14)
    y = jnp.arange(6.0)
    np.testing.assert_allclose(metrics.rmse(y, 0 * y), np.sqrt(np.mean(np.arange(6.0) ** 2)), rtol=1e-14)


def test_sliced_wasserstein_shifted_gaussians(x64):
    mu = 1.5
    x = jax.random.normal(jax.random.PRNGKey(0), (4000, 1))
    y = jax.random.normal(jax.random.PRNGKey(1), (4000, 1)) + mu
    # 1-D: W2(N(0,1), N(mu,1)) = |mu|, for equal and unequal sizes
    assert abs(float(metrics.sliced_wasserstein(x, y, jax.random.PRNGKey(2), 8)) - mu) < 0.05
    assert abs(float(metrics.sliced_wasserstein(x, y[:3000], jax.random.PRNGKey(2), 8)) - mu) < 0.05
    # 3-D shift along e1: W2^2 along theta is mu^2 theta_1^2 and E theta_1^2 = 1/3
    x3 = jax.random.normal(jax.random.PRNGKey(3), (4000, 3))
    y3 = jax.random.normal(jax.random.PRNGKey(4), (4000, 3)).at[:, 0].add(mu)
    sw = float(metrics.sliced_wasserstein(x3, y3, jax.random.PRNGKey(5), 1024))
    assert abs(sw - mu / np.sqrt(3)) < 0.06 * mu / np.sqrt(3), sw
    same = float(metrics.sliced_wasserstein(x3, x3, jax.random.PRNGKey(5), 64))
    assert same == 0.0


def test_mmd_same_vs_shifted_and_unbiased(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (400, 2))
    y = jax.random.normal(jax.random.PRNGKey(1), (400, 2))
    same = float(metrics.mmd(x, y))
    shifted = float(metrics.mmd(x, y + 1.0))
    assert abs(same) < 0.01 and shifted > 0.1, (same, shifted)

    def one(key):
        k1, k2 = jax.random.split(key)
        return metrics.mmd(jax.random.normal(k1, (30, 2)), jax.random.normal(k2, (40, 2)), bandwidth=1.0)

    vals = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(2), 2000)))
    assert abs(vals.mean()) < 3 * vals.std() / np.sqrt(vals.size), (vals.mean(), vals.std())
    assert np.mean(vals < 0) > 0.2  # unbiased: not clipped, often negative


def _frechet_closed_form(m1, c1, m2, c2):
    s1 = sqrtm(c1)
    return np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * np.real(sqrtm(s1 @ c2 @ s1)))


def test_frechet_distance_closed_form(x64):
    m1, m2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.5, 0.0])
    c1 = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]])
    c2 = np.array([[0.4, -0.1, 0.2], [-0.1, 1.2, 0.0], [0.2, 0.0, 0.6]])
    n = 40000
    x = np.random.default_rng(0).multivariate_normal(m1, c1, n)
    y = np.random.default_rng(1).multivariate_normal(m2, c2, n)
    exact = _frechet_closed_form(m1, c1, m2, c2)
    fd = float(metrics.frechet_distance(x, y))
    assert abs(fd - exact) < 0.03 * exact, (fd, exact)
    # on the sample moments it agrees with scipy's sqrtm to rounding
    sample = _frechet_closed_form(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    np.testing.assert_allclose(fd, sample, rtol=1e-10)
    assert float(metrics.frechet_distance(x, x)) < 1e-12
    assert float(jax.jit(metrics.frechet_distance)(x, x)) < 1e-12


def test_gmm_nll_and_mode_coverage(x64):
    ring = GaussianMixture.ring()
    x = ring.sample(jax.random.PRNGKey(0), 4000)
    np.testing.assert_allclose(metrics.gmm_nll(ring, x), -np.mean(ring.log_prob(x)), rtol=1e-14)
    assert float(metrics.mode_coverage(ring, x)) == 1.0
    assert float(metrics.mode_weight_error(ring, x)) < 0.05
    half = GaussianMixture(ring.means[:4], np.full(4, 0.04))
    xh = half.sample(jax.random.PRNGKey(1), 4000)
    assert float(metrics.mode_coverage(ring, xh)) == 0.5
    np.testing.assert_allclose(float(metrics.mode_weight_error(ring, xh)), 1.0, atol=0.05)


# ---------------------------------------------------------------------------- PF-ODE likelihood

P = fs.VPLinear()


def _data_end(g, key, n):
    return g.sample(key, n, P.alpha(P.t_min), P.sigma(P.t_min))


def test_pf_ode_log_likelihood_gaussian_exact_trace(x64):
    g = GaussianMixture.gaussian(np.array([0.05, -0.02]), 0.36 * np.eye(2))
    x = _data_end(g, jax.random.PRNGKey(0), 16)
    lp = metrics.pf_ode_log_likelihood(g.denoiser(P), x, exact_trace=True, rtol=1e-8, atol=1e-8)
    exact = g.log_prob(x, P.alpha(P.t_min), P.sigma(P.t_min))
    assert lp.shape == (16,)
    np.testing.assert_allclose(lp, exact, atol=1e-3)

    # A larger mean: with the exact marginal at t_max in place of the N(0, sigma^2) prior the
    # change of variables is exact to the ODE tolerance.
    g = GaussianMixture.gaussian(np.array([1.0, -0.5]), 0.36 * np.eye(2))
    x = _data_end(g, jax.random.PRNGKey(1), 16)
    lp, x_T, delta = metrics.pf_ode_log_likelihood(
        g.denoiser(P), x, rtol=1e-8, atol=1e-8, solver=diffrax.Dopri5(), return_parts=True
    )
    exact = g.log_prob(x, P.alpha(P.t_min), P.sigma(P.t_min))
    np.testing.assert_allclose(g.log_prob(x_T, P.alpha(P.t_max), P.sigma(P.t_max)) + delta, exact, atol=1e-6)
    assert float(jnp.max(jnp.abs(lp - exact))) > 1e-3  # the neglected alpha(t_max) m is visible here


def test_pf_ode_log_likelihood_hutchinson_unbiased(x64):
    cov = np.array([[1.0, 0.6, 0.1], [0.6, 0.8, -0.3], [0.1, -0.3, 0.5]])
    g = GaussianMixture.gaussian(np.array([0.05, -0.02, 0.03]), cov)
    d = g.denoiser(P)
    x = _data_end(g, jax.random.PRNGKey(1), 4)
    exact = metrics.pf_ode_log_likelihood(d, x)  # dimension 3: exact trace by default
    np.testing.assert_allclose(exact, g.log_prob(x, P.alpha(P.t_min), P.sigma(P.t_min)), atol=1e-3)
    with pytest.raises(ValueError, match="key"):
        metrics.pf_ode_log_likelihood(d, x, exact_trace=False)
    R = 256
    for probe in ("rademacher", "gaussian"):
        est = metrics.pf_ode_log_likelihood(
            d, jnp.tile(x, (R, 1)), key=jax.random.PRNGKey(3), exact_trace=False, probe=probe
        ).reshape(R, 4)
        err = np.asarray(est.mean(0) - exact)
        se = np.asarray(est.std(0)) / np.sqrt(R)
        assert np.all(se > 1e-3)  # a genuine estimator (full covariance: off-diagonal Jacobian)
        assert np.all(np.abs(err) < 4 * se), (probe, err, se)

"""Tests for the analytic Gaussian mixture ground-truth model."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from fastsample.models.gaussian_mixture import GaussianMixture

KINDS = ("isotropic", "diagonal", "full")
ALPHA_SIGMA = [(1.0, 1e-3), (0.99, 0.1), (0.8, 0.6), (0.3, 1.0), (1e-3, 1.0), (2.0, 0.5)]


@pytest.fixture(autouse=True)
def x64():
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def random_params(kind, dim, k=3, seed=0):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(k, dim))
    if kind == "isotropic":
        covs = rng.uniform(0.2, 1.0, size=k)
    elif kind == "diagonal":
        covs = rng.uniform(0.1, 1.5, size=(k, dim))
    else:
        a = 0.5 * rng.normal(size=(k, dim, dim))
        covs = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(dim)
    weights = rng.dirichlet(np.ones(k))
    return means, covs, weights


def dense_covs(kind, covs, dim):
    if kind == "isotropic":
        return covs[:, None, None] * np.eye(dim)
    if kind == "diagonal":
        return np.stack([np.diag(c) for c in covs])
    return covs


@eqx.filter_jit
def _sample(gm, key, n, alpha, sigma):
    return gm.sample(key, n, alpha, sigma)


@eqx.filter_jit
def _quantities(gm, x, alpha, sigma):
    """Everything at once under one jit (alpha, sigma traced), to keep compile time down."""
    grad = jax.vmap(jax.grad(lambda y: gm.log_prob(y, alpha, sigma)))(x)
    return dict(
        x0=gm.x0(x, alpha, sigma),
        score=gm.score(x, alpha, sigma),
        eps=gm.eps(x, alpha, sigma),
        log_prob=gm.log_prob(x, alpha, sigma),
        grad=grad,
    )


@eqx.filter_jit
def _call(gm, name, x, alpha, sigma):
    return getattr(gm, name)(x, alpha, sigma)


def call(gm, name, x, alpha=1.0, sigma=0.0):
    """``gm.<name>(x, alpha, sigma)`` under jit (one compile instead of many eager ops), as numpy."""
    return np.asarray(_call(gm, name, jnp.asarray(x), jnp.asarray(alpha, float), jnp.asarray(sigma, float)))


def quantities(gm, x, alpha, sigma):
    out = _quantities(gm, jnp.asarray(x), jnp.asarray(alpha, float), jnp.asarray(sigma, float))
    return {k: np.asarray(v) for k, v in out.items()}


def make_points(gm, alpha, sigma, seed=1):
    """Points from the noised marginal plus some far-off points."""
    key = jax.random.key(seed)
    near = _sample(gm, key, 32, jnp.asarray(alpha, float), jnp.asarray(sigma, float))
    far = 3.0 * jax.random.normal(jax.random.fold_in(key, 1), (8, gm.dim))
    return np.concatenate([np.asarray(near), np.asarray(far)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("alpha,sigma", ALPHA_SIGMA)
def test_tweedie_score_eps_consistency(kind, dim, alpha, sigma):
    gm = GaussianMixture(*random_params(kind, dim))
    assert gm.kind == kind
    xn = make_points(gm, alpha, sigma)
    q = quantities(gm, xn, alpha, sigma)
    x0, score, eps, grad = q["x0"], q["score"], q["eps"], q["grad"]

    np.testing.assert_allclose(x0, (xn + sigma**2 * score) / alpha, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(eps, -sigma * score, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(eps, (xn - alpha * x0) / sigma, rtol=1e-7, atol=1e-7)

    rel = np.linalg.norm(score - grad, axis=-1) / np.linalg.norm(grad, axis=-1)
    assert rel.max() < 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_scipy_mixture(kind):
    dim = 5
    means, covs, weights = random_params(kind, dim, k=3, seed=3)
    gm = GaussianMixture(means, covs, weights)
    full = dense_covs(kind, covs, dim)
    for alpha, sigma in [(1.0, 0.0), (0.7, 0.5), (1e-3, 1.0)]:
        x = make_points(gm, alpha, sigma)
        comp = np.stack(
            [
                multivariate_normal(alpha * means[k], alpha**2 * full[k] + sigma**2 * np.eye(dim)).logpdf(x)
                for k in range(len(weights))
            ],
            axis=-1,
        )
        expected = logsumexp(np.log(weights) + comp, axis=-1)
        np.testing.assert_allclose(call(gm, "log_prob", x, alpha, sigma), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_x0_at_sigma_zero_is_x_over_alpha(kind, alpha):
    gm = GaussianMixture(*random_params(kind, 5))
    x = make_points(gm, alpha, 0.0)
    q = quantities(gm, x, alpha, 0.0)
    assert all(np.all(np.isfinite(v)) for v in q.values())
    np.testing.assert_allclose(q["x0"], x / alpha, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(q["score"], q["grad"], rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(q["eps"], 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0])
def test_x0_at_alpha_zero_is_mixture_mean(kind, sigma):
    means, covs, weights = random_params(kind, 5)
    gm = GaussianMixture(means, covs, weights)
    x = make_points(gm, 0.0, sigma)
    expected = np.broadcast_to(weights @ means, x.shape)
    np.testing.assert_allclose(quantities(gm, x, 0.0, sigma)["x0"], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gm.mean()), weights @ means, rtol=1e-14)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (0.7, 0.4)])
def test_log_prob_normalises_1d(alpha, sigma):
    gm = GaussianMixture([[-2.0], [0.5], [3.0]], [0.3, 0.05, 1.2], [0.2, 0.5, 0.3])
    grid = np.linspace(-15.0, 15.0, 30001)
    dens = np.exp(call(gm, "log_prob", grid[:, None], alpha, sigma))
    assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-4


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (0.6, 0.8)])
def test_log_prob_normalises_2d_full(alpha, sigma):
    gm = GaussianMixture(*random_params("full", 2, k=3, seed=5))
    lim, n = 14.0, 561
    g = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], axis=-1)
    dens = np.exp(call(gm, "log_prob", pts, alpha, sigma)).reshape(n, n)
    h = g[1] - g[0]
    assert abs(dens.sum() * h * h - 1.0) < 1e-4


def test_single_gaussian_log_prob_matches_scipy_full():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + 0.2 * np.eye(4)
    mean = rng.normal(size=4)
    gm = GaussianMixture.gaussian(mean, cov)
    assert gm.kind == "full" and gm.num_components == 1 and gm.dim == 4
    x = rng.normal(size=(50, 4)) * 2
    np.testing.assert_allclose(
        call(gm, "log_prob", x), multivariate_normal(mean, cov).logpdf(x), rtol=0, atol=1e-10
    )
    alpha, sigma = 0.6, 0.9
    np.testing.assert_allclose(
        call(gm, "log_prob", x, alpha, sigma),
        multivariate_normal(alpha * mean, alpha**2 * cov + sigma**2 * np.eye(4)).logpdf(x),
        rtol=0,
        atol=1e-10,
    )


@pytest.mark.parametrize("cov_kind", ["scalar", "diag", "full"])
@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.3), (0.5, 1.0), (0.05, 0.9)])
def test_single_gaussian_x0_closed_form(cov_kind, alpha, sigma):
    rng = np.random.default_rng(11)
    d = 3
    m = rng.normal(size=d)
    if cov_kind == "scalar":
        cov_arg = 0.7
        c = 0.7 * np.eye(d)
    elif cov_kind == "diag":
        cov_arg = rng.uniform(0.2, 2.0, size=d)
        c = np.diag(cov_arg)
    else:
        a = rng.normal(size=(d, d))
        cov_arg = c = a @ a.T + 0.1 * np.eye(d)
    gm = GaussianMixture.gaussian(m, cov_arg)
    x = rng.normal(size=(20, d)) * 2
    gain = alpha * c @ np.linalg.inv(alpha**2 * c + sigma**2 * np.eye(d))
    expected = m + (x - alpha * m) @ gain.T
    np.testing.assert_allclose(call(gm, "x0", x, alpha, sigma), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(gm.covariance()), c, rtol=1e-12, atol=1e-12)


def _check_moments(samples, mean, cov, nse=5.0):
    samples = np.asarray(samples)
    n = samples.shape[0]
    mean_hat = samples.mean(0)
    centered = samples - mean_hat
    se_mean = centered.std(0) / np.sqrt(n)
    assert np.all(np.abs(mean_hat - mean) < nse * se_mean), (mean_hat, mean)
    prods = centered[:, :, None] * centered[:, None, :]
    cov_hat = prods.mean(0)
    se_cov = prods.std(0) / np.sqrt(n)
    assert np.all(np.abs(cov_hat - cov) < nse * se_cov + 1e-12), (cov_hat, cov)


@pytest.mark.parametrize("dim", [2, 4])  # in 2-D, eigh's U is often symmetric, hiding U vs U^T mix-ups
def test_sample_moments_full_mixture(dim):
    gm = GaussianMixture(*random_params("full", dim, k=3, seed=2))
    mean, cov = np.asarray(gm.mean()), np.asarray(gm.covariance())
    sample = eqx.filter_jit(GaussianMixture.sample)  # python-int n is static under filter_jit
    xs = sample(gm, jax.random.key(0), 200_000)
    assert xs.shape == (200_000, dim) and xs.dtype == jnp.float64
    _check_moments(xs, mean, cov)
    alpha, sigma = 0.6, 0.8
    xt = sample(gm, jax.random.key(1), 200_000, alpha, sigma)
    _check_moments(xt, alpha * mean, alpha**2 * cov + sigma**2 * np.eye(dim))


def test_sample_component_frequencies_and_spread():
    gm = GaussianMixture.grid(n=3, spacing=4.0, std=0.1)
    xs = np.asarray(_sample(gm, jax.random.key(3), 9000, 1.0, 0.0))
    idx = np.argmin(((xs[:, None, :] - np.asarray(gm.means)) ** 2).sum(-1), axis=1)
    counts = np.bincount(idx, minlength=9)
    assert np.all(np.abs(counts - 1000) < 5 * np.sqrt(1000 * (1 - 1 / 9)))
    resid = xs - np.asarray(gm.means)[idx]
    assert abs(resid.std() - 0.1) < 0.005


def test_covariance_law_of_total_variance():
    means, covs, weights = random_params("diagonal", 3, k=4, seed=9)
    gm = GaussianMixture(means, covs, weights)
    m = weights @ means
    expected = sum(
        w * (np.diag(c) + np.outer(mu - m, mu - m)) for w, mu, c in zip(weights, means, covs, strict=True)
    )
    np.testing.assert_allclose(np.asarray(gm.covariance()), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gm.covariances), dense_covs("diagonal", covs, 3), rtol=1e-14)


def test_ring_and_grid():
    ring = GaussianMixture.ring(n=8, radius=4.0, std=0.2)
    assert ring.kind == "isotropic" and ring.num_components == 8 and ring.dim == 2
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ring.means), axis=1), 4.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ring.mean()), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ring.eigvals), 0.04, rtol=1e-12)
    grid = GaussianMixture.grid(n=5, spacing=2.0, std=0.1)
    assert grid.num_components == 25 and grid.dim == 2
    m = np.asarray(grid.means)
    assert m.min() == -4.0 and m.max() == 4.0
    np.testing.assert_allclose(m.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grid.weights), 1 / 25, rtol=1e-12)


def test_batch_dims_and_vmap():
    gm = GaussianMixture(*random_params("full", 3))
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 5, 3)))
    assert jax.eval_shape(gm.x0, x, 0.8, 0.6).shape == (4, 5, 3)
    assert jax.eval_shape(gm.log_prob, x, 0.8, 0.6).shape == (4, 5)
    out = call(gm, "x0", x, 0.8, 0.6)
    flat = call(gm, "x0", x.reshape(20, 3), 0.8, 0.6)
    np.testing.assert_allclose(out.reshape(20, 3), flat, rtol=1e-13)
    alphas = jnp.array([0.9, 0.5, 0.1])
    sigmas = jnp.sqrt(1 - alphas**2)
    batched = np.asarray(jax.jit(jax.vmap(gm.x0, in_axes=(None, 0, 0)))(x[0], alphas, sigmas))
    for i in range(3):
        np.testing.assert_allclose(
            batched[i], call(gm, "x0", x[0], alphas[i], sigmas[i]), rtol=1e-12, atol=1e-12
        )


def test_filter_jit_does_not_retrace_on_new_values():
    traces = []

    @eqx.filter_jit
    def f(model, x):
        traces.append(1)
        return model.x0(x, 0.7, 0.7)

    x = jnp.ones((2, 3))
    a = GaussianMixture(*random_params("full", 3, seed=0))
    b = GaussianMixture(*random_params("full", 3, seed=1))
    ya, yb = f(a, x), f(b, x)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(yb), call(b, "x0", x, 0.7, 0.7), rtol=1e-12)
    assert not np.allclose(np.asarray(ya), np.asarray(yb))


def test_dtypes_follow_inputs():
    means, covs, weights = random_params("full", 2)
    gm32 = GaussianMixture(means.astype(np.float32), covs.astype(np.float32), weights)
    assert gm32.means.dtype == jnp.float32 and gm32.eigvecs.dtype == jnp.float32
    for method in ("x0", "score", "eps", "log_prob"):
        f = getattr(gm32, method)
        assert jax.eval_shape(f, jnp.ones(2, jnp.float32), 0.5, 0.5).dtype == jnp.float32
        assert jax.eval_shape(f, jnp.ones(2, jnp.float64), 0.5, 0.5).dtype == jnp.float64
    assert jax.eval_shape(lambda k: gm32.sample(k, 3, 0.5, 0.5), jax.random.key(0)).dtype == jnp.float32
    gm64 = GaussianMixture(means, covs, weights)
    assert gm64.means.dtype == jnp.float64
    assert jax.eval_shape(gm64.x0, jnp.ones(2, jnp.float32), 0.5, 0.5).dtype == jnp.float64
    jax.config.update("jax_enable_x64", False)  # restored by the x64 fixture
    gm = GaussianMixture(means, covs, weights)
    assert gm.means.dtype == jnp.float32
    x = _sample(gm, jax.random.key(0), 10, 0.5, 0.5)
    assert x.dtype == jnp.float32
    out = eqx.filter_jit(GaussianMixture.x0)(gm, x, 0.5, 0.5)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def test_bad_inputs():
    means = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"means must have shape \(K, D\)"):
        GaussianMixture(np.zeros(3), np.ones(3))
    with pytest.raises(
        ValueError,
        match=r"covariances must have shape \(K,\), \(K, D\) or \(K, D, D\) "
        r"with K=3, D=2; got \(4, 2\)",
    ):
        GaussianMixture(means, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"covariances must have shape .*got \(3, 2, 3\)"):
        GaussianMixture(means, np.ones((3, 2, 3)))
    with pytest.raises(ValueError, match=r"weights must have shape \(K,\) with K=3; got \(2,\)"):
        GaussianMixture(means, np.ones(3), [0.5, 0.5])
    with pytest.raises(ValueError, match="weights must be nonnegative"):
        GaussianMixture(means, np.ones(3), [1.5, -0.25, -0.25])
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixture(means, np.ones(3), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="must be positive; component 1"):
        GaussianMixture(means, np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="must be positive"):
        GaussianMixture(means, np.array([[1.0, 1.0], [1.0, -2.0], [1.0, 1.0]]))
    eye = np.broadcast_to(np.eye(2), (3, 2, 2)).copy()
    indefinite = eye.copy()
    indefinite[2] = [[1.0, 2.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="positive definite; component 2"):
        GaussianMixture(means, indefinite)
    singular = eye.copy()
    singular[0] = [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="positive definite; component 0"):
        GaussianMixture(means, singular)
    asym = eye.copy()
    asym[1] = [[1.0, 0.5], [0.0, 1.0]]
    with pytest.raises(ValueError, match="must be symmetric; component 1"):
        GaussianMixture(means, asym)
    with pytest.raises(ValueError, match="means must be finite"):
        GaussianMixture(np.full((3, 2), np.nan), np.ones(3))
    with pytest.raises(ValueError, match="covariance must be 'full', 'diag' or 'spherical'"):
        GaussianMixture.digits(covariance="tied")


def test_zero_weight_component_is_ignored():
    means = np.array([[0.0, 0.0], [5.0, 5.0]])
    gm = GaussianMixture(means, np.array([1.0, 1.0]), [1.0, 0.0])
    single = GaussianMixture.gaussian(means[0], 1.0)
    x = jnp.array([[4.0, 4.0], [0.3, -0.2]])
    for f in ("x0", "score", "eps", "log_prob"):
        np.testing.assert_allclose(call(gm, f, x, 0.8, 0.6), call(single, f, x, 0.8, 0.6), rtol=1e-12)


def test_digits():
    from sklearn.datasets import load_digits

    gm = GaussianMixture.digits(n_components=10)
    assert gm.dim == 64 and gm.num_components == 10 and gm.kind == "full"
    np.testing.assert_allclose(float(gm.weights.sum()), 1.0, rtol=1e-12)
    data = load_digits().data / 8.0 - 1.0
    assert data.min() == -1.0 and data.max() == 1.0
    lp = call(gm, "log_prob", data)
    assert np.all(np.isfinite(lp))
    xs = np.asarray(_sample(gm, jax.random.key(0), 2000, 1.0, 0.0))
    assert np.mean(np.abs(xs) <= 1.5) > 0.95
    np.testing.assert_allclose(call(gm, "x0", data[:20], 1.0, 0.0), data[:20], atol=1e-10)
    diag = GaussianMixture.digits(n_components=4, covariance="diag")
    assert diag.kind == "diagonal" and diag.eigvecs is None
    iso = GaussianMixture.digits(n_components=4, covariance="spherical")
    assert iso.kind == "isotropic" and iso.eigvals.shape == (4, 64)
    np.testing.assert_allclose(np.asarray(iso.eigvals), np.asarray(iso.eigvals)[:, :1] * np.ones(64), rtol=0)


def test_construction_under_jit_is_differentiable():
    """Built from traced arrays (value checks skipped); parameter gradients match finite differences."""
    means, covs, weights = random_params("full", 3, k=2, seed=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))

    def f(m, c):
        return GaussianMixture(m, c, weights).log_prob(x, 0.8, 0.6).sum()

    gm_grad, gc_grad = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(means), jnp.asarray(covs))
    h = 1e-6
    dm = np.zeros_like(means)
    dm[1, 2] = h
    fd_m = (f(means + dm, covs) - f(means - dm, covs)) / (2 * h)
    np.testing.assert_allclose(float(gm_grad[1, 2]), float(fd_m), rtol=1e-6)
    dc = np.zeros_like(covs)
    dc[0, 0, 1] = dc[0, 1, 0] = h
    fd_c = (f(means, covs + dc) - f(means, covs - dc)) / (2 * h)
    np.testing.assert_allclose(float(gc_grad[0, 0, 1] + gc_grad[0, 1, 0]), float(fd_c), rtol=1e-6)

"""Sample-quality metrics: pointwise errors, distances between sample sets, mixture-based scores
and the probability-flow ODE log-likelihood.

All functions work in the dtype of their inputs (use float64 for reference numbers) and, except
where noted, can be called inside ``jax.jit``.
"""

from __future__ import annotations

import functools
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from ._compat import as_float as _as_float
from .denoisers import Denoiser
from .terms import ProbabilityFlowTerm

__all__ = [
    "digits_classifier",
    "rmse",
    "psnr",
    "sliced_wasserstein",
    "mmd",
    "frechet_distance",
    "gmm_nll",
    "mode_coverage",
    "mode_weight_error",
    "pf_ode_log_likelihood",
    "digits_features",
    "bits_per_dim",
]




def _as_2d(x, name):
    x = _as_float(x)
    if x.ndim == 1:
        return x[:, None]
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape (n, ...); got {x.shape}")
    return x.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------- pointwise


def rmse(x, ref):
    """Root-mean-square error over all elements: ``sqrt(mean((x - ref)^2))``."""
    x, ref = _as_float(x), _as_float(ref)
    return jnp.sqrt(jnp.mean((x - ref) ** 2))


def psnr(x, ref, data_range: float = 2.0):
    """Peak signal-to-noise ratio in dB: ``20 log10(data_range) - 10 log10(mean((x - ref)^2))``.

    ``data_range`` is the width of the value range (2 for data in ``[-1, 1]``). ``+inf`` when
    ``x == ref``.
    """
    x, ref = _as_float(x), _as_float(ref)
    mse = jnp.mean((x - ref) ** 2)
    return 20.0 * jnp.log10(jnp.asarray(data_range, mse.dtype)) - 10.0 * jnp.log10(mse)


# ---------------------------------------------------------------------------- sample sets


def _quantiles(sorted_proj, levels):
    """Empirical quantile function of sorted ``(n, P)`` columns at ``levels`` in ``(0, 1)``
    (linear interpolation between the order statistics placed at ``(i + 1/2) / n``)."""
    n = sorted_proj.shape[0]
    pos = (jnp.arange(n, dtype=sorted_proj.dtype) + 0.5) / n
    return jax.vmap(lambda col: jnp.interp(levels, pos, col), in_axes=1, out_axes=1)(sorted_proj)


def sliced_wasserstein(x, y, key, num_projections: int = 128, p: float = 2):
    """Sliced Wasserstein-``p`` distance ``(E_theta W_p^p(theta.x, theta.y))^(1/p)``.

    Directions ``theta`` are uniform on the unit sphere (``num_projections`` Monte-Carlo draws from
    ``key``). Equal sample sizes compare sorted projections; unequal sizes compare the empirical
    quantile functions (linear interpolation) on ``max(n, m)`` evenly spaced levels.

    Args:
        x: ``(n, ...)`` samples (flattened to ``(n, D)``).
        y: ``(m, ...)`` samples with the same trailing size ``D``.
        key: PRNG key for the directions.
        num_projections: number of directions (static).
        p: order ``p >= 1``.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {x.shape[1]} and {y.shape[1]}")
    dtype = jnp.result_type(x, y)
    theta = jax.random.normal(key, (num_projections, x.shape[1]), dtype)
    theta = theta / jnp.linalg.norm(theta, axis=1, keepdims=True)
    px = jnp.sort(x.astype(dtype) @ theta.T, axis=0)
    py = jnp.sort(y.astype(dtype) @ theta.T, axis=0)
    n, m = px.shape[0], py.shape[0]
    if n != m:
        L = max(n, m)
        levels = (jnp.arange(L, dtype=dtype) + 0.5) / L
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return jnp.mean(jnp.abs(px - py) ** p) ** (1.0 / p)


def _sq_dists(a, b):
    d = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d, 0.0)


def mmd(x, y, bandwidth=None):
    """Unbiased estimate of the squared maximum mean discrepancy ``MMD^2`` with the RBF kernel
    ``k(a, b) = exp(-||a - b||^2 / (2 h^2))``.

    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``
    (Gretton et al., 2012); it can be slightly negative. ``bandwidth=None`` uses the median
    heuristic: ``h`` = median of the pairwise distances between distinct points of the pooled sample
    (the estimate is then only approximately unbiased, because ``h`` depends on the data).
    Needs at least 2 samples in each set.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    dtype = jnp.result_type(x, y)
    x, y = x.astype(dtype), y.astype(dtype)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples in each set; got {n} and {m}")
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    if bandwidth is None:
        z = jnp.concatenate([x, y])
        iu = jnp.triu_indices(n + m, k=1)
        h2 = jnp.median(_sq_dists(z, z)[iu])
    else:
        h2 = jnp.asarray(bandwidth, dtype) ** 2
    k = lambda d: jnp.exp(-d / (2.0 * h2))
    kxx = (jnp.sum(k(dxx)) - n) / (n * (n - 1))  # the diagonal is exp(0) = 1
    kyy = (jnp.sum(k(dyy)) - m) / (m * (m - 1))
    kxy = jnp.mean(k(dxy))
    return kxx + kyy - 2.0 * kxy


def _sqrtm_psd(c):
    w, v = jnp.linalg.eigh(0.5 * (c + c.T))
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T


def frechet_distance(x, y):
    """Fréchet (2-Wasserstein) distance, squared, between Gaussians fitted to two sample sets:

    ``||m1 - m2||^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2})`` (the FID formula), with
    sample means and unbiased (``n - 1``) covariances. The trace of the matrix square root is the
    sum of square roots of the eigenvalues of the symmetric PSD product ``C1^{1/2} C2 C1^{1/2}``
    (``eigh``, negative round-off clipped to zero), which is stable for singular covariances.
    The result is clipped at zero.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    dtype = jnp.result_type(x, y)
    x, y = x.astype(dtype), y.astype(dtype)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {x.shape[1]} and {y.shape[1]}")
    m1, m2 = jnp.mean(x, 0), jnp.mean(y, 0)
    c1 = (x - m1).T @ (x - m1) / (x.shape[0] - 1)
    c2 = (y - m2).T @ (y - m2) / (y.shape[0] - 1)
    s1 = _sqrtm_psd(c1)
    prod = s1 @ c2 @ s1
    eig = jnp.linalg.eigvalsh(0.5 * (prod + prod.T))
    tr_sqrt = jnp.sum(jnp.sqrt(jnp.maximum(eig, 0.0)))
    d = jnp.sum((m1 - m2) ** 2) + jnp.trace(c1) + jnp.trace(c2) - 2.0 * tr_sqrt
    return jnp.maximum(d, 0.0)


@functools.lru_cache(maxsize=4)
@functools.lru_cache(maxsize=4)
def digits_classifier(seed: int = 0):
    """The scikit-learn ``MLPClassifier`` (one hidden layer of 64 ReLUs, ``random_state=seed``)
    trained on the digits train split of ``seed``: the feature map of :func:`digits_features` and a
    reward for fine-tuning experiments. Trained once per seed and process."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from .data import digits

    x, y = digits("train", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed).fit(x, y)


def digits_features(x, seed: int = 0):
    """Features of 8x8 digits (pixels in ``[-1, 1]``, shape ``(n, 64)``) for a Frechet distance in
    a learned feature space, the recipe of FID (Heusel et al., GANs Trained by a Two Time-Scale
    Update Rule Converge to a Local Nash Equilibrium, 2017) at digit scale: the 64 ReLU activations
    of the hidden layer of a one-hidden-layer classifier (scikit-learn ``MLPClassifier``, fixed
    ``random_state``) trained on the digits train split of ``seed``. In raw pixels a Gaussian with
    the data's mean and covariance is nearly unbeatable by the Frechet distance, which compares
    only means and covariances; in this nonlinear feature space it is not moment-matched.

    Runs in NumPy (not jittable); returns a float64 ``(n, 64)`` array."""
    import numpy as np

    clf = digits_classifier(int(seed))
    x = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    if x.shape[1] != clf.coefs_[0].shape[0]:
        raise ValueError(f"digits_features needs (n, 64) digit images; got shape {x.shape}.")
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def bits_per_dim(log_likelihood, dim: int, bin_width: float | None = None):
    """Negative log-likelihood in bits per dimension: ``-log p / (dim ln 2)``. With ``bin_width``
    (the quantisation step of discrete data, e.g. ``1/8`` for the digits' 17 levels in ``[-1, 1]``)
    it is the discrete bits/dim of uniformly dequantised data, ``-log p / (dim ln 2) - log2(bin_width)``
    (Theis et al., A Note on the Evaluation of Generative Models, 2016)."""
    bpd = -_as_float(log_likelihood) / (dim * math.log(2.0))
    return bpd if bin_width is None else bpd - math.log2(bin_width)


# ---------------------------------------------------------------------------- mixture scores


def gmm_nll(mixture, x, alpha=1.0, sigma=0.0):
    """Mean negative log-likelihood of ``x`` under the mixture's marginal at ``(alpha, sigma)``
    (defaults: the data distribution): ``-mean(mixture.log_prob(x, alpha, sigma))``."""
    return -jnp.mean(mixture.log_prob(x, alpha, sigma))


def _assignment_frequencies(mixture, x, alpha, sigma):
    r = mixture.responsibilities(x, alpha, sigma)
    labels = jnp.argmax(r.reshape(-1, r.shape[-1]), axis=-1)
    counts = jnp.zeros(mixture.num_components, r.dtype).at[labels].add(1.0)
    return counts / labels.shape[0]


def mode_coverage(mixture, x, threshold: float = 0.1, alpha=1.0, sigma=0.0):
    """Fraction of the mixture's components that receive samples.

    Each sample is assigned to its most responsible component (argmax of
    ``mixture.responsibilities``). Component ``k`` counts as covered when it gets at least one
    sample and its empirical frequency is at least ``threshold * w_k`` (a tenth of its expected
    share by default, so that a few stray samples do not count; ``threshold=0`` only asks for one
    sample).
    """
    freq = _assignment_frequencies(mixture, x, alpha, sigma)
    covered = (freq > 0) & (freq >= threshold * mixture.weights)
    return jnp.mean(covered.astype(freq.dtype))


def mode_weight_error(mixture, x, alpha=1.0, sigma=0.0):
    """L1 distance ``sum_k |f_k - w_k|`` between the empirical assignment frequencies ``f_k``
    (argmax of the responsibilities) and the mixture weights ``w_k``; in ``[0, 2]``, twice the
    total-variation distance between the two categorical distributions."""
    freq = _assignment_frequencies(mixture, x, alpha, sigma)
    return jnp.sum(jnp.abs(freq - mixture.weights))


# ---------------------------------------------------------------------------- PF-ODE likelihood

#: Default dimension up to which :func:`pf_ode_log_likelihood` takes the exact trace.
EXACT_TRACE_MAX_DIM = 16


def pf_ode_log_likelihood(
    denoiser: Denoiser,
    x0,
    key=None,
    exact_trace: bool | None = None,
    t_end: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    *,
    t_start: float | None = None,
    cond=None,
    probe: str = "rademacher",
    solver: diffrax.AbstractSolver | None = None,
    max_steps: int = 100_000,
    return_parts: bool = False,
):
    """Per-sample log-likelihood through the probability-flow ODE (instantaneous change of
    variables: Score SDE, Song et al. 2021; FFJORD, Grathwohl et al. 2019).

    The points ``x0`` are taken as states at ``t_start`` (default ``process.t_min``, the data end)
    and carried with the PF-ODE ``dx/dt = f(x, t)`` to ``t_end`` (default ``process.t_max``) by an
    adaptive diffrax solve (``Tsit5`` and a PID controller at ``rtol``/``atol`` by default), together
    with ``d delta / dt = div f(x, t)``. Then
    ``log p_{t_start}(x0) = log N(x_T; 0, sigma(t_end)^2 I) + delta(t_end)``. The prior neglects
    ``alpha(t_end) x0``, as :func:`fastsample.prior` and every sampler do, so the result is the
    likelihood of the model whose samples start from that prior.

    The divergence is the exact trace of the Jacobian (``jax.jacfwd``, one per sample) when
    ``exact_trace`` is true, and otherwise Hutchinson's estimate ``v^T (df/dx) v`` with a probe ``v``
    (``"rademacher"`` or ``"gaussian"``, drawn from ``key`` and held fixed along each trajectory),
    which is unbiased. ``exact_trace=None`` picks the exact trace when the per-sample dimension is
    at most ``EXACT_TRACE_MAX_DIM``. The model must treat the samples independently.

    Args:
        denoiser: the model (any process; ``sigma(t_start) > 0``).
        x0: ``(n, ...)`` points.
        key: PRNG key, needed for the Hutchinson estimator.
        exact_trace: see above.
        t_end: where the ODE stops and the prior is applied (default ``t_max``).
        rtol, atol: tolerances of the adaptive solve.
        t_start: the time at which ``x0`` lives (default ``t_min``).
        cond: conditioning passed to the model.
        probe: Hutchinson probe distribution.
        solver: a diffrax solver (default ``Tsit5()``; ``Dopri5()`` works too).
        max_steps: step cap of the solve.
        return_parts: also return the end state ``x_T`` and the integrated divergence ``delta``.

    Returns:
        ``(n,)`` log-likelihoods (in nats), or ``(log_likelihood, x_T, delta)`` with ``return_parts``.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian'; got {probe!r}")
    process = denoiser.process
    x0 = _as_float(x0)
    if x0.ndim < 1:
        raise ValueError(f"x0 must have shape (n, ...); got {x0.shape}")
    dim = math.prod(x0.shape[1:])
    if exact_trace is None:
        exact_trace = dim <= EXACT_TRACE_MAX_DIM
    t0 = process.t_min if t_start is None else t_start
    t1 = process.t_max if t_end is None else t_end
    if not t1 > t0:
        raise ValueError(f"need t_end > t_start; got t_start={t0}, t_end={t1}")
    if not float(process.sigma(jnp.asarray(t0, x0.dtype))) > 0:
        raise ValueError(f"pf_ode_log_likelihood needs sigma(t_start) > 0; got t_start={t0}")
    if exact_trace:
        v = None
    else:
        if key is None:
            raise ValueError("the Hutchinson estimator (exact_trace=False) needs a PRNG `key`")
        if probe == "rademacher":
            v = jax.random.rademacher(key, x0.shape, x0.dtype)
        else:
            v = jax.random.normal(key, x0.shape, x0.dtype)
    logp, x_T, delta = _pf_loglik(
        ProbabilityFlowTerm(denoiser), x0, v, jnp.asarray(t0, x0.dtype), jnp.asarray(t1, x0.dtype), cond,
        rtol, atol, solver or diffrax.Tsit5(), max_steps,
    )
    return (logp, x_T, delta) if return_parts else logp


@eqx.filter_jit
def _pf_loglik(term, x0, v, t0, t1, cond, rtol, atol, solver, max_steps):
    n = x0.shape[0]

    def drift(t, x):
        return term.vf(t, x, cond)

    def vf(t, state, args):
        x, _ = state
        if v is None:
            def single(xi):
                return drift(t, xi[None])[0]

            f = drift(t, x)
            jac = jax.vmap(jax.jacfwd(single))(x)  # (n, *shape, *shape)
            div = jnp.trace(jac.reshape(n, x[0].size, x[0].size), axis1=1, axis2=2)
        else:
            f, jv = jax.jvp(lambda y: drift(t, y), (x,), (v,))
            div = jnp.sum((v * jv).reshape(n, -1), axis=1)
        return f, div

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver, t0, t1, dt0=None, y0=(x0, jnp.zeros(n, x0.dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps,
    )
    x_T, delta = sol.ys[0][0], sol.ys[1][0]
    s = term.denoiser.process.sigma(t1)
    d = x_T[0].size
    flat = x_T.reshape(n, -1)
    log_prior = -0.5 * jnp.sum(flat**2, axis=1) / s**2 - d * jnp.log(s) - 0.5 * d * math.log(2.0 * math.pi)
    return log_prior + delta, x_T, delta

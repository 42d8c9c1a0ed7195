"""Gaussian mixture data distributions with exact noised marginals.

A Gaussian mixture stays a Gaussian mixture under the forward process
``x_t = alpha * x_0 + sigma * eps``: component ``k`` becomes
``N(alpha * mu_k, alpha^2 Sigma_k + sigma^2 I)``. Posterior means, scores and
log-densities are therefore available in closed form, which makes the mixture
the ground-truth model against which samplers are measured.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from .._compat import is_traced
from ..data import digits
from ..denoisers import Denoiser

_KINDS = ("isotropic", "diagonal", "full")


def _is_tracer(x) -> bool:
    return is_traced(x)


def _float_dtype(*dtypes):
    """Canonical JAX floating dtype that holds all ``dtypes`` (ints promote to float)."""
    dtype = np.result_type(*dtypes)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.float64
    return jax.dtypes.canonicalize_dtype(dtype)


class GaussianMixture(eqx.Module):
    """Mixture of ``K`` Gaussians in ``D`` dimensions, with exact noised marginals.

    This is the analytic model used as ground truth throughout the library: for the
    forward process ``x_t = alpha * x_0 + sigma * eps`` the posterior mean
    ``E[x_0 | x_t]`` (:meth:`x0`), the score (:meth:`score`), the noise prediction
    (:meth:`eps`), the density (:meth:`log_prob`) and samples (:meth:`sample`) of the
    noised marginal are all exact, for any ``(alpha, sigma)``.

    Component covariances are stored in eigen-form ``Sigma_k = U_k diag(s_k) U_k^T``
    so that ``alpha^2 Sigma_k + sigma^2 I = U_k diag(alpha^2 s_k + sigma^2) U_k^T``
    costs nothing extra for a new ``(alpha, sigma)``. Isotropic and diagonal
    mixtures skip the rotations (``eigvecs is None``) and use elementwise arithmetic.

    Attributes:
        means: ``(K, D)`` component means.
        weights: ``(K,)`` mixture weights (nonnegative, summing to 1).
        eigvals: ``(K, D)`` component variances along the principal axes (the
            eigenvalues ``s_k``; the diagonal for isotropic/diagonal mixtures).
        eigvecs: ``(K, D, D)`` orthonormal eigenvectors ``U_k`` (columns), or ``None``
            unless ``kind == "full"``.
        kind: ``"isotropic"``, ``"diagonal"`` or ``"full"`` (static).
    """

    means: jax.Array
    weights: jax.Array
    eigvals: jax.Array
    eigvecs: jax.Array | None
    kind: str = eqx.field(static=True)

    def __init__(self, means, covariances, weights=None):
        """Build a mixture.

        Args:
            means: ``(K, D)`` component means.
            covariances: ``(K,)`` isotropic variances, ``(K, D)`` diagonal variances,
                or ``(K, D, D)`` symmetric positive definite covariance matrices.
            weights: ``(K,)`` nonnegative mixture weights summing to 1; uniform if
                ``None``.

        Raises:
            ValueError: on wrong shapes, non-finite values, negative weights, weights
                not summing to 1, or covariances that are not (symmetric) positive
                definite. Value checks are skipped for traced (non-concrete) inputs.
        """
        traced = any(_is_tracer(a) for a in (means, covariances, weights))
        mod = jnp if traced else np
        means = mod.asarray(means)
        covariances = mod.asarray(covariances)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, D) with K >= 1 and D >= 1; got {means.shape}")
        K, D = means.shape
        allowed = [(K,), (K, D), (K, D, D)]
        if covariances.shape not in allowed:
            raise ValueError(
                f"covariances must have shape (K,), (K, D) or (K, D, D) with K={K}, D={D}; "
                f"got {covariances.shape}"
            )
        kind = _KINDS[covariances.ndim - 1]
        if weights is None:
            weights = mod.full((K,), 1.0 / K)
        else:
            weights = mod.asarray(weights)
            if weights.shape != (K,):
                raise ValueError(f"weights must have shape (K,) with K={K}; got {weights.shape}")
        dtype = _float_dtype(means.dtype, covariances.dtype)

        if traced:
            weights = weights / jnp.sum(weights)
            if kind == "isotropic":
                eigvals, eigvecs = jnp.broadcast_to(covariances[:, None], (K, D)), None
            elif kind == "diagonal":
                eigvals, eigvecs = covariances, None
            else:
                sym = 0.5 * (covariances + jnp.swapaxes(covariances, -1, -2))
                eigvals, eigvecs = jnp.linalg.eigh(sym)
        else:
            means64 = means.astype(np.float64)
            cov64 = covariances.astype(np.float64)
            w64 = weights.astype(np.float64)
            if not np.all(np.isfinite(means64)):
                raise ValueError("means must be finite")
            if not np.all(np.isfinite(cov64)):
                raise ValueError("covariances must be finite")
            if not np.all(np.isfinite(w64)):
                raise ValueError("weights must be finite")
            if np.any(w64 < 0):
                raise ValueError(f"weights must be nonnegative; got minimum weight {w64.min():.6g}")
            total = w64.sum()
            if abs(total - 1.0) > 1e-5:
                raise ValueError(f"weights must sum to 1 (within 1e-5); got sum {total:.8g}")
            weights = w64 / total
            if kind in ("isotropic", "diagonal"):
                if np.any(cov64 <= 0):
                    bad = int(np.argmin(cov64.reshape(K, -1).min(axis=1)))
                    raise ValueError(
                        f"{kind} covariances (variances) must be positive; component {bad} has "
                        f"variance {cov64.reshape(K, -1)[bad].min():.6g}"
                    )
                eigvals = np.broadcast_to(cov64.reshape(K, -1), (K, D)).copy()
                eigvecs = None
            else:
                scale = np.abs(cov64).max(axis=(1, 2), keepdims=True)
                asym = np.abs(cov64 - np.swapaxes(cov64, 1, 2)).max(axis=(1, 2), keepdims=True)
                if np.any(asym > 1e-6 * scale):
                    bad = int(np.argmax(asym.ravel() / np.maximum(scale.ravel(), 1e-300)))
                    raise ValueError(
                        f"full covariances must be symmetric; component {bad} has max |C - C^T| = "
                        f"{asym.ravel()[bad]:.3g}"
                    )
                sym = 0.5 * (cov64 + np.swapaxes(cov64, 1, 2))
                eigvals, eigvecs = np.linalg.eigh(sym)
                smin, smax = eigvals.min(axis=1), eigvals.max(axis=1)
                bad_mask = smin <= D * np.finfo(np.float64).eps * np.maximum(smax, 0.0)
                if np.any(bad_mask | (smax <= 0)):
                    bad = int(np.argmax(bad_mask | (smax <= 0)))
                    raise ValueError(
                        f"full covariances must be positive definite; component {bad} has eigenvalues "
                        f"in [{smin[bad]:.6g}, {smax[bad]:.6g}]"
                    )

        self.means = jnp.asarray(means, dtype)
        self.weights = jnp.asarray(weights, dtype)
        self.eigvals = jnp.asarray(eigvals, dtype)
        self.eigvecs = None if eigvecs is None else jnp.asarray(eigvecs, dtype)
        self.kind = kind

    # ------------------------------------------------------------------ properties

    @property
    def num_components(self) -> int:
        """Number of mixture components ``K``."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """Data dimension ``D``."""
        return self.means.shape[1]

    @property
    def covariances(self) -> jax.Array:
        """``(K, D, D)`` component covariance matrices (reassembled from eigen-form)."""
        if self.eigvecs is None:
            return jax.vmap(jnp.diag)(self.eigvals)
        return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

    # ------------------------------------------------------------------ internals

    def _cast(self, x, alpha, sigma):
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        dtype = jnp.result_type(x, alpha, sigma, self.means)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        return jnp.asarray(x, dtype), jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)

    def _to_eig(self, y):
        """Rotate ``(..., K, D)`` vectors into each component's eigenbasis: ``U_k^T y_k``."""
        if self.eigvecs is None:
            return y
        return jnp.einsum("kji,...kj->...ki", self.eigvecs, y)

    def _from_eig_sum(self, v):
        """``sum_k U_k v_k`` for ``(..., K, D)`` eigenbasis vectors -> ``(..., D)``."""
        if self.eigvecs is None:
            return jnp.sum(v, axis=-2)
        return jnp.einsum("kij,...kj->...i", self.eigvecs, v)

    def _parts(self, x, alpha, sigma):
        """Shared pieces of all closed forms.

        Returns ``(logits, w, alpha)``: ``logits`` ``(..., K)`` are
        ``log w_k + log N(x; alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I``,
        and ``w`` ``(..., K, D)`` is ``C_k^{-1} (x - alpha mu_k)`` in the eigenbasis of ``k``.
        """
        x, alpha, sigma = self._cast(x, alpha, sigma)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have shape (..., D) with D={self.dim}; got {x.shape}")
        lam = alpha**2 * self.eigvals + sigma**2  # (K, D): eigenvalues of C_k
        y = x[..., None, :] - alpha * self.means  # (..., K, D)
        z = self._to_eig(y)
        w = z / lam
        maha = jnp.sum(z * w, axis=-1)
        logdet = jnp.sum(jnp.log(lam), axis=-1)
        lognorm = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        logits = jnp.log(self.weights) + lognorm
        return logits, w, alpha

    # ------------------------------------------------------------------ closed forms

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """Exact log-density of the noised marginal ``p_t`` of ``alpha x_0 + sigma eps``.

        Args:
            x: ``(..., D)`` points.
            alpha, sigma: scalar noise-schedule values (defaults: the data distribution).

        Returns:
            ``(...,)`` log-densities.
        """
        logits, _, _ = self._parts(x, alpha, sigma)
        return logsumexp(logits, axis=-1)

    def responsibilities(self, x, alpha=1.0, sigma=0.0):
        """Posterior component probabilities ``p(k | x_t = x)``, shape ``(..., K)``."""
        logits, _, _ = self._parts(x, alpha, sigma)
        return jax.nn.softmax(logits, axis=-1)

    def x0(self, x, alpha, sigma):
        """Exact posterior mean ``E[x_0 | alpha x_0 + sigma eps = x]``.

        ``sum_k r_k(x) [mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^{-1} (x - alpha mu_k)]``
        with log-sum-exp stable responsibilities ``r_k``. Well defined at ``sigma = 0``
        (returns ``x / alpha``) and at ``alpha = 0`` (returns the mixture mean).

        Args:
            x: ``(..., D)`` noisy points.
            alpha, sigma: scalars (may be traced).

        Returns:
            ``(..., D)`` posterior means.
        """
        logits, w, alpha = self._parts(x, alpha, sigma)
        r = jax.nn.softmax(logits, axis=-1)
        mean_part = r @ self.means
        correction = self._from_eig_sum(r[..., None] * (self.eigvals * w))
        return mean_part + alpha * correction

    def score(self, x, alpha, sigma):
        """Exact score ``grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - alpha mu_k)``.

        Args:
            x: ``(..., D)`` noisy points.
            alpha, sigma: scalars (may be traced).

        Returns:
            ``(..., D)`` scores.
        """
        logits, w, _ = self._parts(x, alpha, sigma)
        r = jax.nn.softmax(logits, axis=-1)
        return -self._from_eig_sum(r[..., None] * w)

    def eps(self, x, alpha, sigma):
        """Exact noise prediction ``E[eps | x_t = x] = (x - alpha x0(x)) / sigma``.

        Evaluated in the algebraically equal form ``-sigma * score(x)``, which has no
        cancellation for small ``sigma``.

        Args:
            x: ``(..., D)`` noisy points.
            alpha, sigma: scalars (may be traced).

        Returns:
            ``(..., D)`` noise predictions.
        """
        x, alpha, sigma = self._cast(x, alpha, sigma)
        return -sigma * self.score(x, alpha, sigma)

    def sample(self, key, n: int, alpha=1.0, sigma=0.0):
        """Exact samples of ``alpha x_0 + sigma eps`` with ``x_0`` from the mixture.

        Args:
            key: PRNG key.
            n: number of samples (static).
            alpha, sigma: scalar schedule values (defaults: clean data samples).

        Returns:
            ``(n, D)`` samples.
        """
        dtype = jnp.result_type(self.means, alpha, sigma)
        alpha = jnp.asarray(alpha, dtype)
        sigma = jnp.asarray(sigma, dtype)
        k_comp, k_x0, k_eps = jax.random.split(key, 3)
        comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k_x0, (n, self.dim), dtype) * jnp.sqrt(self.eigvals[comp])
        if self.eigvecs is not None:
            z = jnp.einsum("nij,nj->ni", self.eigvecs[comp], z)
        x0 = self.means[comp] + z
        noise = jax.random.normal(k_eps, (n, self.dim), dtype)
        return alpha * x0 + sigma * noise

    def mean(self) -> jax.Array:
        """Mean of the data distribution, ``sum_k w_k mu_k``, shape ``(D,)``."""
        return self.weights @ self.means

    def covariance(self) -> jax.Array:
        """Covariance of the data distribution (law of total variance), shape ``(D, D)``."""
        m = self.mean()
        centered = self.means - m
        within = jnp.einsum("k,kij->ij", self.weights, self.covariances)
        between = jnp.einsum("k,ki,kj->ij", self.weights, centered, centered)
        return within + between

    def denoiser(self, process) -> Denoiser:
        """The exact denoiser of this mixture under ``process``: a :class:`~fastsample.Denoiser`
        predicting ``x0`` with :meth:`x0`, in the dtype of its input."""
        return Denoiser(_MixtureModel(self, process), process, "x0")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def gaussian(cls, mean, cov) -> GaussianMixture:
        """Single Gaussian ``N(mean, cov)``.

        Args:
            mean: ``(D,)`` mean.
            cov: scalar variance (isotropic), ``(D,)`` diagonal variances, or ``(D, D)``
                covariance matrix.
        """
        mean = np.asarray(mean) if not _is_tracer(mean) else mean
        cov = np.asarray(cov) if not _is_tracer(cov) else cov
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,); got {mean.shape}")
        if cov.ndim > 2:
            raise ValueError(f"cov must be a scalar, (D,) or (D, D) with D={mean.shape[0]}; got {cov.shape}")
        return cls(mean[None], cov[None])

    @classmethod
    def ring(cls, n: int = 8, radius: float = 4.0, std: float = 0.2) -> GaussianMixture:
        """2-D ring: ``n`` equally weighted isotropic components on a circle of ``radius``."""
        angles = 2 * np.pi * np.arange(n) / n
        means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return cls(means, np.full(n, float(std) ** 2))

    @classmethod
    def grid(cls, n: int = 5, spacing: float = 2.0, std: float = 0.1) -> GaussianMixture:
        """2-D ``n x n`` grid of equally weighted isotropic components centred at the origin."""
        coords = (np.arange(n) - (n - 1) / 2) * spacing
        gx, gy = np.meshgrid(coords, coords, indexing="ij")
        means = np.stack([gx.ravel(), gy.ravel()], axis=1)
        return cls(means, np.full(n * n, float(std) ** 2))

    @classmethod
    def fit(cls, x, n_components: int = 10, covariance: str = "full", reg_covar: float = 1e-2,
            seed: int = 0) -> GaussianMixture:
        """The mixture of ``n_components`` components fitted to the data ``x`` (``(N, D)``) by
        scikit-learn's EM (``covariance``: ``"full"``, ``"diag"`` or ``"spherical"``/isotropic;
        ``reg_covar`` is added to the covariance diagonals; ``seed`` is EM's ``random_state``).
        Fits are cached by data and settings."""
        if covariance not in _COVARIANCE_KINDS:
            raise ValueError(f"covariance must be 'full', 'diag' or 'spherical' (isotropic); got {covariance!r}.")
        if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer; got {n_components!r}.")
        x = np.ascontiguousarray(x, dtype=np.float64)
        means, covs, weights = _em_fit(x.tobytes(), x.shape, n_components, _COVARIANCE_KINDS[covariance],
                                       float(reg_covar), int(seed))
        return cls(means, covs, weights)

    @classmethod
    def digits(
        cls, n_components: int = 10, covariance: str = "full", reg_covar: float = 1e-2, seed: int = 0
    ) -> GaussianMixture:
        """Mixture fitted to scikit-learn's 8x8 digits (``fastsample.data.digits("all")``, pixels in
        ``[-1, 1]``, 64-D) by :meth:`fit`.

        Args:
            n_components: number of components ``K``.
            covariance: ``"full"``, ``"diag"`` or ``"spherical"`` (isotropic).
            reg_covar: added to covariance diagonals; keeps them positive definite
                (several pixels are constant in the data).
            seed: ``random_state`` for the EM fit.
        """
        return cls.fit(digits("all")[0], n_components, covariance, reg_covar, seed)


_COVARIANCE_KINDS = {"full": "full", "diag": "diag", "diagonal": "diag", "spherical": "spherical",
                     "isotropic": "spherical"}


@functools.lru_cache(maxsize=32)
def _em_fit(data: bytes, shape, n_components: int, covariance_type: str, reg_covar: float, seed: int):
    """scikit-learn's EM fit as NumPy float64 ``(means, covariances, weights)``, cached."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    x = np.frombuffer(data, np.float64).reshape(shape)
    gmm = SkGaussianMixture(n_components=n_components, covariance_type=covariance_type, reg_covar=reg_covar,
                            random_state=seed).fit(x)
    return gmm.means_, gmm.covariances_, gmm.weights_


class _MixtureModel(eqx.Module):
    """``model(x, t, cond)`` returning the exact posterior mean under ``process``."""

    mixture: GaussianMixture
    process: object

    def __call__(self, x, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t)
        return self.mixture.x0(x, alpha, sigma).astype(x.dtype)

"""Align Your Steps: sampling schedules that minimise the KL-divergence upper bound (KLUB).

Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models"
(ICML 2024, arXiv:2404.14507). Everything is done in the EDM noise level ``sigma = sigma(t) /
alpha(t)`` of the process (``s(t) = 1, sigma(t) = t`` in the paper's notation), in which the
denoiser ``D(y, sigma)`` of ``y = x / alpha`` is the same for every process; the result maps back
to the process's time with ``process.t_from_sigma_edm``.

* KLUB (paper eq. 9-11, Theorem 3.2 with the first-order linearised SDE of stochastic DDIM, eq. 7):
  for a schedule ``sigma_0 < ... < sigma_n``,
  ``KLUB = sum_i int_{sigma_{i-1}}^{sigma_i} sigma^-3 E ||D(y_sigma, sigma) - D(y_{sigma_i}, sigma_i)||^2 d sigma``
  (up to the constant 2), with ``x0 ~ data``, ``y_sigma = x0 + sigma z`` and
  ``y_{sigma_i} = y_sigma + sqrt(sigma_i^2 - sigma^2) z'`` drawn from the forward process.
* Importance sampling over ``sigma`` (eq. 15): ``pi(sigma) ∝ sigma^-3 (1/(sigma^2+c^2) - 1/(sigma_i^2+c^2))``
  with ``c = 0.5`` (the integrand for Gaussian data, Lemma 3.3, eq. 13), sampled by inverting its
  CDF in closed form; the draws are stratified in the CDF. For data ``N(0, c^2 I)`` with the same
  ``c`` every draw has the same expectation, so the estimator's variance is only the data's.
* Optimisation (Sec. 3.2, App. B.1): coordinate refinement. Each sweep moves every interior point to
  the best of ``num_candidates`` candidates in a window (a shrinking fraction of the log-gap to its
  neighbours), first the odd, then the even indices (non-neighbours are independent, eq. 11), with
  common random numbers for the candidates of a sweep. Coordinate search rather than gradient
  steps: the objective is a noisy Monte-Carlo estimate whose terms each depend on two points, so an
  exact 1-D search per point with shared draws is robust to that noise, needs no learning rate and
  keeps the points ordered; it is the paper's procedure.
* Early stopping (App. A.3: the KLUB optimum is not the KL optimum): after every sweep of the first
  stage the KLUB is estimated on held-out data with fixed draws; the best schedule is kept and the
  stage stops after ``patience`` sweeps without improvement.
* Hierarchical refinement (Sec. 3.3): the ``n``-step schedule is subdivided (new points at the
  log-midpoints) and only the new points are refined, ``n -> 2n -> 4n`` (10 -> 20 -> 40).
  Other step counts: ``fs.get_timesteps(process, k, "ays", sigmas=result.sigmas)`` interpolates
  the final table log-linearly, as the paper does.

Gaussian data: the closed form ``t_i = c tan((1 - i/n) atan(t_min/c) + (i/n) atan(t_max/c))``
(Theorem 3.1) is the optimum of the KL of **DDIM's** output (App. A.1), available here as
:func:`gaussian_euler_kl_cost`; the KLUB's own optimum for Gaussian data is different (the paper
proves this in App. A.3) and satisfies :func:`gaussian_klub_optimum`'s recursion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..denoisers import Denoiser
from ..grid import Grid
from ..timesteps import get_timesteps, on_host

__all__ = [
    "AYSResult",
    "optimize_ays",
    "klub",
    "klub_cost",
    "refine_schedule",
    "subdivide",
    "gaussian_klub_cost",
    "gaussian_klub_optimum",
    "gaussian_euler_kl_cost",
    "gaussian_euler_optimum",
]

#: ``c`` of the importance-sampling density (the paper's choice, Sec. 3.3)
IS_C = 0.5


class AYSResult(NamedTuple):
    """The optimised schedule.

    ``sigmas``: decreasing EDM noise levels of the final stage (``n * 2^refinements + 1``), usable as
    ``fs.get_timesteps(process, k, "ays", sigmas=sigmas)``; ``timesteps``: the same in the process's
    time (``fs.sample(..., timesteps=timesteps)``); ``stages``: the schedule after each stage
    (10, 20, 40 steps by default); ``history``: one dict per sweep (``stage``, ``steps``, ``sweep``,
    ``val_klub``, ``window``); ``val_klub``: held-out KLUB of each stage's result."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    stages: list
    history: list
    val_klub: list

    @property
    def grid(self) -> Grid:
        """The final schedule as a :class:`~fastsample.Grid` (``fs.sample(..., grid=result.grid)``)."""
        return Grid.from_times(self.timesteps, schedule="ays")

    def timesteps_for(self, process, num_steps: int, **options):
        """The final table interpolated log-linearly to ``num_steps`` steps in ``process``'s time."""
        return get_timesteps(process, num_steps, "ays", sigmas=self.sigmas, **options)


# ----------------------------------------------------------------------- importance sampling


def _is_mass(a, b, c):
    """``int_a^b s^-3 (1/(s^2+c^2) - 1/(b^2+c^2)) ds`` in closed form (``0 < a <= b``)."""
    return _partial_mass(a, b, b, c)


def _partial_mass(a, s, b, c, xp=np):
    """``int_a^s x^-3 (1/(x^2+c^2) - 1/(b^2+c^2)) dx`` for ``a <= s <= b``: the antiderivative is
    ``-1/(2 c^2 x^2) - log(x)/c^4 + log(x^2 + c^2)/(2 c^4) + 1/(2 x^2 (b^2 + c^2))``."""
    c2 = c * c
    inv = 1.0 / a**2 - 1.0 / s**2
    logs = xp.log(s**2 / a**2) - xp.log1p((s**2 - a**2) / (a**2 + c2))
    return inv / (2 * c2) - logs / (2 * c2 * c2) - inv / (2 * (b**2 + c2))


def _is_draws(a, b, key, n, c, knots: int = 65):
    """``(sigmas (M, n), weights (M, n))``: stratified draws from (a tabulation of) ``pi`` on each
    interval ``[a_m, b_m]`` and their importance weights, so that ``mean(weight * ||dD||^2)``
    estimates ``int sigma^-3 E||dD||^2 d sigma`` without bias.

    ``pi``'s CDF is computed exactly (closed form) at ``knots`` points uniform in ``log sigma`` and
    interpolated linearly in between: the proposal is piecewise constant in ``log sigma`` and each
    weight is the integrand's factor ``sigma^-2`` divided by that density (float64, numpy)."""
    a = np.asarray(a, np.float64)[:, None]
    b = np.asarray(b, np.float64)[:, None]
    shift = np.asarray(jax.random.uniform(key, (n,), dtype=jnp.float32), np.float64)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), n))
    u = np.clip((perm + shift) / n, 0.0, 1.0)  # stratified uniforms, shared by the intervals
    ell = np.log(a) + (np.log(b) - np.log(a)) * np.linspace(0.0, 1.0, knots)  # (M, G)
    cdf = _partial_mass(a, np.exp(ell), b, c)  # (M, G), cdf[:, 0] = 0
    cdf[:, -1] = _is_mass(a[:, 0], b[:, 0], c)
    mass = np.diff(cdf, axis=1)  # (M, G - 1) > 0
    target = u[None, :] * cdf[:, -1:]  # (M, N)
    k = np.clip(np.sum(cdf[:, None, 1:-1] <= target[:, :, None], axis=2), 0, knots - 2)  # segment index
    rows = np.arange(a.shape[0])[:, None]
    frac = np.clip((target - cdf[rows, k]) / mass[rows, k], 0.0, 1.0)
    width = ell[:, 1:2] - ell[:, 0:1]
    log_s = ell[rows, k] + frac * width
    s = np.exp(log_s)
    density = mass[rows, k] / (width * cdf[:, -1:])  # proposal density of log sigma
    return s, s**-2 / density  # d sigma = sigma d log sigma: weight = sigma^-3 sigma / density


# ------------------------------------------------------------------------------- the estimator


def _edm_denoise(denoiser: Denoiser, cond):
    process = denoiser.process

    def one(y, sigma):  # y: (*shape), sigma: scalar EDM noise level
        t = process.t_from_sigma_edm(sigma)
        x = process.alpha(t) * y
        return denoiser(x[None], t, cond)[0]

    return jax.vmap(jax.vmap(one, in_axes=(0, 0)), in_axes=(0, 0))


def _interval_terms(denoise, x0, z1, z2, s, b, w):
    """``(M,)``: per-interval KLUB estimates, per data dimension."""
    dtype = x0.dtype
    s, b, w = (jnp.asarray(v, dtype) for v in (s, b, w))  # (M, N), (M, 1), (M, N)
    extra = (1,) * (x0.ndim - 1)
    y = x0[None] + s.reshape(s.shape + extra) * z1[None]
    yb = y + jnp.sqrt(jnp.maximum(b**2 - s**2, 0.0)).reshape(s.shape + extra) * z2[None]
    d = denoise(y, s) - denoise(yb, jnp.broadcast_to(b, s.shape))
    sq = jnp.mean(d.reshape(d.shape[:2] + (-1,)) ** 2, axis=-1)
    return jnp.mean(w * sq, axis=1)


class _Estimator:
    """KLUB terms of arbitrary intervals on one batch of draws (common random numbers)."""

    def __init__(self, denoiser, data, key, num_samples, is_c, cond):
        data = jnp.asarray(data)
        k_idx, k_z1, k_z2, self.k_is = jax.random.split(key, 4)
        idx = jax.random.choice(k_idx, data.shape[0], (num_samples,), replace=num_samples > data.shape[0])
        self.x0 = data[idx]
        self.z1 = jax.random.normal(k_z1, self.x0.shape, self.x0.dtype)
        self.z2 = jax.random.normal(k_z2, self.x0.shape, self.x0.dtype)
        self.n, self.c = num_samples, is_c
        self.denoiser, self.cond = denoiser, cond

    def __call__(self, lo, hi) -> np.ndarray:
        """KLUB of the intervals ``[lo_m, hi_m]`` (arrays of EDM sigmas, ``lo < hi``)."""
        lo, hi = np.atleast_1d(np.asarray(lo, np.float64)), np.atleast_1d(np.asarray(hi, np.float64))
        s, w = _is_draws(lo, hi, self.k_is, self.n, self.c)
        m = lo.shape[0]
        chunk = max(1, 8192 // self.n)  # bounds the batch of denoiser calls; one compiled shape
        pad = -m % chunk
        s, w = np.pad(s, ((0, pad), (0, 0)), mode="edge"), np.pad(w, ((0, pad), (0, 0)), mode="edge")
        hi = np.pad(hi, (0, pad), mode="edge")
        out = [np.asarray(_terms(self.denoiser, self.cond, self.x0, self.z1, self.z2, s[i:i + chunk],
                                 hi[i:i + chunk, None], w[i:i + chunk])) for i in range(0, m + pad, chunk)]
        return np.concatenate(out).astype(np.float64)[:m]


@eqx.filter_jit
def _terms(denoiser, cond, x0, z1, z2, s, b, w):
    return _interval_terms(_edm_denoise(denoiser, cond), x0, z1, z2, s, b, w)


def klub_cost(denoiser: Denoiser, data, *, key, num_samples: int = 512, is_c: float = IS_C, cond=None):
    """An interval cost ``cost(lo, hi) -> (M,)``: the Monte-Carlo KLUB of each interval
    ``[lo_m, hi_m]`` of EDM sigmas (paper eq. 9 with the importance sampling of eq. 15), per data
    dimension, on ``num_samples`` draws fixed by ``key`` (the same draws for every interval)."""
    _check_data(data)
    return _Estimator(denoiser, data, key, _check_int("num_samples", num_samples, 1), _check_pos("is_c", is_c), cond)


def klub(denoiser: Denoiser, data, sigmas, *, key, num_samples: int = 512, is_c: float = IS_C, cond=None) -> float:
    """The KLUB of a schedule (decreasing EDM sigmas), per data dimension, estimated by Monte
    Carlo (paper eqs. 10-11, 15)."""
    sigmas = _check_sigmas(sigmas)
    cost = klub_cost(denoiser, data, key=key, num_samples=num_samples, is_c=is_c, cond=cond)
    return float(np.sum(cost(sigmas[1:], sigmas[:-1])))


# --------------------------------------------------------------------- closed forms (Gaussian)


def gaussian_klub_cost(c: float):
    """Exact KLUB interval cost for data ``N(0, c^2 I)`` per dimension (Lemma 3.3 integrated):
    ``c^4 int_lo^hi s^-3 (1/(s^2+c^2) - 1/(hi^2+c^2)) ds``."""
    c = _check_pos("c", c)
    return lambda lo, hi: c**4 * _is_mass(np.asarray(lo, np.float64), np.asarray(hi, np.float64), c)


def gaussian_klub_optimum(c: float, sigma_min: float, sigma_max: float, num_steps: int, iters: int = 20000):
    """The KLUB-optimal schedule for data ``N(0, c^2 I)`` (decreasing). Setting the derivative of
    the Gaussian KLUB (App. A.3) with respect to ``t_i`` to zero gives, with ``A = t_{i-1}^2``,
    ``E = t_{i+1}^2``, ``C = c^2``: ``(A + C + E) t_i^4 - 2 A E t_i^2 - A C E = 0``, i.e.
    ``t_i^2 = (A E + sqrt(A^2 E^2 + A C E (A + C + E))) / (A + C + E)``; solved by fixed-point sweeps."""
    c2 = _check_pos("c", c) ** 2
    t = np.geomspace(sigma_max, sigma_min, num_steps + 1)
    for _ in range(iters):
        A, E = t[2:] ** 2, t[:-2] ** 2
        new = np.sqrt((A * E + np.sqrt(A * A * E * E + A * c2 * E * (A + c2 + E))) / (A + c2 + E))
        if np.max(np.abs(new / t[1:-1] - 1)) < 1e-13:
            break
        t[1:-1] = new
    return t


def gaussian_euler_kl_cost(c: float):
    """Interval cost whose sum is ``-log f`` of App. A.1 (eq. 19), for data ``N(0, c^2 I)`` and
    DDIM (Euler on the PF-ODE): ``log((lo^2+c^2)(hi^2+c^2)) - 2 log(lo hi + c^2)`` (= ``-2 log cos``
    of the ``atan(t/c)`` gap). The KL of DDIM's output increases with the sum, so both share the
    optimum of Theorem 3.1."""
    c2 = _check_pos("c", c) ** 2

    def cost(lo, hi):
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        # (lo^2 + c^2)(hi^2 + c^2) = (lo hi + c^2)^2 + c^2 (hi - lo)^2
        return np.log1p(((hi - lo) ** 2 * c2) / (lo * hi + c2) ** 2)

    return cost


def gaussian_euler_optimum(c: float, sigma_min: float, sigma_max: float, num_steps: int):
    """Theorem 3.1: ``t_i = c tan((1 - i/n) atan(t_min/c) + (i/n) atan(t_max/c))``, returned decreasing."""
    c = _check_pos("c", c)
    r = np.arange(num_steps + 1) / num_steps
    return (c * np.tan((1 - r) * np.arctan(sigma_min / c) + r * np.arctan(sigma_max / c)))[::-1].copy()


# ------------------------------------------------------------------------------ the optimiser


def _candidates(log_s, idx, u, window):
    """``(len(idx), len(u))`` candidate log-sigmas for the interior points ``idx``."""
    cur = log_s[idx][:, None]
    up, down = log_s[idx - 1][:, None] - cur, cur - log_s[idx + 1][:, None]
    return cur + np.where(u < 0, u * window * down, u * window * up)


def refine_schedule(
    cost: Callable,
    sigmas,
    *,
    free=None,
    sweeps: int = 30,
    num_candidates: int = 17,
    window: float = 0.5,
    decay: float = 0.7,
    min_window: float = 0.005,
    expand: float = 1.6,
    max_window: float = 0.95,
    relax: float = 1.5,
    average: int = 0,
    new_cost: Callable[[int], Callable] | None = None,
    validate: Callable | None = None,
    patience: int | None = None,
    on_sweep: Callable | None = None,
):
    """Coordinate refinement of a schedule (AYS, Sec. 3.2): minimise ``sum_i cost(sigma_{i+1}, sigma_i)``
    over the interior points (``free``: indices allowed to move, default all interior ones).

    Every sweep moves each free point to the best of ``num_candidates`` (odd, the current point
    among them) spread over ``window`` times the log-gap to each neighbour, odd indices first, then
    even ones. The window shrinks by ``decay`` per sweep down to ``min_window``. ``new_cost(k)``, if
    given, returns the cost of sweep ``k`` (fresh Monte-Carlo draws per sweep, shared by all
    candidates of the sweep). ``validate(sigmas) -> float``, if given, is called after each sweep:
    the best schedule under it is returned and, with ``patience``, the search stops after that many
    sweeps without improvement. ``average = k > 0`` (Polyak-Ruppert averaging, for noisy costs):
    the schedule of the last ``k`` sweeps averaged in ``log sigma`` is a candidate too (after the
    sweeps; chosen if ``validate`` prefers it, or always without ``validate``).
    Returns ``(sigmas, history)``."""
    s = _check_sigmas(sigmas)
    n = s.shape[0] - 1
    free = np.arange(1, n) if free is None else np.asarray(sorted(set(int(i) for i in free)), dtype=int)
    if free.size and (free.min() < 1 or free.max() > n - 1):
        raise ValueError(f"free indices must be interior points in [1, {n - 1}]; got {free.tolist()}.")
    num_candidates = _check_int("num_candidates", num_candidates, 3)
    if num_candidates % 2 == 0:
        raise ValueError(f"num_candidates must be odd (the current point is a candidate); got {num_candidates}.")
    _check_int("sweeps", sweeps, 0)
    if not (0 < min_window <= window <= max_window < 1 and 0 < decay <= 1 <= expand):
        raise ValueError(f"need 0 < min_window <= window <= max_window < 1, 0 < decay <= 1 and expand >= 1; got "
                         f"window={window}, min_window={min_window}, max_window={max_window}, decay={decay}, "
                         f"expand={expand}.")
    if patience is not None and validate is None:
        raise ValueError("patience needs a held-out `validate` function.")
    u = np.linspace(-1.0, 1.0, num_candidates)
    log_s = np.log(s)
    history = []
    best_s, best_val, bad = s.copy(), (validate(s) if validate is not None else np.nan), 0
    if validate is not None:
        history.append({"sweep": 0, "val_klub": float(best_val), "window": None})
    w = np.full(n + 1, float(window))  # per-point windows
    tail = []
    for k in range(1, sweeps + 1):
        c = new_cost(k) if new_cost is not None else cost
        for parity in (1, 0):
            idx = free[free % 2 == parity]
            if idx.size == 0:
                continue
            cand = _candidates(log_s, idx, u, w[idx][:, None])  # (P, K)
            ec = np.exp(cand)
            lo_nb = np.broadcast_to(np.exp(log_s[idx + 1])[:, None], ec.shape)
            hi_nb = np.broadcast_to(np.exp(log_s[idx - 1])[:, None], ec.shape)
            lo = np.concatenate([lo_nb.ravel(), ec.ravel()])
            hi = np.concatenate([ec.ravel(), hi_nb.ravel()])
            vals = np.asarray(c(lo, hi), np.float64)
            total = (vals[: ec.size] + vals[ec.size:]).reshape(ec.shape)
            total = np.where(np.isfinite(total), total, np.inf)
            pick = np.argmin(total, axis=1)
            step = cand[np.arange(idx.size), pick] - log_s[idx]
            # over-relaxation: the points of a chain move together, so plain coordinate search
            # (Gauss-Seidel) creeps; moving omega times the step (kept inside the neighbours) does not
            lim_up = log_s[idx - 1] - log_s[idx]
            lim_down = log_s[idx + 1] - log_s[idx]
            log_s[idx] += np.clip(relax * step, 0.5 * lim_down, 0.5 * lim_up) if relax != 1 else step
            # a pick at the window's edge widens it (the minimum may lie further), else it narrows
            edge = np.abs(u[pick]) == 1.0
            w[idx] = np.where(edge, np.minimum(w[idx] * expand, max_window), np.maximum(w[idx] * decay, min_window))
        cur = np.exp(log_s)
        tail = (tail + [log_s.copy()])[-average:] if average else tail
        record = {"sweep": k, "window": float(np.mean(w[free])) if free.size else None}
        if validate is not None:
            v = float(validate(cur))
            record["val_klub"] = v
            if v < best_val:
                best_s, best_val, bad = cur.copy(), v, 0
            else:
                bad += 1
        history.append(record)
        if on_sweep is not None:
            on_sweep(record)
        if patience is not None and bad >= patience:
            break
    out = best_s if validate is not None else np.exp(log_s)
    if tail:
        mean = np.exp(np.mean(tail, axis=0))
        if validate is None:
            out = mean
        else:
            v = float(validate(mean))
            history.append({"sweep": "average", "val_klub": v, "window": None})
            if v < best_val:
                out = mean
    out[0], out[-1] = s[0], s[-1]
    return out, history


def subdivide(sigmas) -> np.ndarray:
    """Double the steps: keep every point and insert the log-midpoint of each interval (Sec. 3.3)."""
    s = _check_sigmas(sigmas)
    out = np.empty(2 * s.shape[0] - 1)
    out[::2] = s
    out[1::2] = np.sqrt(s[:-1] * s[1:])
    return out


def optimize_ays(
    denoiser: Denoiser,
    data,
    num_steps: int = 10,
    *,
    key,
    refinements: int = 2,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
    init: str | np.ndarray = "logsnr_uniform",
    num_samples: int = 512,
    val_fraction: float = 0.25,
    val_samples: int | None = None,
    sweeps: int = 40,
    refine_sweeps: int = 12,
    patience: int | None = 5,
    num_candidates: int = 17,
    window: float = 0.5,
    decay: float = 0.7,
    min_window: float = 0.005,
    relax: float = 1.5,
    average: int = 5,
    is_c: float = IS_C,
    cond=None,
    progress: bool = False,
) -> AYSResult:
    """Align Your Steps for ``denoiser``: a ``num_steps``-step schedule minimising the KLUB on
    ``data``, then ``refinements`` rounds of subdivision (10 -> 20 -> 40 by default).

    Arguments:
        data: ``(M, *shape)`` data samples ``x0`` (e.g. ``GaussianMixture.sample(key, M)``); the
            last ``val_fraction`` of them are held out for the early-stopping estimate.
        key: PRNG key of every Monte-Carlo draw.
        sigma_max, sigma_min: the ends in EDM noise level (default: ``sigma_edm`` at the process's
            ``t_max`` / ``t_min``; they must be finite and positive, e.g. flow matching needs them).
        init: ``"logsnr_uniform"``, ``"karras"`` (rho 7), an explicit decreasing array of
            ``num_steps + 1`` sigmas from ``sigma_max`` to ``sigma_min``, or a
            :class:`~fastsample.Grid` of ``num_steps`` steps between the ends.
        num_samples: Monte-Carlo draws per interval per sweep (fresh each sweep).
        val_samples: draws of the held-out estimate (default ``2 num_samples``; fixed for the run).
        sweeps, patience: first-stage sweeps and early stopping on the held-out KLUB.
        refine_sweeps: sweeps over the new points after each subdivision.
        num_candidates, window, decay, min_window, relax, average: the coordinate search
            (:func:`refine_schedule`; ``average``: the mean of the last sweeps competes with the
            best one on the held-out estimate).
        is_c: ``c`` of the importance-sampling density (eq. 15; the paper uses 0.5).

    Returns:
        :class:`AYSResult`.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    data = _check_data(data)
    num_steps = _check_int("num_steps", num_steps, 2)
    refinements = _check_int("refinements", refinements, 0)
    num_samples = _check_int("num_samples", num_samples, 1)
    val_samples = 2 * num_samples if val_samples is None else _check_int("val_samples", val_samples, 1)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}.")
    n_val = int(round(data.shape[0] * val_fraction))
    if n_val < 1 or n_val >= data.shape[0]:
        raise ValueError(f"val_fraction={val_fraction} of {data.shape[0]} data samples leaves no train or held-out "
                         "samples; pass more data (at least 2) or another val_fraction.")
    train, val = data[: data.shape[0] - n_val], data[data.shape[0] - n_val:]
    process = denoiser.process
    s_max, s_min = _ends(process, sigma_max, sigma_min)
    if isinstance(init, Grid):
        init = on_host(process.sigma_edm, init.times)
    sigmas = _init(init, num_steps, s_max, s_min)
    k_train, k_val = jax.random.split(key)
    val_cost = klub_cost(denoiser, val, key=k_val, num_samples=val_samples, is_c=is_c, cond=cond)

    def validate(s):
        return float(np.sum(val_cost(s[1:], s[:-1])))

    def fresh(stage):
        return lambda k: klub_cost(denoiser, train, key=jax.random.fold_in(jax.random.fold_in(k_train, stage), k),
                                   num_samples=num_samples, is_c=is_c, cond=cond)

    options = dict(num_candidates=num_candidates, window=window, decay=decay, min_window=min_window, relax=relax,
                   average=average)
    report = (lambda r: print(f"ays: {r}", flush=True)) if progress else None
    stages, history, vals = [], [], []
    for stage in range(refinements + 1):
        if stage == 0:
            sigmas, hist = refine_schedule(None, sigmas, sweeps=sweeps, new_cost=fresh(stage), validate=validate,
                                           patience=patience, on_sweep=report, **options)
        else:
            sigmas = subdivide(sigmas)
            sigmas, hist = refine_schedule(None, sigmas, free=np.arange(1, sigmas.shape[0] - 1, 2),
                                           sweeps=refine_sweeps, new_cost=fresh(stage), validate=validate,
                                           on_sweep=report, **options)
        steps = sigmas.shape[0] - 1
        history += [{"stage": stage, "steps": steps, **h} for h in hist]
        stages.append(sigmas.copy())
        vals.append(min(h["val_klub"] for h in hist))
    ts = np.array(process.t_from_sigma_edm(jnp.asarray(sigmas)), np.float64)
    t_hi = process.t_max if sigma_max is None else ts[0]
    t_lo = process.t_min if sigma_min is None else ts[-1]
    ts[0], ts[-1] = t_hi, t_lo
    return AYSResult(sigmas, ts, stages, history, vals)


# -------------------------------------------------------------------------------- validation


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}.")
    return int(value)


def _check_pos(name, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return v


def _check_data(data):
    if not hasattr(data, "shape") or getattr(data, "ndim", 0) < 2 or data.shape[0] < 2:
        raise ValueError(f"data must be an array of data samples x0 of shape (M >= 2, *shape); got "
                         f"{getattr(data, 'shape', type(data).__name__)}.")
    if not jnp.issubdtype(jnp.asarray(data).dtype, jnp.floating):
        raise ValueError(f"data must be floating point; got dtype {jnp.asarray(data).dtype}.")
    return jnp.asarray(data)


def _check_sigmas(sigmas) -> np.ndarray:
    s = np.array(sigmas, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] < 2 or not (np.all(np.isfinite(s)) and np.all(s > 0) and np.all(np.diff(s) < 0)):
        raise ValueError(f"sigmas must be a 1-D, strictly decreasing array of at least 2 finite EDM noise levels > 0; "
                         f"got {np.asarray(sigmas).tolist() if np.size(sigmas) < 50 else np.shape(sigmas)}.")
    return s


def _ends(process, sigma_max, sigma_min):
    with jax.enable_x64(True):
        def edm(t):
            return float(process.sigma_edm(jnp.asarray(t, jnp.float64)))

        s_max = edm(process.t_max) if sigma_max is None else _check_pos("sigma_max", sigma_max)
        s_min = edm(process.t_min) if sigma_min is None else _check_pos("sigma_min", sigma_min)
        lo, hi = edm(process.t_min), edm(process.t_max)
    name = type(process).__name__
    if not (math.isfinite(s_max) and s_max > 0):
        raise ValueError(f"sigma_max must be finite: {name} has sigma_edm={s_max} at t_max={process.t_max}; pass "
                         "sigma_max (e.g. sigma_max=100.0 for flow matching).")
    if not (math.isfinite(s_min) and s_min > 0):
        raise ValueError(f"sigma_min must be > 0: {name} has sigma_edm={s_min} at t_min={process.t_min}; pass "
                         "sigma_min (e.g. sigma_min=0.002).")
    if not s_max > s_min:
        raise ValueError(f"sigma_max must be > sigma_min; got {s_max}, {s_min}.")
    tol = 1e-6
    if s_max > hi * (1 + tol) or s_min < lo * (1 - tol):
        raise ValueError(f"[sigma_min, sigma_max] = [{s_min}, {s_max}] leaves the EDM noise range of {name}: "
                         f"allowed [{lo}, {hi}].")
    return s_max, s_min


def _init(init, n, s_max, s_min) -> np.ndarray:
    if isinstance(init, str):
        if init == "logsnr_uniform":
            return np.geomspace(s_max, s_min, n + 1)
        if init == "karras":
            r = np.arange(n + 1) / n
            return (s_max ** (1 / 7) + r * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
        raise ValueError(f"init must be 'logsnr_uniform', 'karras' or an array of sigmas; got {init!r}.")
    s = _check_sigmas(init)
    if s.shape[0] != n + 1:
        raise ValueError(f"init has {s.shape[0]} sigmas; num_steps={n} needs {n + 1}.")
    if not (np.isclose(s[0], s_max, rtol=1e-9) and np.isclose(s[-1], s_min, rtol=1e-9)):
        raise ValueError(f"init must run from sigma_max={s_max} to sigma_min={s_min}; got {s[0]} .. {s[-1]}.")
    return s

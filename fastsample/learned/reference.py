"""Reference data for fitting solvers: noise, the exact PF-ODE endpoint, and the trajectory.

A :class:`ReferenceSet` holds ``x_T`` and the probability-flow solution it leads to: the endpoint
``x_end`` (at ``t_end``; at ``t = 0``, clean data, by default) and, optionally, the trajectory on a
fine grid in the half log-SNR with its derivatives, so that :meth:`ReferenceSet.at` reads the
true state at any time (cubic Hermite interpolation in ``lambda``, where every process's ODE is
smooth). Solutions come from :func:`fastsample.reference_solve` (adaptive Dopri8, tight tolerances).
"""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..denoisers import Denoiser
from ..processes import EDM
from ..sampling import prior, reference_solve
from ..terms import ProbabilityFlowTerm

__all__ = ["ReferenceSet", "make_reference", "exact_endpoint", "reference_trajectory"]


class ReferenceSet(NamedTuple):
    """``x_T`` (``N, *shape``) and its exact endpoint ``x_end`` at ``t_end``; ``lams``/``xs``/
    ``dxs``: the trajectory at ``K`` half log-SNRs (``N, K, *shape``), empty when not asked for."""

    x_T: jax.Array
    x_end: jax.Array
    t_start: float
    t_end: float
    lams: jax.Array
    xs: jax.Array
    dxs: jax.Array

    @property
    def size(self) -> int:
        """The number of noise/solution pairs."""
        return self.x_T.shape[0]

    def take(self, index) -> ReferenceSet:
        """The pairs at ``index`` (an integer array or a slice)."""
        sub = lambda a: a[index] if a.ndim and a.shape[0] == self.size else a
        return self._replace(x_T=sub(self.x_T), x_end=sub(self.x_end), xs=sub(self.xs), dxs=sub(self.dxs))

    def split(self, n_train: int) -> tuple[ReferenceSet, ReferenceSet]:
        """``(first n_train, the rest)``: a held-out split."""
        if not 0 < n_train < self.size:
            raise ValueError(f"n_train must be in (0, {self.size}); got {n_train}.")
        return self.take(slice(0, n_train)), self.take(slice(n_train, None))

    def at(self, process, t):
        """The reference state at time ``t`` (scalar, may be traced), for every sample.
        ``t = t_end`` gives ``x_end``; other times interpolate the stored trajectory (cubic
        Hermite in ``lambda``), clamped to its range."""
        if self.lams.shape[0] < 2:
            raise ValueError("this ReferenceSet stores no trajectory; make it with trajectory_points > 1.")
        lam = process.log_snr(jnp.asarray(t, self.xs.dtype))
        lam = jnp.clip(lam, self.lams[0], self.lams[-1])
        k = jnp.clip(jnp.searchsorted(self.lams, lam) - 1, 0, self.lams.shape[0] - 2)
        h = self.lams[k + 1] - self.lams[k]
        s = (lam - self.lams[k]) / h
        h00, h10 = (1 + 2 * s) * (1 - s) ** 2, s * (1 - s) ** 2
        h01, h11 = s * s * (3 - 2 * s), s * s * (s - 1)
        x = (h00 * self.xs[:, k] + h10 * h * self.dxs[:, k] + h01 * self.xs[:, k + 1] + h11 * h * self.dxs[:, k + 1])
        return jnp.where(jnp.asarray(t) == self.t_end, self.x_end, x)


def exact_endpoint(denoiser: Denoiser, x_T, t_start: float | None = None, t_end: float = 0.0):
    """The PF-ODE solution from ``x_T`` at ``t_start`` (default ``t_max``) to ``t_end``. ``t_end = 0``
    (clean data) is reached by integrating the same model in EDM variables down to
    ``sigma_edm = 1e-9``, where the remaining step is below float64 resolution of the data."""
    process = denoiser.process
    t0 = process.t_max if t_start is None else t_start
    if t_end > 0:
        return reference_solve(denoiser, x_T, t_start=t0, t_end=t_end)
    s_max = float(process.sigma_edm(jnp.asarray(t0, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)))
    if not np.isfinite(s_max):
        raise ValueError(f"t_start={t0} is pure noise for {type(process).__name__}; start below it.")
    edm = EDM(sigma_min=1e-9, sigma_max=s_max)
    y_T = x_T / process.alpha(jnp.asarray(t0, x_T.dtype))
    return reference_solve(denoiser.with_process(edm), y_T)


def make_reference(
    denoiser: Denoiser,
    key,
    num: int,
    shape: tuple[int, ...],
    *,
    t_start: float | None = None,
    t_end: float = 0.0,
    trajectory_points: int = 0,
    batch_size: int = 256,
    cond=None,
    dtype=None,
) -> ReferenceSet:
    """``num`` noise draws ``x_T ~ prior`` (``shape`` per sample) and their exact solutions.

    ``trajectory_points = K > 1`` also stores the trajectory at ``K`` half log-SNRs, uniformly
    from ``lambda(t_start)`` to ``lambda`` of ``max(t_end, t_min)``, with the ODE's derivative
    in ``lambda`` for Hermite interpolation. Work is done in batches of ``batch_size``.
    """
    process = denoiser.process
    dtype = dtype or jnp.result_type(float)
    t0 = float(process.t_max if t_start is None else t_start)
    x_T = prior(process, key, (num, *shape), dtype) * (process.sigma(t0) / process.sigma(process.t_max))
    ends = []
    for i in range(0, num, batch_size):
        ends.append(exact_endpoint(denoiser, x_T[i:i + batch_size], t0, t_end))
    x_end = jnp.concatenate(ends)
    empty = jnp.zeros((0,), dtype)
    if trajectory_points < 2:
        return ReferenceSet(x_T, x_end, t0, float(t_end), empty, empty, empty)
    t_last = max(float(t_end), float(process.t_min))
    lam0, lam1 = (float(process.log_snr(jnp.asarray(t, dtype))) for t in (t0, t_last))
    lams = jnp.linspace(lam0, lam1, trajectory_points, dtype=dtype)
    term = ProbabilityFlowTerm(denoiser, time="log_snr")
    xs, dxs = [], []
    for i in range(0, num, batch_size):
        x, dx = reference_trajectory(term, x_T[i:i + batch_size], lams, cond)
        xs.append(x)
        dxs.append(dx)
    return ReferenceSet(x_T, x_end, t0, float(t_end), lams, jnp.concatenate(xs), jnp.concatenate(dxs))


@eqx.filter_jit
def reference_trajectory(term, x_T, lams, cond):
    """The exact (adaptive Dopri8) solution of ``term`` (in the half log-SNR) at the half log-SNRs
    ``lams`` and its derivative there: ``(xs, dxs)``, each ``(batch, K, ...)``."""
    tight = 1e-10 if x_T.dtype == jnp.float64 else 1e-6
    sol = diffrax.diffeqsolve(
        term, diffrax.Dopri8(), lams[0], lams[-1], dt0=None, y0=x_T, args=cond,
        stepsize_controller=diffrax.PIDController(rtol=tight, atol=tight),
        saveat=diffrax.SaveAt(ts=lams), max_steps=100_000,
    )
    xs = jnp.moveaxis(sol.ys, 0, 1)  # (N, K, ...)
    dxs = jax.vmap(lambda lam, x: term.vf(lam, x, cond), in_axes=(0, 1), out_axes=1)(lams, xs)
    return xs, dxs

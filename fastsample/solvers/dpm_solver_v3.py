"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu: Improved Diffusion ODE Solver with Empirical Model
Statistics, NeurIPS 2023): the multistep predictor.

With the EMS ``l, s, b`` (see :mod:`fastsample.solvers.ems`, which also states the scaling used
here), the exact solution from ``lambda_s`` to ``lambda_t`` is

    x_t = (sigma_t / sigma_s) e^{L_t - L_s} x_s
          + alpha_t int_{lambda_s}^{lambda_t} w(lambda) e^{S(lambda)} (B(lambda) + g(lambda)) dlambda,
    w(lambda) = e^{(lambda - lambda_t) - (L_lambda - L_t)},

with ``L = int l``, ``S(lambda) = int_{lambda_s}^lambda s`` and ``B(lambda) = int_{lambda_s}^lambda
e^{-S} b``. The local approximation of order ``n`` replaces ``g`` by its Taylor polynomial of
degree ``n - 1`` at ``lambda_s`` whose derivatives solve the linear system given by the ``n - 1``
earlier values of ``g`` (multistep; the paper's local approximation, its Eq. (8)); the integrals of
``w e^S (lambda - lambda_s)^k / k!`` and ``w e^S B`` are computed by Gauss-Legendre quadrature of the
grid's cumulative EMS integrals interpolated linearly in lambda.

A step that ends at ``sigma = 0`` is DDIM (order 1 in data prediction), and steps outside the
EMS grid see zero statistics. With ``l = s = b = 0`` this is DPM-Solver++ multistep in its Taylor
("heun") form, with the third-order update that integrates the quadratic interpolant exactly.
With ``corrector=True`` (the paper's multistep predictor-corrector, still one model evaluation per
step): the output at the predicted point ``x~_i`` is added to the points of the local
approximation of the step ``lambda_{i-1} -> lambda_i``, which is recomputed from ``x_{i-1}`` before
the next predictor step (no correction after the last step). Not implemented: the pseudo-order.

The scaling of the statistics and this solution formula were derived here from the paper's
construction; numerical parity with the authors' implementation has not been checked.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .ems import EMS, interp
from .exponential import AbstractMultistepSolver, History, ddim_step, prediction_step, safe_step

__all__ = ["DPMSolverV3"]

_NODES = 32


class CorrectorState(NamedTuple):
    history: History  # f values (newest first) and their lambdas
    x_prev: jax.Array  # the (corrected) state at the previous grid time
    t_prev: jax.Array


class DPMSolverV3(AbstractMultistepSolver):
    """DPM-Solver-v3 multistep predictor (optionally with its corrector) of order 1-3 with
    empirical model statistics ``ems``."""

    ems: EMS | None = None
    corrector: bool = eqx.field(static=True, default=False)

    name: ClassVar[str] = "dpm_solver_v3"

    def __check_init__(self):
        if not isinstance(self.ems, EMS):
            raise ValueError("DPMSolverV3 needs `ems`: an EMS (EMS.trivial(...), estimate_ems(...) or EMS.load(...)).")
        if self.prediction != "x0":
            raise ValueError("DPMSolverV3 works with data prediction only (prediction='x0').")

    @property
    def needs_finite_start(self) -> bool:
        return True

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        history = super().init_state(denoiser, x, cond, t_end, num_steps)
        if not self.corrector:
            return history
        return CorrectorState(history, jnp.zeros_like(x), jnp.asarray(0, x.dtype))

    def _f(self, process, t, x, x0):
        """``f_theta = x_theta - l x / alpha`` at time ``t``."""
        lam = process.log_snr(t)
        l = interp(self.ems.lambdas, self.ems.l, jnp.reshape(lam, (1,)).astype(self.ems.lambdas.dtype))[0]
        return x0 - l.astype(x.dtype) * x / process.alpha(t)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        if tuple(x.shape[1:]) != self.ems.data_shape:
            raise ValueError(f"EMS data shape {self.ems.data_shape} does not fit samples of shape {x.shape}.")
        process = denoiser.process
        x0 = denoiser.predict(x, t0, cond, target="x0")
        f0 = self._f(process, t0, x, x0)
        hist = state.history if self.corrector else state
        k = self.history_size
        if self.corrector and k >= 1:
            # corrector of the previous step: its reference point, the new output, older outputs
            order_c = jnp.minimum(self.order, hist.count + 1)
            ells = [process.log_snr(t0)] + [hist.ells[j] for j in range(1, k)]
            vals = [f0] + [hist.values[j] for j in range(1, k)]
            avail = [hist.count >= 1] + [hist.count >= j + 1 for j in range(1, k)]
            x_c = self._local(process, state.t_prev, t0, state.x_prev, hist.values[0], ells, vals, avail, order_c)
            x = jnp.where(hist.count >= 1, x_c, x)
        c = prediction_step(process, t0, t1, "x0")
        order = self.step_order(hist, t1)
        x_high = self._local(process, t0, t1, x, f0, [hist.ells[j] for j in range(k)],
                             [hist.values[j] for j in range(k)], [hist.count >= j + 1 for j in range(k)], order)
        x1 = jnp.where(t1 == 0, ddim_step(process, t0, t1, x, x0), x_high)
        hist = hist.push(f0, c.ell0)
        return x1, (CorrectorState(hist, x, jnp.asarray(t0, x.dtype)) if self.corrector else hist)

    def _local(self, process, t0, t1, x, f0, ells, vals, avail, order):
        """The local approximation of order ``order`` (traced, at most ``len(ells) + 1``) from
        ``(t0, x)`` to ``t1``, with ``f0`` at ``t0`` and ``vals`` at log-SNRs ``ells`` (``avail``:
        which are valid; invalid ones are never selected)."""
        dtype = x.dtype
        c = prediction_step(process, t0, t1, "x0")
        grid = self.ems.lambdas
        big_l, big_s, big_b = self.ems.cumulative()
        ls = c.ell0
        h = safe_step(c, t1)
        lt = ls + h
        nodes, weights = np.polynomial.legendre.leggauss(_NODES)
        u = ls + h * (jnp.asarray(nodes, dtype) + 1) / 2
        wq = h * jnp.asarray(weights, dtype) / 2
        k = len(ells)
        pts = jnp.concatenate([jnp.stack([ls, lt]), u] + [jnp.reshape(e, (1,)) for e in ells]).astype(grid.dtype)
        li, si, bi = (interp(grid, v, pts).astype(dtype) for v in (big_l, big_s, big_b))
        l_s, l_t, l_u = li[0], li[1], li[2:2 + _NODES]
        s_s, s_u, s_h = si[0], si[2:2 + _NODES], si[2 + _NODES:]
        b_s, b_u, b_h = bi[0], bi[2:2 + _NODES], bi[2 + _NODES:]
        ex = (1,) * (x.ndim - 1)

        def rel_b(bv):  # B(lambda) = e^{S_glob(lambda_s)} (B_glob(lambda) - B_glob(lambda_s))
            return jnp.exp(s_s) * (bv - b_s)

        du = (u - ls).reshape((-1,) + ex)
        kern = wq.reshape((-1,) + ex) * jnp.exp(du + (ls - lt) - (l_u - l_t)) * jnp.exp(s_u - s_s)
        e0 = jnp.sum(kern, 0)
        e1 = jnp.sum(kern * du, 0)
        e2 = jnp.sum(kern * du**2 / 2, 0)
        cb = jnp.sum(kern * rel_b(b_u), 0)
        base = (c.kappa1 / c.kappa0) * jnp.exp(l_t - l_s) * x + c.beta1 * cb
        out1 = base + c.beta1 * e0 * f0
        if k == 0:
            return out1
        # g at the other points, referred to lambda_s; Taylor derivatives at lambda_s
        g = [jnp.exp(-(s_h[j] - s_s)) * vals[j] - rel_b(b_h[j]) for j in range(k)]
        d = [jnp.where(avail[j], ells[j] - ls, -(j + 1.0) * h) for j in range(k)]  # unfilled: never used
        out2 = base + c.beta1 * (e0 * f0 + e1 * (g[0] - f0) / d[0])
        if k == 1:
            return jnp.where(order == 1, out1, out2)
        # solve [d0, d0^2/2; d1, d1^2/2] [g1; g2] = [g_0 - f0; g_1 - f0]
        r0, r1 = g[0] - f0, g[1] - f0
        det = d[0] * d[1] ** 2 / 2 - d[1] * d[0] ** 2 / 2
        g1 = (r0 * d[1] ** 2 / 2 - r1 * d[0] ** 2 / 2) / det
        g2 = (d[0] * r1 - d[1] * r0) / det
        out3 = base + c.beta1 * (e0 * f0 + e1 * g1 + e2 * g2)
        return jnp.where(order == 1, out1, jnp.where(order == 2, out2, out3))

"""Classic linear multistep samplers: LMS (k-diffusion), iPNDM (Zhang & Chen) and PNDM (Liu et al.).

* :class:`LMS` is the Adams-Bashforth family with variable steps on the PF-ODE drift in the
  process's own time ``t`` (no exponential integrator): the Lagrange polynomial through the last
  ``order`` drifts is integrated over ``[t0, t1]``. Under ``EDM`` (``t = sigma``, drift
  ``(x - x0_hat) / sigma``) this is k-diffusion's ``sample_lms`` and diffusers'
  ``LMSDiscreteScheduler``; order 1 is fastsample's ``euler``.
* :class:`IPNDM` (improved PNDM, Zhang & Chen, Fast Sampling of Diffusion Models with Exponential
  Integrator, 2023) combines noise predictions with the fixed Adams-Bashforth coefficients of
  equal steps and transfers with DDIM; warm-up with lower orders (no extra evaluations).
* :class:`PNDM` (F-PNDM, Liu, Ren, Lin, Zhao, Pseudo Numerical Methods for Diffusion Models on
  Manifolds, 2022): three pseudo Runge-Kutta steps (four evaluations each), then the pseudo linear
  multistep method with the fourth-order Adams-Bashforth weights.

A step that ends at ``t = 0`` is a DDIM step with the step's single evaluation, for every solver
here (for ``EDM`` and flow matching that is also the Euler step). The noise-prediction forms
(iPNDM, PNDM) divide by ``alpha`` at a step's start, like every noise-prediction exponential
integrator: with flow matching, start below ``t = 1``.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..terms import ProbabilityFlowTerm
from .base import AbstractLinearSolver, AbstractPhasedSolver
from .exponential import AbstractMultistepSolver, History, ddim_step, prediction_step

__all__ = ["LMS", "IPNDM", "PNDM", "ADAMS_BASHFORTH"]

#: Adams-Bashforth coefficients for equal steps, newest first (row ``k - 1`` is order ``k``)
ADAMS_BASHFORTH = np.array([
    [1.0, 0.0, 0.0, 0.0],
    [3.0 / 2.0, -1.0 / 2.0, 0.0, 0.0],
    [23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0, 0.0],
    [55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
])

# Gauss-Legendre on [0, 1] with 4 nodes: exact for the cubic Lagrange basis of LMS-4
_GL_X, _GL_W = np.polynomial.legendre.leggauss(4)
_S, _W = 0.5 * (_GL_X + 1.0), 0.5 * _GL_W


def _eps_transfer(process, t0, t1, x, eps):
    """DDIM's transfer with a given noise prediction (PNDM's ``phi``):
    ``x1 = alpha1 (x - sigma0 eps) / alpha0 + sigma1 eps``, written as
    ``(alpha1 / alpha0) x - sigma1 expm1(lambda1 - lambda0) eps``. Needs ``t1 > 0``."""
    c = prediction_step(process, t0, t1, "eps")
    return (c.kappa1 / c.kappa0) * x - c.beta1 * jnp.expm1(-c.h) * eps


def _ddim_from_eps(process, t0, t1, x, eps):
    """A DDIM step given the noise prediction (finite at ``t1 = 0``)."""
    a0, s0 = process.alpha_sigma(t0)
    return ddim_step(process, t0, t1, x, (x - s0 * eps) / a0)


class LMS(AbstractLinearSolver):
    """Linear multistep (variable-step Adams-Bashforth) on the PF-ODE drift in time ``t``, order
    1-4: ``x1 = x + sum_j c_j d_j`` with ``c_j = int_{t0}^{t1} l_j(t) dt`` for the Lagrange basis
    ``l_j`` through the times of the last ``order`` drifts ``d_j`` (Gauss-Legendre, exact).

    Fields: ``order`` (default 4, k-diffusion's), ``lower_order_final`` (default off, as in
    k-diffusion). Warm-up steps use the available history; order 1 is ``euler``; a step to
    ``t = 0`` is DDIM (k-diffusion's ``lms`` keeps its order there; in EDM variables its
    first-order step to ``sigma = 0`` is the same DDIM/Euler step).
    """

    order: int = eqx.field(static=True, default=4)
    lower_order_final: bool = eqx.field(static=True, default=False)

    name: ClassVar[str] = "lms"
    max_order: ClassVar[int] = 4

    def __check_init__(self):
        if not 1 <= self.order <= self.max_order:
            raise ValueError(f"LMS order must be in 1..{self.max_order}; got {self.order}.")

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        # a History whose values are drifts and whose ``ells`` hold the times they were taken at
        return History.empty(self.order - 1, x, t_end, num_steps)

    def coefficients(self, t0, t1, state: History, order):
        """``c_j = int_{t0}^{t1} l_j(t) dt`` (newest first, zero beyond ``order``), shape ``(order,)``
        of the solver's maximal order."""
        dt = t1 - t0
        # nodes in s = (t - t0) / dt; unfilled history (never selected) gets distinct values
        nodes = [jnp.zeros_like(dt)]
        for j in range(self.order - 1):
            nodes.append(jnp.where(state.count > j, (state.ells[j] - t0) / dt, -(j + 1.0)))
        s = jnp.asarray(_S, dt.dtype)
        w = jnp.asarray(_W, dt.dtype)
        rows = []
        for p in range(1, self.order + 1):
            c = []
            for j in range(p):
                lj = jnp.ones_like(s)
                for k in range(p):
                    if k != j:
                        lj = lj * (s - nodes[k]) / (nodes[j] - nodes[k])
                c.append(dt * jnp.sum(w * lj))
            rows.append(jnp.stack(c + [jnp.zeros_like(dt)] * (self.order - p)))
        return jnp.stack(rows)[jnp.clip(order, 1, self.order) - 1]

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        x0, d = ProbabilityFlowTerm(denoiser).x0_and_drift(t0, x, cond)
        order = state.order_for(self.order, self.lower_order_final, t1)
        x_euler = x + (t1 - t0) * d
        if self.order > 1:
            coef = self.coefficients(t0, t1, state, order).astype(x.dtype)
            x_high = x + jnp.tensordot(coef, jnp.concatenate([d[None], state.values]), axes=1)
            x1 = jnp.where(order == 1, x_euler, x_high)
        else:
            x1 = x_euler
        x1 = jnp.where(t1 == 0, ddim_step(process, t0, t1, x, x0), x1)
        t0 = jnp.asarray(t0, x.dtype)
        return x1, state.push(d, t0)


class IPNDM(AbstractMultistepSolver, AbstractLinearSolver):
    """iPNDM: ``eps' = sum_j a_j eps_j`` with the fixed (equal-step) Adams-Bashforth coefficients
    ``a`` of order ``k = min(order, steps taken + 1)`` (``1``; ``(3, -1)/2``; ``(23, -16, 5)/12``;
    ``(55, -59, 37, -9)/24``), then a DDIM step with ``eps'``:
    ``x1 = alpha1 x0(eps') + sigma1 eps'``, ``x0(eps') = (x - sigma0 eps') / alpha0``.

    This is the fixed-coefficient method of the DEIS paper (its repository's ``ipndm``; diffusers'
    ``IPNDMScheduler`` uses the same coefficients and a DDIM-type transfer), not the variable-step
    variant some codebases call ``ipndm_v``. In the shared form
    ``x1 = (kappa1/kappa0) x + beta1 sum_j b_j m_j`` its weights are ``b = -expm1(-h) a``.

    The coefficients assume equal steps in ``rho = sigma / alpha`` (where DDIM is Euler's step for
    ``x / alpha``): on other smooth grids orders 3 and 4 converge with order 2.

    Fields: ``order`` 1-4 (default 4), ``prediction`` (``"eps"``, the method's; ``"x0"`` applies
    the same combination to data predictions), ``lower_order_final`` (default off, as in the
    paper). Order 1, and any step to ``t = 0``, is DDIM.
    """

    order: int = eqx.field(static=True, default=4)
    prediction: str = eqx.field(static=True, default="eps")
    lower_order_final: bool = eqx.field(static=True, default=False)

    max_order: ClassVar[int] = 4
    name: ClassVar[str] = "ipndm"

    def weights(self, process, c, state, order):
        table = jnp.asarray(ADAMS_BASHFORTH[:, : self.history_size + 1], c.h.dtype)
        return -jnp.expm1(-c.h) * table[jnp.clip(order, 1, self.max_order) - 1]


class PNDM(AbstractLinearSolver, AbstractPhasedSolver):
    """F-PNDM: the first three steps are pseudo Runge-Kutta steps (four noise predictions:
    ``e1`` at ``(x, t0)``, ``e2`` at ``phi(x, e1, t0, tm)``, ``e3`` at ``phi(x, e2, t0, tm)``, ``e4``
    at ``phi(x, e3, t0, t1)``, then ``x1 = phi(x, (e1 + 2 e2 + 2 e3 + e4) / 6, t0, t1)``, with
    ``phi`` DDIM's transfer and ``tm`` the midpoint); later steps are pseudo linear multistep,
    ``x1 = phi(x, (55 e0 - 59 e1 + 37 e2 - 9 e3) / 24, t0, t1)`` over the ``e1`` of the last four
    steps. ``n`` steps cost ``4 min(n, 3) + max(n - 3, 0)`` evaluations.

    ``midpoint`` picks ``tm``: ``"t"`` (default) the midpoint in the process time, as in the paper
    and diffusers' ``PNDMScheduler`` (half the timestep spacing); ``"sigma_edm"`` the midpoint in
    ``rho = sigma / alpha``, where DDIM's transfer is Euler's step for ``x / alpha``, which makes the
    warm-up classical RK4 in ``rho`` (for ``EDM``, ``t = rho`` and both agree); ``"log_snr"`` the
    midpoint in ``lambda``. Where ``rho(t)`` is far from linear over a step (flow matching near
    ``t = 1``) the time midpoint is inaccurate. A step that ends at ``t = 0`` is a DDIM step with
    ``e1`` (one evaluation). Phases: the final DDIM step (branch 0), the pseudo Runge-Kutta steps
    (1) and the multistep ones (2); with ``phase=None`` ``lax.switch`` on an unbatched index picks
    the branch (the others' evaluations are skipped).
    """

    midpoint: str = eqx.field(static=True, default="t")
    phase: int | None = eqx.field(static=True, default=None)

    name: ClassVar[str] = "pndm"

    @property
    def needs_finite_start(self) -> bool:
        return True
    #: pseudo Runge-Kutta warm-up steps
    prk_steps: ClassVar[int] = 3

    def __check_init__(self):
        if self.midpoint not in ("t", "log_snr", "sigma_edm"):
            raise ValueError(f"PNDM midpoint must be 't', 'log_snr' or 'sigma_edm'; got {self.midpoint!r}.")

    def half_time(self, process, t0, t1):
        """The time of the pseudo Runge-Kutta midpoint evaluations."""
        if self.midpoint == "t":
            return t0 + 0.5 * (t1 - t0)
        if self.midpoint == "log_snr":
            return process.t_from_log_snr(0.5 * (process.log_snr(t0) + process.log_snr(t1)))
        return process.t_from_sigma_edm(0.5 * (process.sigma_edm(t0) + process.sigma_edm(t1)))

    def nfe(self, num_steps, final_zero=False):
        prk = min(num_steps, self.prk_steps)
        total = 4 * prk + (num_steps - prk)
        if final_zero and num_steps <= self.prk_steps:
            total -= 3  # the last step (a warm-up one) is a DDIM step instead
        return total

    def phases(self, num_steps, ends_at_zero):
        last = 1 if ends_at_zero else 0
        prk = min(num_steps - last, self.prk_steps)
        return ((prk, 1), (num_steps - last - prk, 2), (last, 0))

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return History.empty(3, x, t_end, num_steps)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        eps = lambda y, t: denoiser.predict(y, t, cond, target="eps")
        e1 = eps(x, t0)

        def final():
            return _ddim_from_eps(process, t0, t1, x, e1)

        def prk():
            tm = self.half_time(process, t0, t1)
            e2 = eps(_eps_transfer(process, t0, tm, x, e1), tm)
            e3 = eps(_eps_transfer(process, t0, tm, x, e2), tm)
            e4 = eps(_eps_transfer(process, t0, t1, x, e3), t1)
            return _eps_transfer(process, t0, t1, x, (e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0)

        def plms():
            k = jnp.minimum(4, state.count + 1)  # 4 after the warm-up; lower under a short history
            coef = jnp.asarray(ADAMS_BASHFORTH, x.dtype)[k - 1]
            e = jnp.tensordot(coef, jnp.concatenate([e1[None], state.values]), axes=1)
            return _eps_transfer(process, t0, t1, x, e)

        if self.phase is not None:
            x1 = (final, prk, plms)[self.phase]()
        else:  # unbatched predicates: the untaken branches' evaluations really are skipped
            branch = jnp.where(t1 == 0, 0, jnp.where(state.step < self.prk_steps, 1, 2))
            x1 = jax.lax.switch(branch, [final, prk, plms])
        return x1, state.push(e1, jnp.asarray(t0, x.dtype))

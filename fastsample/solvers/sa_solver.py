"""SA-Solver: stochastic Adams predictor and corrector.

Xue, Yi, Chu, Liu, Lu, Ma, Li: SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models (NeurIPS 2023). The reverse SDE with noise ``tau`` (``tau = 0``: the PF-ODE) in data
prediction, over a step with ``h = lambda1 - lambda0`` and ``c = 1 + tau^2``, is solved by

    x1 = (sigma1 / sigma0) e^{-tau^2 h} x + alpha1 c int_{lambda0}^{lambda1} e^{-c (lambda1 - l)} D(l) dl
         + sigma1 sqrt(1 - e^{-2 tau^2 h}) xi.

Replacing ``D`` by its Lagrange interpolant through nodes ``v_j = (lambda_j - lambda0) / h``
gives weights ``c h rho`` with ``sum_j rho_j v_j^k = k! phi_{k+1}(-c h)`` (a transposed
Vandermonde system, the one UniPC solves: ``_shared.vandermonde_solve``). The predictor (order ``p``) uses the
newest ``p`` outputs; the corrector (order ``q``) recomputes the previous step with the output
just evaluated at the predicted point as an extra node at ``v = 1`` and the *same* noise ``xi``,
so it costs no evaluation. ``tau`` is SDE-DPM-Solver++'s ``sqrt(eta)``: at ``tau = 0`` without the
corrector the predictor is ``dpmpp_2m`` (``solver_type="heun"``) for ``p = 2`` and the
third-order ``dpmpp_3m`` (``exact_third_order=True``) for ``p = 3``.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ._shared import check_nonnegative, pad_zeros, select_order, step_ratios, vandermonde_solve
from .base import AbstractLinearSolver
from .exponential import AbstractMultistepSolver, History, phi, prediction_step
from .stochastic_base import AbstractStochasticSolver, eta_h

__all__ = ["SASolver", "SAState"]


class SAState(NamedTuple):
    hist: History  # model outputs (data predictions), newest first
    x_prev: jax.Array  # (corrected) start of the last step
    t_prev: jax.Array
    z_prev: jax.Array  # the noise the last step used (the corrector reuses it)


def _b(ch, n):
    return [math.factorial(k) * phi(k + 1, -ch) for k in range(n)]


class SASolver(AbstractStochasticSolver, AbstractMultistepSolver, AbstractLinearSolver):
    """SA-Solver (Xue et al. 2023): stochastic Adams predictor of order ``predictor_order`` (1-3)
    and corrector of order ``corrector_order`` (0: none, 1-3), noise ``tau`` applied on steps whose
    starting EDM noise level ``sigma/alpha`` lies in ``tau_interval`` (0 elsewhere; the paper's
    piecewise-constant ``tau`` function). One evaluation per step; warm-up and lower-order-final
    as the multistep ODE solvers."""

    corrector_order: int = eqx.field(static=True, default=2)
    tau: float = 1.0
    tau_interval: tuple[float, float] = eqx.field(static=True, default=(0.0, float("inf")))
    s_noise: float = 1.0

    name: ClassVar[str] = "sa_solver"

    def __init__(self, predictor_order: int = 2, corrector_order: int = 2, tau: float = 1.0,
                 tau_interval=(0.0, float("inf")), s_noise: float = 1.0, lower_order_final: bool = True):
        self.order = predictor_order
        self.prediction = "x0"
        self.lower_order_final = lower_order_final
        self.corrector_order = corrector_order
        self.tau = tau
        self.tau_interval = tuple(float(v) for v in tau_interval)
        self.s_noise = s_noise

    def __check_init__(self):
        if not 1 <= self.order <= 3:
            raise ValueError(f"sa_solver predictor_order must be 1, 2 or 3; got {self.order}.")
        if self.corrector_order not in (0, 1, 2, 3):
            raise ValueError(
                f"sa_solver corrector_order must be 0 (no corrector), 1, 2 or 3; got {self.corrector_order}.")
        lo, hi = self.tau_interval
        if not 0 <= lo <= hi:
            raise ValueError(f"sa_solver tau_interval must be (lo, hi) with 0 <= lo <= hi; got {self.tau_interval}.")
        check_nonnegative(self.name, "tau", self.tau)
        check_nonnegative(self.name, "s_noise", self.s_noise)

    @property
    def history_size(self) -> int:
        # the corrector needs the previous output even at order 1 (it marks that a step was taken)
        return max(self.order - 1, self.corrector_order - 1, min(self.corrector_order, 1))

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        hist = History.empty(self.history_size, x, t_end, num_steps)
        return SAState(hist, x, jnp.asarray(t_end, x.dtype), jnp.zeros_like(x))

    def tau2(self, process, t):
        """``tau^2`` of a step starting at ``t``."""
        s = process.sigma_edm(t)
        lo, hi = self.tau_interval
        return jnp.where((s >= lo) & (s <= hi), jnp.square(jnp.asarray(self.tau, s.dtype)), 0.0)

    def step_scalars(self, process, t0, t1):
        c = prediction_step(process, t0, t1, "x0")
        eh = eta_h(self.tau2(process, t0), c.h)
        return c._replace(kappa1=c.kappa1 * jnp.exp(-eh), h=c.h + eh)

    def _weights(self, ch, nodes, q_max, order, size):
        """Weights ``c h rho`` of the values at ``nodes`` for interpolation orders ``1..q_max``."""
        b = _b(ch, q_max)
        zero = jnp.zeros_like(ch)
        cands = [pad_zeros([ch * r for r in vandermonde_solve(nodes[:q], b)], size, zero) for q in range(1, q_max + 1)]
        return select_order(order, cands)

    def weights(self, process, c, state: History, order):
        # c.h is the (safe) (1 + tau^2) h; the nodes are in units of h = ell1 - ell0 itself
        d = c.ell1 - c.ell0
        h = jnp.where(jnp.isfinite(d), d, 1.0)
        nodes = [jnp.zeros_like(h)] + step_ratios(state.ells, c.ell0, h, state.count, 0, self.order - 1)
        return self._weights(c.h, nodes, self.order, order, self.history_size + 1)

    def update(self, denoiser, t0, t1, x, cond, state: SAState, noise=None):
        process = denoiser.process
        m = self.evaluate(denoiser, t0, x, cond)
        if self.corrector_order > 0:
            x = self.correct(process, t0, x, m, state)
        x1, hist = self.advance(process, t0, t1, x, m, state.hist)
        z = self.s_noise * noise.step_normal(x)
        x1 = x1 + self._noise_std(process, t0, t1).astype(x.dtype) * z
        return x1, SAState(hist, x, jnp.asarray(t0, x.dtype), z)

    def _noise_std(self, process, t0, t1):
        h = process.log_snr(t1) - process.log_snr(t0)
        return process.sigma(t1) * jnp.sqrt(-jnp.expm1(-2.0 * eta_h(self.tau2(process, t0), h)))

    def correct(self, process, t0, x, m, state: SAState):
        """SA-Corrector: the last step recomputed from ``x_prev`` with ``m`` (evaluated at the
        predicted ``x``) as an extra node and the same noise; ``x`` unchanged before the first
        step and after a step from an infinite log-SNR."""
        hist = state.hist
        on = hist.count >= 1
        t_prev = jnp.where(on, state.t_prev, t0)
        c = prediction_step(process, t_prev, t0, "x0")
        on = on & jnp.isfinite(c.h) & (c.h != 0)
        h = jnp.where(on, c.h, 1.0)
        tau2 = self.tau2(process, t_prev)
        ch = (1.0 + tau2) * h
        q_max = self.corrector_order
        earlier = step_ratios(hist.ells, hist.ells[0], h, hist.count, 1, q_max - 2)
        nodes = [jnp.ones_like(h), jnp.zeros_like(h)] + earlier
        order = jnp.minimum(q_max, hist.count + 1)
        w = self._weights(ch, nodes, q_max, order, q_max).astype(x.dtype)
        vals = jnp.concatenate([m[None], hist.values[: q_max - 1]])
        combo = jnp.tensordot(w, vals, axes=1)
        a1, s1 = process.alpha_sigma(t0)
        decay = jnp.exp(-tau2 * h)
        full = ((c.kappa1 / c.kappa0) * decay).astype(x.dtype) * state.x_prev + a1.astype(x.dtype) * combo \
            + self._noise_std(process, t_prev, t0).astype(x.dtype) * state.z_prev
        return jnp.where(on, full, x)

"""ER-SDE-Solver: solvers of the extended reverse-time SDE, orders 1-3.

Cui, Zhang, Feng, Shen, Zhou, Yang: Elucidating the Solution Space of Extended Reverse-Time SDE
for Diffusion Models (2023). In EDM variables (``y = x / alpha``, ``s = sigma / alpha``) the
extended reverse SDE with noise-scale function ``phi`` (``phi(s) = s``: the PF-ODE,
``phi(s) = s^2``: the reverse SDE) has the exact solution from ``s0`` down to ``s1``

    y1 = (phi1/phi0) y0 + phi1 int_{s1}^{s0} phi'(s)/phi(s)^2 D(s) ds + sqrt(s1^2 - s0^2 (phi1/phi0)^2) z.

With ``D(s) ~ D0 + (s - s0) c1 + (s - s0)^2 c2`` (Newton interpolation of the last one to three
data predictions in ``s``; multistep, one evaluation per step) the integrals are, by parts,
``1 - phi1/phi0``, ``(s1 - s0) + phi1 I1`` and ``(s1 - s0)^2 + 2 phi1 I2`` with
``I1 = int_{s1}^{s0} ds / phi`` and ``I2 = int_{s1}^{s0} (s - s0) / phi ds``, computed by
Gauss-Legendre quadrature in ``log s`` (``phi`` is arbitrary). Valid noise-scale functions keep
``phi(s)/s`` non-decreasing (the noise variance is clamped at 0 otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._shared import check_nonnegative
from .base import AbstractLinearSolver
from .exponential import History
from .stochastic_base import AbstractStochasticSolver

__all__ = ["ERSDE", "NOISE_SCALES"]

#: named noise-scale functions, as ``log phi(s)``: ``ode`` (PF-ODE), ``sde`` (the reverse SDE) and
#: ``default``, ``phi(s) = s (exp(s^0.3) + 10)`` (the authors' default noise scale, "SDE_5", one of
#: the special solutions of the paper's Appendix A.8)
NOISE_SCALES: dict[str, Callable] = {
    "ode": lambda s: jnp.log(s),
    "sde": lambda s: 2.0 * jnp.log(s),
    "default": lambda s: jnp.log(s) + jnp.log(jnp.exp(s**0.3) + 10.0),
}


class ERSDE(AbstractStochasticSolver, AbstractLinearSolver):
    """ER-SDE-Solver-``order`` (1-3) with noise-scale function ``noise_scale``: a name of
    :data:`NOISE_SCALES` or a callable ``phi(s)`` of the EDM noise level. ``order=1`` with
    ``noise_scale="ode"`` is DDIM; with ``"sde"`` it is DDPM's ancestral step. Warm-up and
    lower-order-final as the multistep ODE solvers; a step onto ``t = 0`` is first order and
    noise-free. The grid must start at a finite log-SNR."""

    order: int = eqx.field(static=True, default=3)
    noise_scale: str | Callable = eqx.field(static=True, default="default")
    s_noise: float = 1.0
    lower_order_final: bool = eqx.field(static=True, default=True)
    quadrature_points: int = eqx.field(static=True, default=12)

    name: ClassVar[str] = "er_sde"

    def __check_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f"er_sde order must be 1, 2 or 3; got {self.order}.")
        if not callable(self.noise_scale) and self.noise_scale not in NOISE_SCALES:
            raise ValueError(f"er_sde noise_scale must be one of {', '.join(NOISE_SCALES)} or a callable phi(sigma); "
                             f"got {self.noise_scale!r}.")
        check_nonnegative(self.name, "s_noise", self.s_noise)

    @property
    def needs_finite_start(self) -> bool:
        return True

    def log_phi(self, s):
        if callable(self.noise_scale):
            return jnp.log(self.noise_scale(s))
        return NOISE_SCALES[self.noise_scale](s)

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return History.empty(self.order - 1, x, t_end, num_steps)

    def _integrals(self, s1, s0):
        """``(I1, I2)`` by Gauss-Legendre quadrature in ``u = log s`` over ``[log s1, log s0]``."""
        nodes, weights = np.polynomial.legendre.leggauss(self.quadrature_points)
        u1, u0 = jnp.log(s1), jnp.log(s0)
        half = 0.5 * (u0 - u1)
        i1 = i2 = jnp.zeros_like(s0)
        for v, w in zip(nodes, weights, strict=True):
            u = u1 + half * (v + 1.0)
            s = jnp.exp(u)
            f = w * half * jnp.exp(u - self.log_phi(s))  # ds / phi = s du / phi
            i1, i2 = i1 + f, i2 + f * (s - s0)
        return i1, i2

    def update(self, denoiser, t0, t1, x, cond, state: History, noise=None):
        process = denoiser.process
        d0 = denoiser(x, t0, cond)
        a0, a1, sig1 = process.alpha(t0), process.alpha(t1), process.sigma(t1)
        s0, s1 = process.sigma_edm(t0), process.sigma_edm(t1)
        final = t1 == 0
        s1_safe = jnp.where(final, 0.5 * s0, s1)
        lp0, lp1 = self.log_phi(s0), self.log_phi(s1)
        ratio = jnp.exp(lp1 - lp0)  # phi1 / phi0 (0 onto t = 0)
        order = state.order_for(self.order, self.lower_order_final, t1)
        w = [1.0 - ratio, jnp.zeros_like(s0), jnp.zeros_like(s0)]
        if self.order > 1:
            i1, i2 = self._integrals(s1_safe, s0)
            phi1 = jnp.exp(self.log_phi(s1_safe))
            A1 = (s1_safe - s0) + phi1 * i1
            A2 = (s1_safe - s0) ** 2 + 2.0 * phi1 * i2
            # earlier noise levels (dummies while the history fills; never selected then)
            sa = jnp.where(state.count >= 1, state.ells[0], 2.0 * s0)
            sb = jnp.where(state.count >= 2, state.ells[1], 4.0 * s0) if self.order > 2 else 4.0 * s0
            d01 = jnp.asarray([1.0, -1.0, 0.0], s0.dtype) / (s0 - sa)
            d12 = jnp.asarray([0.0, 1.0, -1.0], s0.dtype) / (sa - sb)
            d012 = (d01 - d12) / (s0 - sb)
            w1 = jnp.stack(w)
            w2 = w1 + A1 * d01
            w3 = w1 + A1 * (d01 + (s0 - sa) * d012) + A2 * d012
            w = jnp.where(order == 1, w1, jnp.where(order == 2, w2, w3))
        else:
            w = jnp.stack(w)
        w = w.astype(x.dtype)
        combo = w[0] * d0
        for j in range(self.order - 1):
            combo = combo + w[j + 1] * state.values[j]
        # noise: sqrt(s1^2 - s0^2 ratio^2) = s1 sqrt(1 - exp(2 g)), g = log(phi1/s1) - log(phi0/s0) <= 0
        lp1s = self.log_phi(s1_safe)
        g = jnp.minimum((lp1s - jnp.log(s1_safe)) - (lp0 - jnp.log(s0)), 0.0)
        std = jnp.where(final, 0.0, sig1 * jnp.sqrt(-jnp.expm1(2.0 * g)))
        x1 = (a1 * ratio / a0).astype(x.dtype) * x + a1.astype(x.dtype) * combo
        x1 = x1 + std.astype(x.dtype) * (self.s_noise * noise.step_normal(x))
        return x1, state.push(d0, s0)

"""Restart sampling.

Xu, Deng, Liu, Liu, Tegmark, Jaakkola: Restart Sampling for Improving Generative Processes
(NeurIPS 2023). An ODE solver runs down the grid; when it passes the lower end ``s_min`` of a
restart interval ``[s_min, s_max]`` (EDM noise levels ``sigma / alpha``) it lands on the first
grid point ``t_lo`` at or below it, and then, ``K`` times, jumps forward by adding noise
(``y <- y + sqrt(s_max^2 - s_lo^2) z`` in EDM variables) and solves the ODE back from ``s_max``
to ``t_lo`` in ``restart_steps`` steps (Karras ``rho = 7`` spacing). The added noise contracts
the accumulated error; the ODE keeps the steps cheap.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .base import AbstractFastSolver
from .runge_kutta import Heun
from .stochastic_base import AbstractStochasticSolver

__all__ = ["Restart"]


class Restart(AbstractStochasticSolver):
    """Restart sampling (Xu et al. 2023) around any deterministic solver (``inner``, an instance;
    ``heun`` by default, as in the paper; kept in the field ``solver``; the registry's
    ``get_solver("restart", inner="dpmpp_2m", ...)`` takes a name and its options).

    ``intervals``: restart intervals ``(s_min, s_max)`` in EDM noise levels (one pair or a tuple
    of pairs); ``K``: repetitions per interval (an int for all, or one per interval);
    ``restart_steps``: inner steps of each backward pass. Every interval must be crossed by a step
    of the grid that ends above ``t = 0`` (checked on concrete grids), so the NFE is exact:
    ``solver.nfe(n) + sum_j K_j solver.nfe(restart_steps)``. ``K = 0`` is ``solver`` exactly.
    Forward jumps use fresh draws ``normal(j)`` of the step that reaches ``t_lo``."""

    solver: AbstractFastSolver
    intervals: tuple[tuple[float, float], ...] = eqx.field(static=True)
    K: tuple[int, ...] = eqx.field(static=True)
    restart_steps: int = eqx.field(static=True)

    name: ClassVar[str] = "restart"

    def __init__(self, inner: AbstractFastSolver | None = None, intervals=((0.06, 0.30),), K=2,
                 restart_steps: int = 3):
        solver = Heun() if inner is None else inner
        if isinstance(solver, AbstractStochasticSolver) or not isinstance(solver, AbstractFastSolver):
            raise ValueError("restart needs a deterministic fixed-grid inner solver (an instance; by name: "
                             f"get_solver('restart', inner='heun', ...)); got {type(solver).__name__}.")
        pairs = np.asarray(intervals, dtype=np.float64)
        if pairs.ndim == 1:
            pairs = pairs[None]
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] < 1:
            raise ValueError(f"restart intervals must be (s_min, s_max) pairs; got {intervals!r}.")
        if not np.all((pairs[:, 0] > 0) & (pairs[:, 1] > pairs[:, 0]) & np.isfinite(pairs[:, 1])):
            raise ValueError(
                f"restart intervals need 0 < s_min < s_max < inf (EDM noise levels); got {pairs.tolist()}.")
        ks = (K,) * pairs.shape[0] if isinstance(K, int) else tuple(K)
        if len(ks) != pairs.shape[0] or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ks):
            raise ValueError(f"restart K must be an integer >= 0 or one per interval ({pairs.shape[0]}); got {K!r}.")
        if not isinstance(restart_steps, int) or restart_steps < solver.min_steps():
            raise ValueError(f"restart_steps must be an integer >= {solver.min_steps()}; got {restart_steps!r}.")
        self.solver = solver
        self.intervals = tuple((float(a), float(b)) for a, b in pairs)
        self.K = ks
        self.restart_steps = restart_steps

    @property
    def needs_finite_start(self) -> bool:
        return self.solver.needs_finite_start

    def order(self, terms):
        return self.solver.order(terms) if callable(self.solver.order) else self.solver.order

    def min_steps(self) -> int:
        return self.solver.min_steps()

    def nfe(self, num_steps, final_zero=False):
        return self.solver.nfe(num_steps, final_zero) + sum(k * self.solver.nfe(self.restart_steps) for k in self.K)

    def check_grid(self, process, ts) -> None:
        super().check_grid(process, ts)
        positive = ts[ts > 0]
        for s_min, _ in self.intervals:
            t_min = float(process.t_from_sigma_edm(jnp.asarray(s_min)))
            if not positive[-1] <= t_min < ts[0]:
                raise ValueError(
                    f"restart interval s_min={s_min} (t={t_min:.6g}) is not crossed by a step of the grid that ends "
                    f"above t=0 (grid from t={float(ts[0]):.6g} to t={float(positive[-1]):.6g}): choose s_min inside "
                    "the grid's noise levels."
                )

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return self.solver.init_state(denoiser, x, cond, t_end, num_steps)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        x1, state = self.solver.update(denoiser, t0, t1, x, cond, state)
        offset = 0
        for (s_min, s_max), k in zip(self.intervals, self.K, strict=True):
            if k == 0:
                continue
            t_j = denoiser.process.t_from_sigma_edm(jnp.asarray(s_min, x.dtype))
            hit = (t1 <= t_j) & (t_j < t0) & (t1 > 0)
            x1 = jax.lax.cond(
                hit, lambda v, s=s_max, k=k, o=offset: self._restart(denoiser, t1, v, cond, noise, s, k, o),
                lambda v: v, x1)
            offset += k
        return x1, state

    def _restart(self, denoiser, t_lo, x, cond, noise, s_max, k, offset):
        process, inner, n = denoiser.process, self.solver, self.restart_steps
        t_lo = jnp.asarray(t_lo, x.dtype)
        s_lo = process.sigma_edm(t_lo)
        t_hi = process.t_from_sigma_edm(jnp.asarray(s_max, x.dtype))
        s_hi = process.sigma_edm(t_hi)  # consistent also where t_hi is clamped to the process range
        rho = 7.0
        ramp = jnp.linspace(0.0, 1.0, n + 1, dtype=x.dtype)
        sig = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        sub = process.t_from_sigma_edm(sig).at[0].set(t_hi).at[-1].set(t_lo)
        a_lo, a_hi = process.alpha(t_lo), process.alpha(t_hi)
        jump = (a_hi * jnp.sqrt(jnp.maximum(s_hi**2 - s_lo**2, 0.0))).astype(x.dtype)

        def body(carry, i):
            v, st = carry
            return inner.update(denoiser, sub[i], sub[i + 1], v, cond, st), None

        def repeat(r, v):
            v = (a_hi / a_lo).astype(x.dtype) * v + jump * noise.normal(offset + r, v)
            (v, _), _ = jax.lax.scan(body, (v, inner.init_state(denoiser, v, cond, t_lo, n)), jnp.arange(n))
            return v

        return jax.lax.fori_loop(0, k, repeat, x)

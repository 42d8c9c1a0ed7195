"""Shared machinery of exponential integrators (DDIM, DPM-Solver, DPM-Solver++, DEIS, UniPC, ...).

The semi-linear PF-ODE is solved exactly in its linear part. With data prediction
(``x0``) the state scales with ``sigma`` and the prediction enters with weight ``alpha``; with
noise prediction (``eps``) the roles swap. One set of formulas covers both, written in
"prediction variables" (Lu et al., DPM-Solver 2022 and DPM-Solver++ 2022):

    x0 prediction:  kappa = sigma, beta = alpha, ell = lambda
    eps prediction: kappa = alpha, beta = sigma, ell = -lambda

and a first-order step reads ``x1 = (kappa1 / kappa0) x - beta1 expm1(-h) m`` with
``h = ell1 - ell0``. Higher orders add finite differences of earlier predictions ``m`` weighted by
the phi-functions :func:`phi`, which have a series branch for small arguments.

First-order steps always use the data-prediction form, whose coefficients stay finite when
the first point has ``alpha = 0`` (flow matching at ``t = 1``) or the last has ``sigma = 0``.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .base import AbstractFastSolver, AbstractLinearSolver

__all__ = [
    "DDIM",
    "ddim_step",
    "phi",
    "PredictionStep",
    "prediction_step",
    "History",
    "AbstractMultistepSolver",
]

_SERIES_TERMS = 24


def phi(k: int, z):
    """``phi_k(z) = sum_j z^j / (j + k)!`` (``phi_0 = exp``, ``phi_1 = expm1(z)/z``, and
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``), accurate for every ``z`` including ``z -> 0``."""
    z = jnp.asarray(z)
    if k == 0:
        return jnp.exp(z)
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, z, 0.0)
    series = jnp.zeros_like(zs)
    for j in reversed(range(_SERIES_TERMS)):  # Horner's rule
        series = series * zs + 1.0 / math.factorial(j + k)
    zd = jnp.where(small, 1.0, z)
    direct = jnp.expm1(zd) / zd
    for i in range(1, k):
        direct = (direct - 1.0 / math.factorial(i)) / zd
    return jnp.where(small, series, direct)


def ddim_step(process, t0, t1, x, x0_hat):
    """First-order exponential step with data prediction (DDIM, DPM-Solver++(1)):
    ``x1 = (sigma1 / sigma0) x - alpha1 expm1(-h) x0_hat``. Finite when ``alpha0 = 0`` or
    ``sigma1 = 0`` (``h = +inf``)."""
    a1, s1 = process.alpha_sigma(t1)
    s0 = process.sigma(t0)
    h = process.log_snr(t1) - process.log_snr(t0)
    return (s1 / s0) * x - a1 * jnp.expm1(-h) * x0_hat


class PredictionStep(NamedTuple):
    """Scalars of one step in prediction variables (see the module docstring)."""

    kappa0: jax.Array
    kappa1: jax.Array
    beta1: jax.Array
    h: jax.Array  # ell1 - ell0
    ell0: jax.Array
    ell1: jax.Array


def prediction_variables(process, t, prediction: str):
    """``(kappa, beta, ell)`` of ``process`` at ``t`` for ``prediction`` in ``x0`` / ``eps``."""
    a, s = process.alpha_sigma(t)
    lam = process.log_snr(t)
    return (s, a, lam) if prediction == "x0" else (a, s, -lam)


def prediction_step(process, t0, t1, prediction: str) -> PredictionStep:
    k0, _, l0 = prediction_variables(process, t0, prediction)
    k1, b1, l1 = prediction_variables(process, t1, prediction)
    return PredictionStep(k0, k1, b1, l1 - l0, l0, l1)


def ell_to_time(process, ell, prediction: str):
    return process.t_from_log_snr(ell if prediction == "x0" else -ell)


class DDIM(AbstractLinearSolver):
    """DDIM (Song, Meng, Ermon, Denoising Diffusion Implicit Models, 2021), the first-order
    exponential integrator: exact for single-point data on any grid, and the same update
    whichever prediction the model makes (DPM-Solver-1 = DPM-Solver++(1) = DDIM)."""

    name: ClassVar[str] = "ddim"

    def order(self, terms):
        return 1

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        return ddim_step(denoiser.process, t0, t1, x, denoiser(x, t0, cond)), state


class History(NamedTuple):
    """Fixed-shape multistep history, newest first."""

    values: jax.Array  # (k, *x.shape) earlier model outputs (in the solver's prediction)
    ells: jax.Array  # (k,) the ``ell`` at which each was produced
    count: jax.Array  # number of valid entries
    step: jax.Array  # index of the step about to be taken
    num_steps: jax.Array  # total steps of the grid, -1 if unknown
    t_end: jax.Array  # last time of the grid

    @classmethod
    def empty(cls, capacity: int, x, t_end, num_steps: int | None) -> History:
        """An empty history for ``capacity`` earlier outputs shaped like ``x``."""
        return cls(
            jnp.zeros((capacity,) + x.shape, x.dtype), jnp.zeros((capacity,), x.dtype),
            jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32),
            jnp.asarray(-1 if num_steps is None else num_steps, jnp.int32), jnp.asarray(t_end, x.dtype),
        )

    def order_for(self, max_order: int, lower_order_final: bool, t1, below: int | None = 15):
        """The order of the coming step (traced): ``max_order`` limited by the warm-up
        (``count + 1``), by lower-order-final (at most ``n - i`` on grids under ``below`` = 15
        steps, diffusers' DPM-Solver rule; on every grid if ``below`` is ``None``, UniPC's rule;
        only when the step count is known) and to 1 on a step to ``t = 0``."""
        order = jnp.minimum(max_order, self.count + 1)
        if lower_order_final:
            short = (self.num_steps >= 0) & ((self.num_steps < below) if below is not None else True)
            order = jnp.where(short, jnp.minimum(order, self.num_steps - self.step), order)
        return jnp.where(t1 == 0, 1, order)

    def push(self, value, ell) -> History:
        """Record ``value`` produced at ``ell``. An output at infinite ``ell`` (pure noise,
        ``alpha = 0``) is infinitely far from every later point and carries no information
        for finite differences: it is stored with a safe ``ell`` and the count restarts."""
        if self.values.shape[0] == 0:
            return self._replace(step=self.step + 1)
        finite = jnp.isfinite(ell)
        values = jnp.concatenate([value[None], self.values[:-1]])
        ells = jnp.concatenate([jnp.reshape(jnp.where(finite, ell, 0.0), (1,)), self.ells[:-1]])
        k = self.values.shape[0]
        count = jnp.where(finite, jnp.minimum(self.count + 1, k), 0)
        return History(values, ells, count, self.step + 1, self.num_steps, self.t_end)


class AbstractMultistepSolver(AbstractFastSolver):
    """Linear multistep exponential integrators: one model evaluation per step, earlier outputs
    kept in a fixed-shape :class:`History`. Warm-up and lower-order-final steps select smaller
    orders with ``jnp.where``, never with extra model evaluations.

    ``lower_order_final`` (default on) lowers the order of the last steps of grids shorter than
    15 steps so that step ``i`` of ``n`` uses at most order ``n - i`` (DPM-Solver++'s and
    diffusers' rule); a step that ends at ``sigma = 0`` always uses order 1. Under
    ``diffeqsolve`` the number of steps is unknown and only the ``sigma = 0`` rule applies.

    Subclasses implement :meth:`advance`, which combines the newest output with the history.
    """

    order: int = eqx.field(static=True, default=2)
    prediction: str = eqx.field(static=True, default="x0")
    lower_order_final: bool = eqx.field(static=True, default=True)
    #: grids shorter than this get lower-order-final steps (15: diffusers' DPM-Solver(++) / DEIS
    #: rule); ``None``: every grid (the UniPC reference code and diffusers' UniPC scheduler)
    lower_order_final_below: int | None = eqx.field(static=True, default=15)

    max_order: ClassVar[int] = 3

    def __check_init__(self):
        if not 1 <= self.order <= self.max_order:
            raise ValueError(f"{type(self).__name__} order must be in 1..{self.max_order}; got {self.order}.")
        if self.prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' or 'eps'; got {self.prediction!r}.")

    @property
    def history_size(self) -> int:
        return self.order - 1

    @property
    def needs_finite_start(self) -> bool:
        return self.prediction == "eps"

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return History.empty(self.history_size, x, t_end, num_steps)

    def step_order(self, state: History, t1):
        """The order used by the coming step (see :meth:`History.order_for`)."""
        return state.order_for(self.order, self.lower_order_final, t1, self.lower_order_final_below)

    def evaluate(self, denoiser, t0, x, cond):
        """The model output this solver works with (one NFE)."""
        return denoiser.predict(x, t0, cond, target=self.prediction)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        return self.advance(denoiser.process, t0, t1, x, self.evaluate(denoiser, t0, x, cond), state)

    def advance(self, process, t0, t1, x, m, state):
        """Step from ``t0`` to ``t1`` given the newest output ``m``; returns ``(x1, state)``."""
        order = self.step_order(state, t1)
        c = self.step_scalars(process, t0, t1)
        w = self.weights(process, c._replace(h=safe_step(c, t1)), state, order)
        if self.prediction == "x0":
            # In data-prediction variables order 1 is DDIM itself, finite also for h = inf
            # (sigma1 = 0): select its weights as scalars, so the update stays one fused expression.
            first = jnp.zeros_like(w).at[0].set(-jnp.expm1(-c.h))
            w = jnp.where(order == 1, first, w)
        w = w.astype(x.dtype)
        combo = w[0] * m
        for j in range(self.history_size):
            combo = combo + w[j + 1] * state.values[j]
        x1 = (c.kappa1 / c.kappa0) * x + c.beta1 * combo
        if self.prediction == "eps":  # here order 1 must use the data-prediction form (sigma1 = 0)
            x1 = jnp.where(order == 1, ddim_step(process, t0, t1, x, _x0_from_eps(process, t0, x, m)), x1)
        return x1, state.push(m, c.ell0)

    def step_scalars(self, process, t0, t1) -> PredictionStep:
        """The step's scalars in prediction variables (SDE variants shift ``h`` and ``kappa1``)."""
        return prediction_step(process, t0, t1, self.prediction)

    def weights(self, process, c: PredictionStep, state: History, order):
        """Weights ``b`` of ``x1 = (kappa1/kappa0) x + beta1 sum_j b_j m_j`` (``m_0`` newest) for
        the traced ``order``, shape ``(history_size + 1,)``."""
        raise NotImplementedError


def _x0_from_eps(process, t, x, eps):
    a, s = process.alpha_sigma(t)
    return (x - s * eps) / a


def safe_step(c: PredictionStep, t1):
    """``h`` with the ``sigma = 0`` step (``h = inf``) replaced by 1, for the coefficients of
    orders that are never selected there (keeps values and gradients finite)."""
    return jnp.where((t1 == 0) | ~jnp.isfinite(c.h), 1.0, c.h)

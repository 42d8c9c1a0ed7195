"""UniPC: the UniP-p multistep predictor and the UniC corrector.

Zhao, Bai, Rao, Zhou, Lu: UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models (NeurIPS 2023), the "B(h)" multistep variants (their Algorithms for data and
noise prediction). In the prediction variables of ``exponential.py`` (``hh = -h``, ``m_0`` the
newest model output at ``t0``, ``r_k = (ell_k - ell_0) / h`` for earlier outputs ``m_k``):

    x1 = (kappa1 / kappa0) x - beta1 expm1(hh) m_0 - beta1 B(hh) sum_k rho_k D_k,
    D_k = (m_k - m_0) / r_k,   B(hh) = hh ("bh1") or expm1(hh) ("bh2"),

with ``rho`` solving ``sum_k rho_k r_k^(n-1) = b_n = n! hh phi_(n+1)(hh) / B(hh)``. UniP-p uses
``p - 1`` earlier outputs (order 2 takes the paper's closed form ``rho = 1/2``); UniC-p adds the
output at the freshly predicted point (``r = 1``) and solves the full ``p x p`` system (order 1:
``rho = 1/2``), raising the order by one. The corrector reuses the evaluation the next step makes
anyway, so it costs no model evaluation; the predictor then continues from the corrected point
with that same output (it is not re-evaluated there).
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ._shared import pad_zeros, select_order, step_ratios, vandermonde_solve
from .base import AbstractLinearSolver, AbstractWrapper
from .exponential import (
    AbstractMultistepSolver,
    History,
    phi,
    prediction_step,
    prediction_variables,
)

__all__ = ["UniPC", "UniC", "CorrectorState", "UniCState"]

VARIANTS = ("bh1", "bh2")


class CorrectorState(NamedTuple):
    """What UniC needs to correct the point the last predictor step produced."""

    hist: History  # earlier model outputs, newest (m at x_prev) first; capacity >= the predictor order
    x_prev: jax.Array  # the (corrected) start point of the last predictor step
    t_prev: jax.Array  # its time
    order_prev: jax.Array  # the order that step used (0 before the first step)


class UniCState(NamedTuple):
    """State of :class:`UniC`: the base solver's own state and the corrector's."""

    base: object
    corrector: CorrectorState


# ----- coefficients ---------------------------------------------------------------------------


def _bh(hh, variant: str):
    """``g`` with ``B(hh) = hh g``: 1 for ``bh1``, ``phi_1(hh) = expm1(hh) / hh`` for ``bh2``."""
    return jnp.ones_like(hh) if variant == "bh1" else phi(1, hh)


def _b_vector(hh, g, n: int):
    """``b_i = i! hh phi_(i+1)(hh) / B(hh)`` for ``i = 1..n`` (stable as ``hh -> 0``)."""
    return [math.factorial(i) * phi(i + 1, hh) / g for i in range(1, n + 1)]


def _predictor_rhos(q: int, rks, b):
    """UniP-q: ``rho`` for the ``q - 1`` earlier outputs (order 2: the paper's ``1/2``)."""
    if q == 1:
        return []
    if q == 2:
        return [0.5 + 0.0 * b[0]]
    return vandermonde_solve(rks[: q - 1], b)


def _corrector_rhos(q: int, rks, b):
    """UniC-q: ``rho`` for the ``q - 1`` earlier outputs followed by the new one (``r = 1``)."""
    if q == 1:
        return [0.5 + 0.0 * b[0]]
    return vandermonde_solve(list(rks[: q - 1]) + [jnp.ones_like(b[0])], b)


def unic_correct(process, prediction: str, variant: str, scale, t0, x, m, cs: CorrectorState):
    """UniC: the corrected ``x`` at ``t0``, given the output ``m`` evaluated at the predicted ``x``.

    Recomputes the last step from ``cs.x_prev`` at ``cs.t_prev`` with the outputs of the history
    (``cs.hist.values[0]`` at ``x_prev``, then earlier ones) and ``m``, at the order ``p`` that step
    used, with a ``p``-point UniC (order ``p + 1``). ``scale`` blends predictor (0) and corrector (1).
    Returns ``x`` unchanged before the first step and after a step that started at an infinite
    log-SNR (``alpha = 0``)."""
    hist = cs.hist
    cap = hist.values.shape[0]
    on = hist.count >= 1
    t_prev = jnp.where(on, cs.t_prev, t0)
    c = prediction_step(process, t_prev, t0, prediction)
    on = on & jnp.isfinite(c.h)
    h = jnp.where(on & (c.h != 0), c.h, 1.0)
    hh = -h
    g = _bh(hh, variant)
    b = _b_vector(hh, g, cap)
    rks = step_ratios(hist.ells, hist.ells[0], h, hist.count, 1, cap - 1)
    zero = jnp.zeros_like(hh)
    cands = []
    for q in range(1, cap + 1):
        rho = _corrector_rhos(q, rks, b)
        hist_w = [rho[k] / rks[k] for k in range(q - 1)]
        # weights of (m, m_prev, earlier...) in sum_k rho_k D_k + rho_new (m - m_prev)
        cands.append([rho[-1], -rho[-1] - sum(hist_w, zero)] + pad_zeros(hist_w, cap - 1, zero))
    w = select_order(cs.order_prev, cands).astype(x.dtype)
    vals = jnp.concatenate([m[None], hist.values])
    corr = jnp.tensordot(w, vals, axes=1)
    x_full = ((c.kappa1 / c.kappa0) * cs.x_prev - c.beta1 * jnp.expm1(hh) * hist.values[0]
              - c.beta1 * (hh * g) * corr)
    return jnp.where(on, (1.0 - scale) * x + scale * x_full, x)


def _record(cs: CorrectorState, hist: History, x, t0, order) -> CorrectorState:
    """The corrector state after a step from ``(x, t0)`` of ``order``, whose output ``hist`` has
    just received (``History.push`` restarts the count after an output at infinite ``ell``)."""
    return CorrectorState(hist, x, jnp.asarray(t0, cs.t_prev.dtype), jnp.asarray(order, jnp.int32))


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}.")


# ----- solvers --------------------------------------------------------------------------------


class UniPC(AbstractMultistepSolver, AbstractLinearSolver):
    """UniPC-p (Zhao et al. 2023): UniP-p multistep predictor of order ``p = order`` (1-3)
    followed, at the next step, by the UniC corrector of order ``p + 1``, at one model evaluation
    per step. ``prediction`` ``x0`` (the paper's data-prediction algorithm, default) or ``eps``;
    ``variant`` ``bh1`` (``B(h) = h``) or ``bh2`` (``B(h) = expm1(h)``, default);
    ``use_corrector=False`` gives UniP-p alone (``order=1`` is DDIM); ``corrector_scale`` scales
    the correction (1: UniC, 0: none). The last step of a grid is not corrected (nothing
    evaluates after it); warm-up, lower-order-final and the final ``sigma = 0`` step follow
    :meth:`AbstractMultistepSolver.step_order`.

    The state is a :class:`CorrectorState` whose history of ``p`` outputs serves both the
    predictor (newest ``p - 1``) and the corrector (newest ``p``)."""

    variant: str = eqx.field(static=True, default="bh2")
    use_corrector: bool = eqx.field(static=True, default=True)
    corrector_scale: float = 1.0

    def __check_init__(self):
        _check_variant(self.variant)

    @property
    def name(self) -> str:
        return "unipc" if self.use_corrector else "unip"

    @property
    def history_size(self) -> int:
        return self.order if self.use_corrector else self.order - 1

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        hist = super().init_state(denoiser, x, cond, t_end, num_steps)
        return CorrectorState(hist, x, jnp.asarray(t_end, x.dtype), jnp.asarray(0, jnp.int32))

    def advance(self, process, t0, t1, x, m, state: CorrectorState):
        """Correct ``x`` with ``m`` (UniC), then take the UniP step from it with the same ``m``."""
        if self.use_corrector:
            x = unic_correct(process, self.prediction, self.variant, self.corrector_scale, t0, x, m, state)
        order = self.step_order(state.hist, t1)
        x1, hist = super().advance(process, t0, t1, x, m, state.hist)
        return x1, _record(state, hist, x, t0, order)

    def weights(self, process, c, state: History, order):
        p = self.order
        hh = -c.h
        g = _bh(hh, self.variant)
        b = _b_vector(hh, g, max(p - 1, 1))
        rks = step_ratios(state.ells, c.ell0, c.h, state.count, 0, p - 1)
        zero = jnp.zeros_like(hh)
        size = self.history_size + 1
        cands = []
        for q in range(1, p + 1):
            rho = _predictor_rhos(q, rks, b)
            coef = [-(hh * g) * rho[k] / rks[k] for k in range(q - 1)]  # weight of m_k (k = 1..q-1)
            cands.append(pad_zeros([-jnp.expm1(hh) - sum(coef, zero)] + coef, size, zero))
        return select_order(order, cands)


class UniC(AbstractWrapper, AbstractLinearSolver):
    """UniC (Zhao et al. 2023, Sec. 3.2) after any multistep solver: before each of ``base``'s
    steps, the point the previous step predicted is corrected with the output just evaluated
    there (UniC-p for a step of order ``p``, so order ``p + 1``), and ``base`` then steps from the
    corrected point with that output. No extra model evaluations: ``nfe`` is the base's.
    ``variant`` picks ``B(h)`` as in :class:`UniPC`; ``corrector_scale`` scales the correction
    (0 reproduces ``base``)."""

    base: AbstractMultistepSolver
    variant: str = eqx.field(static=True, default="bh2")
    corrector_scale: float = 1.0

    def __check_init__(self):
        if not isinstance(self.base, AbstractMultistepSolver):
            raise ValueError(f"UniC needs a multistep solver; got {type(self.base).__name__}.")
        _check_variant(self.variant)

    prefix: ClassVar[str] = "unic"

    def order(self, terms):
        return self.base.order + 1

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        base_state = self.base.init_state(denoiser, x, cond, t_end, num_steps)
        hist = History.empty(self.base.order, x, t_end, num_steps)
        return UniCState(base_state, CorrectorState(hist, x, jnp.asarray(t_end, x.dtype), jnp.asarray(0, jnp.int32)))

    def update(self, denoiser, t0, t1, x, cond, state: UniCState, noise=None):
        base, process, cs = self.base, denoiser.process, state.corrector
        m = base.evaluate(denoiser, t0, x, cond)
        x = unic_correct(process, base.prediction, self.variant, self.corrector_scale, t0, x, m, cs)
        order = base.step_order(cs.hist, t1)
        x1, base_state = base.advance(process, t0, t1, x, m, state.base)
        _, _, ell0 = prediction_variables(process, t0, base.prediction)
        return x1, UniCState(base_state, _record(cs, cs.hist.push(m, ell0), x, t0, order))

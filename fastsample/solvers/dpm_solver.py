"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), multistep and singlestep.

Lu, Zhou, Bao, Chen, Li, Zhu: DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps (2022), and DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models (2022). Both share the machinery of ``exponential.py``: the two
families differ only in the prediction variables.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .base import AbstractFastSolver
from .exponential import (
    AbstractMultistepSolver,
    ddim_step,
    ell_to_time,
    phi,
    prediction_step,
    prediction_variables,
)

__all__ = [
    "AdaptiveResult",
    "DPMSolverAdaptive",
    "DPMSolverFast",
    "DPMSolverMultistep",
    "DPMSolverSinglestep",
    "fast_orders",
]


def _dpm_weights(h, r0, r1, order, midpoint: bool, size: int, d2_factor: float = 1.0):
    """Weights of ``m_0, m_1, m_2`` (newest first) for orders 1-3 (DPM-Solver++ Algorithm 2 and
    its third-order extension), selected by the traced ``order``; ``r_j`` are ratios of earlier
    steps to ``h``.

    The published third-order update ``... - beta1 phi_3 D2`` uses ``D2 ~ h^2 m''/2``, while
    integrating the quadratic interpolant exactly needs ``2 phi_3 D2``: with ``d2_factor=1`` (the
    reference implementations' numbers) the method is exact for linear, not quadratic, outputs and
    converges with order 2; ``d2_factor=2`` gives the third-order method."""
    z = -h
    e1 = jnp.expm1(z)  # expm1(-h)
    e2 = h * phi(2, z)  # expm1(-h)/h + 1
    e3 = z * phi(3, z)  # e2/h - 1/2
    zero = jnp.zeros_like(h)  # (not 0 * r: a point at lambda = -inf has r = inf)
    w1 = jnp.stack([-e1, zero, zero])
    if midpoint:
        w2 = jnp.stack([-e1 - 0.5 * e1 / r0, 0.5 * e1 / r0, zero])
    else:
        w2 = jnp.stack([-e1 + e2 / r0, -e2 / r0, zero])
    d10 = jnp.stack([1.0 / r0, -1.0 / r0, zero])
    d11 = jnp.stack([zero, 1.0 / r1, -1.0 / r1])
    d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
    d2 = (d10 - d11) / (r0 + r1)
    w3 = w1 + e2 * d1 - d2_factor * e3 * d2
    w = jnp.where(order == 1, w1, jnp.where(order == 2, w2, w3))
    return w[:size]


class DPMSolverMultistep(AbstractMultistepSolver):
    """Multistep DPM-Solver(++) of order 1-3: ``dpmpp_2m`` / ``dpmpp_3m`` (data prediction) and
    ``dpm_solver_2m`` / ``dpm_solver_3m`` (noise prediction). ``solver_type`` ``midpoint`` (the
    paper's DPM-Solver++(2M), diffusers' default) or ``heun`` (Taylor form) for order 2."""

    solver_type: str = eqx.field(static=True, default="midpoint")
    #: ``True``: the third-order update integrates the quadratic interpolant exactly (order 3);
    #: ``False``: the published formula, as in the reference implementations (order 2 in practice)
    exact_third_order: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun'; got {self.solver_type!r}.")

    @property
    def name(self) -> str:
        return f"{'dpmpp' if self.prediction == 'x0' else 'dpm_solver'}_{self.order}m"

    def weights(self, process, c, state, order):
        ells = state.ells
        r0 = (c.ell0 - ells[0]) / c.h if self.history_size >= 1 else jnp.ones_like(c.h)
        r1 = (ells[0] - ells[1]) / c.h if self.history_size >= 2 else jnp.ones_like(c.h)
        # unfilled history (warm-up) is never selected; keep its ratios finite
        r0 = jnp.where(state.count >= 1, r0, 1.0)
        r1 = jnp.where(state.count >= 2, r1, 1.0)
        return _dpm_weights(c.h, r0, r1, order, self.solver_type == "midpoint", self.history_size + 1,
                            2.0 if self.exact_third_order else 1.0)


class DPMSolverSinglestep(AbstractFastSolver):
    """Singlestep DPM-Solver-1/2/3 (noise prediction, intermediate points at ``r = 1/2`` for
    order 2 and ``1/3, 2/3`` for order 3) and DPM-Solver++(2S/3S) (data prediction). Each step
    costs ``order`` evaluations; a step that ends at ``sigma = 0`` is a DDIM step (one
    evaluation), so ``n`` steps cost ``order n`` or ``order (n - 1) + 1``."""

    order: int = eqx.field(static=True, default=2)
    prediction: str = eqx.field(static=True, default="eps")

    @property
    def needs_finite_start(self) -> bool:
        return True

    def __check_init__(self):
        if not 1 <= self.order <= 3:
            raise ValueError(f"DPMSolverSinglestep order must be 1, 2 or 3; got {self.order}.")
        if self.prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' or 'eps'; got {self.prediction!r}.")

    @property
    def name(self) -> str:
        return f"dpmpp_{self.order}s" if self.prediction == "x0" else f"dpm_solver_{self.order}"

    def nfe(self, num_steps, final_zero=False):
        return self.order * num_steps - ((self.order - 1) if final_zero else 0)

    def update(self, denoiser, t0, t1, x, cond, state):
        process = denoiser.process
        m0 = denoiser.predict(x, t0, cond, target=self.prediction)
        if self.order == 1:
            return self._first_order(process, t0, t1, x, m0), state
        return jax.lax.cond(
            t1 == 0,
            lambda: self._first_order(process, t0, t1, x, m0),
            lambda: self._higher_order(denoiser, t0, t1, x, m0, cond),
        ), state

    def _first_order(self, process, t0, t1, x, m0):
        if self.prediction == "x0":
            return ddim_step(process, t0, t1, x, m0)
        a0, s0 = process.alpha_sigma(t0)
        return ddim_step(process, t0, t1, x, (x - s0 * m0) / a0)

    def _higher_order(self, denoiser, t0, t1, x, m0, cond):
        return self.step_pair(denoiser, t0, t1, x, m0, cond)[0]

    def step_pair(self, denoiser, t0, t1, x, m0, cond):
        """``(x_k, x_{k-1})``: the order-``k`` step and the embedded lower-order estimate that
        shares its model evaluations (DPM-Solver-12 / -23, used for step-size control)."""
        process, pred = denoiser.process, self.prediction
        c = prediction_step(process, t0, t1, pred)
        h = c.h

        def point(r):
            """x at the intermediate point ell0 + r h, from the first-order step."""
            t = ell_to_time(process, c.ell0 + r * h, pred)
            k, b, _ = prediction_variables(process, t, pred)
            return t, k, (k / c.kappa0) * x - b * jnp.expm1(-r * h) * m0, b

        e1 = jnp.expm1(-h)
        first = (c.kappa1 / c.kappa0) * x - c.beta1 * e1 * m0
        r1 = 0.5 if self.order == 2 else 1.0 / 3.0
        ts1, _, x1, _ = point(r1)
        m1 = denoiser.predict(x1, ts1, cond, target=pred)
        second = first - (0.5 / r1) * c.beta1 * e1 * (m1 - m0)
        if self.order == 2:
            return second, first
        r2 = 2.0 / 3.0
        ts2, _, x2, b2 = point(r2)
        x2 = x2 + b2 * (r2 / r1) * (r2 * h * phi(2, -r2 * h)) * (m1 - m0)
        m2 = denoiser.predict(x2, ts2, cond, target=pred)
        return first + (c.beta1 / r2) * (h * phi(2, -h)) * (m2 - m0), second


def fast_orders(order: int, nfe: int) -> tuple[int, ...]:
    """DPM-Solver's allocation of a budget of ``nfe`` evaluations to singlestep orders (Lu et al.
    2022, Sec. 3.4): as many order-``order`` steps as fit, and one or two lower-order steps last."""
    if nfe <= 0:
        return ()
    if order == 3:
        k = nfe // 3 + 1
        tail = {0: (2, 1), 1: (1,), 2: (2,)}[nfe % 3]
        return (3,) * (k - len(tail)) + tail
    if order == 2:
        return (2,) * (nfe // 2) + ((1,) if nfe % 2 else ())
    return (1,) * nfe


class DPMSolverFast(AbstractFastSolver):
    """DPM-Solver-fast (k-diffusion's ``dpm_fast``): singlestep DPM-Solver whose per-step orders
    spend any budget exactly (:func:`fast_orders`); with ``final_zero`` the last step, onto
    ``sigma = 0``, is first order. Configured for a budget by :meth:`for_budget` (``sample``
    does it); noise prediction by default, as in the paper."""

    order: int = eqx.field(static=True, default=3)
    prediction: str = eqx.field(static=True, default="eps")
    orders: tuple[int, ...] = eqx.field(static=True, default=())

    def __check_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f"dpm_solver_fast order must be 1, 2 or 3; got {self.order}.")

    @property
    def name(self) -> str:
        return "dpm_solver_fast"

    @property
    def needs_finite_start(self) -> bool:
        return True

    def for_budget(self, nfe, final_zero=False):
        orders = fast_orders(self.order, nfe - 1) + (1,) if final_zero else fast_orders(self.order, nfe)
        return DPMSolverFast(self.order, self.prediction, orders)

    def nfe(self, num_steps, final_zero=False):
        if num_steps != len(self.orders):
            raise ValueError(f"dpm_solver_fast is configured for {len(self.orders)} steps (orders {self.orders}); "
                             f"got {num_steps}: give it an NFE budget (sample(..., nfe=N)).")
        return sum(self.orders)

    def steps_for_nfe(self, nfe, final_zero=False):
        return len(self.for_budget(nfe, final_zero).orders)

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return jnp.asarray(0, jnp.int32)  # the step index selects the step's order

    def update(self, denoiser, t0, t1, x, cond, state):
        if not self.orders:
            raise ValueError("dpm_solver_fast needs an NFE budget: pass nfe to sample (not only timesteps).")
        branches = [
            lambda k=k: DPMSolverSinglestep(order=k, prediction=self.prediction).update(
                denoiser, t0, t1, x, cond, None)[0]
            for k in (1, 2, 3)
        ]
        order = jnp.asarray(self.orders, jnp.int32)[jnp.minimum(state, len(self.orders) - 1)]
        # lax.switch on an unbatched index: only the selected order's evaluations run
        return jax.lax.switch(order - 1, branches), state + 1


class AdaptiveResult(NamedTuple):
    x: jax.Array
    nfe: jax.Array  # model evaluations made (accepted and rejected steps)
    steps: jax.Array  # accepted steps
    reached: jax.Array  # whether the end time was reached within the budget


class DPMSolverAdaptive(eqx.Module):
    """DPM-Solver with adaptive step size (Lu et al. 2022, Algorithm 4): a pair of embedded
    singlestep solvers (orders 1/2 or 2/3) sharing model evaluations estimates the local error;
    a step is accepted when the scaled error ``E <= 1`` and the next log-SNR step is
    ``min(theta h E^{-1/order}, ell_end - ell)``. Noise prediction by default, as in the paper.
    ``fastsample.sample(..., solver="dpm_solver_adaptive", nfe=None)`` runs it; ``nfe`` caps the
    model evaluations."""

    order: int = eqx.field(static=True, default=3)
    prediction: str = eqx.field(static=True, default="eps")
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    theta: float = 0.9
    max_steps: int = eqx.field(static=True, default=1000)

    def __check_init__(self):
        if self.order not in (2, 3):
            raise ValueError(f"dpm_solver_adaptive order must be 2 or 3; got {self.order}.")

    @property
    def name(self) -> str:
        return "dpm_solver_adaptive"

    @property
    def needs_finite_start(self) -> bool:
        return True

    def solve(self, denoiser, x, t_start, t_end, cond=None, max_nfe=None) -> AdaptiveResult:
        pair = DPMSolverSinglestep(order=self.order, prediction=self.prediction)
        process = denoiser.process
        dtype = x.dtype
        lam_start = jnp.asarray(process.log_snr(t_start), dtype)  # sampling increases lambda
        lam_end = jnp.asarray(process.log_snr(t_end), dtype)
        budget = jnp.asarray(jnp.iinfo(jnp.int32).max if max_nfe is None else max_nfe, jnp.int32)
        tiny = 1e-5 * (lam_end - lam_start)

        def norm(v):
            return jnp.max(jnp.sqrt(jnp.mean(jnp.square(v.reshape(v.shape[0], -1)), axis=1)))

        def cond_fn(carry):
            x, lam, h, nfe, steps, tries = carry
            return (lam_end - lam > tiny) & (nfe + self.order <= budget) & (tries < self.max_steps)

        def body(carry):
            x, lam, h, nfe, steps, tries = carry
            t0, t1 = process.t_from_log_snr(lam), process.t_from_log_snr(lam + h)
            m0 = denoiser.predict(x, t0, cond, target=self.prediction)
            x_high, x_low = pair.step_pair(denoiser, t0, t1, x, m0, cond)
            delta = jnp.maximum(self.atol, self.rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x)))
            err = norm((x_high - x_low) / delta)
            accept = err <= 1.0
            x = jnp.where(accept, x_high, x)
            lam = jnp.where(accept, lam + h, lam)
            h = jnp.minimum(self.theta * h * jnp.maximum(err, 1e-10) ** (-1.0 / self.order), lam_end - lam)
            return x, lam, h, nfe + self.order, steps + accept.astype(jnp.int32), tries + 1

        h0 = jnp.minimum(jnp.asarray(self.h_init, dtype), lam_end - lam_start)
        zero = jnp.asarray(0, jnp.int32)
        x, lam, _, nfe, steps, _ = jax.lax.while_loop(cond_fn, body, (x, lam_start, h0, zero, zero, zero))
        return AdaptiveResult(x, nfe, steps, lam_end - lam <= tiny)

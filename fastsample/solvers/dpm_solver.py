"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), multistep and singlestep.

Lu, Zhou, Bao, Chen, Li, Zhu: DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps (2022), and DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models (2022). Both share the machinery of ``exponential.py``: the two
families differ only in the prediction variables.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ._shared import dpm_weights
from .base import AbstractBudgetSolver, AbstractLinearSolver, AbstractPhasedSolver
from .exponential import (
    AbstractMultistepSolver,
    ddim_step,
    ell_to_time,
    phi,
    prediction_step,
    prediction_variables,
)

__all__ = [
    "DPMSolverFast",
    "DPMSolverMultistep",
    "DPMSolverSinglestep",
    "fast_orders",
]


class DPMSolverMultistep(AbstractMultistepSolver, AbstractLinearSolver):
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
        return dpm_weights(c.h, r0, r1, order, self.solver_type == "midpoint", self.history_size + 1,
                            2.0 if self.exact_third_order else 1.0)


class DPMSolverSinglestep(AbstractLinearSolver, AbstractPhasedSolver):
    """Singlestep DPM-Solver-1/2/3 (noise prediction, intermediate points at ``r = 1/2`` for
    order 2 and ``1/3, 2/3`` for order 3) and DPM-Solver++(2S/3S) (data prediction). Each step
    costs ``order`` evaluations; a step that ends at ``sigma = 0`` is a DDIM step (one
    evaluation), so ``n`` steps cost ``order n`` or ``order (n - 1) + 1``. Phases: order-``k``
    steps (branch 0), then that DDIM step (branch 1)."""

    order: int = eqx.field(static=True, default=2)
    prediction: str = eqx.field(static=True, default="eps")
    phase: int | None = eqx.field(static=True, default=None)

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

    def phases(self, num_steps, ends_at_zero):
        return ((num_steps - 1, 0), (1, 1)) if ends_at_zero else ((num_steps, 0),)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        m0 = denoiser.predict(x, t0, cond, target=self.prediction)
        if self.order == 1 or self.phase == 1:
            return self._first_order(process, t0, t1, x, m0), state
        if self.phase == 0:
            return self._higher_order(denoiser, t0, t1, x, m0, cond), state
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


class DPMSolverFast(AbstractLinearSolver, AbstractPhasedSolver, AbstractBudgetSolver):
    """DPM-Solver-fast (k-diffusion's ``dpm_fast``): singlestep DPM-Solver whose per-step orders
    spend any budget exactly (:func:`fast_orders`); with ``final_zero`` the last step, onto
    ``sigma = 0``, is first order. Configured for a budget by :meth:`for_budget` (``sample``
    does it); noise prediction by default, as in the paper. Phases: the runs of equal orders
    (the branch is the order)."""

    order: int = eqx.field(static=True, default=3)
    prediction: str = eqx.field(static=True, default="eps")
    orders: tuple[int, ...] = eqx.field(static=True, default=())
    phase: int | None = eqx.field(static=True, default=None)

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
        return DPMSolverFast(order=self.order, prediction=self.prediction, orders=orders)

    def nfe(self, num_steps, final_zero=False):
        if num_steps != len(self.orders):
            raise ValueError(f"dpm_solver_fast is configured for {len(self.orders)} steps (orders {self.orders}); "
                             f"got {num_steps}: give it an NFE budget (sample(..., nfe=N)).")
        return sum(self.orders)

    def steps_for_nfe(self, nfe, final_zero=False):
        return len(self.for_budget(nfe, final_zero).orders)

    def phases(self, num_steps, ends_at_zero):
        self.nfe(num_steps)  # configured for this many steps
        runs = []
        for k in self.orders:
            if runs and runs[-1][1] == k:
                runs[-1] = (runs[-1][0] + 1, k)
            else:
                runs.append((1, k))
        return tuple(runs)

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return jnp.asarray(0, jnp.int32)  # the step index selects the step's order

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        if not self.orders:
            raise ValueError("dpm_solver_fast needs an NFE budget: pass nfe to sample (not only timesteps).")
        if self.phase is not None:
            step = DPMSolverSinglestep(order=self.phase, prediction=self.prediction, phase=0)
            return step.update(denoiser, t0, t1, x, cond, None)[0], state + 1
        branches = [
            lambda k=k: DPMSolverSinglestep(order=k, prediction=self.prediction).update(
                denoiser, t0, t1, x, cond, None)[0]
            for k in (1, 2, 3)
        ]
        order = jnp.asarray(self.orders, jnp.int32)[jnp.minimum(state, len(self.orders) - 1)]
        # lax.switch on an unbatched index: only the selected order's evaluations run
        return jax.lax.switch(order - 1, branches), state + 1

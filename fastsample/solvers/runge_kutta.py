"""Runge-Kutta solvers on the probability-flow ODE in the process's own time ``t``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax

from ..terms import ProbabilityFlowTerm
from .base import AbstractLinearSolver, AbstractPhasedSolver

__all__ = ["Euler", "Heun", "Midpoint"]


def _drift(denoiser, t, x, cond):
    return ProbabilityFlowTerm(denoiser).vf(t, x, cond)


class Euler(AbstractLinearSolver):
    """Explicit Euler on the PF-ODE ``dx/dt = alpha' x0 + sigma' eps``. For ``EDM`` this is
    k-diffusion's ``euler``; for ``FlowMatching`` the usual flow Euler step (both equal DDIM)."""

    name: ClassVar[str] = "euler"

    def order(self, terms):
        return 1

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        return x + (t1 - t0) * _drift(denoiser, t0, x, cond), state


class Heun(AbstractLinearSolver, AbstractPhasedSolver):
    """Heun's second-order method, EDM's deterministic sampler (Karras et al., Elucidating the
    Design Space of Diffusion-Based Generative Models, 2022, Algorithm 1): a step that ends at
    ``t = 0`` is a plain Euler step, so ``n`` steps cost ``2n`` evaluations, or ``2n - 1`` when
    the grid ends at sigma = 0. Phases: Heun steps (branch 0), then that Euler step (branch 1)."""

    phase: int | None = eqx.field(static=True, default=None)

    name: ClassVar[str] = "heun"
    nfe_per_step: ClassVar[int] = 2

    def order(self, terms):
        return 2

    def nfe(self, num_steps, final_zero=False):
        return 2 * num_steps - (1 if final_zero else 0)

    def phases(self, num_steps, ends_at_zero):
        return ((num_steps - 1, 0), (1, 1)) if ends_at_zero else ((num_steps, 0),)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        dt = t1 - t0
        d0 = _drift(denoiser, t0, x, cond)
        x_euler = x + dt * d0

        def corrected():
            return x + 0.5 * dt * (d0 + _drift(denoiser, t1, x_euler, cond))

        if self.phase is not None:
            return (corrected() if self.phase == 0 else x_euler), state
        # lax.cond on an unbatched predicate: the second evaluation really is skipped.
        return jax.lax.cond(t1 == 0, lambda: x_euler, corrected), state


class Midpoint(AbstractLinearSolver):
    """The explicit midpoint rule (second-order Runge-Kutta) in ``t``: two evaluations per step,
    at ``t0`` and at ``(t0 + t1) / 2``, so a step to ``t = 0`` needs none at ``t = 0``. It is the
    base of Bespoke RK2 (Shaul et al., Bespoke Solvers for Generative Flow Models, 2023)."""

    name: ClassVar[str] = "midpoint"
    nfe_per_step: ClassVar[int] = 2

    def order(self, terms):
        return 2

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        dt = t1 - t0
        x_mid = x + 0.5 * dt * _drift(denoiser, t0, x, cond)
        return x + dt * _drift(denoiser, t0 + 0.5 * dt, x_mid, cond), state

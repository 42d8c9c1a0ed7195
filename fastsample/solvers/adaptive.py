"""Solvers that choose their own steps: their own kind, run by their own driver.

An adaptive solver is not a fixed-grid solver: it has no ``update`` for the ``lax.scan`` driver
but a :meth:`AbstractAdaptiveSolver.solve` that integrates from ``t_start`` to ``t_end`` under an
error controller, within an optional NFE cap. ``fastsample.solve`` (and ``sample``) dispatch a
solver of this kind to :func:`fastsample.solve.solve_adaptive`.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .dpm_solver import DPMSolverSinglestep

__all__ = ["AbstractAdaptiveSolver", "AdaptiveResult", "DPMSolverAdaptive"]


class AbstractAdaptiveSolver(eqx.Module):
    """Base class of solvers that choose their own steps."""

    name: ClassVar[str]

    @property
    def needs_finite_start(self) -> bool:
        """Whether the solve must start at a finite log-SNR (``alpha > 0``)."""
        return False

    @abc.abstractmethod
    def solve(self, denoiser, x, t_start, t_end, cond=None, max_nfe=None) -> AdaptiveResult:
        """Integrate from ``t_start`` to ``t_end`` (``max_nfe``: cap on model evaluations)."""


class AdaptiveResult(NamedTuple):
    x: jax.Array
    nfe: jax.Array  # model evaluations made (accepted and rejected steps)
    steps: jax.Array  # accepted steps
    reached: jax.Array  # whether the end time was reached within the budget


class DPMSolverAdaptive(AbstractAdaptiveSolver):
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

    name: ClassVar[str] = "dpm_solver_adaptive"

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

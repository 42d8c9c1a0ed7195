"""Shared machinery of exponential integrators (DDIM, DPM-Solver, DEIS, UniPC, ...).

Coefficients are written with ``alpha``, ``sigma`` and ``expm1`` of the log-SNR step ``h``, so a
first point with ``alpha = 0`` (flow matching at ``t = 1``, ``h = +inf``) or a last point with
``sigma = 0`` (``h = +inf``) gives finite results without special cases.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax.numpy as jnp

from .base import AbstractFastSolver

__all__ = ["DDIM", "StepCoefficients", "step_coefficients"]


class StepCoefficients(NamedTuple):
    alpha0: jnp.ndarray
    sigma0: jnp.ndarray
    alpha1: jnp.ndarray
    sigma1: jnp.ndarray
    h: jnp.ndarray  # lambda(t1) - lambda(t0) > 0


def step_coefficients(process, t0, t1) -> StepCoefficients:
    a0, s0 = process.alpha_sigma(t0)
    a1, s1 = process.alpha_sigma(t1)
    return StepCoefficients(a0, s0, a1, s1, process.log_snr(t1) - process.log_snr(t0))


class DDIM(AbstractFastSolver):
    """DDIM (Song, Meng, Ermon, Denoising Diffusion Implicit Models, 2021), the first-order
    exponential integrator with data prediction (DPM-Solver++(1)):
    ``x1 = (sigma1 / sigma0) x0 - alpha1 expm1(-h) x0_hat``. Exact for single-point data."""

    name: ClassVar[str] = "ddim"
    _order: ClassVar[int] = 1

    def update(self, denoiser, t0, t1, x, cond, state):
        x0_hat = denoiser(x, t0, cond)
        c = step_coefficients(denoiser.process, t0, t1)
        return (c.sigma1 / c.sigma0) * x - c.alpha1 * jnp.expm1(-c.h) * x0_hat, state

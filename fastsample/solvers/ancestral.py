"""Ancestral samplers: DDIM with ``eta > 0``, Euler-ancestral, DDPM, and EDM's stochastic sampler.

- ``ddim`` with ``eta`` (Song, Meng, Ermon: Denoising Diffusion Implicit Models, 2021): a DDIM
  step to a lower noise level followed by fresh noise ``sigma_eta = eta sigma1 sqrt(1 - e^{-2h})``.
- ``euler_ancestral``: k-diffusion's Euler-ancestral step, an Euler step in EDM variables to
  ``sigma_down`` plus ``sigma_up`` noise. An Euler step in EDM variables is the DDIM step, and
  ``sigma_up`` is ``sigma_eta`` (clamped at ``sigma1`` for ``eta > 1``), so it is the same update as
  ``ddim`` with ``eta`` (its ``eta = 0`` counterpart is DDIM, which is ``euler`` for ``EDM``).
- ``ddpm`` (Ho, Jain, Abbeel: Denoising Diffusion Probabilistic Models, 2020): ancestral sampling
  with the posterior mean and the posterior variance (``eta = 1``) or the forward-transition
  ("large") variance ``sigma0^2 (1 - e^{-2h})``.
- ``edm_stochastic`` (Karras, Aittala, Aila, Laine: Elucidating the Design Space of Diffusion-Based
  Generative Models, 2022, Algorithm 2): "churn" raises the noise level by ``gamma`` before a Heun
  step.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from ._shared import check_nonnegative
from .base import AbstractLinearSolver, AbstractPhasedSolver
from .runge_kutta import Heun
from .stochastic_base import AbstractSDESolver, AbstractStochasticSolver, ancestral_step, log_rho_ddim

__all__ = ["AncestralDDIM", "EDMStochastic"]

VARIANCES = ("ddim", "large")


class AncestralDDIM(AbstractSDESolver, AbstractLinearSolver):
    """DDIM with noise (``ddim`` with ``eta > 0``, ``ddim_eta``, ``euler_ancestral``, ``ddpm``).

    ``eta``: DDIM's noise level (0: DDIM, 1: DDPM's posterior; above 1 the noise is clamped at
    ``sigma1``, as k-diffusion's ancestral step). ``s_noise`` scales the added noise.
    ``variance="large"`` (DDPM only): posterior mean (``eta = 1``) with the forward-transition
    variance ``sigma0^2 (1 - e^{-2h})``; no noise on a step to ``t = 0``. One evaluation per step."""

    eta: float = 1.0
    s_noise: float = 1.0
    variance: str = eqx.field(static=True, default="ddim")
    label: str = eqx.field(static=True, default="ddim")

    def __check_init__(self):
        if self.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCES)}; got {self.variance!r}.")
        check_nonnegative(self.label, "eta", self.eta)
        check_nonnegative(self.label, "s_noise", self.s_noise)

    @property
    def name(self) -> str:
        return self.label

    def order(self, terms):
        return 1

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        x0 = denoiser(x, t0, cond)
        h = process.log_snr(t1) - process.log_snr(t0)
        log_rho = log_rho_ddim(self.eta, h)
        std = None
        if self.variance == "large":
            std = jnp.where(t1 == 0, 0.0, process.sigma(t0) * jnp.sqrt(-jnp.expm1(2.0 * log_rho)))
        z = self.s_noise * noise.step_normal(x)
        return ancestral_step(process, t0, t1, x, x0, log_rho, z, std), state

    def sde_log_rho(self, process, t0, t1):
        """``log rho`` of the step from ``t0`` to ``t1``: it is an exponential step of the reverse SDE
        that contracts by ``rho`` (:func:`~fastsample.solvers.stochastic_base.ancestral_step`) plus
        additive noise; the SDE adjoint (:class:`fastsample.gradients.Adjoint`) integrates that SDE's adjoint."""
        return log_rho_ddim(self.eta, process.log_snr(t1) - process.log_snr(t0))


class EDMStochastic(AbstractStochasticSolver, AbstractLinearSolver, AbstractPhasedSolver):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) for any process: at a step from
    ``t0`` whose EDM noise level ``sigma0 = sigma/alpha`` lies in ``[S_tmin, S_tmax]``, raise it to
    ``sigma_hat = sigma0 (1 + gamma)``, ``gamma = min(S_churn / N, sqrt(2) - 1)`` (``N`` steps), by
    adding ``S_noise sqrt(sigma_hat^2 - sigma0^2)`` noise in EDM variables, then take a Heun step
    (fastsample's ``heun``) from ``t_hat`` to ``t1``. ``S_churn = 0`` is ``heun`` exactly. Costs as
    Heun: ``2n`` evaluations, ``2n - 1`` when the grid ends at ``t = 0``; its phases are Heun's."""

    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = float("inf")
    S_noise: float = 1.0
    phase: int | None = eqx.field(static=True, default=None)

    name: ClassVar[str] = "edm_stochastic"

    def __check_init__(self):
        for field in ("S_churn", "S_tmin", "S_tmax", "S_noise"):
            check_nonnegative(self.name, field, getattr(self, field))

    def order(self, terms):
        return 2

    def nfe(self, num_steps, final_zero=False):
        return Heun().nfe(num_steps, final_zero)

    def phases(self, num_steps, ends_at_zero):
        return Heun().phases(num_steps, ends_at_zero)

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        if num_steps is None:
            raise ValueError("edm_stochastic needs the number of steps (S_churn / N): run it with fastsample.sample.")
        return jnp.asarray(num_steps, jnp.int32)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        s0 = process.sigma_edm(t0)
        inside = (s0 >= self.S_tmin) & (s0 <= self.S_tmax) & jnp.isfinite(s0)
        gamma = jnp.where(inside, jnp.minimum(self.S_churn / state, math.sqrt(2.0) - 1.0), 0.0)
        churn = gamma > 0
        t_hat = process.t_from_sigma_edm(s0 * (1.0 + jnp.where(churn, gamma, 0.0)))
        s_hat = process.sigma_edm(t_hat)  # (a clamped time, e.g. VPDiscrete beyond t_max, stays consistent)
        a0, a_hat = process.alpha(t0), process.alpha(t_hat)
        std = self.S_noise * jnp.sqrt(jnp.maximum(s_hat**2 - s0**2, 0.0))
        z = noise.normal(0, x)
        x_hat = (a_hat / jnp.where(churn, a0, 1.0)).astype(x.dtype) * x + (a_hat * std).astype(x.dtype) * z
        x_hat = jnp.where(churn, x_hat, x)
        t_hat = jnp.where(churn, t_hat, t0)
        return Heun(phase=self.phase).update(denoiser, t_hat, t1, x_hat, cond, None)[0], state

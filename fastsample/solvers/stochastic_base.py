"""The contract of stochastic solvers and the first-order stochastic exponential step they share.

A stochastic solver's :meth:`AbstractStochasticSolver.update` uses its ``noise`` argument: the
step's noise handle (:class:`fastsample.noise.StepNoise`), built by the ``lax.scan`` driver from the
scan index ``i``. Stochastic solvers run under :func:`fastsample.sample` (with a ``key``), not under
``diffrax.diffeqsolve``. :class:`AbstractSDESolver` marks the ones whose step is an exponential
step of a reverse SDE plus additive noise, with a known contraction (the SDE adjoint needs it).

Every first-order stochastic update in data-prediction form is, with ``h = lambda1 - lambda0``,
the predicted noise ``eps = (x - alpha0 x0) / sigma0`` and a standard normal ``z``,

    x1 = alpha1 x0 + sigma1 (rho eps + sqrt(1 - rho^2) z),   0 <= rho <= 1,

i.e. ``x1 = (sigma1/sigma0) rho x + alpha1 (1 - rho e^{-h}) x0 + sigma1 sqrt(1 - rho^2) z``.
``rho = 1`` is DDIM; ``rho = e^{-h}`` is the DDPM posterior (the reverse SDE). Two
parameterizations of the noise level ``eta`` are in use: DDIM's ``sigma_eta = eta sigma1
sqrt(1 - e^{-2h})`` (Song et al., Denoising Diffusion Implicit Models, 2021; also k-diffusion's
ancestral step) and SDE-DPM-Solver++'s ``rho = e^{-eta h}`` (Lu et al., DPM-Solver++, 2022;
SA-Solver's ``tau^2``). Both give DDIM at ``eta = 0`` and the DDPM posterior at ``eta = 1``.
"""

from __future__ import annotations

import abc

import jax.numpy as jnp

from .base import AbstractFastSolver

__all__ = ["AbstractStochasticSolver", "AbstractSDESolver", "ancestral_step", "log_rho_ddim", "log_rho_sde",
           "eta_h"]


class AbstractStochasticSolver(AbstractFastSolver):
    """Capability: a stochastic solver; :meth:`update` draws from its ``noise`` handle.

    ``fastsample.sample(..., key=...)`` runs them (a missing key is an error); the noise of step
    ``i`` comes from the scan index ``i`` (see :mod:`fastsample.noise`)."""

    @abc.abstractmethod
    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        """One step from ``t0`` to ``t1`` with the step's noise handle ``noise``; returns ``(x1, state)``."""

    # diffrax's contract: the step index that seeds the noise is not available there.
    def init(self, terms, t0, t1, y0, args):
        raise ValueError(
            f"{self.name} is stochastic: run it with fastsample.sample(..., key=...), which gives every step its "
            "noise; diffrax.diffeqsolve cannot supply the step index."
        )


class AbstractSDESolver(AbstractStochasticSolver):
    """Capability: each step is an exponential step of a reverse SDE that contracts by ``rho``
    (:func:`ancestral_step` with ``log_rho``, higher-order terms allowed) plus additive noise. The
    SDE adjoint (:class:`fastsample.gradients.Adjoint`) integrates that SDE's adjoint."""

    @abc.abstractmethod
    def sde_log_rho(self, process, t0, t1):
        """``log rho`` of the step from ``t0`` to ``t1``."""


def eta_h(eta, h):
    """``eta h``, zero when ``eta = 0`` (also for ``h = inf``)."""
    eta = jnp.asarray(eta, jnp.result_type(h))
    return jnp.where(eta == 0, 0.0, eta * jnp.where(eta == 0, 1.0, h))


def log_rho_sde(eta, h):
    """``log rho = -eta h`` (SDE-DPM-Solver++'s parameterization)."""
    return -eta_h(eta, h)


def log_rho_ddim(eta, h):
    """``log rho = log sqrt(1 - eta^2 (1 - e^{-2h}))`` (DDIM's ``sigma_eta``; clamped at
    ``rho = 0`` for ``eta > 1``, as k-diffusion's ancestral step)."""
    eta = jnp.asarray(eta, jnp.result_type(h))
    frac = jnp.minimum(eta * eta * -jnp.expm1(-2.0 * h), 1.0)
    return 0.5 * jnp.log1p(-frac)


def ancestral_step(process, t0, t1, x, x0, log_rho, z, noise_std=None):
    """``x1 = (sigma1/sigma0) rho x + alpha1 (1 - rho e^{-h}) x0 + std z`` with the default
    ``std = sigma1 sqrt(1 - rho^2)``; finite when ``alpha0 = 0`` or ``sigma1 = 0`` (``h = inf``),
    and DDIM's :func:`~fastsample.solvers.exponential.ddim_step` when ``log_rho = 0``."""
    a1, s1 = process.alpha_sigma(t1)
    s0 = process.sigma(t0)
    h = process.log_snr(t1) - process.log_snr(t0)
    if noise_std is None:
        noise_std = s1 * jnp.sqrt(-jnp.expm1(2.0 * log_rho))
    dt = x.dtype
    return (((s1 / s0) * jnp.exp(log_rho)).astype(dt) * x + (a1 * -jnp.expm1(log_rho - h)).astype(dt) * x0
            + jnp.asarray(noise_std, dt) * z)

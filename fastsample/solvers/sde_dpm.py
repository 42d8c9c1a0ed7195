"""SDE-DPM-Solver++: ``dpmpp_2m_sde``, ``dpmpp_3m_sde`` (multistep) and ``dpmpp_sde`` (singlestep).

Lu, Zhou, Bao, Chen, Li, Zhu: DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models (2022), SDE-DPM-Solver++(2M), with the noise level ``eta`` of k-diffusion's
samplers. With data prediction, ``h = lambda1 - lambda0`` and ``h_eta = (1 + eta) h``, a step is

    x1 = (sigma1 / sigma0) e^{-eta h} x + alpha1 sum_j w_j(h_eta) D_j + sigma1 sqrt(1 - e^{-2 eta h}) z,

where ``w(h_eta)`` are the ODE multistep weights (``_shared.dpm_weights``) evaluated at
``h_eta`` with the ratios ``r`` of earlier steps to ``h``: at ``eta = 0`` the ODE solvers
``dpmpp_2m`` / ``dpmpp_3m``, whose history, warm-up and lower-order-final rules are reused here.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ._shared import check_nonnegative, dpm_weights
from .base import AbstractLinearSolver, AbstractPhasedSolver
from .dpm_solver import DPMSolverMultistep
from .exponential import ell_to_time, prediction_step
from .stochastic_base import AbstractSDESolver, AbstractStochasticSolver, ancestral_step, eta_h, log_rho_ddim

__all__ = ["DPMSolverMultistepSDE", "DPMSolverSDE"]


class DPMSolverMultistepSDE(AbstractSDESolver, DPMSolverMultistep):
    """SDE-DPM-Solver++(2M) / (3M): ``dpmpp_2m_sde`` (``solver_type`` midpoint or heun) and
    ``dpmpp_3m_sde``. ``eta`` (default 1) sets the noise (0: ``dpmpp_2m`` / ``dpmpp_3m`` exactly),
    ``s_noise`` scales it. Data prediction only; one evaluation per step."""

    eta: float = 1.0
    s_noise: float = 1.0

    def __check_init__(self):
        if self.prediction != "x0":
            raise ValueError(f"dpmpp_{self.order}m_sde uses data prediction: prediction must be 'x0'; "
                             f"got {self.prediction!r}.")
        check_nonnegative(self.name, "eta", self.eta)
        check_nonnegative(self.name, "s_noise", self.s_noise)

    @property
    def name(self) -> str:
        return f"dpmpp_{self.order}m_sde"

    def step_scalars(self, process, t0, t1):
        c = prediction_step(process, t0, t1, "x0")
        eh = eta_h(self.eta, c.h)
        return c._replace(kappa1=c.kappa1 * jnp.exp(-eh), h=c.h + eh)

    def weights(self, process, c, state, order):
        h = c.h / (1.0 + self.eta)  # c.h is h_eta; the ratios of earlier steps are to h
        r0 = (c.ell0 - state.ells[0]) / h if self.history_size >= 1 else jnp.ones_like(h)
        r1 = (state.ells[0] - state.ells[1]) / h if self.history_size >= 2 else jnp.ones_like(h)
        r0 = jnp.where(state.count >= 1, r0, 1.0)
        r1 = jnp.where(state.count >= 2, r1, 1.0)
        return dpm_weights(c.h, r0, r1, order, self.solver_type == "midpoint", self.history_size + 1,
                            2.0 if self.exact_third_order else 1.0)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        x1, state = self.advance(process, t0, t1, x, self.evaluate(denoiser, t0, x, cond), state)
        h = process.log_snr(t1) - process.log_snr(t0)
        std = self.s_noise * process.sigma(t1) * jnp.sqrt(-jnp.expm1(-2.0 * eta_h(self.eta, h)))
        return x1 + std.astype(x.dtype) * noise.step_normal(x), state

    def sde_log_rho(self, process, t0, t1):
        """``log rho = -eta h``: the contraction of the reverse SDE this solver discretises (its noise
        is additive); the SDE adjoint (:class:`fastsample.gradients.Adjoint`) integrates that SDE's adjoint."""
        return -eta_h(self.eta, process.log_snr(t1) - process.log_snr(t0))


class DPMSolverSDE(AbstractStochasticSolver, AbstractLinearSolver, AbstractPhasedSolver):
    """DPM-Solver++ SDE, singlestep (k-diffusion's ``dpmpp_sde``): DPM-Solver++(2S) whose two
    first-order sub-steps (to the midpoint ``lambda0 + r h`` and to ``t1``) are ancestral DDIM
    steps with noise level ``eta`` (:func:`~fastsample.solvers.stochastic_base.log_rho_ddim`);
    their noises are the standardized Brownian increments over ``[t0, t_mid]`` and ``[t0, t1]``,
    built from the increments over ``[t0, t_mid]`` and ``[t_mid, t1]`` (draws 0 and 1 for
    independent noise), so they are correlated as on one path (k-diffusion samples it with a
    Brownian tree by default; independent sub-step noises bias the variance). ``eta = 0`` is
    ``dpmpp_2s``. Two evaluations per step; a step onto ``t = 0`` is a DDIM step (one)."""

    eta: float = 1.0
    s_noise: float = 1.0
    r: float = eqx.field(static=True, default=0.5)
    phase: int | None = eqx.field(static=True, default=None)

    name: ClassVar[str] = "dpmpp_sde"

    def __check_init__(self):
        check_nonnegative(self.name, "eta", self.eta)
        check_nonnegative(self.name, "s_noise", self.s_noise)
        if not 0.0 < self.r < 1.0:
            raise ValueError(f"dpmpp_sde r must be in (0, 1); got {self.r}.")

    @property
    def needs_finite_start(self) -> bool:
        return True

    def order(self, terms):
        return 2

    def nfe(self, num_steps, final_zero=False):
        return 2 * num_steps - (1 if final_zero else 0)

    def phases(self, num_steps, ends_at_zero):
        return ((num_steps - 1, 0), (1, 1)) if ends_at_zero else ((num_steps, 0),)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        x0 = denoiser(x, t0, cond)
        h = process.log_snr(t1) - process.log_snr(t0)

        def step(t_to, target, z):
            hs = process.log_snr(t_to) - process.log_snr(t0)
            return ancestral_step(process, t0, t_to, x, target, log_rho_ddim(self.eta, hs), self.s_noise * z)

        def second_order():
            t_mid = ell_to_time(process, process.log_snr(t0) + self.r * h, "x0")
            # increments over [t0, t_mid] and [t_mid, t1]: the noise of the full step contains the
            # midpoint's (a Brownian path also for independent noise; without it the bias is large)
            w1, w2 = noise.increment(t0, t_mid, x, 0), noise.increment(t_mid, t1, x, 1)
            x0_mid = denoiser(step(t_mid, x0, w1 / jnp.sqrt(jnp.abs(t0 - t_mid)).astype(x.dtype)), t_mid, cond)
            z = (w1 + w2) / jnp.sqrt(jnp.abs(t0 - t1)).astype(x.dtype)
            return step(t1, x0 + (0.5 / self.r) * (x0_mid - x0), z)

        def first_order():
            return step(t1, x0, jnp.zeros_like(x))

        if self.phase is not None:
            return (second_order() if self.phase == 0 else first_order()), state
        # lax.cond on an unbatched predicate: the midpoint evaluation really is skipped
        return jax.lax.cond(t1 == 0, first_order, second_order), state

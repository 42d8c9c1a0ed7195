"""Euler-Maruyama on the reverse SDE and the predictor-corrector sampler with a Langevin corrector.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole: Score-Based Generative Modeling through
Stochastic Differential Equations (2021). For ``x_t = alpha x_0 + sigma eps`` the forward SDE is
``dx = f x dt + g dW`` with ``f = alpha'/alpha`` and ``g^2 = 2 sigma (sigma' - f sigma) =
-2 sigma^2 lambda'(t)``; the reverse-time family

    dx = [f x - (1 + eta^2)/2 g^2 score] dt + eta g dW_bar

has the marginals of the data process for every ``eta`` (``eta = 0``: the probability-flow ODE,
``eta = 1``: the reverse SDE).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from ..terms import ProbabilityFlowTerm
from ._shared import check_nonnegative
from .ancestral import AncestralDDIM
from .base import AbstractLinearSolver
from .stochastic_base import AbstractStochasticSolver

__all__ = ["EulerMaruyama", "PCLangevin"]


class EulerMaruyama(AbstractStochasticSolver, AbstractLinearSolver):
    """Euler-Maruyama on the reverse SDE with noise level ``eta`` (1: the reverse SDE; 0: ``euler``
    on the PF-ODE, exactly), in the process time ``t``. Its noise is the Brownian increment over the
    step (``noise="brownian"`` gives strong order 1/2). A step onto ``t = 0`` is the deterministic
    Euler step (the reverse SDE's drift is singular there). The diffusion ``g`` is infinite where
    ``alpha = 0``, so the grid must start at a finite log-SNR. One evaluation per step."""

    eta: float = 1.0
    s_noise: float = 1.0

    name: ClassVar[str] = "euler_maruyama"

    def __check_init__(self):
        check_nonnegative(self.name, "eta", self.eta)
        check_nonnegative(self.name, "s_noise", self.s_noise)

    @property
    def needs_finite_start(self) -> bool:
        return True

    def order(self, terms):
        return 1

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        process = denoiser.process
        x0, drift = ProbabilityFlowTerm(denoiser).x0_and_drift(t0, x, cond)
        a, s, da, ds = process.derivatives(jnp.asarray(t0, x.dtype))
        g2 = 2.0 * s * (ds - s * da / a)
        eta = jnp.where(t1 == 0, 0.0, self.eta)
        on = eta > 0
        extra = jnp.where(on, 0.5 * eta**2 * jnp.where(on, g2, 0.0), 0.0)  # ( -score = eps / sigma )
        drift = drift + extra.astype(x.dtype) * ((x - a * x0) / (s * s))
        diffusion = jnp.where(on, self.s_noise * eta * jnp.sqrt(jnp.where(on, g2, 0.0)), 0.0)
        return x + (t1 - t0) * drift + diffusion.astype(x.dtype) * noise.increment(t0, t1, x), state


PREDICTORS = {"euler_maruyama": EulerMaruyama, "ddpm": AncestralDDIM}


class PCLangevin(AbstractStochasticSolver, AbstractLinearSolver):
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3): at each grid time,
    ``corrector_steps`` Langevin MCMC steps ``x <- x + e score + sqrt(2 e) z``, then one predictor
    step (``euler_maruyama`` or ``ddpm``, the ancestral "reverse diffusion" predictor).

    The step size follows the signal-to-noise rule ``e = 2 (snr |z| / |score|)^2`` with the
    expected norms ``|z| ~ sqrt(D)`` and ``|score| ~ sqrt(D) / sigma(t)`` (Song & Ermon, Improved
    Techniques for Training Score-Based Generative Models, 2020), i.e. ``e = 2 (snr sigma)^2``:
    Score SDE's code uses batch means of the norms, which would make sample ``b`` depend on the
    batch, and per-sample norms are heavy-tailed in low dimension. Costs ``1 + corrector_steps``
    evaluations per step; ``corrector_steps = 0`` is the predictor alone and ``snr = 0`` leaves
    the corrector's point unchanged. The corrector's noise is fresh (``normal(j)``, ``j >= 1``);
    the predictor's is the step's Brownian increment."""

    snr: float = 0.16
    corrector_steps: int = eqx.field(static=True, default=1)
    predictor: str = eqx.field(static=True, default="euler_maruyama")

    name: ClassVar[str] = "pc_langevin"

    def __check_init__(self):
        if self.predictor not in PREDICTORS:
            raise ValueError(f"pc_langevin predictor must be one of {', '.join(PREDICTORS)}; got {self.predictor!r}.")
        if not isinstance(self.corrector_steps, int) or self.corrector_steps < 0:
            raise ValueError(f"pc_langevin corrector_steps must be an integer >= 0; got {self.corrector_steps!r}.")
        check_nonnegative(self.name, "snr", self.snr)

    @property
    def nfe_per_step(self) -> int:
        return 1 + self.corrector_steps

    @property
    def needs_finite_start(self) -> bool:
        return PREDICTORS[self.predictor]().needs_finite_start

    def order(self, terms):
        return 1

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        e = (2.0 * jnp.square(self.snr * denoiser.process.sigma(t0))).astype(x.dtype)
        for j in range(self.corrector_steps):
            score = denoiser.predict(x, t0, cond, target="score")
            x = x + e * score + jnp.sqrt(2.0 * e) * noise.normal(j + 1, x)
        return PREDICTORS[self.predictor]().update(denoiser, t0, t1, x, cond, None, noise)[0], state

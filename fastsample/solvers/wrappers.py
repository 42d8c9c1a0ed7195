"""Wrappers that modify any fastsample solver: momentum, time shifting and epsilon scaling.

Each wrapper is itself an :class:`~fastsample.solvers.AbstractFastSolver` holding ``base``; its
NFE, minimum step count and name derive from the base, and its state is the base's state plus
what the wrapper needs.

* :class:`HB` -- Polyak's heavy-ball momentum on the solver's step (Wizadwongsa, Chinchuthakun,
  Khungurn, Raj, Suwajanakorn: Diffusion Sampling with Momentum for Mitigating Divergence
  Artifacts, ICLR 2024). In the variables ``x_bar = x / alpha``, ``sigma_bar = sigma / alpha`` a
  multistep method reads ``x_bar_{n+1} = x_bar_n + delta_n sum_j b_j eps_{n-j}``; HB replaces the
  combination by a velocity::

      v_{n+1} = (1 - beta) v_n + beta sum_j b_j eps_{n-j},   x_bar_{n+1} = x_bar_n + delta_n v_{n+1}

  i.e. the momentum acts on the *combination of model outputs* the base steps with (its ``eps``
  or, for DPM-Solver++, ``x0`` "gradient"), not on the raw increment of ``x``.
* :class:`GHVB` -- the generalised heavy ball of the same paper: momentum on the raw outputs,
  ``v_n = (1 - beta) v_{n-1} + beta m_n``, followed by an order-``k`` multistep combination of the
  velocities whose coefficients undo the lag of the moving average (order 2:
  ``x_bar_{n+1} = x_bar_n + delta_n ((2 + beta) v_n - (2 - beta) v_{n-1}) / (2 beta)``).
* :class:`TimeShift` -- the Time-Shift Sampler (Li, Qu, Yao, Sun, Moens: Alleviating Exposure Bias
  in Diffusion Models through Sampling with Shifted Time Steps, ICLR 2024): the model is queried
  at the time, within a window around the nominal one, whose ``sigma^2`` best matches the
  variance of the current sample.
* :class:`EpsScaling` -- Epsilon Scaling (Ning, Li, Su, Salah, Ertugrul: Elucidating the
  Exposure Bias in Diffusion Models, ICLR 2024): the noise prediction is divided by
  ``lambda(t) = scale + slope * t`` before the solver uses it.

``beta = 1`` (HB, GHVB), ``window = 0`` (TimeShift) and ``scale = 1, slope = 0`` (EpsScaling)
reproduce the base solver exactly.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ..denoisers import convert_prediction
from .base import AbstractFastSolver, AbstractLinearSolver, AbstractWrapper
from .exponential import DDIM, AbstractMultistepSolver, History

__all__ = ["HB", "GHVB", "TimeShift", "EpsScaling"]


def _check_beta(name: str, beta) -> None:
    if isinstance(beta, (int, float)) and not 0.0 < beta <= 1.0:
        raise ValueError(f"{name} beta must be in (0, 1]; got {beta}.")


def step_coefficients(process, t0, t1, prediction: str):
    """``(A, B)`` of the first-order exponential step ``x1 = A x + B m`` in prediction variables.

    ``x0``: ``A = sigma1 / sigma0``, ``B = -alpha1 expm1(lambda0 - lambda1)`` (DPM-Solver++ form,
    finite at ``alpha0 = 0`` and ``sigma1 = 0``). ``eps``: ``A = alpha1 / alpha0``,
    ``B = A sigma0 expm1(lambda0 - lambda1) = sigma1 - A sigma0``, i.e.
    ``x_bar1 = x_bar0 + (sigma_bar1 - sigma_bar0) eps`` (finite at ``sigma1 = 0``, not at
    ``alpha0 = 0``)."""
    e = jnp.expm1(process.log_snr(t0) - process.log_snr(t1))
    if prediction == "x0":
        return process.sigma(t1) / process.sigma(t0), -process.alpha(t1) * e
    a = process.alpha(t1) / process.alpha(t0)
    return a, a * process.sigma(t0) * e


# --------------------------------------------------------------------------------------------- HB


class _HBState(NamedTuple):
    base: object
    v: jax.Array  # the velocity (a data prediction)
    count: jax.Array  # momentum updates made so far


class HB(AbstractWrapper, AbstractLinearSolver):
    """Polyak's heavy-ball momentum applied to any solver (Wizadwongsa et al., 2024, Sec. 4.1).

    Every step of the base is read as a first-order exponential step ``x1 = A x + B m_eff``
    (:func:`step_coefficients`): ``m_eff = (x1_base - A x) / B`` is the combination of model
    outputs the base used (``D0 + D1 / 2`` for DPM-Solver++(2M), the Adams-Bashforth sum for
    PLMS, the output itself for DDIM). The wrapper then steps with the velocity::

        v_{n+1} = (1 - beta) v_n + beta m_eff_n,      x_{n+1} = A x_n + B v_{n+1}

    In ``eps`` variables this is the paper's ``x_bar_{n+1} = x_bar_n + delta_n v_{n+1}``; in
    ``x0`` variables it is the authors' DPM-Solver++ form ``x_{n+1} = (sigma_{n+1} / sigma_n) x_n
    - alpha_{n+1} expm1(-h) v_{n+1}``. The two give the same sampler (by induction, the ``eps``
    velocity stays the noise equivalent ``(x_n - alpha_n v) / sigma_n`` of the ``x0`` velocity,
    because each step is the first-order step with that velocity), so the wrapper works in ``x0``
    variables, whose coefficients stay finite at ``alpha = 0`` and ``sigma = 0``. The velocity
    starts at the first step's ``m_eff`` (the first step is the base's). ``beta = 1`` is the base
    exactly; smaller ``beta`` enlarges the stability region (the method is then first order). A
    step with degenerate coefficients (``B = 0``: ending at ``alpha = 0``) is the base's step and
    leaves the velocity unchanged.

    Arguments:
        base: the solver whose steps get momentum.
        beta: the momentum weight in ``(0, 1]``.
    """

    base: AbstractFastSolver
    beta: float = 1.0

    def __check_init__(self):
        _check_beta("HB", self.beta)

    prefix: ClassVar[str] = "hb"

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return _HBState(self.base.init_state(denoiser, x, cond, t_end, num_steps), jnp.zeros_like(x),
                        jnp.asarray(0, jnp.int32))

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        x1_base, base_state = self.base.update(denoiser, t0, t1, x, cond, state.base, noise)
        a, b = step_coefficients(denoiser.process, t0, t1, "x0")
        bad = ~(jnp.isfinite(a) & jnp.isfinite(b) & (b != 0))
        a = jnp.where(bad, 0.0, a).astype(x.dtype)
        b = jnp.where(bad, 1.0, b).astype(x.dtype)
        m = (x1_base - a * x) / b
        beta = jnp.asarray(self.beta, x.dtype)
        v = jnp.where(state.count == 0, m, (1 - beta) * state.v + beta * m)
        # A x + B v written as x1_base + B (v - m): exactly the base's step when v == m (beta = 1).
        x1 = x1_base + b * (v - m)
        x1 = jnp.where(bad, x1_base, x1)
        v = jnp.where(bad, state.v, v)
        return x1, _HBState(base_state, v, state.count + jnp.where(bad, 0, 1).astype(jnp.int32))


# ------------------------------------------------------------------------------------------- GHVB


class _FirstOrder(AbstractMultistepSolver):
    """DDIM seen as the order-1 multistep method (GHVB's base for ``DDIM``). The paper's DDIM is
    PLMS of order 1 on ``eps``; for heavy ball on a first-order method ``x0`` and ``eps``
    variables give the same sampler (see :class:`HB`), and ``x0`` stays finite at ``alpha = 0``."""

    name = "ddim"

    def weights(self, process, c, state, order):
        return jnp.stack([-jnp.expm1(-c.h)])


class _GHVBState(NamedTuple):
    base: History
    velocities: jax.Array  # (k, *x.shape) newest first
    count: jax.Array


def _extrapolation(p: int) -> list[float]:
    """Weights of ``v_0 .. v_{p-1}`` (newest first) giving ``v_p`` with ``nabla^p v = 0``."""
    return [(-1.0) ** (p - i + 1) * math.comb(p, i) for i in range(p)]


class GHVB(AbstractWrapper, AbstractLinearSolver):
    """Generalised heavy ball (Wizadwongsa et al., 2024, Sec. 4.2) on a multistep solver.

    The momentum acts on the raw model outputs, ``v_n = (1 - beta) v_{n-1} + beta m_n`` (``v_0 =
    m_0``), and the step is the base's order-``k`` combination applied to velocities. Because
    ``m_n = v_n + L (v_n - v_{n-1})`` exactly (``L = (1 - beta) / beta``), the base combination of
    the outputs ``m_0 .. m_{p-1}`` (newest first, ``p`` the step's order) is rewritten in the
    velocities ``v_0 .. v_p``; GHVB drops the one velocity the ``p``-step method does not keep,
    replacing ``v_p`` by its polynomial extrapolation (``nabla^p v = 0``), so the step uses
    ``m~_j = v_j + L (v_j - v_{j+1})`` with that ``v_p``. With Adams-Bashforth weights this is the
    paper's GHVB (order 2: ``((2 + beta) v_n - (2 - beta) v_{n-1}) / (2 beta)``; order 3:
    ``((18 + 5 beta) v_n - (24 - 8 beta) v_{n-1} + (6 - beta) v_{n-2}) / (12 beta)``); with the
    exponential weights of DPM-Solver(++)/multistep solvers it is the same construction on a
    non-uniform grid (on a log-SNR-uniform grid DPM-Solver-2M in ``eps`` is exactly AB2 in
    ``x_bar``). Order 1 (``DDIM``, warm-up, final steps) is heavy ball on the outputs.
    ``beta = 1`` is the base exactly. Unlike HB, for orders >= 2 the result depends on the
    base's prediction variables (the paper's GHVB is on ``eps``: use a base with
    ``prediction="eps"`` for it).

    Arguments:
        base: an :class:`~fastsample.solvers.exponential.AbstractMultistepSolver` (its order,
            prediction variables, warm-up and lower-order-final rules are kept) or :class:`DDIM`
            (order 1, which is :class:`HB` on DDIM).
        beta: the momentum weight in ``(0, 1]``.
    """

    base: AbstractFastSolver
    beta: float = 1.0

    def __check_init__(self):
        _check_beta("GHVB", self.beta)
        if not isinstance(self.base, (DDIM, AbstractMultistepSolver)):
            raise ValueError(f"GHVB needs a multistep solver or DDIM as its base; got {type(self.base).__name__}.")

    prefix: ClassVar[str] = "ghvb"

    @property
    def _core(self) -> AbstractMultistepSolver:
        if isinstance(self.base, AbstractMultistepSolver):
            return self.base
        return _FirstOrder(order=1, prediction="x0")

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        core = self._core
        return _GHVBState(core.init_state(denoiser, x, cond, t_end, num_steps),
                          jnp.zeros((core.order,) + x.shape, x.dtype), jnp.asarray(0, jnp.int32))

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        core = self._core
        k = core.order
        m = core.evaluate(denoiser, t0, x, cond)
        beta = jnp.asarray(self.beta, x.dtype)
        lag = (1 - beta) / beta
        v0 = jnp.where(state.count == 0, m, (1 - beta) * state.velocities[0] + beta * m)
        w = jnp.concatenate([v0[None], state.velocities[:-1]])  # v_0 .. v_{k-1}, newest first
        order = core.step_order(state.base, t1)
        values = w
        for p in range(1, k + 1):
            v_p = sum(c * w[i] for i, c in enumerate(_extrapolation(p)))
            nxt = [w[j + 1] for j in range(p - 1)] + [v_p]
            tilde = [w[j] + lag * (w[j] - nxt[j]) for j in range(p)] + [w[j] for j in range(p, k)]
            values = jnp.where(order == p, jnp.stack(tilde), values)
        x1, base_state = core.advance(denoiser.process, t0, t1, x, values[0],
                                      state.base._replace(values=values[1:]))
        return x1, _GHVBState(base_state, w, state.count + 1)


# ------------------------------------------------------------------------- denoiser-side wrappers


class _AbstractDenoiserWrapper(AbstractWrapper):
    """A wrapper that changes what the base solver sees of the denoiser (:meth:`wrap`)."""

    @abc.abstractmethod
    def wrap(self, denoiser):
        """The denoiser whose predictions the base solver sees."""

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return self.base.init_state(self.wrap(denoiser), x, cond, t_end, num_steps)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        return self.base.update(self.wrap(denoiser), t0, t1, x, cond, state, noise)


class _DenoiserView(eqx.Module):
    """A denoiser seen through a transformation: what solvers use of a ``Denoiser``
    (``process``, ``predict``, calling for ``x0``); each ``predict`` is one call of ``inner``."""

    inner: eqx.Module

    @property
    def process(self):
        return self.inner.process

    def __call__(self, x, t, cond=None):
        return self.predict(x, t, cond, "x0")


def _pooled_variance(x):
    """Variance of each sample over its features (unbiased, as ``torch.var``), averaged over the
    batch (axis 0); a 1-D ``x`` is one sample."""
    feats = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    ddof = 1 if feats.shape[1] > 1 else 0
    return jnp.mean(jnp.var(feats, axis=1, ddof=ddof))


class _TimeShifted(_DenoiserView):
    window: int = eqx.field(static=True)
    cutoff: float
    num_candidates: int = eqx.field(static=True)

    def shifted_time(self, x, t):
        """The time among ``t + k dt`` (``|k| <= window // 2``, ``dt`` one step of a
        ``num_candidates``-point uniform grid of ``[t_min, t_max]``) whose ``sigma^2`` is closest to
        the variance of ``x``; ``t`` itself at or below ``cutoff``."""
        process = self.process
        half = self.window // 2
        dt = (float(process.t_max) - float(process.t_min)) / (self.num_candidates - 1)
        offsets = jnp.arange(-half, half + 1)
        cands = jnp.clip(t + offsets.astype(x.dtype) * dt, process.t_min, process.t_max)
        cands = jnp.where(offsets == 0, t, cands)
        dist = jnp.abs(_pooled_variance(x) - process.sigma(cands) ** 2)
        tau = cands[jnp.argmin(dist)]
        return jnp.where(t > self.cutoff, tau, t)

    def predict(self, x, t, cond=None, target: str = "x0"):
        t = jnp.asarray(t, x.dtype)
        tau = self.shifted_time(x, t)
        if target == "eps":
            return self.inner.predict(x, tau, cond, "eps")
        # The noise prediction made at tau is kept; the data prediction at t follows from it:
        # x0_t = (x - sigma_t eps) / alpha_t with eps = (x - alpha_tau x0_tau) / sigma_tau.
        x0_tau = self.inner.predict(x, tau, cond, "x0")
        a_t, s_t = self.process.alpha_sigma(t)
        a_u, s_u = self.process.alpha_sigma(tau)
        x0 = (1 - s_t / s_u) / a_t * x + (a_u * s_t) / (a_t * s_u) * x0_tau
        x0 = jnp.where(tau == t, x0_tau, x0)
        return x0 if target == "x0" else convert_prediction(self.process, x, t, x0, "x0", target)


class TimeShift(_AbstractDenoiserWrapper):
    """Time-Shift Sampler (Li et al., 2024) around any solver.

    Each model evaluation at nominal time ``t > cutoff`` is made at the shifted time ``t_s``: the
    candidate among ``t + k dt``, ``|k| <= window // 2`` (the paper's window ``[t - w/2, t + w/2]``
    of training steps; ``dt = (t_max - t_min) / (num_candidates - 1)``, one training step for
    ``VPDiscrete`` with 1000 candidates), whose noise level best matches the state::

        t_s = argmin_k | Var(x_t) - sigma(t + k dt)^2 |

    (``1 - alpha_bar`` for VP processes, as in the paper's code). The model's noise prediction at
    ``t_s`` is used as the noise prediction at ``t``; the solver's coefficients stay at the nominal
    grid. fastsample models take one scalar time, so one shift serves the whole batch: ``Var(x_t)``
    is each sample's variance over its features, averaged over the batch (the paper shifts each
    sample). ``window = 0`` or ``cutoff >= t_max`` is the base exactly.

    Arguments:
        base: the solver.
        window: the window size ``w`` in candidate steps (static).
        cutoff: no shift at times ``t <= cutoff`` (the paper's ``t_c``), in process time.
        num_candidates: size of the grid-independent candidate grid on ``[t_min, t_max]``.
    """

    base: AbstractFastSolver
    window: int = eqx.field(static=True)
    cutoff: float = 0.0
    num_candidates: int = eqx.field(static=True, default=1000)

    def __check_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"TimeShift window must be an integer >= 0; got {self.window!r}.")
        if not isinstance(self.num_candidates, int) or self.num_candidates < 2:
            raise ValueError(f"TimeShift num_candidates must be an integer >= 2; got {self.num_candidates!r}.")

    prefix: ClassVar[str] = "ts"  # not linear: the shift looks at the variance of x

    def wrap(self, denoiser):
        return _TimeShifted(denoiser, self.window, self.cutoff, self.num_candidates)



class _EpsScaled(_DenoiserView):
    scale: float
    slope: float

    def factor(self, t):
        return self.scale + self.slope * t

    def predict(self, x, t, cond=None, target: str = "x0"):
        t = jnp.asarray(t, x.dtype)
        lam = jnp.asarray(self.factor(t), x.dtype)
        if target == "eps":
            return self.inner.predict(x, t, cond, "eps") / lam
        # eps' = eps / lam and x0' = (x - sigma eps') / alpha = x0 + (x / alpha - x0)(1 - 1 / lam)
        x0 = self.inner.predict(x, t, cond, "x0")
        a = self.process.alpha(t)
        x0 = jnp.where(lam == 1, x0, x0 + (x / a - x0) * (1 - 1 / lam))
        return x0 if target == "x0" else convert_prediction(self.process, x, t, x0, "x0", target)


class EpsScaling(_AbstractDenoiserWrapper, AbstractLinearSolver):
    """Epsilon Scaling (Ning et al., 2024) around any solver.

    The model's noise prediction is divided by ``lambda(t) = scale + slope * t`` (the paper's
    ``lambda_t = k t + b``, here in process time; ``slope = 0`` is its uniform schedule) before the
    solver sees it; the data prediction is the one consistent with the scaled noise,
    ``x0' = (x - sigma eps / lambda) / alpha``. The paper's sampler is
    ``mu(x_t, t) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps(x_t, t) / lambda_t) / sqrt(alpha_t)``.
    ``scale = 1, slope = 0`` is the base exactly. Not defined where ``alpha = 0``.
    """

    base: AbstractFastSolver
    scale: float = 1.0
    slope: float = 0.0

    def __check_init__(self):
        if isinstance(self.scale, (int, float)) and not self.scale > 0:
            raise ValueError(f"EpsScaling scale must be > 0; got {self.scale}.")

    prefix: ClassVar[str] = "es"

    def wrap(self, denoiser):
        return _EpsScaled(denoiser, self.scale, self.slope)

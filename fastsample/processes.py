"""Noise processes: ``x_t = alpha(t) x_0 + sigma(t) eps``.

Every process exposes ``alpha``, ``sigma``, ``log_snr`` (half log-SNR ``lambda = log(alpha/sigma)``),
its inverse ``t_from_log_snr`` and a time range ``[t_min, t_max]``. Sampling runs from ``t_max``
down to ``t_min`` (lambda increasing). ``t = 0`` always means clean data (``sigma = 0``): a grid
may end there, so that the final step lands on the data prediction.

Each process implements ``log_alpha``/``log_sigma`` with formulas that stay accurate in float32
at both ends of its range (``expm1``, ``log1p``, ``log_sigmoid``); everything else derives from them.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import as_float as _float

__all__ = [
    "AbstractProcess",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "VE",
    "EDM",
    "FlowMatching",
]




def _vp_log_alpha(lam):
    # alpha^2 = sigmoid(2 lambda) for variance-preserving processes.
    return 0.5 * jax.nn.log_sigmoid(2.0 * lam)


def _vp_log_sigma(lam):
    return 0.5 * jax.nn.log_sigmoid(-2.0 * lam)


class AbstractProcess(eqx.Module):
    """A forward noising process ``x_t = alpha(t) x_0 + sigma(t) eps``.

    Subclasses implement ``log_alpha``, ``log_sigma`` and ``t_from_log_snr`` and set the
    fields ``t_min`` and ``t_max`` (the range a sampler integrates over).
    """

    t_min: eqx.AbstractVar[float]
    t_max: eqx.AbstractVar[float]

    @abc.abstractmethod
    def log_alpha(self, t):
        """``log alpha(t)``."""

    @abc.abstractmethod
    def log_sigma(self, t):
        """``log sigma(t)`` (``-inf`` at ``t = 0``)."""

    @abc.abstractmethod
    def t_from_log_snr(self, lam):
        """Inverse of ``log_snr``: the time whose half log-SNR is ``lam``."""

    @property
    def variance_preserving(self) -> bool:
        return False

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def log_snr(self, t):
        """Half log-SNR ``lambda(t) = log(alpha / sigma)``; ``+inf`` at ``t = 0``."""
        return self.log_alpha(t) - self.log_sigma(t)

    def sigma_edm(self, t):
        """EDM noise level ``sigma / alpha = exp(-lambda)``."""
        return jnp.exp(self.log_sigma(t) - self.log_alpha(t))

    def t_from_sigma_edm(self, sigma_edm):
        return self.t_from_log_snr(-jnp.log(_float(sigma_edm)))

    def alpha_sigma(self, t):
        """``(alpha, sigma)`` at ``t``."""
        return self.alpha(t), self.sigma(t)

    def derivatives(self, t):
        """``(alpha, sigma, d alpha / dt, d sigma / dt)`` at ``t`` (forward-mode autodiff)."""
        t = _float(t)
        a, da = jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))
        s, ds = jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))
        return a, s, da, ds

    def derivatives_in_log_snr(self, lam):
        """``(alpha, sigma, d alpha / d lambda, d sigma / d lambda)`` at half log-SNR ``lam``."""
        lam = _float(lam)
        ones = jnp.ones_like(lam)
        a, da = jax.jvp(lambda l: self.alpha(self.t_from_log_snr(l)), (lam,), (ones,))
        s, ds = jax.jvp(lambda l: self.sigma(self.t_from_log_snr(l)), (lam,), (ones,))
        return a, s, da, ds

    def check_times(self, ts, *, allow_zero: bool = True, name: str = "grid"):
        """Raise ``ValueError`` unless ``ts`` (concrete) is strictly decreasing and inside
        ``[t_min, t_max]`` (a final ``0`` is allowed: it means clean data)."""
        ts = np.asarray(ts, dtype=np.float64)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D array of at least 2 times; got shape {ts.shape}.")
        if not np.all(np.isfinite(ts)):
            raise ValueError(f"{name} must be finite; got {ts.tolist()}.")
        if not np.all(np.diff(ts) < 0):
            i = int(np.argmax(~(np.diff(ts) < 0)))
            raise ValueError(
                f"{name} must be strictly decreasing (from t_max towards t_min); "
                f"ts[{i}]={ts[i]!r} is followed by ts[{i + 1}]={ts[i + 1]!r}."
            )
        inner = ts[:-1] if (allow_zero and ts[-1] == 0.0) else ts
        tol = 1e-6 * max(1.0, abs(self.t_max))
        bad = (inner < self.t_min - tol) | (inner > self.t_max + tol)
        if np.any(bad):
            i = int(np.argmax(bad))
            allowed = f"[{self.t_min}, {self.t_max}]" + (" (or a final 0 for clean data)" if allow_zero else "")
            raise ValueError(
                f"{name}[{i}]={ts[i]!r} leaves the time range of {type(self).__name__}: allowed {allowed}."
            )


class VPLinear(AbstractProcess):
    """Variance-preserving SDE with linear ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``
    (Score-Based Generative Modeling through SDEs, 2021; DPM-Solver, 2022).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    @property
    def variance_preserving(self) -> bool:
        return True

    def _neg2_log_alpha(self, t):
        t = _float(t)
        return t * (self.beta_min + 0.5 * t * (self.beta_max - self.beta_min))

    def log_alpha(self, t):
        return -0.5 * self._neg2_log_alpha(t)

    def log_sigma(self, t):
        # sigma^2 = 1 - alpha^2 = -expm1(2 log alpha)
        return 0.5 * jnp.log(-jnp.expm1(-self._neg2_log_alpha(t)))

    def t_from_log_snr(self, lam):
        # -2 log alpha = softplus(-2 lambda) = L, solve beta_min t + (beta_max-beta_min) t^2 / 2 = L.
        L = jax.nn.softplus(-2.0 * _float(lam))
        d = self.beta_max - self.beta_min
        return 2.0 * L / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * d * L))


class VPCosine(AbstractProcess):
    """Cosine schedule ``alpha_bar(t) = cos^2(theta(t)) / cos^2(theta(0))``,
    ``theta(t) = (t + s) / (1 + s) * pi / 2`` (Improved DDPM, Nichol & Dhariwal 2021).

    ``t_max`` stops short of 1, where ``alpha = 0``.
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    @property
    def variance_preserving(self) -> bool:
        return True

    def _theta0(self):
        return self.s / (1.0 + self.s) * math.pi / 2

    def log_alpha(self, t):
        # cos(theta) = sin(pi/2 - theta), with pi/2 - theta computed from 1 - t (exact near t = 1).
        delta = (1.0 - _float(t)) / (1.0 + self.s) * (math.pi / 2)
        return jnp.log(jnp.sin(delta)) - math.log(math.cos(self._theta0()))

    def log_sigma(self, t):
        # sigma^2 = (cos^2 th0 - cos^2 th) / cos^2 th0 = sin(th - th0) sin(th + th0) / cos^2 th0
        t = _float(t)
        th0 = self._theta0()
        dth = t / (1.0 + self.s) * (math.pi / 2)
        return 0.5 * (jnp.log(jnp.sin(dth)) + jnp.log(jnp.sin(dth + 2 * th0))) - math.log(math.cos(th0))

    def t_from_log_snr(self, lam):
        lam = _float(lam)
        th0 = self._theta0()
        alpha = jnp.exp(_vp_log_alpha(lam))
        sigma2 = jnp.exp(2 * _vp_log_sigma(lam))
        sin_th = jnp.sqrt(math.sin(th0) ** 2 + math.cos(th0) ** 2 * sigma2)
        cos_th = math.cos(th0) * alpha
        # theta - theta0 via atan2 of the difference angle keeps precision near t = 0.
        sin_d = sin_th * math.cos(th0) - cos_th * math.sin(th0)
        cos_d = cos_th * math.cos(th0) + sin_th * math.sin(th0)
        return jnp.arctan2(sin_d, cos_d) * (2.0 * (1.0 + self.s) / math.pi)


class VPDiscrete(AbstractProcess):
    """Discrete-time DDPM process from ``betas`` or ``alphas_cumprod`` (N training steps).

    Step ``n`` (0-based) sits at ``t_n = (n + 1) / N``; ``lambda`` is interpolated piecewise
    linearly in ``t`` between steps, which makes ``t_from_log_snr`` its exact inverse
    (DPM-Solver's discrete-time wrapper). Presets: ``ddpm_linear`` (1e-4..0.02) and
    ``scaled_linear`` (Stable Diffusion, 0.00085..0.012), 1000 steps.
    """

    log_snrs: np.ndarray  # (N,) half log-SNR at t_n, increasing in n is *not* assumed: decreasing.
    t_min: float
    t_max: float

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("VPDiscrete needs exactly one of `betas` or `alphas_cumprod`.")
        if betas is not None:
            betas = np.asarray(betas, dtype=np.float64)
            if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
                raise ValueError("betas must be a 1-D array with values in (0, 1).")
            log_ac = np.cumsum(np.log1p(-betas))
        else:
            ac = np.asarray(alphas_cumprod, dtype=np.float64)
            if ac.ndim != 1 or np.any(ac <= 0) or np.any(ac >= 1):
                raise ValueError("alphas_cumprod must be a 1-D array with values in (0, 1).")
            log_ac = np.log(ac)
        if log_ac.shape[0] < 2 or not np.all(np.diff(log_ac) < 0):
            raise ValueError("alphas_cumprod must be strictly decreasing with at least 2 steps.")
        # lambda = 0.5 (log ac - log(1 - ac))
        self.log_snrs = 0.5 * (log_ac - np.log(-np.expm1(log_ac)))
        n = log_ac.shape[0]
        self.t_min = 1.0 / n
        self.t_max = 1.0

    @classmethod
    def ddpm_linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """DDPM's linear betas (Ho et al., 2020)."""
        return cls(betas=np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Stable Diffusion's scaled-linear betas: ``linspace(sqrt(b0), sqrt(b1))^2``."""
        return cls(betas=np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2)

    @property
    def variance_preserving(self) -> bool:
        return True

    @property
    def num_train_timesteps(self) -> int:
        return int(self.log_snrs.shape[0])

    def _grid(self, dtype):
        n = self.num_train_timesteps
        ts = jnp.arange(1, n + 1, dtype=dtype) / n
        return ts, jnp.asarray(self.log_snrs, dtype=dtype)

    def log_snr(self, t):
        t = _float(t)
        ts, lams = self._grid(t.dtype)
        lam = jnp.interp(t, ts, lams)
        return jnp.where(t <= 0, jnp.inf, lam)

    def log_alpha(self, t):
        return _vp_log_alpha(self.log_snr(t))

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_snr(t))

    def t_from_log_snr(self, lam):
        lam = _float(lam)
        ts, lams = self._grid(lam.dtype)
        return jnp.interp(lam, lams[::-1], ts[::-1])

    def t_from_index(self, n):
        """Continuous time of training step ``n`` (0-based)."""
        return (jnp.asarray(n) + 1.0) / self.num_train_timesteps


class VE(AbstractProcess):
    """Variance-exploding SDE: ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``
    (Score-Based Generative Modeling through SDEs, 2021). ``t = 0`` is clean data."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def log_sigma(self, t):
        t = _float(t)
        ls = math.log(self.sigma_min) + t * math.log(self.sigma_max / self.sigma_min)
        return jnp.where(t <= 0, -jnp.inf, ls)

    def t_from_log_snr(self, lam):
        lam = _float(lam)
        # -lambda - log(sigma_min) cancels near t_min: subtract the constant in two parts (its value
        # in lam's dtype, then the rounding remainder) so float32 keeps full relative precision.
        c = math.log(self.sigma_min)
        c_hi = np.asarray(c, dtype=lam.dtype)
        c_lo = c - float(c_hi)
        return ((-lam - c_hi) - c_lo) / math.log(self.sigma_max / self.sigma_min)


class EDM(AbstractProcess):
    """EDM's process: ``alpha = 1``, ``sigma(t) = t`` (Karras et al., Elucidating the Design
    Space of Diffusion-Based Generative Models, 2022)."""

    t_min: float
    t_max: float

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}.")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    @property
    def sigma_min(self) -> float:
        return self.t_min

    @property
    def sigma_max(self) -> float:
        return self.t_max

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def log_sigma(self, t):
        return jnp.log(_float(t))

    def sigma(self, t):
        return _float(t)

    def t_from_log_snr(self, lam):
        return jnp.exp(-_float(lam))


class FlowMatching(AbstractProcess):
    """Flow matching / rectified flow: ``alpha = 1 - t``, ``sigma = t`` (Lipman et al., Flow
    Matching for Generative Modeling; Liu et al., Rectified Flow; 2023). ``t = 1`` is pure
    noise (``lambda = -inf``), ``t = 0`` clean data."""

    t_min: float = 0.0
    t_max: float = 1.0

    def log_alpha(self, t):
        return jnp.log1p(-_float(t))

    def log_sigma(self, t):
        return jnp.log(_float(t))

    def alpha(self, t):
        # direct forms: exact at both ends, and their derivatives have no 0 * inf
        return 1.0 - _float(t)

    def sigma(self, t):
        return _float(t)

    def t_from_log_snr(self, lam):
        # t / (1 - t) = exp(-lambda)  =>  t = sigmoid(-lambda)
        return jax.nn.sigmoid(-_float(lam))

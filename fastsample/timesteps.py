"""Time discretizations ("schedules") for fixed-step samplers.

:func:`get_timesteps` returns the grid ``t_0 > t_1 > ... > t_num_steps`` that a fixed-step sampler
walks, from ``t_start`` (default ``process.t_max``, the noisy end) down to ``t_end`` (default
``process.t_min``), in the time variable of the given process (see :mod:`fastsample.processes`).

Conventions
-----------
* ``num_steps`` sampler steps means ``num_steps + 1`` grid points, strictly decreasing.
* ``final_zero=False`` (default): the schedule spans ``[t_end, t_start]`` with ``num_steps``
  intervals; the grid starts at ``t_start`` and ends at ``t_end`` exactly.
* ``final_zero=True``: k-diffusion's convention of appending ``sigma = 0``. The schedule is built
  with ``num_steps - 1`` intervals between ``t_start`` and ``t_end`` (``num_steps`` points) and an
  exact ``0.0`` (clean data) is appended, so the last step lands on the data prediction. With
  ``num_steps == 1`` the grid is ``[t_start, 0]``. ``t_end`` must then be ``> 0``.
* Grids are computed on the host, in float64 (process methods are evaluated under
  ``jax.enable_x64``, also while a caller's ``jit`` traces): :func:`schedule_times` returns NumPy
  float64, :func:`get_timesteps` a ``jnp`` array of the default float dtype (float32 unless x64 is
  enabled). The ends are set to ``t_start``/``t_end`` exactly rather than round-tripped.
* Exceptions: ``ays`` defaults its ends to the published table's ends (clipped to the process
  range) and the diffusers spacings ``leading``/``trailing``/``linspace`` (``VPDiscrete`` only)
  are fixed by the training-step indices; see their docstrings.

Adding a schedule: ``SCHEDULES[name] = fn`` with
``fn(process, num_steps, *, t_start, t_end, final_zero, **options) -> array`` of ``num_steps + 1``
times (``t_start``/``t_end`` may be ``None``). :func:`continuous_schedule` turns a function
``f(process, n, t_start, t_end, **options)`` returning ``n + 1`` float64 times from ``t_start`` to
``t_end`` into one, handling defaults, validation and ``final_zero``.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc

from .processes import AbstractProcess, VPDiscrete

__all__ = [
    "get_timesteps",
    "schedule_times",
    "on_host",
    "validate_timesteps",
    "available_schedules",
    "SCHEDULES",
    "AYS_SIGMAS",
    "continuous_schedule",
    "beta_ppf",
    "time_uniform",
    "time_quadratic",
    "logsnr_uniform",
    "exponential",
    "karras",
    "polyexponential",
    "ays",
    "beta",
    "leading",
    "trailing",
    "linspace",
    "leading_indices",
    "trailing_indices",
    "linspace_indices",
]


# --------------------------------------------------------------------------------------- helpers


class _Float64:
    """Evaluate jax code eagerly (even under a trace) with 64-bit floats enabled."""

    def __enter__(self):
        self._x64 = jax.enable_x64(True)
        self._eval = jax.ensure_compile_time_eval()
        self._x64.__enter__()
        self._eval.__enter__()
        return self

    def __exit__(self, *exc):
        self._eval.__exit__(*exc)
        self._x64.__exit__(*exc)
        return False


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _pad(x: np.ndarray) -> np.ndarray:
    """Pad a 1-D array (repeating its last value) to a power-of-two length >= 16, so eager jax
    calls on grids of different sizes reuse the same compiled shapes."""
    size = max(16, 1 << (x.shape[0] - 1).bit_length())
    return np.concatenate([x, np.full(size - x.shape[0], x[-1])]) if size > x.shape[0] else x


def on_host(fn, x) -> np.ndarray:
    """``fn(x)`` for a process method, computed eagerly in float64 (also while a caller's ``jit``
    traces), returned as NumPy float64."""
    x = _f64(x)
    flat = x.reshape(-1)
    with _Float64():
        out = _f64(fn(jnp.asarray(_pad(flat) if flat.size else flat)))
    return out[: flat.size].reshape(x.shape)


def _check_positive(name: str, value, schedule: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{schedule}: {name} must be a positive number; got {value!r}.") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{schedule}: {name} must be a finite number > 0; got {value!r}.")
    return v


def _tol(process: AbstractProcess) -> float:
    return 1e-6 * max(1.0, abs(float(process.t_max)))


def _check_time(process: AbstractProcess, name: str, value) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}.") from None
    lo, hi = float(process.t_min), float(process.t_max)
    tol = _tol(process)
    if not (math.isfinite(t) and lo - tol <= t <= hi + tol):
        raise ValueError(
            f"{name}={value!r} is outside the time range of {type(process).__name__}: allowed [{lo}, {hi}]."
        )
    return min(max(t, lo), hi)  # forgive rounding just outside the range


def _resolve_ends(process: AbstractProcess, t_start, t_end, final_zero: bool) -> tuple[float, float]:
    t0 = float(process.t_max) if t_start is None else _check_time(process, "t_start", t_start)
    t1 = float(process.t_min) if t_end is None else _check_time(process, "t_end", t_end)
    if not t0 > t1:
        raise ValueError(f"t_start must be > t_end; got t_start={t0!r}, t_end={t1!r}.")
    if final_zero and t1 <= 0:
        raise ValueError(
            f"final_zero=True appends t=0 after t_end, so t_end must be > 0; got t_end={t1!r} "
            f"(the default t_end is process.t_min={process.t_min!r}); pass t_end inside "
            f"({process.t_min}, {process.t_max}]."
        )
    return t0, t1


def _finish(ts, t_start: float, t_end: float, final_zero: bool) -> np.ndarray:
    ts = _f64(ts).copy()
    ts[0], ts[-1] = t_start, t_end
    if final_zero:
        ts = np.append(ts, 0.0)
    return ts


def _log_snr_ends(process, t_start, t_end, schedule):
    lams = on_host(process.log_snr, [t_start, t_end])
    for name, t, lam in (("t_start", t_start, lams[0]), ("t_end", t_end, lams[1])):
        if not math.isfinite(lam):
            raise ValueError(
                f"{schedule} needs a finite log-SNR at both ends, but {type(process).__name__} has "
                f"lambda={lam} at {name}={t!r}; pass t_start/t_end strictly inside "
                f"({process.t_min}, {process.t_max}) (e.g. t_start=0.999, t_end=1e-3 for flow matching)."
            )
    return lams


def continuous_schedule(fn: Callable) -> Callable:
    """Turn ``fn(process, n, t_start, t_end, **options)`` (``n + 1`` float64 times from ``t_start``
    to ``t_end``) into a registry schedule: resolves the default ends (``t_max``/``t_min``),
    validates them, applies the ``final_zero`` convention (``n = num_steps - 1`` and a 0 appended)
    and sets the ends exactly."""

    @functools.wraps(fn)
    def schedule(process, num_steps, *, t_start=None, t_end=None, final_zero=False, **options):
        t0, t1 = _resolve_ends(process, t_start, t_end, final_zero)
        n = num_steps - 1 if final_zero else num_steps
        if n == 0:  # num_steps == 1 with final_zero: [t_start, 0]
            return np.array([t0, 0.0])
        return _finish(fn(process, n, t0, t1, **options), t0, t1, final_zero)

    schedule.raw = fn
    std = [
        inspect.Parameter("process", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("num_steps", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("t_start", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("t_end", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("final_zero", inspect.Parameter.KEYWORD_ONLY, default=False),
    ]
    opts = [p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    schedule.__signature__ = inspect.Signature(std + opts)
    return schedule


# ------------------------------------------------------------------------------ continuous schedules


@continuous_schedule
def time_uniform(process, n, t_start, t_end):
    """Uniform in ``t`` (DDPM/DDIM-style uniform time steps; Song et al., DDIM, 2021)."""
    return np.linspace(t_start, t_end, n + 1)


@continuous_schedule
def time_quadratic(process, n, t_start, t_end):
    """DPM-Solver's ``time_quadratic`` (``t_order = 2``): ``t_i = linspace(sqrt(t_start),
    sqrt(t_end), n + 1)_i ** 2`` (Lu et al., DPM-Solver, 2022; DDIM's quadratic skip for small n)."""
    return np.linspace(math.sqrt(t_start), math.sqrt(t_end), n + 1) ** 2


@continuous_schedule
def logsnr_uniform(process, n, t_start, t_end):
    """Uniform in the half log-SNR ``lambda = log(alpha / sigma)`` (Lu et al., DPM-Solver, 2022).

    Identical to uniform in ``log sigma_edm`` (``sigma_edm = exp(-lambda)``), i.e. k-diffusion's
    ``exponential`` schedule. Both ends need a finite lambda (not ``t = 0`` or flow matching's ``t = 1``).
    """
    lam0, lam1 = _log_snr_ends(process, t_start, t_end, "logsnr_uniform")
    return on_host(process.t_from_log_snr, np.linspace(lam0, lam1, n + 1))


exponential = logsnr_uniform
"""Alias of :func:`logsnr_uniform` (uniform in ``log sigma_edm``; k-diffusion's
``get_sigmas_exponential``)."""


def _sigma_edm_ends(process, t_start, t_end, schedule, *, allow_zero_end: bool):
    s = on_host(process.sigma_edm, [t_start, t_end])
    if not math.isfinite(s[0]):
        raise ValueError(
            f"{schedule} needs a finite sigma_edm at t_start, but {type(process).__name__} has "
            f"sigma_edm=inf at t_start={t_start!r}; pass t_start < {process.t_max} (e.g. 0.999)."
        )
    if not (s[1] > 0 or (allow_zero_end and s[1] == 0)):
        raise ValueError(
            f"{schedule} needs sigma_edm > 0 at t_end, but {type(process).__name__} has "
            f"sigma_edm={s[1]} at t_end={t_end!r}; pass t_end > 0."
        )
    return s


@continuous_schedule
def karras(process, n, t_start, t_end, *, rho: float = 7.0):
    """EDM's schedule (Karras et al., Elucidating the Design Space of Diffusion-Based Generative
    Models, 2022, eq. 5): ``sigma_i = (s_max^(1/rho) + i/n (s_min^(1/rho) - s_max^(1/rho)))^rho`` in
    EDM noise level ``sigma_edm = sigma / alpha``, ``s_max = sigma_edm(t_start)``,
    ``s_min = sigma_edm(t_end)`` (may be 0), mapped back with ``process.t_from_sigma_edm``."""
    rho = _check_positive("rho", rho, "karras")
    s_max, s_min = _sigma_edm_ends(process, t_start, t_end, "karras", allow_zero_end=True)
    ramp = np.arange(n + 1) / n
    a, b = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
    sigmas = (a + ramp * (b - a)) ** rho
    return on_host(process.t_from_sigma_edm, sigmas)


@continuous_schedule
def polyexponential(process, n, t_start, t_end, *, rho: float = 1.0):
    """k-diffusion's polynomial-in-log-sigma schedule (``get_sigmas_polyexponential``):
    ``log sigma_i = log s_min + (1 - i/n)^rho (log s_max - log s_min)``; ``rho = 1`` is
    ``logsnr_uniform``. (Crowson, k-diffusion; in the spirit of Karras et al., 2022.)"""
    rho = _check_positive("rho", rho, "polyexponential")
    s_max, s_min = _sigma_edm_ends(process, t_start, t_end, "polyexponential", allow_zero_end=False)
    ramp = (1.0 - np.arange(n + 1) / n) ** rho
    log_s = math.log(s_min) + ramp * (math.log(s_max) - math.log(s_min))
    return on_host(process.t_from_sigma_edm, np.exp(log_s))


# ---------------------------------------------------------------------------- Align Your Steps

AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    # Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules in Diffusion
    # Models" (ICML 2024, arXiv:2404.14507), Appendix B.3, Table 3; also NVIDIA's AYS "Quickstart
    # guide" (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html). 10-step schedules:
    # 11 EDM noise levels sigma(t_10), ..., sigma(t_0) (sigma / alpha of the VP models).
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "deepfloyd_if": (160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.030, 0.006),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def _loglinear_interp(table: np.ndarray, k: int) -> np.ndarray:
    """AYS's log-linear interpolation of a decreasing sigma table onto ``k`` points: ``log sigma``
    linear in the normalised index (``np.interp`` of ``log sigma`` at ``linspace(0, 1, len)`` onto
    ``linspace(0, 1, k)``). Points that land on a table knot return the table value exactly."""
    m = table.shape[0]
    if k == m:
        return table.copy()
    num = np.arange(k) * (m - 1)  # position i (m-1)/(k-1) in table index units, as a fraction
    j = np.minimum(num // (k - 1), m - 2)
    frac = (num - j * (k - 1)) / (k - 1)
    log_t = np.log(table)
    out = np.exp((1.0 - frac) * log_t[j] + frac * log_t[j + 1])
    on_knot = frac == 0
    out[on_knot] = table[j[on_knot]]
    return out


def ays(process, num_steps, *, t_start=None, t_end=None, final_zero=False, model: str = "sd15", sigmas=None):
    """Align Your Steps (Sabour, Fidler & Kreis, 2024): the published optimized 10-step schedules
    (:data:`AYS_SIGMAS`, EDM noise levels ``sigma_edm``) for ``model`` in ``sd15``, ``sdxl``,
    ``deepfloyd_if``, ``svd`` (or a custom decreasing ``sigmas`` table).

    * Other step counts use the authors' log-linear interpolation (``log sigma`` linear in the
      normalised index). The schedule has ``num_steps + 1`` points, or ``num_steps`` points plus an
      appended 0 with ``final_zero=True`` (so ``num_steps=10, final_zero=False`` is the table itself).
      A trailing ``0.0`` in a custom table is dropped (use ``final_zero`` instead).
    * Range: ``t_start``/``t_end`` default to ``t_max``/``t_min`` like every schedule (the prior
      is drawn at ``t_max``); pass ``t_start="table"`` / ``t_end="table"`` to use the table's own
      ends clipped to the process range. If the end noise levels differ from the table's,
      ``log sigma`` is rescaled affinely so the table's ends land on them exactly (SVD's
      700..0.002 is compressed into ``EDM(0.002, 80)``; SD1.5's table on
      ``VPDiscrete.scaled_linear()`` moves by under 0.6%). Sigmas map to ``t`` with
      ``process.t_from_sigma_edm``.
    """
    if sigmas is None:
        if model not in AYS_SIGMAS:
            raise ValueError(f"ays: unknown model {model!r}; known: {', '.join(sorted(AYS_SIGMAS))}.")
        table = _f64(AYS_SIGMAS[model])
    else:
        table = _f64(sigmas)
        if table.ndim == 1 and table.shape[0] >= 3 and table[-1] == 0.0:
            table = table[:-1]
        if (
            table.ndim != 1
            or table.shape[0] < 2
            or not (np.all(np.isfinite(table)) and np.all(table > 0) and np.all(np.diff(table) < 0))
        ):
            raise ValueError(
                "ays: sigmas must be a 1-D, strictly decreasing table of at least 2 finite positive "
                f"EDM noise levels (an optional final 0 is dropped); got {np.asarray(sigmas).tolist()}."
            )
    log_table_hi, log_table_lo = math.log(table[0]), math.log(table[-1])
    s_range = on_host(process.sigma_edm, [process.t_max, process.t_min])
    with np.errstate(divide="ignore"):
        log_range_hi, log_range_lo = np.log(s_range)

    # Noise levels (log) and times of the two ends. A table end within 1e-9 (relative) of, or
    # beyond, the process's end snaps to t_max / t_min exactly.
    snap = 1e-9
    t_start = process.t_max if t_start is None else (None if t_start == "table" else t_start)
    t_end = process.t_min if t_end is None else (None if t_end == "table" else t_end)
    if t_start is None:
        if log_table_hi > log_range_hi - snap:
            t0, hi = float(process.t_max), float(log_range_hi)
        elif log_table_hi < log_range_lo:
            raise ValueError(f"ays: the table's top sigma {table[0]} is below the process range.")
        else:
            hi = log_table_hi
            t0 = float(on_host(process.t_from_sigma_edm, table[0]))
    else:
        t0 = _check_time(process, "t_start", t_start)
        hi = float(np.log(on_host(process.sigma_edm, t0)))
    if t_end is None:
        if log_table_lo < log_range_lo + snap:
            t1, lo = float(process.t_min), float(log_range_lo)
        elif log_table_lo > log_range_hi:
            raise ValueError(f"ays: the table's bottom sigma {table[-1]} is above the process range.")
        else:
            lo = log_table_lo
            t1 = float(on_host(process.t_from_sigma_edm, table[-1]))
    else:
        t1 = _check_time(process, "t_end", t_end)
        lo = float(np.log(on_host(process.sigma_edm, t1)))
    if not t0 > t1:
        raise ValueError(f"t_start must be > t_end; got t_start={t0!r}, t_end={t1!r}.")
    if final_zero and t1 <= 0:
        raise ValueError(f"final_zero=True appends t=0 after t_end, so t_end must be > 0; got t_end={t1!r}.")
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise ValueError(
            f"ays needs finite noise levels at both ends; got sigma_edm={math.exp(hi)} at t_start={t0!r} "
            f"and {math.exp(lo)} at t_end={t1!r}; pass t_start/t_end strictly inside "
            f"({process.t_min}, {process.t_max})."
        )

    k = num_steps if final_zero else num_steps + 1
    s = _loglinear_interp(table, k) if k > 1 else table[:1].copy()
    if (hi, lo) != (log_table_hi, log_table_lo):
        scale = (hi - lo) / (log_table_hi - log_table_lo)
        s = np.exp(lo + (np.log(s) - log_table_lo) * scale)
    ts = on_host(process.t_from_sigma_edm, s)
    if k == 1:  # num_steps == 1 with final_zero: [t_start, 0]
        return np.array([t0, 0.0])
    return _finish(ts, t0, t1, final_zero)


# ---------------------------------------------------------------------------------------- beta


def beta_ppf(q, a: float, b: float, *, iters: int = 64) -> np.ndarray:
    """Quantile function of ``Beta(a, b)``: the ``x`` in ``[0, 1]`` with ``I_x(a, b) = q``
    (inverse regularised incomplete beta), by vectorised bisection on
    ``jax.scipy.special.betainc`` in float64. 64 halvings of ``[0, 1]`` reach float64 resolution,
    so the result is accurate to ~1e-15 in ``x``. ``q = 0`` and ``q = 1`` give exactly 0 and 1."""
    a = _check_positive("alpha", a, "beta_ppf")
    b = _check_positive("beta", b, "beta_ppf")
    q_in = _f64(q)
    if not np.all((q_in >= 0) & (q_in <= 1)):
        raise ValueError(f"beta_ppf: q must lie in [0, 1]; got {q_in.tolist()}.")
    if q_in.size == 0:
        return q_in.copy()
    q = _pad(q_in.reshape(-1))
    with _Float64():
        lo = np.zeros_like(q)
        hi = np.ones_like(q)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = _f64(betainc(a, b, jnp.asarray(mid))) < q
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
    x = np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, 0.5 * (lo + hi)))
    return x[: q_in.size].reshape(q_in.shape)


@continuous_schedule
def beta(process, n, t_start, t_end, *, alpha: float = 0.6, beta: float = 0.6):
    """Beta sampling (Lee, Lee, Gye & Kim, "Beta Sampling is All You Need: Efficient Image
    Generation Strategy for Diffusion Models using Stepwise Spectral Analysis", 2024): steps at
    the quantiles of ``Beta(alpha, beta)`` over the normalised sampling progress,
    ``t_i = t_start + (t_end - t_start) * ppf(i / n)``. ``alpha < 1`` concentrates steps at the
    noisy start, ``beta < 1`` at the clean end; ``alpha = beta = 1`` is ``time_uniform``.
    (ComfyUI's ``beta`` scheduler uses ``ppf(1 - i/n)`` over training steps, i.e. the roles of
    alpha and beta swapped; identical for the default symmetric 0.6/0.6.)"""
    alpha = _check_positive("alpha", alpha, "beta")
    beta_ = _check_positive("beta", beta, "beta")
    u = beta_ppf(np.arange(n + 1) / n, alpha, beta_)
    return t_start + (t_end - t_start) * u


# ---------------------------------------------------------------- diffusers' discrete spacings


def _check_counts(n: int, num_train: int, schedule: str):
    if n > num_train:
        raise ValueError(
            f"{schedule}: num_steps={n} exceeds num_train_timesteps={num_train}; the training-step "
            f"indices would repeat. Allowed: 1 <= num_steps <= {num_train}."
        )


def leading_indices(num_train_timesteps: int, n: int, steps_offset: int = 0, drop_zero: bool = False) -> np.ndarray:
    """diffusers' ``leading`` spacing: ``arange(0, n) * (N // n) + steps_offset``, reversed
    (DDIM/Stable Diffusion; Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", 2024, Table 2). N=1000, n=10: ``[900, 800, ..., 0]``. ``drop_zero=True``: the
    variant of diffusers' DPM-Solver / UniPC / DEIS schedulers, ``n + 1`` points
    ``arange(0, n + 1) * (N // (n + 1))`` with the 0 dropped (N=1000, n=10: ``[900, 810, ..., 90]``)."""
    _check_counts(n, num_train_timesteps, "leading")
    drop_zero = _check_flag("leading", "drop_zero", drop_zero)
    try:
        so = None if isinstance(steps_offset, bool) else operator.index(steps_offset)
    except TypeError:
        so = None
    if so is None or so < 0:
        raise ValueError(f"leading: steps_offset must be an integer >= 0; got {steps_offset!r}.")
    m = n + 1 if drop_zero else n
    idx = (np.arange(m) * (num_train_timesteps // m))[::-1][:n] + so
    if idx[0] > num_train_timesteps - 1:
        raise ValueError(
            f"leading: steps_offset={steps_offset} pushes the first index to {idx[0]}, beyond the last "
            f"training step {num_train_timesteps - 1}; allowed: steps_offset <= "
            f"{num_train_timesteps - 1 - int(idx[0] - so)}."
        )
    return idx.astype(np.int64)


def trailing_indices(num_train_timesteps: int, n: int) -> np.ndarray:
    """diffusers' ``trailing`` spacing: ``round(arange(N, 0, -N / n)) - 1`` (Lin et al., 2024,
    Table 2; recommended there since it starts at the last training step). N=1000, n=10:
    ``[999, 899, ..., 99]``."""
    _check_counts(n, num_train_timesteps, "trailing")
    N = num_train_timesteps
    # Same float arange as diffusers (its rounding of .5 cases depends on it); for some n (e.g.
    # N=1000, n=61) that arange has n + 1 entries, the last rounding to index -1: keep the first n.
    return (np.round(np.arange(N, 0, -N / n))[:n] - 1).astype(np.int64)


def linspace_indices(num_train_timesteps: int, n: int, drop_zero: bool = False) -> np.ndarray:
    """diffusers' ``linspace`` spacing: ``round(linspace(0, N - 1, n))``, reversed (Lin et al.,
    2024, Table 2). N=1000, n=10: ``[999, 888, ..., 111, 0]``. ``drop_zero=True``: the variant of
    diffusers' DPM-Solver / UniPC / DEIS schedulers, ``round(linspace(0, N - 1, n + 1))`` with the 0
    dropped (N=1000, n=10: ``[999, 899, ..., 100]``)."""
    _check_counts(n, num_train_timesteps, "linspace")
    m = n + 1 if _check_flag("linspace", "drop_zero", drop_zero) else n
    return np.round(np.linspace(0, num_train_timesteps - 1, m))[::-1][:n].astype(np.int64)


def _check_flag(schedule: str, name: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{schedule}: {name} must be True or False; got {value!r}.")
    return bool(value)


def _index_schedule(name: str, index_fn: Callable):
    def schedule(process, num_steps, *, t_start=None, t_end=None, final_zero=False, **options):
        if not isinstance(process, VPDiscrete):
            raise ValueError(
                f"schedule {name!r} spaces the integer training steps of a discrete-time model; it "
                f"needs a VPDiscrete process, got {type(process).__name__}. Use time_uniform, "
                f"logsnr_uniform, karras, ... for continuous-time processes."
            )
        if t_start is not None or t_end is not None:
            raise ValueError(
                f"schedule {name!r} does not take t_start/t_end: its grid is fixed by the training-step "
                f"indices; got t_start={t_start!r}, t_end={t_end!r}."
            )
        idx = index_fn(process.num_train_timesteps, num_steps, **options)
        if np.unique(idx).shape[0] != idx.shape[0]:
            raise ValueError(f"{name}: indices {idx.tolist()} contain duplicates; use fewer steps.")
        if not final_zero and idx[-1] == 0:
            raise ValueError(
                f"{name}: the last index is training step 0 (= t_min), so the final step to t_min "
                f"would be empty; pass final_zero=True (diffusers' set_alpha_to_one=True)"
                + (" or steps_offset=1." if name == "leading" else ".")
            )
        ts = on_host(process.t_from_index, idx)
        end = 0.0 if final_zero else float(process.t_min)
        return np.append(ts, end)

    schedule.__name__ = schedule.__qualname__ = name
    schedule.index_fn = index_fn
    schedule.__doc__ = (
        f"diffusers' ``{name}`` spacing over the training steps of a ``VPDiscrete`` process: the "
        f"``num_steps`` indices of :func:`{index_fn.__name__}` mapped with ``process.t_from_index``, "
        f"followed by ``0`` if ``final_zero`` else ``process.t_min`` (training step 0; diffusers' "
        f"DDIM final ``alphas_cumprod[0]``, ``set_alpha_to_one=False``). Unlike the continuous "
        f"schedules, ``final_zero`` does not drop a point: the grid is always ``num_steps`` indices "
        f"plus the end. ``t_start``/``t_end`` are not accepted.\n\n" + (index_fn.__doc__ or "")
    )
    # Expose the spacing's own options (e.g. steps_offset) for option validation.
    params = [p for p in inspect.signature(index_fn).parameters.values()][2:]
    schedule.__signature__ = inspect.Signature(
        [
            inspect.Parameter("process", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("num_steps", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("t_start", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("t_end", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("final_zero", inspect.Parameter.KEYWORD_ONLY, default=False),
        ]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    )
    return schedule


leading = _index_schedule("leading", leading_indices)
trailing = _index_schedule("trailing", trailing_indices)
linspace = _index_schedule("linspace", linspace_indices)


# ------------------------------------------------------------------------------------ registry

SCHEDULES: dict[str, Callable] = {
    "ays": ays,
    "beta": beta,
    "exponential": exponential,
    "karras": karras,
    "leading": leading,
    "linspace": linspace,
    "logsnr_uniform": logsnr_uniform,
    "polyexponential": polyexponential,
    "time_quadratic": time_quadratic,
    "time_uniform": time_uniform,
    "trailing": trailing,
}


def available_schedules() -> list[str]:
    """Names accepted by :func:`get_timesteps`, sorted."""
    return sorted(SCHEDULES)


_STANDARD = {"process", "num_steps", "t_start", "t_end", "final_zero"}


def _schedule_options(fn) -> list[str] | None:
    """Keyword options a schedule accepts, or ``None`` if it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in _STANDARD]


def schedule_times(
    process: AbstractProcess,
    num_steps: int,
    schedule: str = "logsnr_uniform",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    final_zero: bool = False,
    **options,
) -> np.ndarray:
    """The time grid of a fixed-step sampler: ``num_steps + 1`` strictly decreasing times, computed
    on the host (also while a caller's ``jit`` traces) in float64.

    Args:
        process: the noise process (its time variable, range and ``lambda(t)``).
        num_steps: number of sampler steps (>= 1).
        schedule: one of :func:`available_schedules` (see :data:`SCHEDULES`).
        t_start: first time (default ``process.t_max``; ``ays`` defaults to its table's top).
        t_end: last time before any appended 0 (default ``process.t_min``; ``ays``: table bottom).
        final_zero: if ``True``, the schedule's ``num_steps`` points (``num_steps - 1`` intervals
            from ``t_start`` to ``t_end``) are followed by an exact ``0.0`` (clean data), as in
            k-diffusion's ``append_zero``. If ``False``, ``num_steps`` intervals end at ``t_end``.
            The diffusers spacings instead always use ``num_steps`` indices and end with ``0``
            (``final_zero``) or ``t_min``.
        **options: schedule options, e.g. ``rho`` (karras), ``model`` (ays), ``alpha``/``beta``
            (beta), ``steps_offset`` (leading).

    Returns:
        NumPy float64 array of shape ``(num_steps + 1,)``.

    Raises:
        ValueError: unknown schedule or option, bad ``num_steps``/option values, ends outside
            ``[t_min, t_max]`` or ``t_start <= t_end``, a schedule not valid for the process.
    """
    fn = SCHEDULES.get(schedule) if isinstance(schedule, str) else None
    if fn is None:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(available_schedules())}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}.")
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps}.")
    allowed = _schedule_options(fn)
    if allowed is not None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"schedule {schedule!r} got unknown option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) if allowed else 'none'}."
            )
    ts = fn(process, num_steps, t_start=t_start, t_end=t_end, final_zero=bool(final_zero), **options)
    ts = _f64(ts)
    if ts.shape != (num_steps + 1,):
        raise ValueError(f"schedule {schedule!r} returned shape {ts.shape}; expected ({num_steps + 1},).")
    process.check_times(ts, allow_zero=True, name=f"{schedule!r} grid")
    return ts


def get_timesteps(
    process: AbstractProcess,
    num_steps: int,
    schedule: str = "logsnr_uniform",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    final_zero: bool = False,
    **options,
) -> jnp.ndarray:
    """:func:`schedule_times` as a ``jnp`` array of the default float dtype (float32 unless x64 is
    enabled), checked in that dtype (float32 may merge points)."""
    ts = schedule_times(process, num_steps, schedule, t_start=t_start, t_end=t_end, final_zero=final_zero, **options)
    out = ts.astype(jnp.result_type(float))
    process.check_times(out, allow_zero=True, name=f"{schedule!r} grid")
    return jnp.asarray(out)


def validate_timesteps(process: AbstractProcess, ts, *, name: str = "timesteps"):
    """Raise ``ValueError`` unless ``ts`` is a 1-D grid of >= 2 finite, strictly decreasing times
    inside ``[t_min, t_max]`` (a final 0 allowed); returns ``ts`` (delegates to
    ``process.check_times``)."""
    process.check_times(ts, allow_zero=True, name=name)
    return ts

"""The time grid of a fixed-step solve as one value: :class:`Grid`.

A grid is resolved and validated once, on the host: its times (float64 NumPy, strictly
decreasing from the noisy end, or increasing for inversion), its step count, whether it ends at
``t = 0`` (clean data: the last step lands on the data prediction) and, when it was built for a
budget, that NFE. Every driver (``solve``/``sample``, ``invert``, ``sample_picard``) and every
fitting routine takes a ``Grid``; the keyword shortcuts (``nfe=``, ``schedule=``, ``timesteps=``,
``final_zero=``, ``schedule_options=``) only build one.

A grid whose times are traced (passed into ``jax.jit`` as an argument, or differentiated) is still
a ``Grid``: its step count and ``ends_at_zero`` are static, its values are not checked.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._compat import ValueCache, is_traced
from .processes import AbstractProcess
from .timesteps import on_host, schedule_times

__all__ = ["Grid", "default_choice", "DEFAULT_SOLVER", "DEFAULT_SCHEDULE", "DEFAULT_NFE", "PURE_NOISE_SOLVER",
           "PURE_NOISE_SCHEDULE"]

#: Defaults measured by ``benchmarks/quality.py`` (best geometric-mean RMSE over VPDiscrete, EDM and
#: flow matching at NFE 5-20 on the digits mixture): iPNDM on the Align-Your-Steps grid, stopping
#: at ``t_min``. Grids that start at pure noise (``alpha = 0``) need a data-prediction solver and a
#: schedule defined there: UniPC-3 on the beta schedule.
DEFAULT_SOLVER, DEFAULT_SCHEDULE = "ipndm", "ays"
DEFAULT_NFE = 10
#: grids of named schedules already computed (by process, steps, schedule and options)
_SCHEDULES = ValueCache(256)
PURE_NOISE_SOLVER, PURE_NOISE_SCHEDULE = "unipc_3", "beta"


def default_choice(process: AbstractProcess, t_start=None) -> tuple[str, str]:
    """The ``(solver, schedule)`` that ``solver="auto"`` / ``schedule="auto"`` resolve to for a grid
    starting at ``t_start`` (default ``t_max``)."""
    t0 = process.t_max if t_start is None else t_start
    lam = concrete_log_snr(process, t0)
    if lam is None or np.isfinite(lam):
        return DEFAULT_SOLVER, DEFAULT_SCHEDULE
    return PURE_NOISE_SOLVER, PURE_NOISE_SCHEDULE


def concrete_log_snr(process: AbstractProcess, t) -> float | None:
    """``log_snr(t)`` as a Python float, computed on the host; ``None`` if ``t`` or the process is traced."""
    if is_traced(t) or any(is_traced(leaf) for leaf in jax.tree.leaves(process)):
        return None
    return float(on_host(process.log_snr, np.asarray([float(t)]))[0])


class Grid(eqx.Module):
    """A resolved time grid: ``times`` (``steps + 1`` points), ``ends_at_zero`` and the NFE budget
    it was built for.

    Build one with :meth:`from_times` (explicit times) or :meth:`from_schedule` (a named schedule
    and a step count); ``fastsample.grid`` builds one for a solver and an NFE budget.

    Attributes:
        times: float64 NumPy array when concrete (validated), a JAX array when traced.
        ends_at_zero: the grid ends at ``t = 0`` (static).
        budget: the NFE the grid was built for (``None`` for explicit times); solvers that configure
            themselves for a budget (``dpm_solver_fast``) read it.
        schedule: the schedule's name, for reports (``None`` for explicit times).
        increasing: an inversion grid (``t_min`` up to ``t_max``; see :meth:`reversed`).
        strict: the times are strictly monotone (``False``: a fitted program's evaluation times,
            which may repeat, e.g. Heun's; not checked as a sampling grid).
    """

    times: Any
    ends_at_zero: bool = eqx.field(static=True)
    budget: int | None = eqx.field(static=True, default=None)
    schedule: str | None = eqx.field(static=True, default=None)
    increasing: bool = eqx.field(static=True, default=False)
    strict: bool = eqx.field(static=True, default=True)

    @classmethod
    def from_times(cls, times, process: AbstractProcess | None = None, *, ends_at_zero: bool | None = None,
                   budget: int | None = None, schedule: str | None = None) -> Grid:
        """A grid of explicit ``times`` (strictly decreasing; a final ``0`` means clean data).

        Concrete times are validated (against ``process``'s range when given) and kept as float64.
        Traced times are kept as they are; ``ends_at_zero`` must then be given (default ``False``)."""
        if is_traced(times):
            if np.ndim(times) != 1 or np.shape(times)[0] < 2:
                raise ValueError(f"timesteps must be a 1-D array of at least 2 times; got shape {np.shape(times)}.")
            return cls(times, bool(ends_at_zero), budget, schedule)
        ts = np.asarray(times, dtype=np.float64)
        if process is not None:
            process.check_times(ts, name="timesteps")
        else:
            _check_monotone(ts, "timesteps", decreasing=True)
        at_zero = bool(ts[-1] == 0.0)
        if ends_at_zero is not None and bool(ends_at_zero) != at_zero:
            raise ValueError(f"ends_at_zero={ends_at_zero} but the timesteps end at t = {ts[-1]!r}.")
        return cls(ts, at_zero, budget, schedule)

    @classmethod
    def from_schedule(cls, process: AbstractProcess, steps: int, schedule: str = "auto", *, final_zero: bool = False,
                      budget: int | None = None, **options) -> Grid:
        """``steps`` steps of the named ``schedule`` (``fastsample.timesteps``; ``"auto"``: the measured
        default for ``process``). ``final_zero`` ends the grid at ``t = 0``; a range that already ends
        there (``t_end=0``, flow matching's default ``t_min``) needs none appended. ``options`` are the
        schedule's (``t_start``, ``t_end``, ``rho``, ...)."""
        if schedule == "auto":
            schedule = default_choice(process, options.get("t_start"))[1]
        t_end = options.get("t_end", process.t_min)
        at_zero = bool(final_zero) or t_end == 0
        append_zero = at_zero and t_end != 0
        key = ValueCache.key(process, steps, schedule, append_zero, options)
        ts = _SCHEDULES.get(key)
        if ts is None:  # computed once per configuration: an eager sample() call pays for it once
            ts = _SCHEDULES.put(key, schedule_times(process, steps, schedule, final_zero=append_zero, **options))
            ts.flags.writeable = False
        return cls(ts, at_zero, budget, schedule)

    @property
    def steps(self) -> int:
        """The number of steps (``len(times) - 1``, static)."""
        return int(np.shape(self.times)[0]) - 1

    @property
    def concrete(self) -> bool:
        """Whether the times are known on the host (not traced)."""
        return not is_traced(self.times)

    def nfe(self, solver) -> int:
        """The model evaluations ``solver`` spends on this grid."""
        return solver.nfe(self.steps, self.ends_at_zero)

    def array(self, dtype=None) -> Float[Array, " n"]:
        """The times as a JAX array of ``dtype`` (default: the default float dtype)."""
        return jnp.asarray(self.times, dtype or jnp.result_type(float))

    def reversed(self) -> Grid:
        """The same times walked the other way: an inversion grid from ``t_min`` up to ``t_max``
        (a sampling grid ending at ``t = 0`` cannot be inverted)."""
        if self.ends_at_zero and not self.increasing:
            raise ValueError("inversion needs a grid that starts at t > 0 (sigma > 0); this grid ends at t = 0: "
                             "build the sampling grid without final_zero, or with t_end > 0 "
                             "(schedule_options=dict(t_end=...)).")
        times = self.times[::-1]
        return Grid(times, False, self.budget, self.schedule, not self.increasing, self.strict)

    def check(self, process: AbstractProcess) -> None:
        """Raise ``ValueError`` unless the (concrete) times lie in ``process``'s range, in order."""
        if not self.concrete or not self.strict:
            return
        if self.increasing:
            _check_monotone(self.times, "timesteps", decreasing=False)
            process.check_times(self.times[::-1], allow_zero=False, name="timesteps (reversed)")
            if not self.times[0] > 0:
                raise ValueError(f"timesteps must start at t > 0 for inversion (sigma > 0); got {self.times[0]!r}.")
        else:
            process.check_times(self.times, name="timesteps")

    def __repr__(self) -> str:
        what = f"{self.schedule}, " if self.schedule else ""
        budget = f", nfe={self.budget}" if self.budget is not None else ""
        direction = ", increasing" if self.increasing else ""
        return f"Grid({what}{self.steps} steps, ends_at_zero={self.ends_at_zero}{budget}{direction})"


def _check_monotone(ts: np.ndarray, name: str, decreasing: bool) -> None:
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 times; got shape {ts.shape}.")
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"{name} must be finite; got {ts.tolist()}.")
    d = np.diff(ts)
    ok = d < 0 if decreasing else d > 0
    if not np.all(ok):
        i = int(np.argmax(~ok))
        order = "decreasing (from t_max towards t_min)" if decreasing else "increasing (from t_min towards t_max)"
        raise ValueError(f"{name} must be strictly {order}; ts[{i}]={ts[i]!r} is followed by "
                         f"ts[{i + 1}]={ts[i + 1]!r}.")

"""Solvers with trainable parameters, each initialised to a training-free base solver exactly.

- :class:`LearnedGrid`: the base solver on a learned time grid (Learning to Discretize Denoising
  Diffusion ODEs, LD3, Tong et al., 2024) -- the baseline every learned solver must beat.
- :class:`Bespoke`: RK1 / RK2 Bespoke solvers (Bespoke Solvers for Generative Flow Models, Shaul
  et al., 2023): Euler or midpoint steps on the ODE after a learned time reparameterisation
  ``t_r`` and scaling ``s_r`` (``x_bar(r) = s_r x(t_r)``); ``4n - 1`` / ``8n - 1`` parameters for
  ``n`` steps; times monotone and scales positive by construction.
- :class:`NonStationary`: BNS (Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and
  Flow Models, Shaul et al., 2024): every evaluation point is a learned combination of the noise
  and all earlier model outputs, at learned times. The paper combines velocities; since each
  velocity is ``c1 y + c2 x0_hat`` with ``y`` in the span of earlier terms, combining data
  predictions spans the same family.

Each has ``init(...) -> params`` (a pytree), ``solver(params) -> ProgramSolver`` (differentiable)
and ``num_params``.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..processes import AbstractProcess
from ..sampling import sample
from .program import LinearProgram, ProgramSolver, extract_program

__all__ = ["LearnedGrid", "Bespoke", "NonStationary", "monotone_times", "monotone_logits"]


def monotone_times(logits, t_start, t_end, free_end: bool = False):
    """Decreasing times from ``t_start`` to ``t_end``: the increments are a softmax of
    ``[0, *logits]``, so order is guaranteed. Both ends are exact; with ``free_end`` the last
    softmax weight is a gap left above ``t_end``, so the last time is free in ``(t_end, t_start)``."""
    w = jax.nn.softmax(jnp.concatenate([jnp.zeros((1,), logits.dtype), logits]))
    points = t_start + (t_end - t_start) * jnp.cumsum(w)
    points = points[:-1] if free_end else jnp.concatenate([points[:-1], jnp.asarray([t_end], logits.dtype)])
    return jnp.concatenate([jnp.asarray([t_start], logits.dtype), points])


def monotone_logits(ts, floor: float | None = None) -> np.ndarray:
    """The logits for which :func:`monotone_times` returns ``ts`` (strictly decreasing); with
    ``floor`` (below ``ts[-1]``), those of ``free_end=True`` and ``t_end=floor``."""
    ts = np.asarray(ts, np.float64)
    if floor is not None:
        if not floor < ts[-1]:
            raise ValueError(f"floor must lie below the last time {ts[-1]}; got {floor}.")
        ts = np.concatenate([ts, [floor]])
    inc = np.diff(ts)
    if not np.all(inc < 0):
        raise ValueError(f"times must be strictly decreasing; got {ts.tolist()}.")
    logw = np.log(inc / inc.sum())
    return logw[1:] - logw[0]


class _Meta(eqx.Module):
    process: AbstractProcess
    base: str = eqx.field(static=True)
    final_zero: bool = eqx.field(static=True)

    def _solver(self, program: LinearProgram, method: str) -> ProgramSolver:
        return ProgramSolver.from_program(program, method=method, base=self.base,
                                          process=type(self.process).__name__, final_zero=self.final_zero)


class LearnedGrid(_Meta):
    """The base solver on learned times. ``t_start`` stays; so does the end of integration,
    except on a grid with a final step to ``t = 0`` whose last positive time lies above the
    process's ``t_min``: that time (where the final denoising step starts) is learned too, in
    ``(t_min, t_start)``. ``n - 1`` parameters for ``n`` free times."""

    method: ClassVar[str] = "learned_grid"
    t_start: float = eqx.field(static=True, default=1.0)
    t_last: float = eqx.field(static=True, default=0.0)
    free_last: bool = eqx.field(static=True, default=False)

    @classmethod
    def create(cls, process, base: str, ts) -> LearnedGrid:
        ts = np.asarray(ts, np.float64)
        final_zero = bool(ts[-1] == 0.0)
        free_last = final_zero and ts[-2] > process.t_min
        t_last = process.t_min if free_last else (ts[-2] if final_zero else ts[-1])
        return cls(process, base, final_zero, float(ts[0]), float(t_last), bool(free_last))

    def init(self, ts):
        ts = np.asarray(ts, np.float64)
        return {"logits": jnp.asarray(monotone_logits(ts[:-1] if self.final_zero else ts,
                                                      self.t_last if self.free_last else None))}

    def num_params(self, params) -> int:
        return int(params["logits"].size)

    def timesteps(self, params):
        t = monotone_times(params["logits"], self.t_start, self.t_last, self.free_last)
        return jnp.concatenate([t, jnp.zeros((1,), t.dtype)]) if self.final_zero else t

    def sample(self, denoiser, x_T, params, cond=None):
        ts = self.timesteps(params).astype(x_T.dtype)
        return sample(denoiser, x_T, self.base, timesteps=ts, final_zero=self.final_zero, cond=cond)

    def solver(self, params) -> ProgramSolver:
        """The fitted grid as a program (extracted from the base solver; not differentiable)."""
        return self._solver(extract_program(self.base, self.process, np.asarray(self.timesteps(params))), self.method)


def _drift_coefficients(process, t):
    """``(c1, c2)`` with ``dx/dt = c1 x + c2 x0_hat`` (the PF-ODE in data prediction)."""
    a, s, da, ds = process.derivatives(t)
    return ds / s, da - a * ds / s


class Bespoke(_Meta):
    """Bespoke RK1 (Euler) or RK2 (midpoint) solver with ``n`` steps.

    Parameters: ``logits`` of the ``k n + 1`` times ``t_j`` (``k = 1`` or ``2``: midpoints are grid
    points of their own; ends fixed), ``dt`` (``dt_j = d t / d r``, ``k n``), ``log_s``
    (``s_j = exp(log_s_j)`` for ``j >= 1``; ``s_0 = 1``), ``ds`` (``d s / d r``, ``k n``):
    ``4n - 1`` (RK1) and ``8n - 1`` (RK2) numbers. With ``s = 1``, ``ds = 0`` and ``dt`` the base
    grid's increments over ``h = 1/n``, the solver is Euler / the midpoint rule on that grid.
    """

    method: ClassVar[str] = "bespoke"
    order: int = eqx.field(static=True, default=1)
    steps: int = eqx.field(static=True, default=4)
    t_start: float = eqx.field(static=True, default=1.0)
    t_end: float = eqx.field(static=True, default=0.0)

    @classmethod
    def create(cls, process, ts, order: int = 1) -> Bespoke:
        if order not in (1, 2):
            raise ValueError(f"Bespoke order must be 1 (RK1) or 2 (RK2); got {order}.")
        ts = np.asarray(ts, np.float64)
        process.check_times(ts, name="timesteps")
        base = "euler" if order == 1 else "midpoint"
        return cls(process, base, bool(ts[-1] == 0.0), order, len(ts) - 1, float(ts[0]), float(ts[-1]))

    def init(self, ts):
        ts = np.asarray(ts, np.float64)
        k, n = self.order, self.steps
        h = 1.0 / n
        if k == 2:
            fine = np.empty(2 * n + 1)
            fine[0::2], fine[1::2] = ts, 0.5 * (ts[:-1] + ts[1:])
        else:
            fine = ts
        dt = np.repeat(np.diff(ts) / h, k)
        return {"logits": jnp.asarray(monotone_logits(fine)), "dt": jnp.asarray(dt),
                "log_s": jnp.zeros(k * n), "ds": jnp.zeros(k * n)}

    def num_params(self, params) -> int:
        return sum(int(v.size) for v in params.values())

    def _coefficients(self, params):
        t = monotone_times(params["logits"], self.t_start, self.t_end)
        s = jnp.concatenate([jnp.ones((1,), t.dtype), jnp.exp(params["log_s"])])
        return t, s, params["dt"], params["ds"]

    def step(self, params, i: int, y, velocity):
        """Step ``i`` from ``y``; ``velocity(y, j)`` is the ODE's ``dx/dt`` at ``(y, t_j)``
        (``j`` indexes the ``k n + 1`` grid points, midpoints included)."""
        t, s, dt, ds = self._coefficients(params)
        h, j = 1.0 / self.steps, self.order * i
        u = velocity(y, j)
        if self.order == 1:
            return ((s[j] + h * ds[j]) * y + h * dt[j] * s[j] * u) / s[j + 1]
        mid = ((s[j] + 0.5 * h * ds[j]) * y + 0.5 * h * dt[j] * s[j] * u) / s[j + 1]
        u_mid = velocity(mid, j + 1)
        return (s[j] * y + h * (ds[j + 1] * mid + dt[j + 1] * s[j + 1] * u_mid)) / s[j + 2]

    def times(self, params):
        return self._coefficients(params)[0]

    def local_step(self, params, i: int, x, denoiser, cond=None):
        """Step ``i`` applied to the state ``x`` (at grid point ``k i``) with the model."""
        t = self.times(params)

        def velocity(y, j):
            c1, c2 = _drift_coefficients(self.process, t[j])
            return c1 * y + c2 * denoiser(y, t[j], cond)

        return self.step(params, i, x, velocity)

    def program(self, params) -> LinearProgram:
        """The solver as a program: the steps run on coefficient vectors over
        ``[x_T, D_0, ..., D_{m-1}]``, each evaluation contributing a new basis vector."""
        t = self.times(params)
        m = self.order * self.steps
        rows, times = [], []

        def velocity(y, j):
            rows.append(y)
            times.append(t[j])
            c1, c2 = _drift_coefficients(self.process, t[j])
            return c1 * y + c2 * jnp.zeros(m + 1, t.dtype).at[len(rows)].set(1.0)

        y = jnp.zeros(m + 1, t.dtype).at[0].set(1.0)
        for i in range(self.steps):
            y = self.step(params, i, y, velocity)
        R = jnp.stack([*rows, y])
        return LinearProgram(jnp.stack(times), t[-1], R[:, 0], R[:, 1:], tuple(range(m)))

    def solver(self, params) -> ProgramSolver:
        return self._solver(self.program(params), f"bespoke_rk{self.order}")


class NonStationary(_Meta):
    """BNS: learned evaluation times and coefficients (``a``, strictly lower-triangular ``B``),
    initialised to the program of a base solver with one evaluation per step. The first
    evaluation time stays; the last one is learned too (in ``(t_min, t_start)``) when the sample
    is the final data prediction (a grid ending at ``t = 0``) and the base starts it above
    ``t_min``, as for :class:`LearnedGrid`."""

    method: ClassVar[str] = "bns"
    nfe: int = eqx.field(static=True, default=4)
    t_start: float = eqx.field(static=True, default=1.0)
    t_last: float = eqx.field(static=True, default=0.0)
    t_end: float = eqx.field(static=True, default=0.0)
    free_last: bool = eqx.field(static=True, default=False)

    @classmethod
    def create(cls, process, base: str, ts) -> NonStationary:
        program = extract_program(base, process, ts)
        times = np.asarray(program.times)
        if len(set(program.step_of)) != program.nfe or not np.all(np.diff(times) < 0):
            raise ValueError(f"BNS needs a base solver with one model evaluation per step; {base} makes "
                             f"{program.nfe} on {len(ts) - 1} steps.")
        final_zero = bool(np.asarray(ts)[-1] == 0.0)
        free_last = final_zero and times[-1] > process.t_min
        t_last = process.t_min if free_last else times[-1]
        return cls(process, base, final_zero, program.nfe, float(times[0]), float(t_last), float(program.t_end),
                   bool(free_last))

    def init(self, ts):
        program = extract_program(self.base, self.process, ts)
        lower = np.tril_indices(self.nfe + 1, -1, self.nfe)
        logits = monotone_logits(program.times, self.t_last if self.free_last else None)
        return {"logits": jnp.asarray(logits), "a": jnp.asarray(program.a[1:]),
                "B": jnp.asarray(np.asarray(program.B)[lower])}

    def num_params(self, params) -> int:
        return sum(int(v.size) for v in params.values())

    def program(self, params) -> LinearProgram:
        m = self.nfe
        t = monotone_times(params["logits"], self.t_start, self.t_last, self.free_last)
        a = jnp.concatenate([jnp.ones((1,), t.dtype), params["a"]])
        lower = np.tril_indices(m + 1, -1, m)
        B = jnp.zeros((m + 1, m), t.dtype).at[lower].set(params["B"])
        return LinearProgram(t, jnp.asarray(self.t_end, t.dtype), a, B, tuple(range(m)))

    def solver(self, params) -> ProgramSolver:
        return self._solver(self.program(params), self.method)

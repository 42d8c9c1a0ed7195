"""Every fixed-grid deterministic solver as one linear program, and the solver that runs it.

All of fastsample's deterministic solvers are linear in the starting noise and the model's data
predictions once the grid is fixed: the ``k``-th model evaluation happens at

    y_k = a_k x_T + sum_{j<k} B_kj D_j,        D_j = denoiser(y_j, tau_j)   (data prediction)

and the sample is ``y_m = a_m x_T + sum_j B_mj D_j``. A :class:`LinearProgram` holds the
evaluation times ``tau`` (``m``), ``a`` (``m + 1``) and the strictly lower-triangular ``B``
(``(m + 1) x m``). :func:`extract_program` reads them off any registry solver (DDIM, DPM-Solver(++)
, UniPC, DEIS, iPNDM, Heun, ...), and :class:`ProgramSolver` samples with them through
``fastsample.sample``. Learned solvers are programs whose entries were fitted: Bespoke and
non-stationary solvers (Shaul et al., 2023/2024), D-ODE (Kim et al., 2023), IIA (Zhang et al.,
2023) and learned grids (LD3, Tong et al., 2024) all sample through this one piece of code.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..denoisers import Denoiser
from ..processes import AbstractProcess
from ..solvers.base import AbstractFastSolver

__all__ = ["LinearProgram", "ProgramSolver", "extract_program", "record_run"]


class LinearProgram(NamedTuple):
    """Evaluation times ``times`` (``m``), final time ``t_end``, coefficients ``a`` of ``x_T``
    (``m + 1``) and ``B`` of the data predictions (``(m + 1, m)``, strictly lower-triangular).
    ``step_of`` (``m``, static ints) says which step of the base grid each evaluation belongs to."""

    times: Any
    t_end: Any
    a: Any
    B: Any
    step_of: tuple[int, ...]

    @property
    def nfe(self) -> int:
        return len(self.step_of)

    def grid(self):
        """The time grid :func:`fastsample.sample` walks: the evaluation times, then ``t_end``."""
        return jnp.concatenate([jnp.asarray(self.times), jnp.asarray(self.t_end)[None]])


class _ProgramState(NamedTuple):
    x_T: Any
    outputs: Any  # (m, *x.shape): data predictions so far (zeros where not yet evaluated)
    index: Any  # which evaluation comes next


class ProgramSolver(AbstractFastSolver):
    """Runs a :class:`LinearProgram`: one model evaluation per step of the grid ``program.grid()``.

    ``base``, ``method``, ``process`` and ``fingerprint`` record what the program was fitted for;
    :func:`fastsample.sample` refuses another NFE or process.
    """

    name: ClassVar[str] = "program"
    linear_steps: ClassVar[bool] = True
    times: jax.Array
    t_end: jax.Array
    a: jax.Array
    B: jax.Array
    step_of: tuple[int, ...] = eqx.field(static=True)
    method: str = eqx.field(static=True, default="program")
    base: str = eqx.field(static=True, default="")
    process: str = eqx.field(static=True, default="")
    final_zero: bool = eqx.field(static=True, default=False)
    fingerprint: str = eqx.field(static=True, default="")

    @classmethod
    def from_program(cls, program: LinearProgram, **meta) -> ProgramSolver:
        return cls(jnp.asarray(program.times), jnp.asarray(program.t_end), jnp.asarray(program.a),
                   jnp.asarray(program.B), tuple(program.step_of), **meta)

    @property
    def program(self) -> LinearProgram:
        return LinearProgram(self.times, self.t_end, self.a, self.B, self.step_of)

    @property
    def fitted_nfe(self) -> int:
        return len(self.step_of)

    def order(self, terms):
        return 1

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        outputs = jnp.zeros((self.fitted_nfe, *x.shape), x.dtype)
        return _ProgramState(x, outputs, jnp.zeros((), jnp.int32))

    def update(self, denoiser, t0, t1, x, cond, state):
        k = state.index
        outputs = state.outputs.at[k].set(denoiser(x, t0, cond))
        row = jnp.asarray(self.B, x.dtype)[k + 1]
        x1 = jnp.asarray(self.a, x.dtype)[k + 1] * state.x_T + jnp.tensordot(row, outputs, axes=1)
        return x1, _ProgramState(state.x_T, outputs, k + 1)

    def fitted_grid(self, process: AbstractProcess, nfe):
        """The program's grid; refuses a process or budget other than the fitted ones."""
        if self.process and type(process).__name__ != self.process:
            raise ValueError(f"this {self.method} solver was fitted for process {self.process}; "
                             f"got {type(process).__name__}. Fit it again for this process.")
        if nfe is not None and nfe != self.fitted_nfe:
            raise ValueError(f"this {self.method} solver was fitted for nfe={self.fitted_nfe}; got nfe={nfe}. "
                             "Pass nfe=None (or the fitted NFE), or fit a solver for this budget.")
        return self.program.grid()


class _NoScan(Exception):
    """The solver cannot be recorded inside one ``lax.scan`` (a model call inside ``lax.cond``, or a
    number of calls that varies from step to step)."""


def record_run(solver, process: AbstractProcess, ts, x0, outputs, noise=None):
    """Run ``solver`` over the grid ``ts`` from ``x0`` with a model whose ``k``-th evaluation
    returns the data prediction ``outputs[k]`` (and, for a stochastic solver, the noise source
    ``noise``). Returns the evaluation times (``m``), the evaluation inputs followed by the result
    (``(m + 1, *x0.shape)``) and the step of each evaluation.

    One jitted ``lax.scan`` when every step makes the same number of model calls outside
    ``lax.cond`` (fast also for processes that interpolate tables, like ``VPDiscrete``), otherwise
    an eager run in which Python resolves the branches (so that skipped calls are not counted)."""
    ts = np.asarray(ts, dtype=np.float64)
    steps, m = ts.shape[0] - 1, outputs.shape[0]
    if m % steps == 0:
        try:
            times, rows = _record_scan(solver, process, jnp.asarray(ts, x0.dtype), x0, outputs, noise)
            return np.asarray(times), np.asarray(rows), tuple(k // (m // steps) for k in range(m))
        except (_NoScan, jax.errors.UnexpectedTracerError, jax.errors.ConcretizationTypeError):
            pass
    return _record_eager(solver, process, ts, x0, outputs, noise)


@eqx.filter_jit
def _record_scan(solver, process, grid, x0, outputs, noise):
    steps, m = grid.shape[0] - 1, outputs.shape[0]
    per = m // steps

    def body(carry, i):
        x, state = carry
        seen = []

        def model(y, t, c):
            seen.append((y, jnp.asarray(t, y.dtype)))
            return jax.lax.dynamic_index_in_dim(outputs, i * per + len(seen) - 1, keepdims=False)

        den = Denoiser(model, process, prediction="x0")
        args = () if noise is None else (noise.at_step(i, grid[i], grid[i + 1]),)
        x, state = solver.update(den, grid[i], grid[i + 1], x, None, state, *args)
        if len(seen) != per:
            raise _NoScan
        return (x, state), (jnp.stack([y for y, _ in seen]), jnp.stack([t for _, t in seen]))

    den = Denoiser(lambda y, t, c: jnp.zeros_like(y), process, prediction="x0")
    state = solver.init_state(den, x0, None, grid[-1], steps)
    (x, _), (ys, times) = jax.lax.scan(body, (x0, state), jnp.arange(steps))
    return times.reshape(m), jnp.concatenate([ys.reshape((m,) + x0.shape), x[None]])


def _record_eager(solver, process, ts, x0, outputs, noise):
    calls, points, step_of, current = [], [], [], [0]

    def model(x, t, cond):
        k = len(calls)
        if k >= outputs.shape[0]:
            raise ValueError("the solver evaluated the model more often than its reported NFE.")
        calls.append(float(t))
        points.append(x)
        step_of.append(current[0])
        return outputs[k].astype(x.dtype)

    denoiser = Denoiser(model, process, prediction="x0")
    grid = jnp.asarray(ts, x0.dtype)
    steps = ts.shape[0] - 1
    with jax.disable_jit():
        state = solver.init_state(denoiser, x0, None, grid[-1], steps)
        x = x0
        for i in range(steps):
            current[0] = i
            args = () if noise is None else (noise.at_step(i, grid[i], grid[i + 1]),)
            x, state = solver.update(denoiser, grid[i], grid[i + 1], x, None, state, *args)
    if len(calls) != outputs.shape[0]:
        raise ValueError(f"{solver.name} evaluated the model {len(calls)} times on this grid; "
                         f"it reports {outputs.shape[0]}.")
    return np.asarray(calls), np.stack([np.asarray(p) for p in points] + [np.asarray(x)]), tuple(step_of)


def extract_program(solver, process: AbstractProcess, ts) -> LinearProgram:
    """The :class:`LinearProgram` that ``solver`` runs on the grid ``ts``.

    The solver is run once (:func:`record_run`) on ``m + 2`` one-dimensional probes at once:
    probe 0 starts from ``x_T = 1`` with all predictions 0, probe ``j + 1`` from ``x_T = 0`` with
    prediction ``j`` equal to 1. Solvers act elementwise and linearly, so probe ``p`` of each
    evaluation point is one coefficient. The last probe is random and checks linearity: a
    ``ValueError`` says when the solver has no program.
    """
    from ..solvers import get_solver

    solver = get_solver(solver)
    ts = np.asarray(ts, dtype=np.float64)
    process.check_times(ts, name="timesteps")
    m = solver.nfe(ts.shape[0] - 1, bool(ts[-1] == 0.0))
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    # Columns 0..m: the basis probes; column m + 1: a random probe that checks linearity.
    rng = np.random.default_rng(0)
    probes = np.concatenate([np.eye(m + 1), rng.standard_normal((m + 1, 1))], axis=1)
    times, rows, step_of = record_run(solver, process, ts, jnp.asarray(probes[0], dtype),
                                      jnp.asarray(probes[1:], dtype))
    a, B, got = rows[:, 0], rows[:, 1:m + 1], rows[:, m + 1]
    if np.any(np.triu(B[:m]) != 0):
        raise ValueError(f"{solver.name} is not an explicit solver on this grid (an evaluation depends on itself).")
    want = a * probes[0, m + 1] + B @ probes[1:, m + 1]
    if not np.allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max()))):
        raise ValueError(f"{solver.name} is not linear in the noise and the model outputs; it has no program.")
    return LinearProgram(times, ts[-1], a, B, step_of)

"""Every fixed-grid deterministic solver as one linear program, and the solver that runs it.

All of fastsample's linear solvers are linear in the starting noise and the model's data
predictions once the grid is fixed: the ``k``-th model evaluation happens at

    y_k = a_k x_T + sum_{j<k} B_kj D_j,        D_j = denoiser(y_j, tau_j)   (data prediction)

and the sample is ``y_m = a_m x_T + sum_j B_mj D_j``. A :class:`LinearProgram` holds the
evaluation times ``tau`` (``m``), ``a`` (``m + 1``) and the strictly lower-triangular ``B``
(``(m + 1) x m``). :func:`extract_program` composes them from a solver's plan (the per-step
coefficients of :mod:`fastsample.plan`; DDIM, DPM-Solver(++), UniPC, DEIS, iPNDM, Heun, PNDM,
...), and :class:`ProgramSolver` samples with them through ``fastsample.sample``. Learned solvers
are programs whose entries were fitted: Bespoke and non-stationary solvers (Shaul et al.,
2023/2024), D-ODE (Kim et al., 2023), IIA (Zhang et al., 2023) and learned grids (LD3, Tong et al.,
2024) all sample through this one piece of code.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ..grid import Grid
from ..plan import linear_program
from ..processes import AbstractProcess
from ..solvers import AbstractBudgetSolver, AbstractFittedSolver, AbstractLinearSolver, get_solver

__all__ = ["LinearProgram", "ProgramSolver", "extract_program"]


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


class ProgramSolver(AbstractLinearSolver, AbstractFittedSolver):
    """Runs a :class:`LinearProgram`: one model evaluation per step of the grid ``program.grid()``.

    ``base``, ``method``, ``process`` and ``fingerprint`` record what the program was fitted for;
    :func:`fastsample.sample` refuses another NFE or process.
    """

    name: ClassVar[str] = "program"
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

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        k = state.index
        outputs = state.outputs.at[k].set(denoiser(x, t0, cond))
        row = jnp.asarray(self.B, x.dtype)[k + 1]
        x1 = jnp.asarray(self.a, x.dtype)[k + 1] * state.x_T + jnp.tensordot(row, outputs, axes=1)
        return x1, _ProgramState(state.x_T, outputs, k + 1)

    def fitted_grid(self, process: AbstractProcess, nfe):
        """The program's grid (its evaluation times, then ``t_end``; times may repeat, e.g. Heun's,
        so it is not checked as a sampling grid); refuses a process or budget other than the fitted ones."""
        if self.process and type(process).__name__ != self.process:
            raise ValueError(f"this {self.method} solver was fitted for process {self.process}; "
                             f"got {type(process).__name__}. Fit it again for this process.")
        if nfe is not None and nfe != self.fitted_nfe:
            raise ValueError(f"this {self.method} solver was fitted for nfe={self.fitted_nfe}; got nfe={nfe}. "
                             "Pass nfe=None (or the fitted NFE), or fit a solver for this budget.")
        return Grid(self.program.grid(), self.final_zero, strict=False)


def extract_program(solver, process: AbstractProcess, ts) -> LinearProgram:
    """The :class:`LinearProgram` that ``solver`` (a name or a linear solver) runs on the grid ``ts``
    (times or a :class:`~fastsample.Grid`): the whole run composed from the solver's plan
    (:func:`fastsample.plan.linear_program`). A ``ValueError`` says when the solver has no program
    (it is not an :class:`~fastsample.solvers.AbstractLinearSolver`, or is stochastic)."""
    solver = get_solver(solver)
    grid = ts if isinstance(ts, Grid) else Grid.from_times(ts, process)
    if isinstance(solver, AbstractBudgetSolver) and grid.budget is not None:
        solver = solver.for_budget(grid.budget, grid.ends_at_zero)
    times, a, B, step_of = linear_program(solver, process, grid)
    return LinearProgram(times, float(grid.times[-1]), a, B, step_of)

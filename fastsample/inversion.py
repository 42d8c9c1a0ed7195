"""Inversion: running a sampler from data back to noise, and BDIA-DDIM's exact inversion.

:func:`invert` runs any fastsample solver on the sampling grid reversed (``t_min`` up to
``t_max``, :meth:`fastsample.Grid.reversed`): with DDIM this is DDIM inversion, the same update
``x1 = (sigma1 / sigma0) x - alpha1 expm1(-h) x0_hat`` with ``t1 > t0``. It is exact only where
DDIM is (single-point data); otherwise the round trip drifts by the discretization error.

:func:`bdia_sample` and :func:`bdia_invert` run BDIA-DDIM (:class:`fastsample.BDIADDIM`; Zhang,
Lewis, Kleijn: Exact Diffusion Inversion via Bi-directional Integration Approximation, ECCV 2024),
whose steps invert exactly: the round trip recovers ``x_T`` to rounding error.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .denoisers import Denoiser
from .grid import Grid
from .sampling import SaveAt, resolve, solve_fixed
from .solvers import BDIADDIM, AbstractFastSolver

__all__ = ["invert", "inversion_grid", "bdia_sample", "bdia_invert"]


def inversion_grid(solver, process, nfe=None, schedule="auto", *, grid=None, timesteps=None,
                   schedule_options=None, solver_options=None) -> tuple[AbstractFastSolver, Grid]:
    """``(solver, grid)`` for inversion: the increasing :class:`~fastsample.Grid` from ``t_min``
    up to ``t_max`` (explicit increasing ``timesteps`` starting at ``t > 0``, a given sampling
    ``grid`` reversed, or the sampling grid of ``nfe`` / ``schedule`` reversed)."""
    if timesteps is not None:
        if grid is not None:
            raise ValueError("give either `grid` or `timesteps`, not both.")
        ts = timesteps if is_traced(timesteps) else np.asarray(timesteps, np.float64)
        grid = Grid(ts, False, None, None, True)
    elif grid is None:
        solver, grid = resolve(solver, process, nfe, schedule, schedule_options=schedule_options,
                               solver_options=solver_options)
        solver_options = None
    if not grid.increasing:
        grid = grid.reversed()
    return resolve(solver, process, nfe, grid=grid, solver_options=solver_options)


def invert(
    denoiser: Denoiser,
    x,
    solver: str | AbstractFastSolver = "ddim",
    nfe: int | None = None,
    schedule: str = "auto",
    *,
    grid: Grid | None = None,
    timesteps=None,
    cond: Any = None,
    solver_options: dict | None = None,
    schedule_options: dict | None = None,
    check_finite: bool = False,
):
    """Integrate from ``t_min`` up to ``t_max``: the sampling grid of ``nfe`` (default 10) /
    ``schedule`` (or ``grid``) reversed, or an explicit strictly increasing ``timesteps`` grid starting at ``t > 0``.

    ``x`` is the state at the grid's first (smallest) time, e.g. the output of :func:`sample`
    without ``final_zero``. The solver steps with ``t1 > t0``: ``"ddim"`` gives DDIM inversion.
    Returns the state at ``t_max``; ``fastsample.solve(denoiser, x, solver, grid=g.reversed())``
    returns the whole :class:`~fastsample.Solution`.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    solver, grid = inversion_grid(solver, denoiser.process, nfe, schedule, grid=grid, timesteps=timesteps,
                                  schedule_options=schedule_options, solver_options=solver_options)
    return solve_fixed(solver, denoiser, x, grid, cond=cond, check_finite=check_finite).x


def bdia_sample(
    denoiser: Denoiser,
    x_T,
    nfe: int | None = 10,
    gamma: float = 1.0,
    schedule: str = "auto",
    *,
    grid: Grid | None = None,
    timesteps=None,
    final_zero: bool = False,
    cond: Any = None,
    schedule_options: dict | None = None,
):
    """Sample with BDIA-DDIM; returns ``(x_last, x_second_last)``, what :func:`bdia_invert` needs.
    Grid arguments as in :func:`fastsample.sample`."""
    solver, grid = resolve(BDIADDIM(gamma), denoiser.process, nfe, schedule, grid=grid, timesteps=timesteps,
                           final_zero=final_zero, schedule_options=schedule_options)
    traj = solve_fixed(solver, denoiser, x_T, grid, cond=cond, saveat=SaveAt(steps=True)).trajectory
    return traj[-1], traj[-2]


def bdia_invert(
    denoiser: Denoiser,
    x_last,
    x_second_last,
    nfe: int | None = 10,
    gamma: float = 1.0,
    schedule: str = "auto",
    *,
    grid: Grid | None = None,
    timesteps=None,
    final_zero: bool = False,
    cond: Any = None,
    schedule_options: dict | None = None,
):
    """Recover ``x_T`` from the last two states of :func:`bdia_sample` run with the same grid
    arguments and ``gamma`` (``> 0``). Solving the update for ``x_{i+1}``::

        x_{i+1} = DDIM(x_i, t_i -> t_{i+1}) + (x_{i-1} - DDIM(x_i, t_i -> t_{i-1})) / gamma

    is BDIA-DDIM with ``1 / gamma`` on the reversed grid, started from ``(x_last, x_second_last)``;
    it costs one evaluation per step except the first (``nfe - 1``)."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    if isinstance(gamma, (int, float)) and not gamma > 0:
        raise ValueError(f"bdia_invert needs gamma > 0; got {gamma}.")
    x_second_last = jnp.asarray(x_second_last)
    _, grid = resolve(BDIADDIM(gamma), denoiser.process, nfe, schedule, grid=grid, timesteps=timesteps,
                      final_zero=final_zero, schedule_options=schedule_options)
    rev = grid.times[::-1]
    back = Grid(rev[1:], False, None, None, True)
    solver = BDIADDIM(1.0 / gamma, start=(jnp.asarray(x_last, x_second_last.dtype),
                                          jnp.asarray(rev[0], x_second_last.dtype)))
    return solve_fixed(solver, denoiser, x_second_last, back, cond=cond).x

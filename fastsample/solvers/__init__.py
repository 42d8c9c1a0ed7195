"""Solvers: one module per family, all found by name in :data:`SOLVERS`."""

from __future__ import annotations

from .base import AbstractFastSolver
from .exponential import DDIM
from .runge_kutta import Euler, Heun

SOLVERS: dict[str, type[AbstractFastSolver]] = {cls.name: cls for cls in (Euler, Heun, DDIM)}


def available_solvers() -> list[str]:
    return sorted(SOLVERS)


def get_solver(solver, **options) -> AbstractFastSolver:
    """A solver instance from a registry name (with constructor ``options``) or an instance."""
    if isinstance(solver, AbstractFastSolver):
        if options:
            raise ValueError("solver options are only accepted with a solver name, not an instance.")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(available_solvers())}.")
    try:
        return SOLVERS[solver](**options)
    except TypeError as e:
        raise ValueError(f"bad options for solver {solver!r}: {options} ({e}).") from None


__all__ = ["AbstractFastSolver", "DDIM", "Euler", "Heun", "SOLVERS", "available_solvers", "get_solver"]

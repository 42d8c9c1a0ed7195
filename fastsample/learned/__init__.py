"""Learned solvers: every fixed-grid solver as a linear program, and methods that fit one.

- :mod:`.program`: :class:`LinearProgram`, :class:`ProgramSolver`, :func:`extract_program`.
- :mod:`.reference`: noise / exact-solution pairs (:func:`make_reference`).
- :mod:`.parametrized`: learned grid (LD3), Bespoke RK1/RK2, Bespoke non-stationary (BNS).
- :mod:`.distill`: D-ODE and IIA (closed-form least squares).
- :mod:`.fitting`: :func:`fit_solver`, one entry point for all of them.
- :mod:`.io`: :func:`save_solver` / :func:`load_solver`.
- :mod:`.ems`: empirical model statistics for DPM-Solver-v3.
"""

from .distill import fit_dode, fit_iia, refine_grid
from .ems import EMS, estimate_ems
from .fitting import METHODS, FitReport, fit_solver, model_fingerprint
from .io import load_solver, save_solver
from .parametrized import Bespoke, LearnedGrid, NonStationary
from .program import LinearProgram, ProgramSolver, extract_program
from .reference import ReferenceSet, exact_endpoint, make_reference

__all__ = [
    "EMS",
    "METHODS",
    "Bespoke",
    "FitReport",
    "LearnedGrid",
    "LinearProgram",
    "NonStationary",
    "ProgramSolver",
    "ReferenceSet",
    "estimate_ems",
    "exact_endpoint",
    "extract_program",
    "fit_dode",
    "fit_iia",
    "fit_solver",
    "load_solver",
    "make_reference",
    "model_fingerprint",
    "refine_grid",
    "save_solver",
]

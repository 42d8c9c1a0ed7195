"""Learned solvers: every fixed-grid solver as a linear program, and methods that fit one.

- :mod:`.program`: :class:`LinearProgram`, :class:`ProgramSolver`, :func:`extract_program`.
- :mod:`.reference`: noise / exact-solution pairs (:func:`make_reference`).
- :mod:`.parametrized`: learned grid (LD3), Bespoke RK1/RK2, Bespoke non-stationary (BNS).
- :mod:`.distill`: D-ODE and IIA (closed-form least squares).
- :mod:`.methods`: the methods as objects, registered by name (:data:`METHODS`, :func:`register_method`).
- :mod:`.fitting`: :func:`fit_solver`, one entry point for all of them.
- :mod:`.io`: :func:`save_solver` / :func:`load_solver`.
- :mod:`.ems`: empirical model statistics for DPM-Solver-v3.
- :mod:`.ays`: Align Your Steps, schedules that minimise the KL upper bound (:func:`optimize_ays`).
- :mod:`.dc_solver`: DC-Solver, dynamic compensation of multistep solvers, and its cascade regression.
- :mod:`.schedule_search`: GITS, the schedule by dynamic programming against a teacher (:func:`search_schedule`).
"""

from .ays import AYSResult, optimize_ays
from .dc_solver import CascadeRegression, DCReport, DCSolver, fit_dc_solver
from .distill import fit_dode, fit_iia, refine_grid
from .ems import EMS, estimate_ems
from .fitting import FitReport, FitSettings, fit_solver
from .io import load_solver, model_fingerprint, save_solver
from .methods import METHODS, ClosedFormMethod, FitMethod, GradientMethod, get_method, register_method
from .parametrized import Bespoke, LearnedGrid, NonStationary
from .program import LinearProgram, ProgramSolver, extract_program
from .reference import ReferenceSet, exact_endpoint, make_reference
from .schedule_search import SearchResult, search_schedule

__all__ = [
    "AYSResult",
    "CascadeRegression",
    "ClosedFormMethod",
    "DCReport",
    "DCSolver",
    "EMS",
    "METHODS",
    "Bespoke",
    "FitMethod",
    "FitReport",
    "FitSettings",
    "GradientMethod",
    "LearnedGrid",
    "LinearProgram",
    "NonStationary",
    "ProgramSolver",
    "ReferenceSet",
    "SearchResult",
    "estimate_ems",
    "exact_endpoint",
    "extract_program",
    "fit_dc_solver",
    "fit_dode",
    "fit_iia",
    "fit_solver",
    "get_method",
    "load_solver",
    "make_reference",
    "model_fingerprint",
    "optimize_ays",
    "refine_grid",
    "register_method",
    "save_solver",
    "search_schedule",
]

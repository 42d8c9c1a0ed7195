"""Solvers: one module per family, all found by name in :data:`SOLVERS`.

Fixed-grid solvers subclass :class:`AbstractFastSolver` (the contract and its capabilities are in
``base.py``); adaptive ones, which choose their own steps, subclass
:class:`AbstractAdaptiveSolver` (``adaptive.py``). Machinery shared by several families lives in
the private ``_shared.py``. Adding a solver: write its family module, register its name here.
"""

from __future__ import annotations

import functools

from .adaptive import AbstractAdaptiveSolver, DPMSolverAdaptive
from .ancestral import AncestralDDIM, EDMStochastic
from .base import (
    AbstractBudgetSolver,
    AbstractFastSolver,
    AbstractFittedSolver,
    AbstractLinearSolver,
    AbstractPhasedSolver,
    AbstractWrapper,
    check_finite_start,
    phases_of,
    supports,
)
from .bdia import BDIADDIM, AbstractReversibleSolver
from .deis import DEIS
from .dpm_solver import DPMSolverFast, DPMSolverMultistep, DPMSolverSinglestep
from .dpm_solver_v3 import DPMSolverV3
from .er_sde import ERSDE
from .exponential import DDIM
from .langevin import EulerMaruyama, PCLangevin
from .linear_multistep import IPNDM, LMS, PNDM
from .restart import Restart
from .runge_kutta import Euler, Heun, Midpoint
from .sa_solver import SASolver
from .sde_dpm import DPMSolverMultistepSDE, DPMSolverSDE
from .stochastic_base import AbstractSDESolver, AbstractStochasticSolver
from .unipc import UniC, UniPC
from .wrappers import GHVB, HB, EpsScaling, TimeShift

_p = functools.partial


def _restart(inner="heun", intervals=((0.06, 0.30),), K=2, restart_steps: int = 3, **inner_options):
    """``restart`` around the registry solver ``inner`` (with its ``inner_options``)."""
    return Restart(get_solver(inner, **inner_options), intervals, K, restart_steps)


def _ddim(eta=0.0, **options):
    """``ddim``: DDIM, or with ``eta > 0`` (or noise options) ancestral DDIM (a stochastic solver)."""
    if not options and isinstance(eta, (int, float)) and eta == 0:
        return DDIM()
    return AncestralDDIM(eta=eta, label="ddim", **options)

#: registry name -> constructor (keyword options are passed through)
SOLVERS = {
    "euler": Euler,
    "heun": Heun,
    "midpoint": Midpoint,
    "ddim": _ddim,
    "dpm_solver_1": _p(DPMSolverSinglestep, order=1, prediction="eps"),
    "dpm_solver_2": _p(DPMSolverSinglestep, order=2, prediction="eps"),
    "dpm_solver_3": _p(DPMSolverSinglestep, order=3, prediction="eps"),
    "dpm_solver_adaptive": DPMSolverAdaptive,
    "dpm_solver_fast": DPMSolverFast,
    "dpm_solver_v3": DPMSolverV3,  # needs ems=fastsample.learned.estimate_ems(...)
    "dpmpp_2s": _p(DPMSolverSinglestep, order=2, prediction="x0"),
    "dpmpp_3s": _p(DPMSolverSinglestep, order=3, prediction="x0"),
    "dpm_solver_2m": _p(DPMSolverMultistep, order=2, prediction="eps"),
    "dpm_solver_3m": _p(DPMSolverMultistep, order=3, prediction="eps"),
    "dpmpp_2m": _p(DPMSolverMultistep, order=2, prediction="x0"),
    "dpmpp_3m": _p(DPMSolverMultistep, order=3, prediction="x0"),
    "deis": DEIS,
    "ipndm": IPNDM,
    "lms": LMS,
    "pndm": PNDM,
    "unipc": _p(UniPC, order=2),
    "unipc_3": _p(UniPC, order=3),
    # stochastic solvers (need sample(..., key=...))
    "euler_maruyama": EulerMaruyama,
    "euler_ancestral": _p(AncestralDDIM, label="euler_ancestral"),
    "ddpm": _p(AncestralDDIM, eta=1.0, label="ddpm"),
    "edm_stochastic": EDMStochastic,
    "dpmpp_2m_sde": _p(DPMSolverMultistepSDE, order=2),
    "dpmpp_3m_sde": _p(DPMSolverMultistepSDE, order=3),
    "dpmpp_sde": DPMSolverSDE,
    "pc_langevin": PCLangevin,
    "sa_solver": SASolver,
    "er_sde": ERSDE,
    "restart": _restart,
}


def available_solvers() -> list[str]:
    return sorted(SOLVERS)


def get_solver(solver, **options) -> AbstractFastSolver | AbstractAdaptiveSolver:
    """A solver instance from a registry name (with constructor ``options``) or an instance: a
    fixed-grid solver, or an adaptive one (its own kind, with its own driver)."""
    if isinstance(solver, (AbstractFastSolver, AbstractAdaptiveSolver)):
        if options:
            raise ValueError("solver options are only accepted with a solver name, not an instance.")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(available_solvers())}.")
    try:
        return SOLVERS[solver](**options)
    except TypeError as e:
        raise ValueError(f"bad options for solver {solver!r}: {options} ({e}).") from None


__all__ = [
    "AbstractAdaptiveSolver",
    "AbstractBudgetSolver",
    "AbstractFastSolver",
    "AbstractFittedSolver",
    "AbstractLinearSolver",
    "AbstractPhasedSolver",
    "AbstractReversibleSolver",
    "AbstractSDESolver",
    "AbstractStochasticSolver",
    "AbstractWrapper",
    "BDIADDIM",
    "check_finite_start",
    "phases_of",
    "supports",
    "AncestralDDIM",
    "DPMSolverMultistepSDE",
    "DPMSolverSDE",
    "EDMStochastic",
    "ERSDE",
    "Restart",
    "SASolver",
    "EulerMaruyama",
    "PCLangevin",
    "DDIM",
    "DEIS",
    "IPNDM",
    "LMS",
    "PNDM",
    "DPMSolverAdaptive",
    "DPMSolverFast",
    "DPMSolverMultistep",
    "DPMSolverSinglestep",
    "DPMSolverV3",
    "EpsScaling",
    "Euler",
    "GHVB",
    "HB",
    "Heun",
    "Midpoint",
    "TimeShift",
    "UniC",
    "UniPC",
    "SOLVERS",
    "available_solvers",
    "get_solver",
]

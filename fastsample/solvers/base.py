"""The solver contract shared by every fastsample solver.

A solver is a ``diffrax.AbstractSolver`` (so ``diffrax.diffeqsolve`` with ``StepTo`` runs it) whose
work happens in :meth:`AbstractFastSolver.update`, which the ``lax.scan`` driver in
``fastsample.sample`` calls directly. ``update`` receives the denoiser, so exponential
integrators use data/noise predictions rather than the ODE drift. Step counts are static;
grid values, guidance and learned coefficients are traced.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import diffrax
import equinox as eqx

from ..terms import ProbabilityFlowTerm, unwrap_term

__all__ = ["AbstractFastSolver", "AbstractWrapper"]


class AbstractFastSolver(diffrax.AbstractSolver):
    """Base class: subclasses set ``name`` and implement :meth:`update` (and :meth:`init_state`
    when they carry history)."""

    name: ClassVar[str]
    term_structure: ClassVar = ProbabilityFlowTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation
    #: model evaluations per step
    nfe_per_step: ClassVar[int] = 1
    #: every step is linear in ``x``, the state's arrays and the model's data predictions, with
    #: scalar coefficients that depend on the grid only, and makes the same model calls outside
    #: ``lax.cond`` / ``lax.switch``: ``sample`` then runs it from per-step tables with the scalar
    #: work hoisted out of the loop (:mod:`fastsample.linear_steps`). A solver that looks at the
    #: values of ``x`` (norms, variances) or skips evaluations under ``lax.cond`` leaves it ``False``.
    linear_steps: ClassVar[bool] = False
    @property
    def needs_finite_start(self) -> bool:
        """Whether the grid must start at a finite log-SNR (``alpha > 0``): noise-prediction
        updates divide by ``alpha``, and singlestep methods place intermediate points in
        log-SNR, both undefined on a step from pure noise (flow matching at ``t = 1``)."""
        return False

    # ----- the fastsample contract -----------------------------------------------------------
    def init_state(self, denoiser, x, cond, t_end, num_steps: int | None) -> Any:
        """Solver state before the first step (history buffers for multistep solvers).

        ``t_end`` is the last time of the grid; ``num_steps`` the static number of steps, or
        ``None`` when unknown (under ``diffeqsolve``, where only the last step can be recognised,
        by ``t1 == t_end``)."""
        return None

    @abc.abstractmethod
    def update(self, denoiser, t0, t1, x, cond, state):
        """One step from ``t0`` to ``t1`` (``t1 < t0``; ``t1 = 0`` means clean data).
        Returns ``(x1, state)``."""

    def nfe(self, num_steps: int, final_zero: bool = False) -> int:
        """Model evaluations used by ``num_steps`` steps (``final_zero``: the grid ends at ``t = 0``)."""
        return self.nfe_per_step * num_steps

    def min_steps(self) -> int:
        return 1

    def fitted_grid(self, process, nfe):
        """The time grid a fitted solver must run on (``None``: any grid). Fitted solvers refuse
        here, with a ``ValueError``, a process or budget other than the ones they were fitted for."""
        return None

    def for_budget(self, nfe: int, final_zero: bool = False) -> AbstractFastSolver:
        """This solver configured for a budget of ``nfe`` evaluations (solvers whose per-step
        orders depend on the budget override it; the others are budget-free)."""
        return self

    def steps_for_nfe(self, nfe: int, final_zero: bool = False) -> int:
        """The number of steps that uses exactly ``nfe`` model evaluations, or a ``ValueError``."""
        if not isinstance(nfe, int) or isinstance(nfe, bool):
            raise ValueError(f"nfe must be a positive integer; got {nfe!r}.")
        lowest = self.nfe(self.min_steps(), final_zero)
        if nfe < lowest:
            raise ValueError(f"nfe={nfe} is below {self.name}'s minimum of {lowest}.")
        for n in range(self.min_steps(), nfe + 1):
            if self.nfe(n, final_zero) == nfe:
                return n
        reachable = [self.nfe(n, final_zero) for n in range(self.min_steps(), self.min_steps() + 6)]
        end = " with a final step to sigma=0" if final_zero else ""
        raise ValueError(
            f"{self.name} cannot use exactly nfe={nfe}{end}; reachable NFE: {reachable}, ...",
        )

    # ----- diffrax's contract ----------------------------------------------------------------
    def error_order(self, terms):
        # Fixed-step methods carry no error estimate. (Multistep solvers use ``order`` as a field,
        # which shadows diffrax's ``order(terms)`` method, so this must not call it.)
        return None

    def init(self, terms, t0, t1, y0, args):
        term, t0, t1 = unwrap_term(terms, t0, t1)
        return self.init_state(term.denoiser, y0, args, t1, None)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        term, t0, t1 = unwrap_term(terms, t0, t1)
        y1, solver_state = self.update(term.denoiser, t0, t1, y0, args, solver_state)
        return y1, None, dict(y0=y0, y1=y1), solver_state, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class AbstractWrapper(AbstractFastSolver):
    """A solver that modifies another one (``base``): its NFE, minimum step count and start
    requirement are the base's; its name is ``f"{prefix}_{base.name}"``."""

    base: eqx.AbstractVar[AbstractFastSolver]
    prefix: ClassVar[str]

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.base.name}"

    @property
    def linear_steps(self) -> bool:
        return self.base.linear_steps

    def nfe(self, num_steps: int, final_zero: bool = False) -> int:
        return self.base.nfe(num_steps, final_zero)

    def min_steps(self) -> int:
        return self.base.min_steps()

    @property
    def needs_finite_start(self) -> bool:
        return self.base.needs_finite_start

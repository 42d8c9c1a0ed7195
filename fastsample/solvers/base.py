"""The solver contract shared by every fixed-grid fastsample solver, and its capabilities.

A solver is a ``diffrax.AbstractSolver`` (so ``diffrax.diffeqsolve`` with ``StepTo`` runs the
deterministic ones) whose work happens in one method,

    update(denoiser, t0, t1, x, cond, state, noise=None) -> (x1, state)

which fastsample's ``lax.scan`` driver calls directly. ``update`` receives the denoiser, so
exponential integrators use data/noise predictions rather than the ODE drift; ``noise`` is the
step's noise handle (:class:`fastsample.noise.StepNoise`), given to stochastic solvers and
ignored by the others. Step counts are static; grid values, guidance and learned coefficients are
traced.

What a solver can do beyond that is said by the abstract classes it inherits (as diffrax says it
with ``AbstractItoSolver``), never by flags or attribute probes:

- :class:`AbstractLinearSolver`: each step is linear in ``x``, the state's arrays and the step's
  data predictions, with coefficients that depend on the grid only, and makes the same model calls
  in every step. The driver then runs it from a plan of per-step coefficients
  (:mod:`fastsample.plan`), and its whole run is one linear program (learned solvers, Picard).
- :class:`AbstractPhasedSolver`: its steps are not all alike (Heun's last step onto ``t = 0`` is an
  Euler step, PNDM's first three are Runge-Kutta steps): on a fixed grid it splits into phases of
  identical steps, each run without ``lax.cond`` (so no evaluation is made in a discarded branch).
- :class:`AbstractBudgetSolver`: configures itself for an NFE budget (``dpm_solver_fast``).
- :class:`AbstractFittedSolver`: brings its own grid (fitted programs).
- ``AbstractStochasticSolver`` and ``AbstractSDESolver`` (``stochastic.py``): draw noise; the
  latter's step is an exponential step of a reverse SDE with a known contraction.
- ``AbstractReversibleSolver`` (``bdia.py``): a step that can be inverted exactly.

A wrapper (:class:`AbstractWrapper`) modifies a ``base`` solver; it declares a capability by
inheriting it, and has it when its base has it too (:func:`supports`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import numpy as np

from ..terms import ProbabilityFlowTerm, unwrap_term
from ..timesteps import on_host

__all__ = [
    "AbstractFastSolver",
    "AbstractLinearSolver",
    "AbstractPhasedSolver",
    "AbstractBudgetSolver",
    "AbstractFittedSolver",
    "AbstractWrapper",
    "supports",
    "phases_of",
    "check_finite_start",
]


def check_finite_start(name: str, process, t0) -> None:
    """Refuse, with a ``ValueError``, a solve by ``name`` that starts at pure noise (``alpha = 0``,
    infinite log-SNR), where noise-prediction and singlestep updates are undefined."""
    lam = float(on_host(process.log_snr, np.asarray([t0], np.float64))[0])
    if not np.isfinite(lam):
        raise ValueError(
            f"{name} needs a grid that starts at a finite log-SNR (alpha > 0); ts[0]={float(t0)} "
            f"is pure noise for {type(process).__name__}: start slightly below it "
            "(schedule_options={'t_start': ...}) or use a data-prediction multistep solver "
            "(dpmpp_2m, dpmpp_3m, unipc)."
        )


class AbstractFastSolver(diffrax.AbstractSolver):
    """Base class: subclasses set ``name`` and implement :meth:`update` (and :meth:`init_state`
    when they carry history)."""

    name: ClassVar[str]
    term_structure: ClassVar = ProbabilityFlowTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation
    #: model evaluations per step
    nfe_per_step: ClassVar[int] = 1

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
    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        """One step from ``t0`` to ``t1`` (``t1 < t0`` when sampling; ``t1 = 0`` means clean data),
        with the step's noise handle ``noise`` (stochastic solvers; ``None`` otherwise).
        Returns ``(x1, state)``."""

    def nfe(self, num_steps: int, final_zero: bool = False) -> int:
        """Model evaluations used by ``num_steps`` steps (``final_zero``: the grid ends at ``t = 0``)."""
        return self.nfe_per_step * num_steps

    def min_steps(self) -> int:
        return 1

    def steps_for_nfe(self, nfe: int, final_zero: bool = False) -> int:
        """The number of steps that uses exactly ``nfe`` model evaluations, or a ``ValueError``."""
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
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

    def check_grid(self, process, times: np.ndarray) -> None:
        """Refuse a concrete sampling grid this solver cannot use, with a ``ValueError`` that says
        why (default: a grid that starts at pure noise when :attr:`needs_finite_start`)."""
        if self.needs_finite_start:
            check_finite_start(self.name, process, times[0])

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


class AbstractLinearSolver(AbstractFastSolver):
    """Capability: every step is linear in ``x``, the state's arrays (the leaves of the state that
    are shaped like ``x``) and the data predictions of its model calls, with scalar coefficients
    that depend on the grid only, and makes the same model calls in every step, outside
    ``lax.cond`` / ``lax.switch`` (a phased solver: in every step of a phase). A solver that looks
    at the values of ``x`` (norms, variances) or branches on them is not linear.
    :mod:`fastsample.plan` reads the coefficients off :meth:`update` run on unit probe vectors."""


class AbstractPhasedSolver(AbstractFastSolver):
    """Capability: a solver whose steps are not all alike. On a fixed grid of ``num_steps`` steps
    it runs in phases, each a run of identical steps of one branch: :meth:`phases` lists them and
    :meth:`in_phase` gives the solver that always takes that branch (the same state), so the
    driver needs no ``lax.cond``. Subclasses end their fields with a static
    ``phase: int | None = None``: ``None`` (the default, and under ``diffeqsolve``) chooses the
    branch in every step with ``lax.cond`` / ``lax.switch``."""

    @abc.abstractmethod
    def phases(self, num_steps: int, ends_at_zero: bool) -> tuple[tuple[int, int], ...]:
        """``((steps, branch), ...)``: consecutive runs of steps and the branch each takes."""

    def in_phase(self, branch: int) -> AbstractFastSolver:
        """This solver fixed to ``branch``."""
        return dataclasses.replace(self, phase=branch)


class AbstractBudgetSolver(AbstractFastSolver):
    """Capability: a solver whose per-step choices depend on the NFE budget (``dpm_solver_fast``
    allocates singlestep orders to spend it exactly); drivers configure it with :meth:`for_budget`
    before use."""

    @abc.abstractmethod
    def for_budget(self, nfe: int, final_zero: bool = False) -> AbstractFastSolver:
        """This solver configured for a budget of ``nfe`` evaluations."""


class AbstractFittedSolver(AbstractFastSolver):
    """Capability: a solver fitted with its own time grid (and for one process and NFE)."""

    @abc.abstractmethod
    def fitted_grid(self, process, nfe: int | None):
        """The :class:`fastsample.Grid` this solver runs on; a ``ValueError`` for a process or budget
        other than the fitted ones. ``None``: no grid of its own (any grid of the right length)."""


class AbstractWrapper(AbstractFastSolver):
    """A solver that modifies another one (``base``): its NFE, minimum step count and start
    requirement are the base's; its name is ``f"{prefix}_{base.name}"``. It has a capability it
    inherits only when ``base`` has it too (:func:`supports`); when ``base`` is phased, so is the
    wrapper (:func:`phases_of`)."""

    base: eqx.AbstractVar[AbstractFastSolver]
    prefix: ClassVar[str]

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.base.name}"

    def nfe(self, num_steps: int, final_zero: bool = False) -> int:
        return self.base.nfe(num_steps, final_zero)

    def min_steps(self) -> int:
        return self.base.min_steps()

    @property
    def needs_finite_start(self) -> bool:
        return self.base.needs_finite_start

    def check_grid(self, process, times) -> None:
        self.base.check_grid(process, times)
        super().check_grid(process, times)


def supports(solver, capability: type) -> bool:
    """Whether ``solver`` has ``capability`` (one of the abstract classes above): it inherits it,
    and, for a wrapper, its base has it too."""
    if not isinstance(solver, capability):
        return False
    if isinstance(solver, AbstractWrapper):
        return supports(solver.base, capability)
    return True


def phases_of(solver, num_steps: int, ends_at_zero: bool) -> tuple[tuple[int, AbstractFastSolver], ...]:
    """``((steps, solver), ...)``: the runs of identical steps of ``solver`` on a grid of
    ``num_steps`` steps, each with the solver that takes them (``((num_steps, solver),)`` for a
    solver whose steps are all alike). A wrapper around a phased solver wraps each phase."""
    if isinstance(solver, AbstractPhasedSolver) and solver.phase is None:
        runs = tuple((n, solver.in_phase(b)) for n, b in solver.phases(num_steps, ends_at_zero) if n > 0)
    elif isinstance(solver, AbstractWrapper):
        inner = phases_of(solver.base, num_steps, ends_at_zero)
        runs = tuple((n, solver if s is solver.base else eqx.tree_at(lambda w: w.base, solver, s)) for n, s in inner)
    else:
        runs = ((num_steps, solver),)
    if sum(n for n, _ in runs) != num_steps:
        raise ValueError(f"{solver.name}'s phases cover {sum(n for n, _ in runs)} steps, not {num_steps}.")
    return runs

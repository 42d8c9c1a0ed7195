"""Learned-solver methods as objects, registered by name (:data:`METHODS`).

A method knows which solver's grid it starts from (:meth:`FitMethod.base_of`) and how many steps
a budget gives it; a gradient-fitted method (:class:`GradientMethod`) builds a parametrised model
on a grid whose ``init(grid)`` gives the starting parameters, ``solver(params)`` the fitted
:class:`~fastsample.learned.program.ProgramSolver`, and :meth:`GradientMethod.loss` the objective;
a closed-form method (:class:`ClosedFormMethod`) solves its least-squares problem at once.
:func:`~fastsample.learned.fitting.fit_solver` runs any of them; a new method is one subclass and
one :func:`register_method` call.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from ..grid import Grid
from ..sampling import grid as build_grid
from ..sampling import sample
from .distill import fit_dode, fit_iia
from .parametrized import Bespoke, LearnedGrid, NonStationary

__all__ = ["FitMethod", "GradientMethod", "ClosedFormMethod", "METHODS", "register_method", "get_method"]

#: loss names a gradient method may support
LOSSES = ("endpoint", "local")


class FitMethod:
    """A way of fitting a solver for a model and a budget."""

    #: the registry name
    name: ClassVar[str]
    #: one line: what it learns (and the paper)
    description: ClassVar[str]
    #: it contains every grid of its base solver, so a learned grid of that base warm-starts it
    contains_base_grid: ClassVar[bool] = False

    def base_of(self, base: str) -> str:
        """The solver whose grid (and whose output, before fitting) the method starts from."""
        return base

    def grid(self, process, base: str, nfe: int, schedule: str, final_zero: bool, **options) -> Grid:
        """The starting grid that gives :meth:`base_of` exactly ``nfe`` evaluations."""
        return build_grid(process, nfe, schedule, solver=self.base_of(base), final_zero=final_zero, **options)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class GradientMethod(FitMethod):
    """A method whose parameters optax fits on reference pairs (:func:`fastsample.optimization.fit`)."""

    losses: ClassVar[tuple[str, ...]] = ("endpoint",)

    def model(self, process, base: str, grid: Grid):
        """The parametrised solver on ``grid`` (``init(grid) -> params``, ``solver(params)``)."""
        raise NotImplementedError

    def run(self, model, denoiser, params, x_T, cond=None):
        """The differentiable sample of ``model`` with ``params`` from ``x_T``."""
        return sample(denoiser, x_T, model.solver(params), cond=cond)

    def loss(self, model, denoiser, kind: str, reference=None, cond=None):
        """``loss(params, batch)``: the mean squared endpoint error on ``batch`` (``x_T``, ``x_end``)."""
        if kind != "endpoint":
            raise ValueError(f"{self.name} fits the endpoint; loss={kind!r} is not available.")

        def endpoint(params, batch):
            return jnp.mean((self.run(model, denoiser, params, batch["x_T"], cond) - batch["x_end"]) ** 2)

        return endpoint


class ClosedFormMethod(FitMethod):
    """A method solved in closed form from noise alone (no optimiser, no reference endpoints)."""

    def fit(self, denoiser, base: str, grid: Grid, x_T, cond=None):
        """``(solver, params)`` fitted on the noise batch ``x_T``."""
        raise NotImplementedError


class LearnedGridMethod(GradientMethod):
    name = "learned_grid"
    description = "the base solver's time grid (LD3)"

    def model(self, process, base, grid):
        return LearnedGrid.create(process, base, grid.times)

    def run(self, model, denoiser, params, x_T, cond=None):
        return model.sample(denoiser, x_T, params, cond)


class BespokeMethod(GradientMethod):
    """Bespoke RK1 / RK2 on the steps of Euler / the midpoint rule; also Bespoke's local loss."""

    contains_base_grid = True
    losses = LOSSES

    def __init__(self, order: int):
        self.order = order
        self.name = f"bespoke_rk{order}"
        self.description = (f"Bespoke RK{order}: time/scale reparameterisation of "
                            f"{'Euler' if order == 1 else 'midpoint'} steps")

    def base_of(self, base):
        return "euler" if self.order == 1 else "midpoint"

    def grid(self, process, base, nfe, schedule, final_zero, **options):
        if self.order == 2 and nfe % 2:
            raise ValueError(f"bespoke_rk2 uses 2 evaluations per step; nfe={nfe} is odd.")
        return super().grid(process, base, nfe, schedule, final_zero, **options)

    def model(self, process, base, grid):
        return Bespoke.create(process, grid.times, self.order)

    def loss(self, model, denoiser, kind, reference=None, cond=None):
        if kind != "local":
            return super().loss(model, denoiser, kind, reference, cond)
        return _bespoke_local_loss(model, denoiser, reference, cond)


class NonStationaryMethod(GradientMethod):
    name = "bns"
    description = "Bespoke non-stationary: all coefficients and times"
    contains_base_grid = True

    def model(self, process, base, grid):
        return NonStationary.create(process, base, grid.times)


class DODEMethod(ClosedFormMethod):
    name = "dode"
    description = "D-ODE: one scalar per evaluation, least squares against a 10x teacher"

    def fit(self, denoiser, base, grid, x_T, cond=None):
        return fit_dode(denoiser, base, grid.times, x_T, cond=cond)


class IIAMethod(ClosedFormMethod):
    name = "iia"
    description = "IIA: per-step coefficients, least squares against fine sub-steps"

    def fit(self, denoiser, base, grid, x_T, cond=None):
        return fit_iia(denoiser, base, grid.times, x_T, cond=cond)


#: method name -> method
METHODS: dict[str, FitMethod] = {}


def register_method(method: FitMethod) -> FitMethod:
    """Add ``method`` to :data:`METHODS` under its name (a name may be registered once)."""
    if not isinstance(method, GradientMethod | ClosedFormMethod):
        raise ValueError(f"a method must be a GradientMethod or a ClosedFormMethod; got {type(method).__name__}.")
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def get_method(method: str | FitMethod) -> FitMethod:
    """The registered method of that name (a method object passes through)."""
    if isinstance(method, FitMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")
    return METHODS[method]


for _method in (LearnedGridMethod(), BespokeMethod(1), BespokeMethod(2), NonStationaryMethod(), DODEMethod(),
                IIAMethod()):
    register_method(_method)


def _bespoke_local_loss(model: Bespoke, denoiser, reference, cond, lipschitz: float = 1.0):
    """Bespoke's local loss: ``sum_i M_i E|| x_GT(t_{i+1}) - step_i(x_GT(t_i)) ||`` with the
    ground truth read from the reference trajectory at the learned times and ``M_i = L^(n-1-i)``
    (a constant per-step Lipschitz bound ``L``: the paper bounds the global error this way)."""
    process = denoiser.process

    def loss(params, batch):
        ref = reference._replace(x_T=batch["x_T"], x_end=batch["x_end"], xs=batch["xs"], dxs=batch["dxs"])
        t = model.times(params)
        n, k = model.steps, model.order
        total = 0.0
        for i in range(n):
            x_pred = model.local_step(params, i, ref.at(process, t[k * i]), denoiser, cond)
            diff = (x_pred - ref.at(process, t[k * (i + 1)])).reshape(x_pred.shape[0], -1)
            total = total + lipschitz ** (n - 1 - i) * jnp.mean(jnp.sqrt(jnp.sum(diff**2, axis=-1)))
        return total

    return loss

"""One entry point that fits any learned solver for a model and a budget: :func:`fit_solver`.

Gradient-fitted methods (``learned_grid``, ``bespoke_rk1``, ``bespoke_rk2``, ``bns``) minimise the
endpoint MSE to the exact PF-ODE solution (or, for Bespoke, the paper's local loss) with
:func:`fastsample.optimization.fit`; closed-form methods (``dode``, ``iia``) solve least-squares
problems. Every method returns a :class:`~fastsample.learned.program.ProgramSolver` that samples
through :func:`fastsample.sample` and is saved with :func:`save_solver`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..denoisers import Denoiser
from ..grid import Grid
from ..optimization import FitResult, fit
from ..sampling import sample
from ..solvers import get_solver
from .io import model_fingerprint
from .methods import LOSSES, METHODS, ClosedFormMethod, FitMethod, GradientMethod, get_method
from .program import ProgramSolver
from .reference import ReferenceSet

__all__ = ["METHODS", "FitReport", "FitSettings", "fit_solver"]


class FitReport(NamedTuple):
    """What a fit did: the method, parameter count, held-out RMSE of the base solver and of the
    fitted one, the optimisation history (empty for closed-form methods), the grid (``timesteps``:
    the one the fit started from; ``learned_grid``: the learned one) and, after a warm start, the
    learned grid's report."""

    method: str
    base: str
    nfe: int
    num_params: int
    base_rmse: float
    fitted_rmse: float
    params: Any
    history: list
    timesteps: Any = None
    warm_start: Any = None

    @property
    def grid(self) -> Grid:
        """``timesteps`` as a :class:`~fastsample.Grid`."""
        return Grid.from_times(self.timesteps)


def _rmse(x, y) -> float:
    return float(jnp.sqrt(jnp.mean((x - y) ** 2)))


class FitSettings(NamedTuple):
    """How :func:`fit_solver` optimises (shared by both fits of a warm start)."""

    loss: str = "endpoint"
    optimizer: optax.GradientTransformation | None = None
    steps: int = 300
    batch_size: int | None = None
    eval_every: int = 25
    patience: int | None = None
    seed: int = 0
    mesh: Any = None
    checkpoint_dir: Any = None
    log_path: Any = None
    progress: bool = False

    def suffixed(self, suffix: str) -> FitSettings:
        """The same settings with their own checkpoint folder and log (``<path>.<suffix>``)."""
        tag = lambda p: None if p is None else Path(f"{p}.{suffix}")  # noqa: E731
        return self._replace(checkpoint_dir=tag(self.checkpoint_dir), log_path=tag(self.log_path), loss="endpoint")


def fit_solver(
    method: str | FitMethod,
    denoiser: Denoiser,
    train: ReferenceSet,
    val: ReferenceSet,
    nfe: int | None = None,
    *,
    grid: Grid | None = None,
    base: str = "dpmpp_2m",
    schedule: str = "logsnr_uniform",
    schedule_options: dict | None = None,
    final_zero: bool = True,
    loss: str = "endpoint",
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 300,
    batch_size: int | None = None,
    eval_every: int = 25,
    patience: int | None = None,
    seed: int = 0,
    mesh=None,
    checkpoint_dir=None,
    log_path=None,
    progress: bool = False,
    cond=None,
    timesteps=None,
    warm_start: bool = False,
) -> tuple[ProgramSolver, FitReport]:
    """Fit ``method`` (a name in :data:`~fastsample.learned.methods.METHODS` or a method object)
    for ``denoiser`` at a budget of ``nfe`` evaluations.

    ``train``/``val`` are reference sets (:func:`~fastsample.learned.reference.make_reference`)
    whose endpoints are the targets (``val`` is held out: it picks the best parameters and is
    reported). The fit starts from ``grid`` (a :class:`~fastsample.Grid` from ``train.t_start``;
    ``timesteps`` is the same as explicit times) or else from the base solver's grid on
    ``schedule`` with ``schedule_options`` (Bespoke: Euler / the midpoint rule on it);
    ``final_zero`` ends it at ``t = 0``. ``loss="local"`` selects Bespoke's local-truncation loss
    (needs reference sets with a trajectory).

    ``warm_start=True`` (methods that contain every grid of their base: ``bns``, ``bespoke_rk1``,
    ``bespoke_rk2``) is two fits: ``learned_grid`` for the method's base solver with the same
    settings, then the method on the learned grid, so it starts at the learned grid's error (the
    first fit's checkpoints and log get the suffix ``.learned_grid``).
    """
    method = get_method(method)
    settings = FitSettings(loss, optimizer, steps, batch_size, eval_every, patience, seed, mesh, checkpoint_dir,
                           log_path, progress)
    allowed = method.losses if isinstance(method, GradientMethod) else ("endpoint",)
    if loss not in LOSSES:
        raise ValueError(f"loss must be 'endpoint' or 'local'; got {loss!r}.")
    if loss not in allowed:
        raise ValueError(f"loss='local' is Bespoke's loss; {method.name} fits the endpoint.")
    if final_zero != (train.t_end == 0.0):
        raise ValueError(f"final_zero={final_zero} needs reference endpoints at t {'= 0' if final_zero else '> 0'} "
                         f"(make_reference(t_end=...)); these are at t = {train.t_end}.")
    if timesteps is not None:
        if grid is not None:
            raise ValueError("give either `grid` or `timesteps`, not both.")
        grid = Grid.from_times(timesteps)
    if warm_start:
        startable = [name for name, m in METHODS.items() if m.contains_base_grid]
        if not method.contains_base_grid:
            raise ValueError(f"warm_start applies to {', '.join(startable)}; not to {method.name}.")
        if grid is not None:
            raise ValueError("warm_start learns the starting grid: do not pass `timesteps` too.")
    process = denoiser.process
    if grid is None:
        if nfe is None:
            raise ValueError("give the budget `nfe` or a starting `grid`.")
        options = {"t_start": train.t_start, **(schedule_options or {})}
        grid = method.grid(process, base, nfe, schedule, final_zero, **options)
    else:
        grid = _check_grid(process, grid, method, base, nfe, final_zero, train.t_start)
    if not final_zero and not np.isclose(grid.times[-1], train.t_end, rtol=1e-12, atol=0):
        raise ValueError(f"the grid ends at t = {grid.times[-1]} but the reference endpoints are at t = {train.t_end}.")
    if not warm_start:
        return _fit(method, denoiser, train, val, grid, base, settings, cond)
    _, first = _fit(METHODS["learned_grid"], denoiser, train, val, grid, method.base_of(base),
                    settings.suffixed("learned_grid"), cond)
    solver, report = _fit(method, denoiser, train, val, first.grid, base, settings, cond)
    return solver, report._replace(base=first.base, base_rmse=first.base_rmse, warm_start=first)


def _fit(method: FitMethod, denoiser, train, val, grid: Grid, base: str, settings: FitSettings, cond):
    """One fit of ``method`` from ``grid``: ``(solver, report)``."""
    process = denoiser.process
    ts = np.asarray(grid.times)
    history: list = []
    if isinstance(method, ClosedFormMethod):
        solver, params = method.fit(denoiser, base, grid, train.x_T, cond)
        learned = ts
    else:
        model = method.model(process, base, grid)
        params0 = jax.tree.map(lambda a: jnp.asarray(a, train.x_T.dtype), model.init(ts))
        loss_fn = method.loss(model, denoiser, settings.loss, train, cond)
        data = {"x_T": train.x_T, "x_end": train.x_end}
        val_data = {"x_T": val.x_T, "x_end": val.x_end}
        if settings.loss == "local":
            data = {**data, "xs": train.xs, "dxs": train.dxs}
        result: FitResult = fit(
            loss_fn, params0, data, val=val_data if settings.loss == "endpoint" else None,
            optimizer=settings.optimizer or optax.adam(1e-2), steps=settings.steps, batch_size=settings.batch_size,
            eval_every=settings.eval_every, patience=settings.patience, seed=settings.seed, mesh=settings.mesh,
            checkpoint_dir=settings.checkpoint_dir, log_path=settings.log_path, progress=settings.progress,
        )
        params, history = result.params, result.history
        solver = model.solver(params)
        learned = np.asarray(model.timesteps(params)) if hasattr(model, "timesteps") else ts
    solver = dataclasses.replace(solver, fingerprint=model_fingerprint(denoiser))
    fitted = _rmse(sample(denoiser, val.x_T, solver, cond=cond), val.x_end)
    base_name = method.base_of(base)
    base_x = sample(denoiser, val.x_T, base_name, grid=grid, cond=cond)
    report = FitReport(solver.method, base_name, solver.fitted_nfe, _count(params), _rmse(base_x, val.x_end),
                       fitted, params, history, np.asarray(learned))
    return solver, report


def _check_grid(process, grid: Grid, method: FitMethod, base: str, nfe, final_zero, t_start) -> Grid:
    """Check an explicit starting grid: concrete, from the reference's ``t_start``, ending at ``0``
    iff ``final_zero``, giving the method's base solver exactly ``nfe`` evaluations."""
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a fastsample.Grid; got {type(grid).__name__}.")
    if not grid.concrete:
        raise ValueError("a fit's starting grid must be concrete (not traced).")
    ts = np.asarray(grid.times, np.float64)
    process.check_times(ts, name="timesteps")
    if not np.isclose(ts[0], t_start, rtol=1e-9, atol=0):
        raise ValueError(f"timesteps start at t = {ts[0]} but the reference noise is at t = {t_start}.")
    if bool(ts[-1] == 0.0) != bool(final_zero):
        raise ValueError(f"final_zero={final_zero} but the timesteps end at t = {ts[-1]}.")
    used = grid.nfe(get_solver(method.base_of(base)))
    if nfe is not None and used != nfe:
        raise ValueError(f"the {grid.steps}-step timesteps give {method.name} ({base}) {used} evaluations, not "
                         f"nfe={nfe}.")
    return grid


def _count(params) -> int:
    return int(sum(np.size(p) for p in jax.tree.leaves(params)))

"""One entry point that fits any learned solver for a model and a budget: :func:`fit_solver`.

Gradient-fitted methods (``learned_grid``, ``bespoke_rk1``, ``bespoke_rk2``, ``bns``) minimise the
endpoint MSE to the exact PF-ODE solution (or, for Bespoke, the paper's local loss) with
:func:`fastsample.training.fit`; closed-form methods (``dode``, ``iia``) solve least-squares
problems. Every method returns a :class:`~fastsample.learned.program.ProgramSolver` that samples
through :func:`fastsample.sample` and is saved with :func:`save_solver`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..denoisers import Denoiser
from ..sampling import grid as build_grid
from ..sampling import sample
from ..solvers import get_solver
from ..timesteps import get_timesteps
from ..training import FitResult, fit
from .distill import fit_dode, fit_iia
from .parametrized import Bespoke, LearnedGrid, NonStationary
from .program import ProgramSolver
from .reference import ReferenceSet

__all__ = ["METHODS", "WARM_STARTABLE", "FitReport", "fit_solver", "model_fingerprint", "base_grid"]

#: method name -> (what it learns, gradient-fitted?)
METHODS = {
    "learned_grid": "the base solver's time grid (LD3)",
    "bespoke_rk1": "Bespoke RK1: time/scale reparameterisation of Euler steps",
    "bespoke_rk2": "Bespoke RK2: time/scale reparameterisation of midpoint steps",
    "bns": "Bespoke non-stationary: all coefficients and times",
    "dode": "D-ODE: one scalar per evaluation, least squares against a 10x teacher",
    "iia": "IIA: per-step coefficients, least squares against fine sub-steps",
}


class FitReport(NamedTuple):
    """What a fit did: the method, parameter count, held-out RMSE of the base solver and of the
    fitted one, the optimisation history (empty for closed-form methods; a warm start's first),
    the base grid the fit started from and, after a warm start, the learned grid's report."""

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

#: methods that contain the learned grid of their base solver, and that base (``None``: ``base``)
WARM_STARTABLE = {"bns": None, "bespoke_rk1": "euler", "bespoke_rk2": "midpoint"}


def model_fingerprint(denoiser: Denoiser) -> str:
    """A short hash of the denoiser's arrays and process, stored with fitted solvers."""
    h = hashlib.sha256(type(denoiser.process).__name__.encode())
    for leaf in jax.tree.leaves(denoiser):
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def base_grid(process, base: str, nfe: int, schedule: str, final_zero: bool, t_start=None, schedule_options=None):
    """The base solver's grid for exactly ``nfe`` evaluations (``ValueError`` when impossible)."""
    options = dict(schedule_options or {})
    if t_start is not None:
        options["t_start"] = t_start
    return np.asarray(build_grid(process, nfe, schedule, solver=base, final_zero=final_zero, **options).times)


def _rmse(x, y) -> float:
    return float(jnp.sqrt(jnp.mean((x - y) ** 2)))


def fit_solver(
    method: str,
    denoiser: Denoiser,
    train: ReferenceSet,
    val: ReferenceSet,
    nfe: int,
    *,
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
    """Fit ``method`` (see :data:`METHODS`) for ``denoiser`` at a budget of ``nfe`` evaluations.

    ``train``/``val`` are reference sets (:func:`~fastsample.learned.reference.make_reference`)
    whose endpoints are the targets (``val`` is held out: it picks the best parameters and is
    reported). The base solver runs on ``schedule`` with ``schedule_options`` (Bespoke: Euler /
    midpoint on it) from ``train.t_start``; ``final_zero`` ends the grid at ``t = 0``. ``loss="local"`` selects
    Bespoke's local-truncation loss (needs reference sets with a trajectory).

    ``timesteps`` replaces the schedule by an explicit base grid. ``warm_start=True`` (``bns``,
    ``bespoke_rk1``, ``bespoke_rk2``) first fits ``learned_grid`` for the method's base solver
    (``base``; Euler / the midpoint rule for Bespoke) with the same settings and starts from its
    grid: these methods contain every grid of their base, so they start at the learned grid's
    error (its checkpoints and log get the suffix ``.learned_grid``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")
    if loss not in ("endpoint", "local"):
        raise ValueError(f"loss must be 'endpoint' or 'local'; got {loss!r}.")
    if loss == "local" and not method.startswith("bespoke"):
        raise ValueError(f"loss='local' is Bespoke's loss; {method} fits the endpoint.")
    if final_zero != (train.t_end == 0.0):
        raise ValueError(f"final_zero={final_zero} needs reference endpoints at t {'= 0' if final_zero else '> 0'} "
                         f"(make_reference(t_end=...)); these are at t = {train.t_end}.")
    process = denoiser.process
    if warm_start:
        if method not in WARM_STARTABLE:
            raise ValueError(f"warm_start applies to {', '.join(WARM_STARTABLE)}; not to {method}.")
        if timesteps is not None:
            raise ValueError("warm_start learns the starting grid: do not pass `timesteps` too.")
        suffix = lambda p: None if p is None else Path(f"{p}.learned_grid")  # noqa: E731
        _, grid_report = fit_solver(
            "learned_grid", denoiser, train, val, nfe, base=WARM_STARTABLE[method] or base, schedule=schedule,
            schedule_options=schedule_options, final_zero=final_zero, optimizer=optimizer, steps=steps,
            batch_size=batch_size, eval_every=eval_every, patience=patience, seed=seed, mesh=mesh,
            checkpoint_dir=suffix(checkpoint_dir), log_path=suffix(log_path), progress=progress, cond=cond)
        solver, report = fit_solver(
            method, denoiser, train, val, nfe, base=base, final_zero=final_zero, loss=loss, optimizer=optimizer,
            steps=steps, batch_size=batch_size, eval_every=eval_every, patience=patience, seed=seed, mesh=mesh,
            checkpoint_dir=checkpoint_dir, log_path=log_path, progress=progress, cond=cond,
            timesteps=grid_report.timesteps)
        return solver, report._replace(base=grid_report.base, base_rmse=grid_report.base_rmse, warm_start=grid_report)
    if timesteps is not None:
        ts = _explicit_grid(process, timesteps, method, base, nfe, final_zero, train.t_start)
        base_name = {"bespoke_rk1": "euler", "bespoke_rk2": "midpoint"}.get(method, base)
        order = int(method[-1]) if method.startswith("bespoke") else None
    elif method.startswith("bespoke"):
        order = int(method[-1])
        steps_n = nfe if order == 1 else nfe // 2
        if order == 2 and nfe % 2:
            raise ValueError(f"bespoke_rk2 uses 2 evaluations per step; nfe={nfe} is odd.")
        options = {"t_start": train.t_start, **(schedule_options or {})}
        ts = np.asarray(get_timesteps(process, steps_n, schedule, final_zero=final_zero, **options))
        base_name = "euler" if order == 1 else "midpoint"
    else:
        ts = base_grid(process, base, nfe, schedule, final_zero, t_start=train.t_start,
                       schedule_options=schedule_options)
        base_name = base
    if not final_zero and not np.isclose(ts[-1], train.t_end, rtol=1e-12, atol=0):
        raise ValueError(f"the grid ends at t = {ts[-1]} but the reference endpoints are at t = {train.t_end}.")
    meta = dict(fingerprint=model_fingerprint(denoiser))

    if method in ("dode", "iia"):
        fitter = fit_dode if method == "dode" else fit_iia
        solver, params = fitter(denoiser, base, ts, train.x_T, cond=cond)
        base_solver = None
        history: list = []
    else:
        if method == "learned_grid":
            model = LearnedGrid.create(process, base, ts)
            run = lambda p, x: model.sample(denoiser, x, p, cond)
        elif method == "bns":
            model = NonStationary.create(process, base, ts)
            run = lambda p, x: sample(denoiser, x, model.solver(p), cond=cond)
        else:
            model = Bespoke.create(process, ts, order)
            run = lambda p, x: sample(denoiser, x, model.solver(p), cond=cond)
        params0 = jax.tree.map(lambda a: jnp.asarray(a, train.x_T.dtype), model.init(ts))

        def endpoint_loss(p, batch):
            return jnp.mean((run(p, batch["x_T"]) - batch["x_end"]) ** 2)

        loss_fn = endpoint_loss
        data = {"x_T": train.x_T, "x_end": train.x_end}
        val_data = {"x_T": val.x_T, "x_end": val.x_end}
        if loss == "local":
            loss_fn = _bespoke_local_loss(model, denoiser, train, cond)
            data = {"x_T": train.x_T, "x_end": train.x_end, "xs": train.xs, "dxs": train.dxs}
        result: FitResult = fit(
            loss_fn, params0, data, val=val_data if loss == "endpoint" else None,
            optimizer=optimizer or optax.adam(1e-2), steps=steps, batch_size=batch_size, eval_every=eval_every,
            patience=patience, seed=seed, mesh=mesh, checkpoint_dir=checkpoint_dir, log_path=log_path,
            progress=progress,
        )
        params = result.params
        solver = model.solver(params)
        history = result.history
        base_solver = (ts, params0, run)
    solver = _with_meta(solver, **meta)
    fitted = _rmse(sample(denoiser, val.x_T, solver, cond=cond), val.x_end)
    if base_solver is None or method == "learned_grid" or method == "bns":
        base_x = sample(denoiser, val.x_T, base, timesteps=jnp.asarray(ts, val.x_T.dtype), cond=cond)
    else:
        base_x = base_solver[2](base_solver[1], val.x_T)
    if method == "learned_grid":
        ts = np.asarray(model.timesteps(params))
    report = FitReport(solver.method, base_name, solver.fitted_nfe, _count(params), _rmse(base_x, val.x_end),
                       fitted, params, history, np.asarray(ts))
    return solver, report


def _explicit_grid(process, timesteps, method, base, nfe, final_zero, t_start) -> np.ndarray:
    """Check an explicit base grid: it starts at the reference's ``t_start``, ends at ``0`` iff
    ``final_zero`` and gives the base solver exactly ``nfe`` evaluations."""
    ts = np.asarray(timesteps, np.float64)
    process.check_times(ts, name="timesteps")
    if not np.isclose(ts[0], t_start, rtol=1e-9, atol=0):
        raise ValueError(f"timesteps start at t = {ts[0]} but the reference noise is at t = {t_start}.")
    if bool(ts[-1] == 0.0) != bool(final_zero):
        raise ValueError(f"final_zero={final_zero} but the timesteps end at t = {ts[-1]}.")
    if method.startswith("bespoke"):
        used = (len(ts) - 1) * int(method[-1])
    else:
        used = get_solver(base).nfe(len(ts) - 1, bool(final_zero))
    if used != nfe:
        raise ValueError(f"the {len(ts) - 1}-step timesteps give {method} ({base}) {used} evaluations, not nfe={nfe}.")
    return ts


def _count(params) -> int:
    return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def _with_meta(solver: ProgramSolver, **meta) -> ProgramSolver:
    import dataclasses

    return dataclasses.replace(solver, **meta)


def _bespoke_local_loss(model: Bespoke, denoiser: Denoiser, reference: ReferenceSet, cond, lipschitz: float = 1.0):
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

"""Sampling: :func:`solve` (the full API, returning a :class:`Solution`), :func:`sample` (the array
alone), :func:`grid` (a :class:`~fastsample.Grid` for a solver and an NFE budget), the adaptive
reference solve and the prior.

The call path of ``solve`` (and ``sample``):

1. the solver is resolved (a name, an instance, or ``"auto"``: the measured default);
2. an adaptive solver goes to its own driver (:func:`solve_adaptive`); a fixed-grid one gets its
   :class:`~fastsample.Grid`, built from the keywords or given, resolved and validated once, on
   the host (a solver that configures itself for a budget is configured here);
3. for a linear solver on a concrete grid the plan of the solve (its per-step coefficients,
   :func:`fastsample.plan.make_plan`) is computed on the host, also inside a caller's ``jit``;
4. :func:`fastsample.loop.run` steps it inside one compiled program, with the gradient mode's
   scan (or the mode's custom-VJP solve), and returns what :class:`SaveAt` asked to keep.
"""

from __future__ import annotations

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._compat import is_traced
from .denoisers import Denoiser
from .distributed import shard_batch
from .gradients import AbstractGradient, get_gradient
from .grid import DEFAULT_NFE, Grid, default_choice
from .loop import Record, run
from .noise import NOISE_KINDS, AbstractNoise, make_noise
from .plan import Plan, Unsupported, make_plan
from .processes import AbstractProcess
from .solvers import (
    AbstractAdaptiveSolver,
    AbstractBudgetSolver,
    AbstractFastSolver,
    AbstractFittedSolver,
    AbstractStochasticSolver,
    check_finite_start,
    get_solver,
)
from .solvers.exponential import ddim_step
from .terms import ProbabilityFlowTerm

__all__ = ["SaveAt", "Solution", "solve", "solve_fixed", "sample", "grid", "resolve", "noise_source", "solve_adaptive",
           "reference_solve", "prior"]


class SaveAt(eqx.Module):
    """What :func:`solve` keeps besides the final state (as diffrax's ``SaveAt``).

    Attributes:
        steps: the state after every step, with ``x_T`` first: ``Solution.trajectory``,
            shape ``(steps + 1, *x_T.shape)``.
        denoised: the data prediction of each step's first model evaluation (what a progress
            preview shows): ``Solution.denoised``, shape ``(steps, *x_T.shape)``.
    """

    steps: bool = eqx.field(static=True, default=False)
    denoised: bool = eqx.field(static=True, default=False)


class Solution(eqx.Module):
    """The result of :func:`solve`.

    Attributes:
        x: the final state (the samples).
        trajectory: ``SaveAt(steps=True)``: every state, ``x_T`` first; else ``None``.
        denoised: ``SaveAt(denoised=True)``: each step's first data prediction; else ``None``.
        stats: ``nfe`` (model evaluations), ``steps``; drivers add their own (adaptive:
            ``reached``; Picard: ``iterations``, ``sequential_nfe``, ``window``, ``converged``).
        grid: the :class:`~fastsample.Grid` walked (the adaptive solver: its two ends).
    """

    x: Any
    trajectory: Any = None
    denoised: Any = None
    stats: dict = eqx.field(default_factory=dict)
    grid: Grid | None = None


def prior(process: AbstractProcess, key, shape, dtype=None) -> Array:
    """Draw ``x_T ~ N(0, sigma(t_max)^2 I)``, the sampler's starting point."""
    dtype = dtype or jnp.result_type(float)
    return process.sigma(jnp.asarray(process.t_max, dtype)) * jax.random.normal(key, shape, dtype)


def _configure(solver, process: AbstractProcess, t_start=None, options: dict | None = None):
    """A solver instance from a name, an instance or ``"auto"`` (the measured default)."""
    if isinstance(solver, str) and solver == "auto":
        solver = default_choice(process, t_start)[0]
    return get_solver(solver, **(options or {}))


def grid(process: AbstractProcess, nfe: int | None = None, schedule: str = "auto", *, solver="auto",
         steps: int | None = None, final_zero: bool = False, **options) -> Grid:
    """The :class:`~fastsample.Grid` on which ``solver`` spends exactly ``nfe`` model evaluations
    (a ``ValueError`` says when it cannot), or of ``steps`` steps.

    Arguments:
        process: the noise process.
        nfe: the budget (give ``nfe`` or ``steps``).
        schedule: a schedule name (``fastsample.timesteps.available_schedules()``) or ``"auto"``.
        solver: the solver the budget is for (a name, an instance, ``"auto"``).
        final_zero: end the grid at ``t = 0`` (the last step lands on the data prediction).
        **options: the schedule's options (``t_start``, ``t_end``, ``rho``, ...).
    """
    if (nfe is None) == (steps is None):
        raise ValueError(f"give exactly one of nfe and steps; got nfe={nfe!r}, steps={steps!r}.")
    if steps is not None:
        return Grid.from_schedule(process, steps, schedule, final_zero=final_zero, **options)
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer; got {nfe!r}.")
    solver = _configure(solver, process, options.get("t_start"))
    at_zero = bool(final_zero) or options.get("t_end", process.t_min) == 0
    if isinstance(solver, AbstractBudgetSolver):
        solver = solver.for_budget(nfe, at_zero)
    n = solver.steps_for_nfe(nfe, at_zero)
    return Grid.from_schedule(process, n, schedule, final_zero=final_zero, budget=nfe, **options)


_build_grid = grid


def resolve(solver, process: AbstractProcess, nfe=None, schedule="auto", *, grid: Grid | None = None,
            timesteps=None, final_zero: bool = False, schedule_options: dict | None = None,
            solver_options: dict | None = None) -> tuple[AbstractFastSolver, Grid]:
    """``(solver, grid)``: the fixed-grid solver (configured for the grid's budget) and the
    validated :class:`~fastsample.Grid` that the keywords describe (see :func:`solve`)."""
    options = dict(schedule_options or {})
    solver = _configure(solver, process, options.get("t_start"), solver_options)
    if isinstance(solver, AbstractAdaptiveSolver):
        raise ValueError(f"{solver.name} chooses its own steps; this needs a fixed-grid solver.")
    grid_ = grid
    if timesteps is not None:
        if grid_ is not None:
            raise ValueError("give either `grid` or `timesteps`, not both.")
        grid_ = Grid.from_times(timesteps, process, ends_at_zero=final_zero if is_traced(timesteps) else None)
    fitted = solver.fitted_grid(process, nfe) if isinstance(solver, AbstractFittedSolver) else None
    if fitted is not None:
        if grid_ is not None:
            raise ValueError(f"{solver.name} was fitted with its own time grid; do not pass `timesteps` or `grid`.")
        grid_ = fitted
    if grid_ is None:
        grid_ = _build_grid(process, DEFAULT_NFE if nfe is None else nfe, schedule, solver=solver,
                            final_zero=final_zero, **options)
    elif not isinstance(grid_, Grid):
        raise ValueError(f"grid must be a fastsample.Grid (fastsample.grid(...) or Grid.from_times(...)); "
                         f"got {type(grid_).__name__}.")
    if isinstance(solver, AbstractBudgetSolver) and grid_.budget is not None:
        solver = solver.for_budget(grid_.budget, grid_.ends_at_zero)
    if grid_.steps < solver.min_steps():
        raise ValueError(f"{solver.name} needs at least {solver.min_steps()} steps; got {grid_.steps}.")
    used = grid_.nfe(solver)
    if nfe is not None and nfe != used:
        raise ValueError(f"nfe={nfe} disagrees with the {grid_.steps}-step grid given ({used} NFE).")
    if grid_.concrete:
        grid_.check(process)
        solver.check_grid(process, grid_.times[::-1] if grid_.increasing else grid_.times)
    return solver, grid_


def noise_source(solver, process, key, noise):
    """The noise source of a stochastic solver (``None`` for deterministic ones, which ignore ``key``)."""
    if not isinstance(noise, AbstractNoise) and noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise {noise!r}; allowed: {', '.join(NOISE_KINDS)} or a fastsample.noise source.")
    if not isinstance(solver, AbstractStochasticSolver):
        return None
    if key is None and not isinstance(noise, AbstractNoise):
        raise ValueError(f"{solver.name} is a stochastic solver: pass a PRNG key, sample(..., key=jax.random.key(0)).")
    return make_noise(noise, key, 0.0, float(process.t_max))


def solve(
    denoiser: Denoiser,
    x_T: Float[Array, "batch ..."],
    solver: str | AbstractFastSolver | AbstractAdaptiveSolver = "auto",
    nfe: int | None = None,
    schedule: str = "auto",
    *,
    grid: Grid | None = None,
    timesteps: Float[Array, " n"] | None = None,
    final_zero: bool = False,
    cond: Any = None,
    key: Any = None,
    noise: str | AbstractNoise = "independent",
    solver_options: dict | None = None,
    schedule_options: dict | None = None,
    saveat: SaveAt | None = None,
    check_finite: bool = False,
    gradient: str | AbstractGradient = "full",
    mesh: Any = None,
    fused: bool = True,
) -> Solution:
    """Sample by integrating from the grid's first time (``t_max``) to its last (``t_min``, or 0).

    Arguments:
        denoiser: the wrapped model.
        x_T: the starting noise (see :func:`prior`); the leading axis is the batch.
        solver: a registry name (``fastsample.available_solvers()``), a solver instance, or
            ``"auto"``: the best measured training-free choice (``fastsample.grid.default_choice``).
        nfe: the budget of model evaluations (default 10; a fitted solver's own NFE); the solver
            turns it into a step count (a ``ValueError`` says when it cannot use exactly this many).
        schedule: a schedule name (``fastsample.timesteps.available_schedules()``) or ``"auto"``.
        grid: a :class:`~fastsample.Grid` instead of ``nfe``/``schedule`` (``fastsample.grid``,
            ``Grid.from_times``; an increasing grid inverts, see :func:`fastsample.invert`).
        timesteps: explicit decreasing times instead (sugar for ``Grid.from_times``); traced
            values are fine (e.g. to differentiate by them) and new values do not recompile.
        final_zero: end the grid at ``t = 0`` (the last step lands on the data prediction).
        cond: conditioning passed to the model.
        key: PRNG key, required by stochastic solvers (a ``ValueError`` names the solver when it is
            missing) and ignored by deterministic ones. Sample ``b`` gets noise that depends only on
            ``(key, b)``.
        noise: the noise of stochastic solvers: ``"independent"`` (fresh normals per step from
            ``fold_in(key, i)``), ``"brownian"`` (one Brownian path per sample, the same whatever the
            NFE, over ``[0, t_max]``) or a :class:`fastsample.noise.AbstractNoise`.
        solver_options: constructor options for a solver given by name.
        schedule_options: the schedule's options (``t_start``, ``t_end``, ``rho``, ...).
        saveat: what to keep besides the final state (:class:`SaveAt`).
        check_finite: raise an error naming the first step whose state is not finite.
        gradient: how reverse-mode gradients through the sampler are computed (the samples are the
            same): ``"full"``, ``"remat"``, ``"binomial"``, ``"adjoint"``, ``"reversible"`` or a
            :mod:`fastsample.gradients` mode instance.
        mesh: ``None`` (no sharding), ``"all"`` (every device of every process) or a
            ``jax.sharding.Mesh`` with a ``"data"`` axis: ``x_T`` (the global batch) is split over
            ``"data"`` and the result stays sharded (:func:`fastsample.distributed.gather`).
        fused: run a linear solver from its plan (each step its model calls and one fused
            elementwise update, :mod:`fastsample.plan`); ``False`` calls the solver's ``update`` in
            every step. Both give the same samples up to rounding.

    Returns:
        A :class:`Solution`.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    process = denoiser.process
    saveat = saveat or SaveAt()
    options = dict(schedule_options or {})
    configured = _configure(solver, process, options.get("t_start"), solver_options)
    if isinstance(configured, AbstractAdaptiveSolver):
        if saveat.steps or saveat.denoised or timesteps is not None or grid is not None:
            raise ValueError(f"{configured.name} chooses its own steps: no `timesteps` or `grid`, no saved steps.")
        if get_gradient(gradient).name != "full":
            raise ValueError(f"{configured.name} supports gradient='full' only; got {get_gradient(gradient).name!r}.")
        return solve_adaptive(configured, denoiser, x_T, nfe, final_zero=final_zero, cond=cond, **options)
    configured, grid = resolve(configured, process, nfe, schedule, grid=grid, timesteps=timesteps,
                               final_zero=final_zero, schedule_options=options)
    return solve_fixed(configured, denoiser, x_T, grid, cond=cond, key=key, noise=noise, saveat=saveat,
                       check_finite=check_finite, gradient=gradient, mesh=mesh, fused=fused)


def solve_fixed(solver: AbstractFastSolver, denoiser: Denoiser, x_T, grid: Grid, *, cond=None, key=None,
                noise="independent", saveat: SaveAt | None = None, check_finite: bool = False, gradient="full",
                mesh=None, fused: bool = True) -> Solution:
    """The fixed-grid driver: ``solver`` (configured) on the resolved ``grid`` (see :func:`resolve`)."""
    process = denoiser.process
    saveat = saveat or SaveAt()
    source = noise_source(solver, process, key, noise)
    gradient = get_gradient(gradient)
    gradient.check(solver, saves_steps=saveat.steps or saveat.denoised)
    x_T = jnp.asarray(x_T) if mesh is None else shard_batch(x_T, mesh)
    plan = None
    if fused and source is None:
        try:  # the solver's scalar work, done once on the host: the loop makes model calls and fused updates
            plan = make_plan(solver, process, grid, x_T.dtype)
        except Unsupported:
            pass
    if grid.concrete and grid.strict:
        _check_in_dtype(grid, x_T.dtype)
        times = grid.array(x_T.dtype)
    else:
        times = jnp.asarray(grid.times).astype(x_T.dtype)
    # stepped from its plan, the program does not depend on the solver: solvers whose tables have
    # the same structure share one compiled program
    stepper = None if plan is not None and not gradient.custom else solver
    x, outputs = _run(stepper, denoiser, x_T, times, cond, source, gradient, plan, fused, grid.ends_at_zero,
                      saveat, check_finite)
    trajectory = jnp.concatenate([x_T[None], outputs["x"]]) if saveat.steps else None
    return Solution(x, trajectory, outputs.get("denoised"), {"nfe": grid.nfe(solver), "steps": grid.steps}, grid)


def _check_in_dtype(grid: Grid, dtype) -> None:
    """Refuse a grid whose times merge when cast to the samples' dtype (a zero-length step)."""
    ts = np.asarray(grid.times).astype(dtype)
    d = np.diff(ts)
    if not np.all(d > 0 if grid.increasing else d < 0):
        i = int(np.argmax(~(d > 0 if grid.increasing else d < 0)))
        raise ValueError(f"the grid's times ts[{i}]={grid.times[i]!r} and ts[{i + 1}]={grid.times[i + 1]!r} are "
                         f"equal in {np.dtype(dtype).name}: use fewer steps, another schedule, or float64 samples.")


@eqx.filter_jit
def _run(solver, denoiser, x, times, cond, noise, gradient, plan: Plan | None, fused, ends_at_zero, saveat,
         check_finite):
    steps = times.shape[0] - 1
    if gradient.custom:  # a custom-VJP solve (adjoint, reversible)
        x_final, finite = gradient.solve(solver, denoiser, x, times, cond, noise, plan, ends_at_zero)
        outputs = {"finite": finite}
    else:  # the memory mode's scan: lax.scan, rematerialised or recursively checkpointed
        record = Record(trajectory=saveat.steps, denoised=saveat.denoised, finite=check_finite)
        x_final, outputs = run(solver, denoiser, times, x, cond, noise, plan=plan, fused=fused,
                               ends_at_zero=ends_at_zero, scan=gradient.scan, record=record)
    if check_finite:
        bad = ~outputs["finite"]
        msgs = [f"sample: the state is not finite after step {i} (a step from ts[{i}] to ts[{i + 1}])"
                for i in range(steps)]
        x_final = eqx.branched_error_if(x_final, jnp.any(bad), jnp.argmax(bad), msgs)
    return x_final, outputs


def sample(
    denoiser: Denoiser,
    x_T: Float[Array, "batch ..."],
    solver: str | AbstractFastSolver | AbstractAdaptiveSolver = "auto",
    nfe: int | None = None,
    schedule: str = "auto",
    **kwargs,
) -> Float[Array, "batch ..."]:
    """The samples alone: ``solve(denoiser, x_T, solver, nfe, schedule, **kwargs).x`` (every keyword
    of :func:`solve` but ``saveat``)."""
    if "saveat" in kwargs:
        raise ValueError("sample returns the samples alone; use fastsample.solve(..., saveat=...) for a Solution.")
    return solve(denoiser, x_T, solver, nfe, schedule, **kwargs).x


# -------------------------------------------------------------------------------------- adaptive


def solve_adaptive(solver: AbstractAdaptiveSolver, denoiser: Denoiser, x_T, nfe: int | None = None, *,
                   final_zero: bool = False, cond=None, t_start=None, t_end=None) -> Solution:
    """The driver of solvers that choose their own steps: from ``t_start`` (default ``t_max``) to
    ``t_end`` (default ``t_min``) with at most ``nfe`` evaluations (``None``: no cap), then, with
    ``final_zero``, a last DDIM step onto ``t = 0`` (one more evaluation)."""
    process = denoiser.process
    x_T = jnp.asarray(x_T)
    t0 = process.t_max if t_start is None else t_start
    t1 = process.t_min if t_end is None else t_end
    process.check_times(np.array([t0, t1]), allow_zero=False, name="[t_start, t_end]")
    if solver.needs_finite_start:
        check_finite_start(solver.name, process, t0)
    budget = None if nfe is None else nfe - (1 if final_zero else 0)
    result = _adaptive(solver, denoiser, x_T, jnp.asarray(t0, x_T.dtype), jnp.asarray(t1, x_T.dtype), cond,
                       budget, final_zero)
    if not is_traced(result.reached) and not bool(result.reached):
        raise ValueError(
            f"{solver.name} did not reach t_end={t1} within nfe={nfe} model evaluations: pass nfe=None "
            f"(no cap), a larger nfe, or a larger rtol (now {solver.rtol})."
        )
    used, steps = result.nfe + (1 if final_zero else 0), result.steps + (1 if final_zero else 0)
    if not is_traced(used):
        used, steps = int(used), int(steps)
    ends = Grid(np.asarray([t0, 0.0 if final_zero else t1], np.float64), bool(final_zero))
    return Solution(result.x, stats={"nfe": used, "steps": steps, "reached": result.reached}, grid=ends)


@eqx.filter_jit
def _adaptive(solver, denoiser, x, t0, t1, cond, budget, final_zero):
    result = solver.solve(denoiser, x, t0, t1, cond, budget)
    if final_zero:
        x0_hat = denoiser(result.x, t1, cond)
        result = result._replace(x=ddim_step(denoiser.process, t1, jnp.zeros_like(t1), result.x, x0_hat))
    return result


# ------------------------------------------------------------------------------------- reference


def reference_solve(
    denoiser: Denoiser,
    x_T,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    cond: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    solver: diffrax.AbstractSolver | None = None,
    max_steps: int = 100_000,
):
    """Ground truth: an adaptive diffrax solve of the probability-flow ODE from ``t_start``
    (default ``t_max``) to ``t_end`` (default ``t_min``; must have ``sigma > 0``).

    Runs in ``x_T``'s dtype (use float64 for a reference) with ``Dopri8`` and a PID controller at
    ``rtol = atol = 1e-10`` in float64 (``1e-6`` in float32). It integrates in the half log-SNR
    when both ends have a finite one (smooth for every process, ``VPDiscrete``'s piecewise
    schedule included), otherwise in ``t``.
    """
    process = denoiser.process
    x_T = jnp.asarray(x_T)
    t0 = process.t_max if t_start is None else t_start
    t1 = process.t_min if t_end is None else t_end
    if not t1 > 0 or not float(process.sigma(jnp.asarray(t1, x_T.dtype))) > 0:
        raise ValueError(f"reference_solve needs t_end with sigma > 0; got t_end={t1}.")
    process.check_times(np.array([t0, t1]), allow_zero=False, name="[t_start, t_end]")
    lam0, lam1 = (float(process.log_snr(jnp.asarray(t, jnp.float64 if x_T.dtype == jnp.float64 else x_T.dtype)))
                  for t in (t0, t1))
    if np.isfinite(lam0) and np.isfinite(lam1):
        term, tau0, tau1 = ProbabilityFlowTerm(denoiser, time="log_snr"), lam0, lam1
    else:
        term, tau0, tau1 = ProbabilityFlowTerm(denoiser), t0, t1
    tight = 1e-10 if x_T.dtype == jnp.float64 else 1e-6
    return _reference(
        term, x_T, jnp.asarray(tau0, x_T.dtype), jnp.asarray(tau1, x_T.dtype), cond,
        rtol or tight, atol or tight, solver or diffrax.Dopri8(), max_steps,
    )


@eqx.filter_jit
def _reference(term, x_T, t0, t1, cond, rtol, atol, solver, max_steps):
    sol = diffrax.diffeqsolve(
        term, solver, t0, t1, dt0=None, y0=x_T, args=cond,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps,
    )
    return sol.ys[0]

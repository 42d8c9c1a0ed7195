"""Sampling drivers: the fixed-grid ``lax.scan`` sampler, the adaptive reference solve, the prior."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .denoisers import Denoiser
from .distributed import shard_batch
from .gradients import AbstractGradient, get_gradient
from .linear_steps import Unsupported, concrete_tables, initial_slots, linear_body, probing_body
from .noise import NOISE_KINDS, AbstractNoise, make_noise
from .processes import AbstractProcess
from .solvers import AbstractFastSolver, DPMSolverAdaptive, get_solver
from .solvers.exponential import ddim_step
from .solvers.stochastic_base import AbstractStochasticSolver
from .terms import ProbabilityFlowTerm
from .timesteps import get_timesteps

__all__ = ["sample", "reference_solve", "prior", "SampleInfo", "resolve_grid"]


class SampleInfo(NamedTuple):
    """What a call of :func:`sample` did: model evaluations, steps and the time grid."""

    nfe: int
    steps: int
    timesteps: jax.Array


def prior(process: AbstractProcess, key, shape, dtype=None):
    """Draw ``x_T ~ N(0, sigma(t_max)^2 I)``, the sampler's starting point."""
    dtype = dtype or jnp.result_type(float)
    return process.sigma(jnp.asarray(process.t_max, dtype)) * jax.random.normal(key, shape, dtype)


def resolve_grid(solver: AbstractFastSolver, process: AbstractProcess, nfe, schedule, timesteps,
                 final_zero: bool, schedule_options: dict | None):
    """``(solver, ts, steps, ends_at_zero)``: the solver configured for the budget, the time grid,
    the step count and whether the grid ends at ``t = 0``, for a budget of ``nfe`` model
    evaluations or for explicit ``timesteps``."""
    if timesteps is not None:
        if is_traced(timesteps):
            steps, ends_at_zero = timesteps.shape[0] - 1, bool(final_zero)
        else:
            process.check_times(timesteps, name="timesteps")
            steps = int(np.shape(timesteps)[0]) - 1
            ends_at_zero = bool(np.asarray(timesteps)[-1] == 0.0)
        if steps < solver.min_steps():
            raise ValueError(f"{solver.name} needs at least {solver.min_steps()} steps; got {steps}.")
        used = solver.nfe(steps, ends_at_zero)
        if nfe is not None and nfe != used:
            raise ValueError(f"nfe={nfe} disagrees with the {steps}-step timesteps given ({used} NFE).")
        with _eager_if_concrete(timesteps):  # a concrete grid stays concrete inside a caller's jit
            return solver, jnp.asarray(timesteps), steps, ends_at_zero
    if nfe is None:
        raise ValueError("give either `nfe` or explicit `timesteps`.")
    options = dict(schedule_options or {})
    if schedule == "auto":
        schedule = default_choice(process, options.get("t_start"))[1]
    # A range that already ends at t = 0 (flow matching's default t_min) needs no appended zero.
    t_end = options.get("t_end", process.t_min)
    ends_at_zero = bool(final_zero) or t_end == 0
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer; got {nfe!r}.")
    solver = solver.for_budget(nfe, ends_at_zero)
    steps = solver.steps_for_nfe(nfe, ends_at_zero)
    ts = get_timesteps(process, steps, schedule, final_zero=ends_at_zero and t_end != 0, **options)
    return solver, ts, steps, ends_at_zero


def _eager_if_concrete(*trees):
    """``jax.ensure_compile_time_eval()`` when no leaf of ``trees`` is traced: a concrete grid
    stays concrete inside a caller's ``jit``, so that the solver's tables can be computed once,
    while tracing (:func:`fastsample.linear_steps.concrete_tables`)."""
    if any(is_traced(leaf) for leaf in jax.tree.leaves(trees)):
        return contextlib.nullcontext()
    return jax.ensure_compile_time_eval()


def check_start(solver: AbstractFastSolver, process: AbstractProcess, ts) -> None:
    """Refuse grids a solver cannot start on (see ``AbstractFastSolver.needs_finite_start``)."""
    if solver.needs_finite_start and not is_traced(ts):
        lam = _concrete_log_snr(process, ts[0])
        if lam is not None and not np.isfinite(lam):
            raise ValueError(
                f"{solver.name} needs a grid that starts at a finite log-SNR (alpha > 0); ts[0]={float(ts[0])} "
                f"is pure noise for {type(process).__name__}: start slightly below it "
                "(schedule_options={'t_start': ...}) or use a data-prediction multistep solver "
                "(dpmpp_2m, dpmpp_3m, unipc)."
            )


@eqx.filter_jit
def _scan_sample(solver, denoiser, x, ts, cond, return_trajectory, check_finite, noise=None, gradient=None,
                 fused=True, tables=None):
    steps = ts.shape[0] - 1
    if gradient is not None and gradient.custom:  # a custom-VJP solve (adjoint, reversible)
        (x_final, finite), traj = gradient.solve(solver, denoiser, x, ts, cond, noise), None
    else:  # the memory mode's scan: lax.scan, rematerialised or recursively checkpointed
        step, carry = _stepper(solver, denoiser, x, ts, cond, noise, fused, tables)

        def body(carry, i):
            carry = step(carry, i)
            x1 = carry[0]
            return carry, (x1 if return_trajectory else None, jnp.all(jnp.isfinite(x1)) if check_finite else None)

        carry, (traj, finite) = get_gradient(gradient or "full").scan(body, carry, steps)
        x_final = carry[0]
    if check_finite:
        bad = ~finite
        first = jnp.argmax(bad)
        msgs = [f"sample: the state is not finite after step {i} (a step from ts[{i}] to ts[{i + 1}])"
                for i in range(steps)]
        x_final = eqx.branched_error_if(x_final, jnp.any(bad), first, msgs)
    if return_trajectory:
        traj = jnp.concatenate([x[None], traj])
    return x_final, traj


def _stepper(solver, denoiser, x, ts, cond, noise, fused, tables=None):
    """``(step, carry)``: one step of the sampler, ``step(carry, i) -> carry`` with the state
    ``carry[0]``, and the first carry. When ``fused``, a linear solver runs from its per-step tables
    (:mod:`fastsample.linear_steps`: given as constants, or each step's row worked out in the
    loop); otherwise ``solver.update`` steps."""
    steps = ts.shape[0] - 1
    if fused and noise is None:
        try:
            if tables is not None:
                slots = initial_slots(solver, denoiser.process, x, ts[-1], steps)
                return linear_body(tables, denoiser, cond), (x, slots)
            return probing_body(solver, denoiser, x, ts, cond, steps)
        except Unsupported:
            pass

    def step(carry, i):
        x, state = carry
        if noise is None:
            return solver.update(denoiser, ts[i], ts[i + 1], x, cond, state)
        # stochastic solvers: the noise of step i comes from the scan index i
        return solver.update(denoiser, ts[i], ts[i + 1], x, cond, state, noise.at_step(i, ts[i], ts[i + 1]))

    return step, (x, solver.init_state(denoiser, x, cond, ts[-1], steps))


#: Defaults measured by ``benchmarks/quality.py`` (best geometric-mean RMSE over VPDiscrete, EDM and
#: flow matching at NFE 5-20 on the digits mixture): iPNDM on the Align-Your-Steps grid, stopping
#: at ``t_min``. Grids that start at pure noise (``alpha = 0``) need a data-prediction solver and a
#: schedule defined there: UniPC-3 on the beta schedule.
DEFAULT_SOLVER, DEFAULT_SCHEDULE = "ipndm", "ays"
DEFAULT_NFE = 10
PURE_NOISE_SOLVER, PURE_NOISE_SCHEDULE = "unipc_3", "beta"


def default_choice(process: AbstractProcess, t_start=None) -> tuple[str, str]:
    """The ``(solver, schedule)`` that ``solver="auto"`` / ``schedule="auto"`` resolve to."""
    t0 = process.t_max if t_start is None else t_start
    lam = _concrete_log_snr(process, t0)
    if lam is None or np.isfinite(lam):
        return DEFAULT_SOLVER, DEFAULT_SCHEDULE
    return PURE_NOISE_SOLVER, PURE_NOISE_SCHEDULE


def _concrete_log_snr(process: AbstractProcess, t) -> float | None:
    """``log_snr(t)`` as a Python float, also inside a caller's ``jit``; ``None`` if traced."""
    try:
        with jax.ensure_compile_time_eval():
            return float(process.log_snr(jnp.asarray(t)))
    except jax.errors.ConcretizationTypeError:
        return None


def sample(
    denoiser: Denoiser,
    x_T,
    solver: str | AbstractFastSolver = "auto",
    nfe: int | None = None,
    schedule: str = "auto",
    *,
    timesteps=None,
    final_zero: bool = False,
    cond: Any = None,
    key=None,
    noise: str | AbstractNoise = "independent",
    solver_options: dict | None = None,
    schedule_options: dict | None = None,
    return_trajectory: bool = False,
    return_info: bool = False,
    check_finite: bool = False,
    gradient: str | AbstractGradient = "full",
    mesh=None,
    fused: bool = True,
):
    """Sample by integrating from ``t_max`` to ``t_min`` (or ``0``) on a fixed grid.

    Arguments:
        denoiser: the wrapped model.
        x_T: the starting noise (see :func:`prior`).
        solver: a registry name (``fastsample.available_solvers()``), a solver instance, or
            ``"auto"``: the best measured training-free choice (:func:`default_choice`).
        nfe: the budget of model evaluations (default 10; a fitted solver's own NFE); the solver
            turns it into a step count (a ``ValueError`` says when it cannot use exactly this many).
        schedule: a schedule name (``fastsample.timesteps.available_schedules()``) or ``"auto"``.
        timesteps: an explicit decreasing time grid instead of ``nfe``/``schedule`` (pass
            ``nfe=None``); its values are traced, so new values do not recompile.
        final_zero: end the grid at ``t = 0`` (the last step lands on the data prediction).
        cond: conditioning passed to the model.
        key: PRNG key, required by stochastic solvers (a ``ValueError`` names the solver when it is
            missing) and ignored by deterministic ones. Sample ``b`` (leading axis) gets noise that
            depends only on ``(key, b)``.
        noise: the noise of stochastic solvers: ``"independent"`` (fresh normals per step from
            ``fold_in(key, i)``), ``"brownian"`` (one Brownian path per sample, the same whatever the
            NFE, over ``[0, t_max]``) or a :class:`fastsample.noise.AbstractNoise` (see
            :mod:`fastsample.noise`).
        return_trajectory: also return every state, shape ``(steps + 1, *x_T.shape)``.
        return_info: also return a :class:`SampleInfo` (NFE used, steps, grid).
        check_finite: raise an error naming the first step whose state is not finite.
        gradient: how reverse-mode gradients through the sampler are computed (the samples are the
            same): ``"full"`` (plain scan), ``"remat"`` (each step rematerialised), ``"binomial"``
            (recursive checkpointing, O(log N) stored states), ``"adjoint"`` (continuous adjoint,
            AdjointDEIS; memory independent of N) or ``"reversible"`` (exact, by inverting BDIA-DDIM
            steps; memory independent of N), or a :mod:`fastsample.gradients` mode instance.
        mesh: ``None`` (default: no sharding, ``x_T`` stays where it is), ``"all"`` (every device of
            every process) or a ``jax.sharding.Mesh`` with a ``"data"`` axis: ``x_T`` (the global
            batch, the same on every process, or an already sharded global array) is split over
            ``"data"`` along its leading axis and the result stays sharded
            (:func:`fastsample.distributed.gather` brings it to every process). Sample ``b`` is the
            same whatever the device count.
        fused: run a linear solver (every deterministic registry solver but the ones that skip
            evaluations under ``lax.cond``) from per-step coefficient tables, so that each step is
            its model calls and one fused elementwise update (:mod:`fastsample.linear_steps`).
            Inside a caller's ``jit`` with a concrete grid (``timesteps=`` an array computed
            outside it, e.g. by ``fastsample.get_timesteps``) the tables are constants and the
            loop does no scalar work; otherwise each step's row is worked out in the loop.
            ``False`` calls the solver's ``update`` in every step. All give the same samples up to
            rounding.

    Returns:
        ``x_0``, followed by the trajectory and/or the info when asked for.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    if solver == "auto":
        solver = default_choice(denoiser.process, (schedule_options or {}).get("t_start"))[0]
    solver = get_solver(solver, **(solver_options or {}))
    x_T = jnp.asarray(x_T) if mesh is None else shard_batch(x_T, mesh)
    gradient = get_gradient(gradient)
    if isinstance(solver, DPMSolverAdaptive):
        if return_trajectory or timesteps is not None:
            raise ValueError("dpm_solver_adaptive chooses its own steps: no `timesteps`, no trajectory.")
        if gradient.name != "full":
            raise ValueError(f"dpm_solver_adaptive supports gradient='full' only; got {gradient.name!r}.")
        return _sample_adaptive(solver, denoiser, x_T, nfe, final_zero, cond, schedule_options, return_info)
    fitted_grid = solver.fitted_grid(denoiser.process, nfe)
    if fitted_grid is None:
        if nfe is None and timesteps is None:
            nfe = DEFAULT_NFE
        solver, ts, steps, ends_at_zero = resolve_grid(
            solver, denoiser.process, nfe, schedule, timesteps, final_zero, schedule_options
        )
    elif timesteps is not None:
        raise ValueError(f"{solver.name} was fitted with its own time grid; do not pass `timesteps`.")
    else:  # a fitted solver brings its own grid (evaluation times may repeat, e.g. Heun's)
        ts, steps, ends_at_zero = jnp.asarray(fitted_grid), fitted_grid.shape[0] - 1, False
    check_start(solver, denoiser.process, ts)
    with _eager_if_concrete(ts):
        ts = ts.astype(x_T.dtype)
    noise = _noise_for(solver, denoiser.process, key, noise, ts)
    gradient.check(solver, return_trajectory=return_trajectory)
    tables = None
    if fused and noise is None and not gradient.custom:
        try:  # computed once here when the grid is known, so that the loop does no scalar work
            tables = concrete_tables(solver, denoiser.process, ts, x_T.shape, x_T.dtype, ts.shape[0] - 1)
        except Unsupported:
            fused = False
    x, traj = _scan_sample(solver, denoiser, x_T, ts, cond, return_trajectory, check_finite, noise, gradient,
                           fused, tables)
    out = (x,)
    if return_trajectory:
        out += (traj,)
    if return_info:
        out += (SampleInfo(solver.nfe(steps, ends_at_zero), steps, ts),)
    return out[0] if len(out) == 1 else out


def _noise_for(solver, process, key, noise, ts):
    """The noise source of a stochastic solver (``None`` for deterministic ones, which ignore ``key``)."""
    if not isinstance(noise, AbstractNoise) and noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise {noise!r}; allowed: {', '.join(NOISE_KINDS)} or a fastsample.noise source.")
    if not isinstance(solver, AbstractStochasticSolver):
        return None
    if key is None and not isinstance(noise, AbstractNoise):
        raise ValueError(f"{solver.name} is a stochastic solver: pass a PRNG key, sample(..., key=jax.random.key(0)).")
    if not is_traced(ts):
        solver.check_grid(process, np.asarray(ts))
    return make_noise(noise, key, 0.0, float(process.t_max))


def _sample_adaptive(solver, denoiser, x_T, nfe, final_zero, cond, schedule_options, return_info):
    process = denoiser.process
    options = dict(schedule_options or {})
    unknown = set(options) - {"t_start", "t_end"}
    if unknown:
        raise ValueError(f"dpm_solver_adaptive takes schedule_options t_start and t_end only; got {sorted(unknown)}.")
    t0, t1 = options.get("t_start", process.t_max), options.get("t_end", process.t_min)
    process.check_times(np.array([t0, t1]), allow_zero=False, name="[t_start, t_end]")
    check_start(solver, process, np.array([t0]))
    budget = None if nfe is None else nfe - (1 if final_zero else 0)
    result = _adaptive(solver, denoiser, x_T, jnp.asarray(t0, x_T.dtype), jnp.asarray(t1, x_T.dtype), cond,
                       budget, final_zero)
    if not is_traced(result.reached) and not bool(result.reached):
        raise ValueError(
            f"dpm_solver_adaptive did not reach t_end={t1} within nfe={nfe} model evaluations: pass nfe=None "
            f"(no cap), a larger nfe, or a larger rtol (now {solver.rtol})."
        )
    if not return_info:
        return result.x
    used = result.nfe + (1 if final_zero else 0)
    grid = jnp.asarray([t0, 0.0 if final_zero else t1])
    if not is_traced(used):
        used, steps = int(used), int(result.steps) + (1 if final_zero else 0)
    else:
        steps = result.steps
    return result.x, SampleInfo(used, steps, grid)


@eqx.filter_jit
def _adaptive(solver, denoiser, x, t0, t1, cond, budget, final_zero):
    result = solver.solve(denoiser, x, t0, t1, cond, budget)
    if final_zero:
        x0_hat = denoiser(result.x, t1, cond)
        result = result._replace(x=ddim_step(denoiser.process, t1, jnp.zeros_like(t1), result.x, x0_hat))
    return result


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

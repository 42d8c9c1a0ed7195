"""Parallel-in-time sampling: Picard iteration over a sliding window of solver steps.

ParaDiGMS (Shih, Belkhale, Ermon, Sadigh, Anari: Parallel Sampling of Diffusion Models, 2023)
guesses the whole trajectory and refines it by Picard iteration: all model evaluations of a window
of steps run as one batched call, and the window slides past the steps whose state stopped
changing. DreamPropeller (Zhou et al.: DreamPropeller: Supercharge Text-to-3D Generation with
Parallel Sampling, 2024) generalises the Picard update from Euler steps to other update rules.

Here the update rule is any fixed-grid solver of the registry. Once the grid is fixed, a solver is a
:class:`~fastsample.learned.program.LinearProgram`: the input of model evaluation ``k`` is

    y_k = a_k x_T + sum_{j<k} B_kj D_j + n_k,        D_j = denoiser(y_j, tau_j),

with ``n_k = 0`` for deterministic solvers and, for stochastic ones, the contribution of the noise,
drawn upfront from the same source (and key) as :func:`fastsample.sample`. The fixed point of
``D -> denoiser(a x_T + B D + n)`` is the sequential solution; iterating it is the Picard
iteration of the discretised integral form of the sampler (for DDIM: of the variation-of-constants
formula of the probability-flow ODE, whose linear part the program solves exactly). Iteration ``p``
of a window ``[s, s + w)``:

1. inputs ``y_j`` (``s <= j < s + w``) from the current predictions ``D`` (predictions not yet
   computed are guessed as the window's last one, as ParaDiGMS initialises new points with the
   last state);
2. ``D_j = denoiser(y_j, tau_j)`` for the whole window in one ``vmap``-ed call (sharded over a
   mesh axis ``"data"`` when a mesh is given);
3. the new inputs ``y'_j`` and, per sample, the error ``|y'_j - y_j|^2 / (d sigma(tau_j)^2)``
   compared with ``tol^2``: ParaDiGMS's criterion, the squared change per dimension relative to a
   noise variance (the paper's reference implementation divides by the DDPM scheduler's per-step
   variance; here it is the marginal ``sigma^2`` at the evaluation time, defined for every solver,
   ODE ones included). The maximum over the batch is used, so the window moves for all samples;
4. the window start moves to the first ``j > s`` whose error exceeds ``tol^2`` (at least one step:
   ``y_s`` depends only on frozen predictions), and the predictions before it are frozen.

Guarantee (what ``tol`` means). Every frozen ``D_j`` was evaluated at ``y_j = y'_j + r_j`` where
``y'_j`` is its input given the frozen predictions before it, and ``rms(r_j) <= tol sigma(tau_j)``
(``r = 0`` for the first evaluation of each iteration). So the result is the sequential solver's
result with each model input perturbed by at most ``tol`` times its noise level; to first order
its distance to the sequential sample is ``sum_j G_j r_j`` with ``G_j`` the sensitivity of the
sample to the input of evaluation ``j``, hence

    rms(x_picard - x_sequential) <= tol * sum_j ||G_j||_2 sigma(tau_j)   (+ O(tol^2)).

With ``tol = 0`` every iteration freezes exactly one evaluation (unless an input is bit-for-bit
unchanged) and the result is the sequential solver's, after at most ``nfe`` iterations.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._compat import is_traced
from .denoisers import Denoiser
from .grid import Grid
from .loop import Record, run
from .noise import AbstractNoise
from .plan import linear_program
from .sampling import Solution, noise_source, resolve
from .solvers import AbstractLinearSolver, AbstractStochasticSolver, AbstractWrapper

__all__ = ["sample_picard"]


class _ZeroNoise(AbstractNoise):
    """A noise source whose every draw is zero (the deterministic part of a stochastic solver)."""

    def increment(self, i, j, s0, s1, x):
        return jnp.zeros_like(x)

    def unit_increment(self, i, j, s0, s1, x):
        return jnp.zeros_like(x)

    def normal(self, i, j, x):
        return jnp.zeros_like(x)


class _Noiseless(AbstractWrapper, AbstractLinearSolver):
    """A stochastic solver run with zero noise: a deterministic solver whose program gives the
    coefficients of ``x_T`` and of the model outputs."""

    base: AbstractStochasticSolver
    prefix = "noiseless"

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        return self.base.init_state(denoiser, x, cond, t_end, num_steps)

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        zero = _ZeroNoise(jax.random.PRNGKey(0))
        return self.base.update(denoiser, t0, t1, x, cond, state, zero.at_step(0, t0, t1))


def _program(solver, process, grid: Grid):
    """``solver``'s linear program on ``grid``; a stochastic solver's without its noise."""
    return linear_program(_Noiseless(solver) if isinstance(solver, AbstractStochasticSolver) else solver, process, grid)


def _noise_offsets(solver, process, grid: Grid, x_T, noise):
    """``n`` (``(m + 1, *x_T.shape)``): the evaluation inputs and the result of the stochastic
    solver run from ``x_T = 0`` with a model that predicts ``x0 = 0``, i.e. the noise's part."""
    zero = Denoiser(lambda y, t, c: jnp.zeros_like(y), process, prediction="x0")
    times = grid.array(x_T.dtype)
    x, out = _offsets(solver, zero, times, jnp.zeros_like(x_T), noise, grid.ends_at_zero)
    ys = []
    for calls in out["calls"]:  # one entry per phase: (y, t) of each call, stacked over its steps
        stacked = jnp.stack([y for y, _ in calls], axis=1)  # (steps, calls, *x)
        ys.append(stacked.reshape((-1,) + x_T.shape))
    return jnp.concatenate(ys + [x[None]])


@eqx.filter_jit
def _offsets(solver, zero, times, x, noise, ends_at_zero):
    return run(solver, zero, times, x, None, noise, fused=False, ends_at_zero=ends_at_zero, record=Record(calls=True))


def sample_picard(
    denoiser: Denoiser,
    x_T,
    solver="ddim",
    nfe: int | None = None,
    schedule: str = "auto",
    *,
    grid: Grid | None = None,
    timesteps=None,
    final_zero: bool = False,
    cond: Any = None,
    key=None,
    noise="independent",
    solver_options: dict | None = None,
    schedule_options: dict | None = None,
    window: int | None = None,
    tol: float = 1e-3,
    max_iters: int | None = None,
    mesh: Mesh | None = None,
) -> Solution:
    """Sample with a fixed-grid solver by sliding-window Picard iteration (ParaDiGMS, 2023), with
    the update rule of any deterministic or stochastic registry solver (DreamPropeller, 2024).

    Arguments (``solver`` to ``schedule_options`` as in :func:`fastsample.sample`):
        window: evaluations refined together per iteration (default: all of them; with ``mesh``,
            the largest multiple of the device count that fits). Its shape is static.
        tol: tolerance on the per-dimension rms change of a model input relative to its noise
            level ``sigma(tau_j)`` (ParaDiGMS's criterion); ``0`` reproduces the sequential solver.
        max_iters: cap on the parallel iterations (default: the sequential NFE, which always
            suffices); ``stats["converged"]`` says whether the window reached the end.
        mesh: a 1-D ``jax.sharding.Mesh`` with axis ``"data"`` (``fastsample.distributed.data_mesh``):
            the window's evaluations are sharded over its devices (``window`` must be a multiple of
            their number).

    Returns:
        A :class:`~fastsample.Solution` whose ``stats`` hold ``iterations`` (rounds of batched model
        calls, the sequential depth), ``nfe`` (evaluations made, ``iterations * window``),
        ``sequential_nfe`` (the sequential solver's), ``window`` and ``converged``.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    process = denoiser.process
    if timesteps is not None and is_traced(timesteps):
        raise ValueError("sample_picard needs concrete `timesteps` (it reads the solver's coefficients off them).")
    solver, grid = resolve(solver, process, nfe, schedule, grid=grid, timesteps=timesteps, final_zero=final_zero,
                           schedule_options=schedule_options, solver_options=solver_options)
    if not grid.concrete:
        raise ValueError("sample_picard needs a concrete grid (it reads the solver's coefficients off it).")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a batch axis (ndim >= 1); got shape {x_T.shape}.")
    m = grid.nfe(solver)
    window = _check_window(window, m, mesh)
    if max_iters is None:
        max_iters = m
    elif isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer; got {max_iters!r}.")
    if not is_traced(tol) and not (np.ndim(tol) == 0 and float(tol) >= 0):
        raise ValueError(f"tol must be a non-negative number; got {tol!r}.")
    source = noise_source(solver, process, key, noise)
    try:
        times, a, B, _ = _program(solver, process, grid)
    except ValueError as e:
        raise ValueError(f"sample_picard cannot run {solver.name}: {e}") from None
    dt = x_T.dtype
    times = jnp.asarray(times, dt)
    offsets = _noise_offsets(solver, process, grid, x_T, source) if source is not None else None
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))
    x, iterations, start = _picard(
        denoiser, x_T, cond, times, process.sigma(times), jnp.asarray(a, dt), jnp.asarray(B, dt),
        offsets, jnp.asarray(tol, dt), jnp.asarray(max_iters), window, sharding,
    )
    converged = start >= m
    if not is_traced(iterations):
        iterations, converged = int(iterations), bool(converged)
    stats = {"iterations": iterations, "nfe": iterations * window, "sequential_nfe": m, "window": window,
             "converged": converged, "steps": grid.steps}
    return Solution(x, stats=stats, grid=grid)


def _check_window(window, m: int, mesh) -> int:
    devices = 1
    if mesh is not None:
        if not isinstance(mesh, Mesh) or "data" not in mesh.axis_names:
            raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis 'data' "
                             f"(fastsample.distributed.data_mesh()); got {mesh!r}.")
        devices = int(mesh.shape["data"])
    if window is None:
        window = m - m % devices
        if window == 0:
            raise ValueError(f"the solver makes {m} model evaluations, fewer than the {devices} devices of the mesh: "
                             "use a mesh with fewer devices.")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= m:
        raise ValueError(f"window must be an integer between 1 and the solver's {m} model evaluations; got {window!r}.")
    if window % devices:
        raise ValueError(f"window={window} must be a multiple of the mesh's {devices} devices on axis 'data' "
                         "(each device evaluates window / devices steps).")
    return window


@eqx.filter_jit
def _picard(denoiser, x_T, cond, times, sigmas, a, B, offsets, tol, max_iters, window, sharding):
    m = times.shape[0]
    w = window
    feat = tuple(range(2, x_T.ndim + 1))  # the feature axes of a (window, batch, ...) stack
    d = int(np.prod(x_T.shape[1:])) if x_T.ndim > 1 else 1
    index = jnp.arange(m)

    def inputs(lo, D, rows):
        """``y_j`` for ``j = lo + i``, ``i < rows``: ``a_j x_T + B_j D + n_j``."""
        y = jnp.tensordot(jax.lax.dynamic_slice_in_dim(B, lo, rows), D, axes=1)
        y = y + jax.lax.dynamic_slice_in_dim(a, lo, rows).reshape((rows,) + (1,) * x_T.ndim) * x_T
        if offsets is not None:
            y = y + jax.lax.dynamic_slice_in_dim(offsets, lo, rows)
        return y

    def evaluate(y, t):
        if sharding is not None:
            y = jax.lax.with_sharding_constraint(y, sharding)
        out = jax.vmap(lambda yi, ti: denoiser(yi, ti, cond))(y, t)
        return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)

    def body(carry):
        D, s, it = carry
        lo = jnp.minimum(s, m - w)  # the window stays inside the grid; frozen entries are kept
        y = inputs(lo, D, w)
        new = evaluate(y, jax.lax.dynamic_slice_in_dim(times, lo, w))
        j = lo + jnp.arange(w)
        old = jax.lax.dynamic_slice_in_dim(D, lo, w)
        frozen = (j < s).reshape((w,) + (1,) * x_T.ndim)
        new = jnp.where(frozen, old, new)
        D = jax.lax.dynamic_update_slice_in_dim(D, new, lo, axis=0)
        # Predictions beyond the window: guessed as the window's last one.
        D = jnp.where((index >= lo + w).reshape((m,) + (1,) * x_T.ndim), new[-1], D)
        y_new = inputs(lo, D, w)
        sig = jax.lax.dynamic_slice_in_dim(sigmas, lo, w)
        err = jnp.sum((y_new - y) ** 2, axis=feat) / (d * sig[:, None] ** 2)  # (window, batch)
        bad = (jnp.max(err, axis=1) > tol**2) & (j > s)
        s = jnp.where(jnp.any(bad), jnp.argmax(bad) + lo, lo + w)
        return D, s, it + 1

    def cond_fn(carry):
        _, s, it = carry
        return (s < m) & (it < max_iters)

    D0 = jnp.zeros((m,) + x_T.shape, x_T.dtype)
    D, s, it = jax.lax.while_loop(cond_fn, body, (D0, jnp.asarray(0), jnp.asarray(0)))
    x = a[-1] * x_T + jnp.tensordot(B[-1], D, axes=1)
    return (x if offsets is None else x + offsets[-1]), it, s

"""Schedule search by dynamic programming over a fine candidate grid (GITS).

Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML 2024): the
PF-ODE trajectories of a model are regular enough that one time schedule, searched once on a
small batch of noises, serves for new noises. The search:

1. a fine candidate grid ``c_0 > c_1 > ... > c_M`` (default: ``M = 100`` intervals uniform in the
   half log-SNR from ``t_start`` to ``t_end``);
2. the teacher trajectory: the exact PF-ODE solution from ``x_T`` (at ``c_0``) at every candidate
   (adaptive Dopri8, tight tolerances, integrated in ``lambda``);
3. the cost of each coarse jump ``i -> j`` (``i < j``): the error of **one** step of the base
   solver started from the teacher state at ``c_i``, against the teacher state at ``c_j``
   (root-mean-square over the data dimensions, averaged over the batch);
4. dynamic programming for the path ``0 -> M`` with exactly ``steps`` jumps and the least total
   cost (:func:`min_cost_path`, ``O(steps M^2)``).

The schedule is ``[c_{p_0}, ..., c_{p_steps}]``, usable as ``fs.sample(..., timesteps=...)`` with
any solver; searched with a single-step base (``ddim`` by default) it fits that base best. A
multistep base contributes its first (warm-up) step to the costs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..denoisers import Denoiser
from ..grid import Grid
from ..sampling import sample
from ..solvers import AbstractFastSolver, get_solver
from ..terms import ProbabilityFlowTerm
from .reference import reference_trajectory

__all__ = ["SearchResult", "search_schedule", "jump_costs", "min_cost_path"]


class SearchResult(NamedTuple):
    """``timesteps``: the searched grid; ``path``: its indices in ``candidates``; ``cost``: the
    DP's total; ``costs``: the ``(M + 1, M + 1)`` jump-cost matrix (``inf`` where ``j <= i``);
    ``nfe``: the budget searched for."""

    timesteps: np.ndarray
    path: np.ndarray
    cost: float
    candidates: np.ndarray
    costs: np.ndarray
    nfe: int | None = None

    @property
    def grid(self) -> Grid:
        """The searched schedule as a :class:`~fastsample.Grid` (``fs.sample(..., grid=result.grid)``)."""
        return Grid.from_times(self.timesteps, budget=self.nfe)


def min_cost_path(costs, num_steps: int) -> tuple[np.ndarray, float]:
    """The path ``0 = p_0 < p_1 < ... < p_num_steps = M`` minimising ``sum_k costs[p_k, p_{k+1}]``
    (dynamic programming over the number of jumps taken). ``costs``: ``(M + 1, M + 1)``; entries
    with ``j <= i`` are ignored. Returns ``(path, total)``."""
    c = np.array(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"costs must be a square (M + 1, M + 1) matrix with M >= 1; got shape {c.shape}.")
    m = c.shape[0] - 1
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or not 1 <= num_steps <= m:
        raise ValueError(f"num_steps must be an integer in [1, {m}] (the candidate intervals); got {num_steps!r}.")
    c[np.tril_indices(m + 1)] = np.inf
    value = np.full(m + 1, np.inf)
    value[0] = 0.0
    parents = np.zeros((num_steps, m + 1), dtype=int)
    for k in range(num_steps):
        total = value[:, None] + c  # (from, to)
        parents[k] = np.argmin(total, axis=0)
        value = total[parents[k], np.arange(m + 1)]
    if not np.isfinite(value[m]):
        raise ValueError("no finite-cost path: every path to the last candidate has an infinite or NaN jump cost.")
    path = [m]
    for k in reversed(range(num_steps)):
        path.append(parents[k, path[-1]])
    return np.asarray(path[::-1]), float(value[m])


@eqx.filter_jit
def _row(denoiser, solver, xs, ts, i, cond):
    """Errors of one ``solver`` step from ``xs[:, i]`` at ``ts[i]`` to every ``ts[j]`` (``(M + 1,)``;
    entries ``j <= i`` are meaningless)."""
    x_i, t_i, t_last = xs[:, i], ts[i], ts[-1]

    def one(t_j, x_j):
        t_j = jnp.where(t_j < t_i, t_j, t_last)  # keep the grid decreasing where the entry is unused
        x1 = sample(denoiser, x_i, solver, timesteps=jnp.stack([t_i, t_j]), cond=cond)
        err = (x1 - x_j).reshape(x1.shape[0], -1)
        return jnp.mean(jnp.sqrt(jnp.mean(err**2, axis=1)))

    return jax.vmap(one, in_axes=(0, 1))(ts, xs)


def jump_costs(denoiser: Denoiser, x_T, candidates, *, base: str = "ddim", cond=None, teacher=None):
    """The ``(M + 1, M + 1)`` cost matrix of one-step jumps between ``candidates`` (decreasing times,
    ``x_T`` at ``candidates[0]``): ``costs[i, j]`` is the batch mean of the per-sample RMS error of
    one ``base`` step from the teacher state at ``candidates[i]`` to ``candidates[j]``; ``inf`` for
    ``j <= i``. ``teacher``: the ``(N, M + 1, *shape)`` teacher states, computed when not given."""
    solver = get_solver(base)
    process = denoiser.process
    ts = _check_candidates(process, candidates.times if isinstance(candidates, Grid) else candidates)
    x_T = jnp.asarray(x_T)
    if teacher is None:
        teacher = teacher_states(denoiser, x_T, ts, cond=cond)
    ts_j = jnp.asarray(ts, x_T.dtype)
    m = ts.shape[0] - 1
    rows = [np.asarray(_row(denoiser, solver, teacher, ts_j, jnp.asarray(i), cond)) for i in range(m)]  # one compile
    costs = np.full((m + 1, m + 1), np.inf)
    for i, row in enumerate(rows):
        costs[i, i + 1:] = row[i + 1:]
    return costs


def teacher_states(denoiser: Denoiser, x_T, candidates, *, cond=None):
    """The exact PF-ODE states at ``candidates`` (``(N, M + 1, *shape)``), from ``x_T`` at
    ``candidates[0]`` (adaptive Dopri8 in the half log-SNR; the candidates need finite log-SNRs)."""
    process = denoiser.process
    x_T = jnp.asarray(x_T)
    with jax.enable_x64(True):
        lams = np.asarray(process.log_snr(jnp.asarray(candidates, jnp.float64)), np.float64)
    if not np.all(np.isfinite(lams)):
        raise ValueError(f"every candidate needs a finite log-SNR for the teacher solve; {type(process).__name__} "
                         f"has lambda={lams.tolist()[:3]}... at candidates={np.asarray(candidates).tolist()[:3]}...: "
                         "pass t_start/t_end strictly inside (0, 1) for flow matching.")
    term = ProbabilityFlowTerm(denoiser, time="log_snr")
    xs, _ = reference_trajectory(term, x_T, jnp.asarray(lams, x_T.dtype), cond)
    return xs


def search_schedule(
    denoiser: Denoiser,
    x_T,
    nfe: int,
    *,
    base: str = "ddim",
    candidates=None,
    num_candidates: int = 100,
    t_start: float | None = None,
    t_end: float | None = None,
    cond=None,
) -> SearchResult:
    """GITS: the time grid for ``nfe`` evaluations of ``base`` that minimises the summed one-step
    errors against the teacher trajectory of ``x_T`` (a small batch of noises at the grid's start).

    Arguments:
        x_T: ``(N, *shape)`` starting noise at ``candidates[0]`` (``t_start``).
        nfe: the budget; ``base`` turns it into the number of steps (``get_solver(base).steps_for_nfe``).
        candidates: decreasing candidate times or a :class:`~fastsample.Grid` (default:
            ``num_candidates`` intervals uniform in log-SNR from ``t_start`` to ``t_end``, defaults
            ``t_max``/``t_min``).

    Returns:
        :class:`SearchResult`; ``result.grid`` goes to ``fs.sample(..., grid=...)``.
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    solver = get_solver(base)
    if not isinstance(solver, AbstractFastSolver):
        raise ValueError(f"base must be a fixed-grid solver; got {base!r}.")
    steps = solver.steps_for_nfe(nfe)
    process = denoiser.process
    if candidates is None:
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an integer >= 1; got {num_candidates!r}.")
        candidates = Grid.from_schedule(process, num_candidates, "logsnr_uniform", t_start=t_start, t_end=t_end)
    elif t_start is not None or t_end is not None:
        raise ValueError("pass either explicit `candidates` or t_start/t_end, not both.")
    ts = _check_candidates(process, candidates.times if isinstance(candidates, Grid) else candidates)
    if steps > ts.shape[0] - 1:
        raise ValueError(f"{base} needs {steps} steps for nfe={nfe} but there are only {ts.shape[0] - 1} candidate "
                         "intervals; pass more candidates.")
    x_T = jnp.asarray(x_T)
    costs = jump_costs(denoiser, x_T, ts, base=base, cond=cond)
    path, total = min_cost_path(costs, steps)
    return SearchResult(ts[path], path, total, ts, costs, nfe)


def _check_candidates(process, candidates) -> np.ndarray:
    ts = np.array(candidates, dtype=np.float64)
    process.check_times(ts, allow_zero=False, name="candidates")
    if not math.isfinite(float(ts[0])):
        raise ValueError(f"candidates must be finite; got {ts[0]}.")
    return ts

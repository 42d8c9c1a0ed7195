"""Inversion: running a sampler from data back to noise, and BDIA-DDIM's exact inversion.

:func:`invert` runs any fastsample solver on the sampling grid reversed (``t_min`` up to
``t_max``): with DDIM this is DDIM inversion, the same update ``x1 = (sigma1 / sigma0) x -
alpha1 expm1(-h) x0_hat`` with ``t1 > t0``. It is exact only where DDIM is (single-point data);
otherwise the round trip drifts by the discretization error.

:class:`BDIADDIM`, :func:`bdia_sample` and :func:`bdia_invert` implement bi-directional
integration approximation (Zhang, Lewis, Kleijn: Exact Diffusion Inversion via Bi-directional
Integration Approximation, ECCV 2024). With ``Delta(t_i -> t_j | x_i)`` the DDIM increment from
``x_i`` at ``t_i`` to ``t_j`` using the one model evaluation at ``(x_i, t_i)``::

    x_{i-1} = x_{i+1} - (1 - gamma) (x_{i+1} - x_i) - gamma Delta(t_i -> t_{i+1} | x_i)
              + Delta(t_i -> t_{i-1} | x_i)

(the backward DDIM step over the previous slot refines the approximation made when ``x_i`` was
computed; ``gamma = 0`` is DDIM, ``gamma = 1`` the paper's choice; the first step is plain
DDIM). The update is linear in ``x_{i+1}``, so ``x_{i+1}`` follows exactly from ``(x_i,
x_{i-1})``: inversion needs the last two states and recovers ``x_T`` to rounding error.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .denoisers import Denoiser
from .sample import SampleInfo, _scan_sample, check_start, resolve_grid, sample
from .solvers import AbstractFastSolver, get_solver
from .solvers.exponential import ddim_step

__all__ = ["invert", "BDIADDIM", "bdia_sample", "bdia_invert"]


def _check_increasing(process, ts, name: str = "timesteps") -> None:
    """Raise ``ValueError`` unless ``ts`` (concrete) is strictly increasing, starts above 0 and
    stays inside ``[t_min, t_max]`` (an inversion grid: the sampling grid reversed)."""
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim == 1 and ts.shape[0] >= 2 and np.all(np.isfinite(ts)) and not np.all(np.diff(ts) > 0):
        i = int(np.argmax(~(np.diff(ts) > 0)))
        raise ValueError(
            f"{name} must be strictly increasing (from t_min towards t_max) for inversion; "
            f"ts[{i}]={ts[i]!r} is followed by ts[{i + 1}]={ts[i + 1]!r}."
        )
    # The reversed grid is a sampling grid; process.check_times validates shape, values and range.
    process.check_times(ts[::-1], allow_zero=False, name=f"{name} (reversed)")
    if not ts[0] > 0:
        raise ValueError(f"{name} must start at t > 0 for inversion (sigma > 0); got {ts[0]!r}.")


def _inversion_grid(solver, process, nfe, schedule, timesteps, schedule_options):
    """The increasing inversion grid and its step count."""
    if timesteps is not None:
        if not is_traced(timesteps):
            _check_increasing(process, timesteps)
        steps = int(np.shape(timesteps)[0]) - 1
        if steps < solver.min_steps():
            raise ValueError(f"{solver.name} needs at least {solver.min_steps()} steps; got {steps}.")
        used = solver.nfe(steps, False)
        if nfe is not None and nfe != used:
            raise ValueError(f"nfe={nfe} disagrees with the {steps}-step timesteps given ({used} NFE).")
        return jnp.asarray(timesteps), steps
    _, ts, steps, ends_at_zero = resolve_grid(solver, process, nfe, schedule, None, False, schedule_options)
    if ends_at_zero:
        raise ValueError("invert needs a grid that starts at t > 0; this schedule's range ends at t = 0 "
                         "(pass schedule_options=dict(t_end=...) with t_end > 0).")
    return ts[::-1], steps


def invert(
    denoiser: Denoiser,
    x,
    solver: str | AbstractFastSolver = "ddim",
    nfe: int | None = 10,
    schedule: str = "auto",
    *,
    timesteps=None,
    cond: Any = None,
    solver_options: dict | None = None,
    schedule_options: dict | None = None,
    return_trajectory: bool = False,
    return_info: bool = False,
    check_finite: bool = False,
):
    """Integrate from ``t_min`` up to ``t_max``: the sampling grid of ``nfe``/``schedule``
    reversed, or an explicit strictly increasing ``timesteps`` grid starting at ``t > 0``.

    ``x`` is the state at the grid's first (smallest) time, e.g. the output of :func:`sample`
    without ``final_zero``. The solver steps with ``t1 > t0``: ``"ddim"`` gives DDIM inversion.
    Returns the state at ``t_max`` (and the trajectory / a :class:`SampleInfo` whose
    ``timesteps`` is the increasing grid, when asked for).
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    solver = get_solver(solver, **(solver_options or {}))
    x = jnp.asarray(x)
    ts, steps = _inversion_grid(solver, denoiser.process, nfe, schedule, timesteps, schedule_options)
    check_start(solver, denoiser.process, ts[::-1])  # the end it integrates towards
    ts = ts.astype(x.dtype)
    x_T, traj = _scan_sample(solver, denoiser, x, ts, cond, return_trajectory, check_finite)
    out = (x_T,)
    if return_trajectory:
        out += (traj,)
    if return_info:
        out += (SampleInfo(solver.nfe(steps, False), steps, ts),)
    return out[0] if len(out) == 1 else out


# ------------------------------------------------------------------------------------------- BDIA


class _BDIAState(NamedTuple):
    x_prev: jax.Array  # the state before the current one
    t_prev: jax.Array  # its time
    started: jax.Array  # False before the first step (which is plain DDIM)


class BDIADDIM(AbstractFastSolver):
    """BDIA-DDIM (Zhang, Lewis, Kleijn, 2024) as a fastsample solver; one evaluation per step.

    With ``x0_hat`` the data prediction at ``(x_i, t_i)`` and ``DDIM(x_i, t_i -> t_j)`` the DDIM
    transfer ``alpha_j x0_hat + sigma_j eps_hat`` (either direction)::

        x_{i-1} = DDIM(x_i, t_i -> t_{i-1}) + gamma (x_{i+1} - DDIM(x_i, t_i -> t_{i+1}))

    which is the paper's update; the first step is DDIM. The state holds the previous state and
    time. ``start=(x_prev, t_prev)`` starts from a known previous state instead (the first step is
    then a BDIA step): :func:`bdia_invert` runs ``BDIADDIM(1 / gamma, start=...)`` on the reversed
    grid, which is the algebraic inverse.
    """

    gamma: float = 1.0
    start: tuple | None = None

    name = "bdia_ddim"

    def order(self, terms):
        return 1

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        if self.start is None:
            return _BDIAState(x, jnp.asarray(t_end, x.dtype), jnp.asarray(False))
        x_prev, t_prev = self.start
        return _BDIAState(jnp.asarray(x_prev, x.dtype), jnp.asarray(t_prev, x.dtype), jnp.asarray(True))

    def bdia_parts(self, denoiser, t0, t1, t_prev, x, cond):
        """``(DDIM(x, t0 -> t1), DDIM(x, t0 -> t_prev))`` from one model evaluation. A BDIA step is
        ``forward + gamma (x_prev - backward)``, affine in ``x_prev``: exact inversion and the
        reversible gradients of :mod:`fastsample.gradients` rely on this split."""
        x0_hat = denoiser(x, t0, cond)
        return ddim_step(denoiser.process, t0, t1, x, x0_hat), ddim_step(denoiser.process, t0, t_prev, x, x0_hat)

    def update(self, denoiser, t0, t1, x, cond, state):
        # Before the first BDIA step the backward target is unused; t1 keeps it finite.
        forward, backward = self.bdia_parts(denoiser, t0, t1, jnp.where(state.started, state.t_prev, t1), x, cond)
        gamma = jnp.asarray(self.gamma, x.dtype)
        x1 = jnp.where(state.started, forward + gamma * (state.x_prev - backward), forward)
        return x1, _BDIAState(x, jnp.asarray(t0, x.dtype), jnp.asarray(True))


def bdia_sample(
    denoiser: Denoiser,
    x_T,
    nfe: int | None = 10,
    gamma: float = 1.0,
    schedule: str = "auto",
    *,
    timesteps=None,
    final_zero: bool = False,
    cond: Any = None,
    schedule_options: dict | None = None,
    return_info: bool = False,
):
    """Sample with BDIA-DDIM; returns ``(x_last, x_second_last)`` (what :func:`bdia_invert`
    needs), and a :class:`SampleInfo` when asked for. Grid arguments as in :func:`sample`."""
    _, traj, info = sample(
        denoiser, x_T, BDIADDIM(gamma), nfe, schedule, timesteps=timesteps, final_zero=final_zero, cond=cond,
        schedule_options=schedule_options, return_trajectory=True, return_info=True,
    )
    out = (traj[-1], traj[-2])
    return out + (info,) if return_info else out


def bdia_invert(
    denoiser: Denoiser,
    x_last,
    x_second_last,
    nfe: int | None = 10,
    gamma: float = 1.0,
    schedule: str = "auto",
    *,
    timesteps=None,
    final_zero: bool = False,
    cond: Any = None,
    schedule_options: dict | None = None,
    return_info: bool = False,
):
    """Recover ``x_T`` from the last two states of :func:`bdia_sample` run with the same grid
    arguments and ``gamma`` (``> 0``). Solving the update for ``x_{i+1}``::

        x_{i+1} = DDIM(x_i, t_i -> t_{i+1}) + (x_{i-1} - DDIM(x_i, t_i -> t_{i-1})) / gamma

    is BDIA-DDIM with ``1 / gamma`` on the reversed grid, started from ``(x_last, x_second_last)``;
    it costs one evaluation per step except the first (``nfe - 1``). The returned info's
    ``timesteps`` is the increasing grid walked."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    if isinstance(gamma, (int, float)) and not gamma > 0:
        raise ValueError(f"bdia_invert needs gamma > 0; got {gamma}.")
    x_second_last = jnp.asarray(x_second_last)
    _, ts, steps, _ = resolve_grid(BDIADDIM(gamma), denoiser.process, nfe, schedule, timesteps, final_zero,
                                schedule_options)
    ts = ts.astype(x_second_last.dtype)
    rev = ts[::-1]
    solver = BDIADDIM(1.0 / gamma, start=(jnp.asarray(x_last, x_second_last.dtype), rev[0]))
    x_T, _ = _scan_sample(solver, denoiser, x_second_last, rev[1:], cond, False, False)
    if return_info:
        return x_T, SampleInfo(steps - 1, steps - 1, rev[1:])
    return x_T

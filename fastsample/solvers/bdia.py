"""BDIA-DDIM: bi-directional integration approximation, a reversible solver.

Zhang, Lewis, Kleijn: Exact Diffusion Inversion via Bi-directional Integration Approximation
(ECCV 2024). With ``Delta(t_i -> t_j | x_i)`` the DDIM increment from ``x_i`` at ``t_i`` to ``t_j``
using the one model evaluation at ``(x_i, t_i)``::

    x_{i-1} = x_{i+1} - (1 - gamma) (x_{i+1} - x_i) - gamma Delta(t_i -> t_{i+1} | x_i)
              + Delta(t_i -> t_{i-1} | x_i)

(the backward DDIM step over the previous slot refines the approximation made when ``x_i`` was
computed; ``gamma = 0`` is DDIM, ``gamma = 1`` the paper's choice; the first step is plain
DDIM). The update is linear in ``x_{i+1}``, so ``x_{i+1}`` follows exactly from ``(x_i,
x_{i-1})``: inversion needs the last two states and recovers ``x_T`` to rounding error
(``fastsample.bdia_invert``), and the ``"reversible"`` gradient mode needs no stored trajectory.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .base import AbstractFastSolver
from .exponential import ddim_step

__all__ = ["AbstractReversibleSolver", "BDIADDIM"]


class AbstractReversibleSolver(AbstractFastSolver):
    """Capability: a two-state step ``x_{k+1} = forward(x_k) + gamma (x_{k-1} - backward(x_k))``
    with ``gamma > 0``, invertible exactly: given ``(x_{k+1}, x_k)``, ``x_{k-1}`` follows. The
    ``"reversible"`` gradient mode (:class:`fastsample.gradients.Reversible`) inverts steps in its
    backward pass instead of storing them."""

    gamma: eqx.AbstractVar[float]
    #: a known ``(x_prev, t_prev)`` before the first step; ``None``: the first step is ``forward`` alone
    start: eqx.AbstractVar[tuple | None]

    @abc.abstractmethod
    def bdia_parts(self, denoiser, t0, t1, t_prev, x, cond):
        """``(forward, backward)`` of the step from ``x`` at ``t0`` (to ``t1``; previous time
        ``t_prev``), from one model evaluation."""


class _BDIAState(NamedTuple):
    x_prev: jax.Array  # the state before the current one
    t_prev: jax.Array  # its time
    started: jax.Array  # False before the first step (which is plain DDIM)


class BDIADDIM(AbstractReversibleSolver):
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

    def update(self, denoiser, t0, t1, x, cond, state, noise=None):
        # Before the first BDIA step the backward target is unused; t1 keeps it finite.
        forward, backward = self.bdia_parts(denoiser, t0, t1, jnp.where(state.started, state.t_prev, t1), x, cond)
        gamma = jnp.asarray(self.gamma, x.dtype)
        x1 = jnp.where(state.started, forward + gamma * (state.x_prev - backward), forward)
        return x1, _BDIAState(x, jnp.asarray(t0, x.dtype), jnp.asarray(True))

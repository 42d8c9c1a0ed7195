"""DEIS: the multistep exponential integrator of Zhang & Chen, Fast Sampling of Diffusion Models
with Exponential Integrator (ICLR 2023), "tAB-DEIS".

In prediction variables (``exponential.py``) the exact solution of the PF-ODE over a step is

    x1 = (kappa1 / kappa0) x + beta1 * int_{ell0}^{ell1} exp(-(ell1 - ell)) m(ell) d ell,

with ``m`` the model output (noise prediction, the paper's choice, or data prediction).
tAB-DEIS replaces ``m`` by the Lagrange polynomial through the current and the ``order - 1``
previous outputs and integrates the weight times each Lagrange basis polynomial ``l_j``:

    b_j = int_{ell0}^{ell1} exp(-(ell1 - ell)) l_j(ell) d ell
        = h int_0^1 exp(-h (1 - s)) l_j(ell0 + s h) ds,            h = ell1 - ell0,

computed by Gauss-Legendre quadrature (``_QUAD_NODES`` nodes on ``[0, 1]``).

``basis`` picks the variable the polynomial lives in:

* ``"log_snr"`` (default): polynomial in ``ell`` (``-lambda = log(sigma/alpha)`` for noise
  prediction, ``lambda`` for data prediction). For noise prediction this is diffusers'
  ``DEISMultistepScheduler`` ("polynomial fitting in log-rho space", ``rho = sigma/alpha``, whose
  closed-form coefficients integrate ``d rho = e^ell d ell``): the same numbers. For data
  prediction and order 2 it equals DPM-Solver++(2M) in its Taylor ("heun") form.
* ``"t"``: polynomial in the process time ``t``, the paper's original tAB (the repository's
  ``t_ab``); the same integral, evaluated at the times ``t(ell)`` of the quadrature nodes.

The paper's "tAB-r" fits a polynomial of degree ``r`` (``r + 1`` points, global order ``r + 1``);
here ``order = r + 1`` is the number of points and the expected global order, so ``order=1`` is
tAB-0 = DDIM and ``order=4`` is tAB-3.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .base import AbstractLinearSolver
from .exponential import (
    AbstractMultistepSolver,
    ell_to_time,
)

__all__ = ["DEIS", "lagrange_exp_weights"]

_QUAD_NODES = 16
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_QUAD_NODES)
#: Gauss-Legendre nodes and weights on [0, 1]
_S = 0.5 * (_GL_X + 1.0)
_W = 0.5 * _GL_W


def _lagrange_basis(nodes, x):
    """``l_j(x)`` for the (static-length) ``nodes``: shape ``(len(nodes), *x.shape)``."""
    out = []
    for j in range(len(nodes)):
        lj = jnp.ones_like(x)
        for k in range(len(nodes)):
            if k != j:
                lj = lj * (x - nodes[k]) / (nodes[j] - nodes[k])
        out.append(lj)
    return jnp.stack(out)


def lagrange_exp_weights(h, nodes, to_var=None):
    """``b_j = h int_0^1 exp(-h (1 - s)) l_j(v(s)) ds`` for the Lagrange basis ``l_j`` through
    ``nodes``, by Gauss-Legendre quadrature; ``s = (ell - ell0) / h``.

    The polynomial lives in a variable ``v``: by default ``v = s`` (i.e. ``ell``, the log-SNR
    basis) and ``nodes`` are ``s_j = (ell_j - ell0) / h``; otherwise ``to_var`` maps ``s`` to ``v``
    (e.g. to the time ``t``) and ``nodes`` are given in ``v``. Returns shape ``(len(nodes),)``."""
    s = jnp.asarray(_S, dtype=h.dtype)
    w = jnp.asarray(_W, dtype=h.dtype) * h * jnp.exp(-h * (1.0 - s))
    return _lagrange_basis(nodes, s if to_var is None else to_var(s)) @ w


class DEIS(AbstractMultistepSolver, AbstractLinearSolver):
    """tAB-DEIS of ``order`` 1-4 (tAB-0 ... tAB-3): one model evaluation per step, the weights of
    the exponential integral of the Lagrange interpolant of the outputs by Gauss-Legendre quadrature.

    Fields: ``order`` (points of the interpolant = global order; default 3), ``prediction``
    (``"eps"`` as in the paper, or ``"x0"``), ``basis`` (``"log_snr"``, diffusers' choice, or ``"t"``,
    the paper's), ``lower_order_final`` (see :class:`AbstractMultistepSolver`). Order 1, warm-up
    steps with no history and a step to ``t = 0`` are DDIM steps.
    """

    order: int = eqx.field(static=True, default=3)
    prediction: str = eqx.field(static=True, default="eps")
    lower_order_final: bool = eqx.field(static=True, default=True)
    basis: str = eqx.field(static=True, default="log_snr")

    max_order: ClassVar[int] = 4
    name: ClassVar[str] = "deis"

    def __check_init__(self):
        if self.basis not in ("log_snr", "t"):
            raise ValueError(f"DEIS basis must be 'log_snr' or 't'; got {self.basis!r}.")

    def _s_nodes(self, c, state):
        """Nodes ``s_j = (ell_j - ell0) / h`` (``s_0 = 0``); unfilled history gets ``-(j + 1)``
        (never selected, keeps the basis finite). ``History.push`` restarts the count after an
        output at ``ell = -inf`` (pure noise), so filled entries have finite ``ell``."""
        nodes = [jnp.zeros_like(c.h)]
        for j in range(self.history_size):
            filled = state.count > j
            s = (jnp.where(filled, state.ells[j], c.ell0 - (j + 1.0)) - c.ell0) / c.h
            nodes.append(jnp.where(filled, s, -(j + 1.0)))
        return nodes

    def _select(self, per_order, order):
        size = self.history_size + 1
        rows = [jnp.concatenate([w, jnp.zeros((size - w.shape[0],), w.dtype)]) for w in per_order]
        return jnp.stack(rows)[jnp.clip(order, 1, size) - 1]

    def weights(self, process, c, state, order):
        if self.basis == "t":
            return self._time_weights(process, c, state, order)
        nodes = self._s_nodes(c, state)
        per_order = [lagrange_exp_weights(c.h, nodes[:p]) for p in range(1, self.history_size + 2)]
        return self._select(per_order, order)

    def _time_weights(self, process, c, state, order):
        """Weights for the time basis: the Lagrange polynomial in ``t`` through the times of the
        current and earlier outputs, integrated against the same weight in ``ell``."""
        ell0 = jnp.where(jnp.isfinite(c.ell0), c.ell0, 0.0)  # first step at alpha = 0: never selected
        to_t = lambda s: ell_to_time(process, ell0 + s * c.h, self.prediction)
        t_start, t_stop = to_t(jnp.zeros_like(c.h)), to_t(jnp.ones_like(c.h))
        t_nodes = [t_start]
        for j in range(self.history_size):
            # unfilled history (never selected): distinct finite times before t_start
            t_nodes.append(jnp.where(state.count > j, ell_to_time(process, state.ells[j], self.prediction),
                                     t_start + (j + 1.0) * (t_start - t_stop)))
        per_order = []
        for p in range(1, self.history_size + 2):
            per_order.append(lagrange_exp_weights(c.h, t_nodes[:p], to_var=to_t))
        return self._select(per_order, order)

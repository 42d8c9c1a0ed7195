"""Machinery shared by several solver families (private to :mod:`fastsample.solvers`).

- :func:`vandermonde_solve`: the transposed Vandermonde systems of UniPC and SA-Solver, in closed
  form (Lagrange coefficients), with :func:`step_ratios`, :func:`select_order` and :func:`pad_zeros`
  for the order-selection bookkeeping around them;
- :func:`dpm_weights`: the DPM-Solver(++) multistep weights (ODE and SDE variants);
- :func:`check_nonnegative`: the option check of the stochastic solvers.
"""

from __future__ import annotations

import jax.numpy as jnp

from .exponential import phi

__all__ = ["vandermonde_solve", "step_ratios", "select_order", "pad_zeros", "dpm_weights", "check_nonnegative"]


def vandermonde_solve(rs, b):
    """``rho`` with ``sum_k rho_k r_k^n = b_n`` (``n = 0..q-1``), a transposed Vandermonde system,
    in closed form: ``rho_k = sum_n c_kn b_n`` with ``c_k`` the coefficients of the Lagrange
    polynomial ``L_k(r) = prod_(j != k) (r - r_j) / (r_k - r_j)`` (elementwise scalar work that
    fuses, unlike a linear solve)."""
    q = len(rs)
    if q == 1:
        return [b[0]]
    rho = []
    for k in range(q):
        coeffs, denom = [jnp.ones_like(rs[k])], jnp.ones_like(rs[k])
        for j in range(q):
            if j != k:  # multiply by (r - r_j)
                coeffs = [-rs[j] * coeffs[0]] + [coeffs[n - 1] - rs[j] * coeffs[n] for n in range(1, len(coeffs))] \
                    + [coeffs[-1]]
                denom = denom * (rs[k] - rs[j])
        rho.append(sum(c * bn for c, bn in zip(coeffs, b[:q], strict=True)) / denom)
    return rho


def step_ratios(ells, ell_ref, h, count, first: int, n: int):
    """``r_k = (ells[first + k - 1] - ell_ref) / h`` for ``k = 1..n``; entries not (yet) in the
    history get distinct dummies ``-k`` (never selected; keeps the solves regular)."""
    out = []
    for k in range(1, n + 1):
        valid = first + k - 1 < count
        # inputs of the unselected branch made finite too, so that gradients stay finite
        diff = jnp.where(valid, ells[first + k - 1], 0.0) - jnp.where(valid, ell_ref, 0.0)
        out.append(jnp.where(valid, diff / h, -float(k)))
    return out


def select_order(order, candidates):
    """Pick ``candidates[q - 1]`` (equal-length lists of scalars) for the traced ``order``."""
    stacked = jnp.stack([jnp.stack(c) for c in candidates])
    out = stacked[0]
    for q in range(2, len(candidates) + 1):
        out = jnp.where(order == q, stacked[q - 1], out)
    return out


def pad_zeros(values, size, like):
    return list(values) + [jnp.zeros_like(like)] * (size - len(values))



def dpm_weights(h, r0, r1, order, midpoint: bool, size: int, d2_factor: float = 1.0):
    """Weights of ``m_0, m_1, m_2`` (newest first) for orders 1-3 (DPM-Solver++ Algorithm 2 and
    its third-order extension), selected by the traced ``order``; ``r_j`` are ratios of earlier
    steps to ``h``.

    The published third-order update ``... - beta1 phi_3 D2`` uses ``D2 ~ h^2 m''/2``, while
    integrating the quadratic interpolant exactly needs ``2 phi_3 D2``: with ``d2_factor=1`` (the
    reference implementations' numbers) the method is exact for linear, not quadratic, outputs and
    converges with order 2; ``d2_factor=2`` gives the third-order method."""
    z = -h
    e1 = jnp.expm1(z)  # expm1(-h)
    e2 = h * phi(2, z)  # expm1(-h)/h + 1
    e3 = z * phi(3, z)  # e2/h - 1/2
    zero = jnp.zeros_like(h)  # (not 0 * r: a point at lambda = -inf has r = inf)
    w1 = jnp.stack([-e1, zero, zero])
    if midpoint:
        w2 = jnp.stack([-e1 - 0.5 * e1 / r0, 0.5 * e1 / r0, zero])
    else:
        w2 = jnp.stack([-e1 + e2 / r0, -e2 / r0, zero])
    d10 = jnp.stack([1.0 / r0, -1.0 / r0, zero])
    d11 = jnp.stack([zero, 1.0 / r1, -1.0 / r1])
    d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
    d2 = (d10 - d11) / (r0 + r1)
    w3 = w1 + e2 * d1 - d2_factor * e3 * d2
    w = jnp.where(order == 1, w1, jnp.where(order == 2, w2, w3))
    return w[:size]


def check_nonnegative(solver, field, value):
    try:
        bad = not float(value) >= 0
    except (TypeError, ValueError):  # traced values are not checked
        return
    if bad:
        raise ValueError(f"{solver}: {field} must be >= 0; got {value}.")

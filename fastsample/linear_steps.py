"""A solver's scalar work hoisted out of the sampling loop: per-step linear tables.

Every deterministic solver here is linear in the state ``x``, its own state arrays (histories of
earlier outputs, a corrector's previous point) and the data predictions of the step, with
coefficients that depend on the grid only (the fact :mod:`fastsample.learned.program` uses for
whole runs). With basis ``b = (x, s_1 .. s_S, D_1 .. D_K)``, step ``i`` is

    y_k  = sum_j Y[i, k, j] b_j        (input of model call k at time tau[i, k]; D_j for j < k only)
    x'   = sum_j X[i, j] b_j
    s'_r = sum_j R[i, r, j] b_j

:func:`step_tables` reads ``tau, Y, X, R`` off the solver's own ``update``, run on unit probe
vectors of length ``1 + S + K`` (one entry per basis element). The sampling loop's body is then
``K`` model calls and one elementwise combination, which XLA fuses into one kernel, instead of
the solver's array work as separate kernels and copies. When the grid is known while a caller's
``jit`` traces (``sample(..., timesteps=ts)`` with ``ts`` computed outside), :func:`concrete_tables`
computes the tables once and the program holds them as constants, with the terms that are zero
in every step dropped and history shifts reduced to copies: the loop does no scalar work at all
(log-SNRs, phi-functions, order selection, history bookkeeping). Otherwise (an eager call, a
traced grid) :func:`probing_body` works out each step's row inside the loop from the solver's
scalar state: the same result, one compilation. On an accelerator the solver's arithmetic then
vanishes beside the network (``scripts/bench_accelerator``).

A solver takes this path when it declares ``linear_steps = True`` (see
:class:`fastsample.solvers.AbstractFastSolver`) and carries at most :data:`MAX_SLOTS` state
arrays; otherwise :func:`fastsample.sample` calls ``update`` in every step.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .denoisers import Denoiser

__all__ = ["StepTables", "Unsupported", "step_tables", "concrete_tables", "initial_slots", "linear_body",
           "probing_body", "MAX_SLOTS", "MAX_CALLS"]

#: at most this many state arrays (elements of the solver's state that are shaped like ``x``)
MAX_SLOTS = 12
#: at most this many model calls per step
MAX_CALLS = 4


class Unsupported(Exception):
    """The solver cannot be written as per-step tables (the reason is the message)."""


class StepTables(NamedTuple):
    """Per-step coefficients of a linear solver (see the module docstring). ``terms`` is static:
    for each output (the ``K`` model inputs, then ``x'``, then the ``S`` state arrays) the basis
    elements it combines, or ``-1 - j`` when it is basis element ``j`` itself in every step (a
    copy: no arithmetic, and XLA can reuse the buffer)."""

    tau: jax.Array  # (steps, K) model call times
    Y: jax.Array  # (steps, K, N) model inputs
    X: jax.Array  # (steps, N) the next state
    R: jax.Array  # (steps, S, N) the next state arrays
    terms: tuple

    @property
    def num_slots(self) -> int:
        return self.R.shape[1]

    @property
    def num_calls(self) -> int:
        return self.Y.shape[1]


class _Layout(NamedTuple):
    treedef: object
    slot_leaves: tuple[int, ...]  # indices of the leaves that are arrays shaped like x
    leads: tuple[tuple[int, ...], ...]  # their leading shapes

    @property
    def size(self) -> int:
        return sum(int(np.prod(lead)) for lead in self.leads)


def _layout(solver, process, x_shape, dtype, t_end, steps) -> _Layout:
    """Which leaves of the solver's state are shaped like ``x`` (compared across probe sizes)."""
    def shapes(shape):
        den = Denoiser(lambda y, t, c: jnp.zeros_like(y), process, prediction="x0")
        struct = jax.ShapeDtypeStruct(shape, dtype)
        return jax.eval_shape(lambda y: solver.init_state(den, y, None, t_end, steps), struct)

    two, three = shapes((2,)), shapes((3,))
    real = two if x_shape is None else shapes(x_shape)  # None: no check against the real shape
    leaves_r, treedef = jax.tree.flatten(real)
    leaves_2, leaves_3 = jax.tree.leaves(two), jax.tree.leaves(three)
    if not len(leaves_r) == len(leaves_2) == len(leaves_3):
        raise Unsupported("the state's structure depends on the shape of x")
    slots, leads = [], []
    for i, (r, a, b) in enumerate(zip(leaves_r, leaves_2, leaves_3, strict=True)):
        if a.shape == b.shape:
            if x_shape is not None and r.shape != a.shape:
                raise Unsupported("a state leaf's shape depends on x in an unrecognised way")
            continue
        lead = a.shape[:-1]
        if a.shape[-1:] != (2,) or b.shape != lead + (3,) or (x_shape is not None and r.shape != lead + tuple(x_shape)):
            raise Unsupported("a state leaf is not an array of states shaped like x")
        slots.append(i)
        leads.append(tuple(lead))
    return _Layout(treedef, tuple(slots), tuple(leads))


def _with_basis(state, layout: _Layout, eye):
    """``state`` with its slot leaves replaced by unit vectors ``eye[1], eye[2], ...``."""
    leaves = jax.tree.leaves(state)
    offset = 1
    for i, lead in zip(layout.slot_leaves, layout.leads, strict=True):
        n = int(np.prod(lead))
        leaves[i] = eye[offset:offset + n].reshape(lead + (eye.shape[1],))
        offset += n
    return jax.tree.unflatten(layout.treedef, leaves)


def _slot_rows(state, layout: _Layout, like):
    """The slot leaves of a probe state as rows ``(S, N)``."""
    leaves = jax.tree.leaves(state)
    rows = [leaves[i].reshape((-1, like.shape[0])) for i in layout.slot_leaves]
    return jnp.concatenate(rows) if rows else jnp.zeros((0, like.shape[0]), like.dtype)


def _scalars(state, layout: _Layout):
    """The leaves of ``state`` that are not state arrays."""
    leaves = jax.tree.leaves(state)
    return [leaf for i, leaf in enumerate(leaves) if i not in layout.slot_leaves]


class _Prober(NamedTuple):
    """A solver run on unit probe vectors: ``step(scalars, t0, t1) -> (scalars, row)`` gives one
    step's row ``(tau (K,), Y (K, N), X (N,), R (S, N))`` from the solver's scalar state; ``on_x``
    (filled while ``step`` traces) says which calls are made at ``x`` itself."""

    scalars: list
    step: object
    num_slots: int
    on_x: list

    def terms(self, num_calls: int) -> tuple:
        """Dense ``terms`` (every basis element), except calls made at ``x`` itself."""
        S = self.num_slots
        dense = tuple(range(1 + S + num_calls))
        return tuple(-1 if on else tuple(range(1 + S + k)) for k, on in enumerate(self.on_x)) + (dense,) * (1 + S)


def _prober(solver, process, t_end, x_shape, dtype, num_steps: int) -> _Prober:
    if not getattr(solver, "linear_steps", False):
        raise Unsupported(f"{solver.name} does not declare linear_steps")
    layout = _layout(solver, process, x_shape, dtype, t_end, num_steps)
    S = layout.size
    if S > MAX_SLOTS:
        raise Unsupported(f"{S} state arrays (more than {MAX_SLOTS})")
    eye = jnp.eye(1 + S + MAX_CALLS, dtype=dtype)
    e0 = eye[0]  # the probe of x; a model call made at x itself receives this very object
    den0 = Denoiser(lambda y, t, c: jnp.zeros_like(y), process, prediction="x0")
    init = solver.init_state(den0, e0, None, t_end, num_steps)
    slot_leaves = {i: leaf for i, leaf in enumerate(jax.tree.leaves(_with_basis(init, layout, eye)))
                   if i in layout.slot_leaves}
    on_x = []

    def step(scalars, t0, t1):
        it = iter(scalars)
        leaves = [slot_leaves[i] if i in slot_leaves else next(it) for i in range(len(slot_leaves) + len(scalars))]
        calls = []

        def model(y, t, c):
            if len(calls) >= MAX_CALLS:
                raise Unsupported(f"more than {MAX_CALLS} model calls per step")
            calls.append((y, jnp.asarray(t, dtype)))
            return eye[1 + S + len(calls) - 1]

        den = Denoiser(model, process, prediction="x0")
        x1, new = solver.update(den, t0, t1, e0, None, jax.tree.unflatten(layout.treedef, leaves))
        if not calls:
            raise Unsupported("a step without model calls")
        on_x[:] = [y is e0 for y, _ in calls]
        keep = 1 + S + len(calls)  # drop the probe columns of calls that never happen
        row = (jnp.stack([t for _, t in calls]), jnp.stack([y[:keep] for y, _ in calls]), x1[:keep],
               _slot_rows(new, layout, e0)[:, :keep])
        return _scalars(new, layout), row

    return _Prober(_scalars(init, layout), step, S, on_x)


def step_tables(solver, process, ts, x_shape: tuple[int, ...] | None, dtype, num_steps: int) -> StepTables:
    """The tables of ``solver`` on the grid ``ts`` for states of shape ``x_shape`` (``None``: not
    checked) and ``dtype``, by one ``lax.scan`` of the probes. Raises :class:`Unsupported` when the
    solver does not fit (the caller then steps ``update`` itself)."""
    prober = _prober(solver, process, ts[-1], x_shape, dtype, num_steps)
    _, (tau, Y, X, R) = jax.lax.scan(lambda sc, i: prober.step(sc, ts[i], ts[i + 1]), prober.scalars,
                                     jnp.arange(num_steps))
    return StepTables(tau, Y, X, R, prober.terms(Y.shape[1]))


def _sparsity(tables: StepTables) -> tuple:
    """``terms`` read off concrete tables: the basis elements with a non-zero coefficient in some
    step, and copies (a unit coefficient on one element in every step)."""
    out = []
    for coeffs in [np.asarray(tables.Y)[:, k] for k in range(tables.num_calls)] + [np.asarray(tables.X)] + \
            [np.asarray(tables.R)[:, r] for r in range(tables.num_slots)]:
        used = tuple(int(j) for j in np.flatnonzero(np.any(coeffs != 0, axis=0)))
        copy = len(used) == 1 and bool(np.all(coeffs[:, used[0]] == 1))
        out.append(-1 - used[0] if copy else used)
    return tuple(out)


def initial_slots(solver, process, x, t_end, num_steps: int) -> tuple:
    """The solver's initial state arrays for the real ``x``, in the order of the tables."""
    layout = _layout(solver, process, x.shape, x.dtype, t_end, num_steps)
    den = Denoiser(lambda y, t, c: jnp.zeros_like(y), process, prediction="x0")
    leaves = jax.tree.leaves(solver.init_state(den, x, None, t_end, num_steps))
    return tuple(a for i in layout.slot_leaves for a in leaves[i].reshape((-1,) + x.shape))


_concrete = eqx.filter_jit(step_tables)


def concrete_tables(solver, process, ts, x_shape, dtype, num_steps: int) -> StepTables | None:
    """The tables as constants of the program being traced, when a caller's ``jit`` traces the
    sampler with a concrete grid (``sample(..., timesteps=ts)``, ``ts`` computed outside): one compiled
    call computes them now, and the loop then does no scalar work at all. ``None`` outside a trace
    (an eager call: :func:`probing_body` works out each step's row inside the loop, one
    compilation instead of two) and when the grid, solver or process is traced."""
    if not is_traced(jnp.zeros(())) or any(is_traced(leaf) for leaf in jax.tree.leaves((solver, process, ts))):
        return None
    _layout(solver, process, tuple(x_shape), dtype, ts[-1], num_steps)  # the state fits the real x
    with jax.ensure_compile_time_eval():  # evaluated now, not staged into the caller's program
        tables = _concrete(solver, process, ts, None, dtype, num_steps)  # one program for every batch shape
    return tables._replace(terms=_sparsity(tables))


def _combine(coeffs, arrays, terms):
    """``sum_j coeffs[j] arrays[j]`` over the ``terms`` (or ``arrays[-1 - terms]``, a copy)."""
    if isinstance(terms, int):
        return arrays[-1 - terms]
    if not terms:
        return jnp.zeros_like(arrays[0])
    total = None
    for j in terms:
        term = coeffs[j].astype(arrays[j].dtype) * arrays[j]
        total = term if total is None else total + term
    return total


def _apply(row, terms, denoiser, cond, x, slots):
    """One step from its row: the model calls, then ``x'`` and the state arrays."""
    tau, Y, X, R = row
    K, S = Y.shape[0], R.shape[0]
    basis = [x, *slots]
    for k in range(K):
        basis.append(denoiser(_combine(Y[k], basis, terms[k]), tau[k], cond))
    return _combine(X, basis, terms[K]), tuple(_combine(R[r], basis, terms[K + 1 + r]) for r in range(S))


def linear_body(tables: StepTables, denoiser, cond):
    """One step of the sampling loop, ``(x, slots), i -> (x', slots')``, from the tables."""

    def body(carry, i):
        return _apply((tables.tau[i], tables.Y[i], tables.X[i], tables.R[i]), tables.terms, denoiser, cond, *carry)

    return body


def probing_body(solver, denoiser, x, ts, cond, num_steps: int):
    """``(body, carry)``: the sampling loop that works out each step's row inside the loop (from
    the solver's scalar state, carried along) and applies it as one fused update; the first carry
    is ``(x, slots, scalars)``. Raises :class:`Unsupported` as :func:`step_tables` does."""
    process = denoiser.process
    prober = _prober(solver, process, ts[-1], x.shape, x.dtype, num_steps)

    def body(carry, i):
        x, slots, scalars = carry
        scalars, row = prober.step(scalars, ts[i], ts[i + 1])
        return *_apply(row, prober.terms(row[1].shape[0]), denoiser, cond, x, slots), scalars

    return body, (x, initial_slots(solver, process, x, ts[-1], num_steps), prober.scalars)

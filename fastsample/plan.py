"""The plan of a solve: a linear solver's per-step coefficients, computed on the host.

Every deterministic solver here that declares :class:`~fastsample.solvers.AbstractLinearSolver`
is linear in the state ``x``, its own state arrays (histories of earlier outputs, a corrector's
previous point) and the data predictions of the step, with coefficients that depend on the grid
only. With basis ``b = (x, s_1 .. s_S, D_1 .. D_K)``, step ``i`` is

    y_k  = sum_j Y[i, k, j] b_j        (input of model call k at time tau[i, k]; D_j for j < k only)
    x'   = sum_j X[i, j] b_j
    s'_r = sum_j R[i, r, j] b_j

and the state arrays start as ``s_r = c_r x_T``. :func:`make_plan` reads ``tau, Y, X, R`` and
``c`` off the solver's own ``update``, run on unit probe vectors of length ``1 + S + K`` (one entry
per basis element), for every phase of the solver (:func:`fastsample.solvers.phases_of`), in one
compiled ``lax.scan`` per phase evaluated on the host in float64. The sampling loop's body is then
``K`` model calls and one elementwise combination (:func:`table_body`), which XLA fuses into one
kernel; the terms that are zero in every step are dropped and history shifts are copies. A plan
depends on the solver, the process and the grid's values only (not on ``x``): it is computed once
per configuration and cached, also while a caller's ``jit`` traces (its arrays are then constants
of the program).

The same coefficients give the solver's whole run as one linear program (:func:`whole_run`):
evaluation ``k`` happens at ``y_k = a_k x_T + sum_{j<k} B_kj D_j``, which fitted solvers
(:mod:`fastsample.learned`) and Picard iteration (:mod:`fastsample.parallel`) use.

When the grid (or the solver, or the process) is traced, nothing is known on the host:
:func:`probing_body` works out each step's row inside the loop from the solver's scalar state and
applies it the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import ValueCache, is_traced
from .denoisers import Denoiser
from .solvers import AbstractLinearSolver, AbstractStochasticSolver, phases_of, supports

__all__ = ["StepTables", "Plan", "Unsupported", "PROBE_ERRORS", "make_plan", "whole_run", "linear_program",
           "table_body", "probing_body", "apply_row", "initial_slots", "MAX_SLOTS", "MAX_CALLS"]

#: at most this many state arrays (elements of the solver's state that are shaped like ``x``)
MAX_SLOTS = 12
#: at most this many model calls per step
MAX_CALLS = 4


class Unsupported(Exception):
    """The solver cannot be written as per-step tables (the reason is the message)."""


class StepTables(NamedTuple):
    """Per-step coefficients of one phase (see the module docstring). ``terms`` is static: for each
    output (the ``K`` model inputs, then ``x'``, then the ``S`` state arrays) the basis elements it
    combines, or ``-1 - j`` when it is basis element ``j`` itself in every step (a copy: no
    arithmetic, and XLA can reuse the buffer)."""

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

    @property
    def steps(self) -> int:
        return self.Y.shape[0]

    def astype(self, dtype) -> StepTables:
        return StepTables(*(jnp.asarray(a, dtype) for a in self[:4]), self.terms)


class Plan(NamedTuple):
    """A linear solver on a concrete grid: the tables of each phase and ``init`` (static floats),
    the coefficients of ``x_T`` in the starting state arrays."""

    phases: tuple[StepTables, ...]
    init: tuple[float, ...]

    @property
    def calls_per_step(self) -> tuple[int, ...]:
        return tuple(k for p in self.phases for k in [p.num_calls] * p.steps)

    def astype(self, dtype) -> Plan:
        return Plan(tuple(p.astype(dtype) for p in self.phases), self.init)


# ----------------------------------------------------------------------------------- probing


class _Layout(NamedTuple):
    treedef: object
    slot_leaves: tuple[int, ...]  # indices of the leaves that are arrays shaped like x
    leads: tuple[tuple[int, ...], ...]  # their leading shapes

    @property
    def size(self) -> int:
        return sum(int(np.prod(lead)) for lead in self.leads)


def _zero_denoiser(process) -> Denoiser:
    return Denoiser(lambda y, t, c: jnp.zeros_like(y), process, prediction="x0")


def _layout(solver, process, dtype, t_end, steps) -> _Layout:
    """Which leaves of the solver's state are shaped like ``x`` (compared across probe sizes)."""

    def shapes(n):
        struct = jax.ShapeDtypeStruct((n,), dtype)
        return jax.eval_shape(lambda y: solver.init_state(_zero_denoiser(process), y, None, t_end, steps), struct)

    two, three = shapes(2), shapes(3)
    leaves_2, treedef = jax.tree.flatten(two)
    leaves_3 = jax.tree.leaves(three)
    if len(leaves_2) != len(leaves_3):
        raise Unsupported("the state's structure depends on the shape of x")
    slots, leads = [], []
    for i, (a, b) in enumerate(zip(leaves_2, leaves_3, strict=True)):
        if a.shape == b.shape:
            continue
        lead = a.shape[:-1]
        if a.shape[-1:] != (2,) or b.shape != lead + (3,):
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


def _slot_rows(state, layout: _Layout, width: int, dtype):
    """The slot leaves of a probe state as rows ``(S, width)``."""
    leaves = jax.tree.leaves(state)
    rows = [leaves[i].reshape((-1, width)) for i in layout.slot_leaves]
    return jnp.concatenate(rows) if rows else jnp.zeros((0, width), dtype)


def _scalars(state, layout: _Layout):
    """The leaves of ``state`` that are not state arrays."""
    return [leaf for i, leaf in enumerate(jax.tree.leaves(state)) if i not in layout.slot_leaves]


class _Prober(NamedTuple):
    """A solver run on unit probe vectors. ``scalars`` is the initial scalar state, ``init`` the
    coefficients of ``x`` in the initial state arrays; ``step(variant, scalars, t0, t1) -> (scalars, row)``
    gives one step's row ``(tau (K,), Y (K, N), X (N,), R (S, N))``; ``on_x`` (filled while
    ``step`` traces) says which calls are made at ``x`` itself."""

    scalars: list
    init: tuple[float, ...]
    step: object
    num_slots: int
    on_x: list

    def terms(self, num_calls: int) -> tuple:
        """Dense ``terms`` (every basis element), except calls made at ``x`` itself."""
        S = self.num_slots
        dense = tuple(range(1 + S + num_calls))
        return tuple(-1 if on else tuple(range(1 + S + k)) for k, on in enumerate(self.on_x)) + (dense,) * (1 + S)


def _prober(solver, process, t_end, dtype, num_steps: int) -> _Prober:
    layout = _layout(solver, process, dtype, t_end, num_steps)
    S = layout.size
    if S > MAX_SLOTS:
        raise Unsupported(f"{S} state arrays (more than {MAX_SLOTS})")
    with jax.ensure_compile_time_eval():  # the starting state arrays are known while tracing
        eye = jnp.eye(1 + S + MAX_CALLS, dtype=dtype)
        e0 = eye[0]  # the probe of x; a model call made at x itself receives this very object
        init_state = solver.init_state(_zero_denoiser(process), e0, None, t_end, num_steps)
        init_rows = _slot_rows(init_state, layout, eye.shape[0], dtype)
    if is_traced(init_rows):
        raise Unsupported(f"{solver.name}'s starting state arrays depend on traced values")
    init_rows = np.asarray(init_rows)
    if np.any(init_rows[:, 1:] != 0):
        raise Unsupported(f"{solver.name}'s starting state is not a multiple of x")
    slot_leaves = {i: leaf for i, leaf in enumerate(jax.tree.leaves(_with_basis(init_state, layout, eye)))
                   if i in layout.slot_leaves}
    on_x = []

    def step(variant, scalars, t0, t1):
        it = iter(scalars)
        leaves = [slot_leaves[i] if i in slot_leaves else next(it) for i in range(len(slot_leaves) + len(scalars))]
        calls = []

        def model(y, t, c):
            if len(calls) >= MAX_CALLS:
                raise Unsupported(f"more than {MAX_CALLS} model calls per step")
            calls.append((y, jnp.asarray(t, dtype)))
            return eye[1 + S + len(calls) - 1]

        den = Denoiser(model, process, prediction="x0")
        x1, new = variant.update(den, t0, t1, e0, None, jax.tree.unflatten(layout.treedef, leaves))
        if not calls:
            raise Unsupported("a step without model calls")
        on_x[:] = [y is e0 for y, _ in calls]
        keep = 1 + S + len(calls)  # drop the probe columns of calls that never happen
        row = (jnp.stack([t for _, t in calls]), jnp.stack([y[:keep] for y, _ in calls]), x1[:keep],
               _slot_rows(new, layout, eye.shape[0], dtype)[:, :keep])
        return _scalars(new, layout), row

    return _Prober(_scalars(init_state, layout), tuple(float(c) for c in init_rows[:, 0]), step, S, on_x)


#: what running a solver on probe vectors raises when it does not fit the tables (model calls under
#: ``lax.cond``, state that depends on the values of ``x``): the caller then steps ``update``
PROBE_ERRORS = (jax.errors.UnexpectedTracerError, jax.errors.ConcretizationTypeError, TypeError, ValueError)


def _check_linear(solver) -> None:
    if isinstance(solver, AbstractStochasticSolver):
        raise Unsupported(f"{solver.name} is stochastic")
    if not supports(solver, AbstractLinearSolver):
        raise Unsupported(f"{solver.name} is not an AbstractLinearSolver")


def _variants(solver, num_steps: int, ends_at_zero: bool):
    _check_linear(solver)
    runs = phases_of(solver, num_steps, ends_at_zero)
    for _, variant in runs:
        _check_linear(variant)
    return runs


# ------------------------------------------------------------------------------ concrete plans


def _bucket(n: int) -> int:
    """The scan length a phase of ``n`` steps is computed with: a power of two, at least 32, so
    that grids of different step counts share one compiled plan (every few-step grid one; the
    extra probe steps cost microseconds)."""
    return max(32, 1 << max(n - 1, 0).bit_length())


@eqx.filter_jit
def _tables(solver, variants, process, times, t_end, num_steps, starts, lengths, buckets):
    """Each phase's rows, from ``lengths[p]`` steps of a scan of ``buckets[p]`` (static); steps past
    a phase's end leave the scalar state unchanged and their rows are dropped by the caller.
    ``times`` is padded with its last time."""
    dtype = times.dtype
    prober = _prober(solver, process, t_end, dtype, num_steps)
    scalars, out = prober.scalars, [jnp.asarray(prober.init, dtype)]
    for variant, start, n, bucket in zip(variants, starts, lengths, buckets, strict=True):
        def body(sc, j, variant=variant, start=start, n=n):
            i = start + j
            new, row = prober.step(variant, sc, times[i], times[i + 1])
            return jax.tree.map(lambda a, b: jnp.where(j < n, a, b), new, sc), row

        scalars, rows = jax.lax.scan(body, scalars, jnp.arange(bucket))
        out.append(rows)
    return out


def _as_float64(tree):
    """``tree`` with its floating-point array leaves as new float64 JAX arrays."""
    def cast(leaf):
        if isinstance(leaf, np.ndarray | jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.array(np.array(leaf, np.float64))
        return leaf

    return jax.tree.map(cast, tree)


def _sparsity(tables: StepTables) -> tuple:
    """``terms`` read off concrete tables: the basis elements with a non-zero coefficient in some
    step, and copies (a unit coefficient on one element in every step)."""
    out = []
    for coeffs in [tables.Y[:, k] for k in range(tables.num_calls)] + [tables.X] + \
            [tables.R[:, r] for r in range(tables.num_slots)]:
        used = tuple(int(j) for j in np.flatnonzero(np.any(coeffs != 0, axis=0)))
        copy = len(used) == 1 and bool(np.all(coeffs[:, used[0]] == 1))
        out.append(-1 - used[0] if copy else used)
    return tuple(out)


_PLANS = ValueCache(128)


def make_plan(solver, process, grid, dtype=None) -> Plan:
    """The :class:`Plan` of ``solver`` on the concrete ``grid`` (a :class:`fastsample.Grid`) for
    ``process``, computed in float64 (NumPy tables), or with its tables as JAX arrays of ``dtype``.
    Raises :class:`Unsupported` when the solver does not fit (not linear, stochastic, too many
    state arrays or calls per step) or anything is traced; the caller then steps ``update`` itself.
    Plans are cached by value (an eager ``sample`` call computes its plan once)."""
    if not grid.concrete or any(is_traced(leaf) for leaf in jax.tree.leaves((solver, process))):
        raise Unsupported("the grid, the solver or the process is traced")
    key = ValueCache.key(solver, process, grid.times)
    if dtype is not None:
        cast_key = None if key is None else (key, np.dtype(dtype).name)
        hit = _PLANS.get(cast_key)
        if hit is None:
            with jax.ensure_compile_time_eval():  # concrete arrays, also inside a caller's trace
                hit = _PLANS.put(cast_key, make_plan(solver, process, grid).astype(dtype))
        return hit
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    runs = _variants(solver, grid.steps, grid.ends_at_zero)
    lengths = [n for n, _ in runs]
    variants = tuple(v for _, v in runs)
    buckets = tuple(_bucket(n) for n in lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    times = np.concatenate([grid.times, np.full(sum(buckets) + 1 - len(grid.times), grid.times[-1])])
    with jax.enable_x64(True), jax.ensure_compile_time_eval():
        # the solver's and the process's arrays as fresh float64 device arrays: handed over as NumPy
        # arrays, JAX 0.10 may reuse a float32 copy that a caller's jit made of the same array
        # (``RuntimeProgramInputMismatch``)
        solver, variants, process = _as_float64((solver, variants, process))
        try:
            init, *rows = _tables(solver, variants, process, jnp.asarray(times, jnp.float64),
                                  jnp.asarray(grid.times[-1], jnp.float64), jnp.asarray(grid.steps, jnp.int32),
                                  jnp.asarray(starts), jnp.asarray(lengths, jnp.int32), buckets)
        except PROBE_ERRORS as e:
            raise Unsupported(f"{solver.name} does not run on probe vectors ({type(e).__name__}: {e})") from None
        init = np.asarray(init)
        rows = [tuple(np.asarray(a)[:n] for a in r) for r, n in zip(rows, lengths, strict=True)]
    phases = []
    for tau, Y, X, R in rows:
        tables = StepTables(tau, Y, X, R, ())
        phases.append(tables._replace(terms=_sparsity(tables)))
    return _PLANS.put(key, Plan(tuple(phases), tuple(float(c) for c in init)))


def whole_run(plan: Plan):
    """The solver's whole run as one linear program: ``(times (m,), rows (m + 1, m + 1), step_of)``
    with ``rows[k] = (a_k, B_k0 .. B_k,m-1)``, the coefficients of ``x_T`` and of the data
    predictions in the input of evaluation ``k`` (the last row: the sample), and the step each
    evaluation belongs to. Composed on the host, in float64."""
    calls = plan.calls_per_step
    m = sum(calls)
    x = np.zeros(m + 1)
    x[0] = 1.0
    slots = [c * x for c in plan.init]
    rows, times, step_of, count, step = [], [], [], 0, 0
    for tables in plan.phases:
        for i in range(tables.steps):
            basis = [x, *slots]
            for k in range(tables.num_calls):
                y = sum(tables.Y[i, k, j] * basis[j] for j in range(len(basis)))
                rows.append(y)
                times.append(tables.tau[i, k])
                step_of.append(step)
                d = np.zeros(m + 1)
                d[1 + count] = 1.0
                basis.append(d)
                count += 1
            x = sum(tables.X[i, j] * basis[j] for j in range(len(basis)))
            slots = [sum(tables.R[i, r, j] * basis[j] for j in range(len(basis))) for r in range(tables.num_slots)]
            step += 1
    rows.append(x)
    return np.asarray(times, np.float64), np.stack(rows), tuple(step_of)


def linear_program(solver, process, grid):
    """``(times, a, B, step_of)``: the deterministic linear ``solver``'s whole run on the concrete
    ``grid`` (:func:`whole_run` of its plan): evaluation ``k`` at ``times[k]`` takes the input
    ``a_k x_T + sum_j B_kj D_j``; the last row is the sample. A ``ValueError`` says when the solver
    has no program (it is not linear, or does not fit the tables)."""
    try:
        times, rows, step_of = whole_run(make_plan(solver, process, grid))
    except Unsupported as e:
        raise ValueError(f"{solver.name} has no linear program on this grid: {e}.") from None
    return times, rows[:, 0], rows[:, 1:], step_of


# ------------------------------------------------------------------------------- the loop bodies


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


def apply_row(row, terms, denoiser, cond, x, slots, calls=None):
    """One step from its row: the model calls, then ``x'`` and the state arrays. ``calls`` (a
    list) receives ``(y, t, D)`` of each model call."""
    tau, Y, X, R = row
    K, S = Y.shape[0], R.shape[0]
    basis = [x, *slots]
    for k in range(K):
        y = _combine(Y[k], basis, terms[k])
        d = denoiser(y, tau[k], cond)
        if calls is not None:
            calls.append((y, tau[k], d))
        basis.append(d)
    return _combine(X, basis, terms[K]), tuple(_combine(R[r], basis, terms[K + 1 + r]) for r in range(S))


def initial_slots(plan: Plan, x) -> tuple:
    """The state arrays before the first step: ``c_r x``."""
    return tuple(jnp.asarray(c, x.dtype) * x for c in plan.init)


def table_body(tables: StepTables, denoiser, cond):
    """``body((x, slots), j, calls) -> (x', slots')``: step ``j`` of a phase from its tables."""

    def body(carry, j, calls=None):
        x, slots = carry
        row = (tables.tau[j], tables.Y[j], tables.X[j], tables.R[j])
        return apply_row(row, tables.terms, denoiser, cond, x, slots, calls)

    return body


def probing_body(solver, denoiser, x, times, ends_at_zero: bool):
    """``(runs, prober, slots, scalars)`` for working out each step's row inside the loop (a
    traced grid, solver or process): ``runs`` are the phases, ``prober.step(variant, scalars, t0,
    t1)`` gives a step's row, applied with :func:`apply_row` and ``prober.terms``. Raises
    :class:`Unsupported` as :func:`make_plan`."""
    steps = times.shape[0] - 1
    runs = _variants(solver, steps, ends_at_zero)
    try:
        prober = _prober(solver, denoiser.process, times[-1], x.dtype, steps)
    except PROBE_ERRORS as e:
        raise Unsupported(f"{solver.name} does not run on probe vectors ({type(e).__name__}: {e})") from None
    return runs, prober, tuple(jnp.asarray(c, x.dtype) * x for c in prober.init), prober.scalars

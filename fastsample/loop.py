"""The one sampling loop: a fixed-grid solver stepped over a grid by ``lax.scan``.

:func:`run` is the only place a solver's steps are iterated. Sampling, inversion (a reversed
grid), every gradient mode's forward pass, Picard iteration's noise offsets and the fitting
routines all call it. It runs the solver phase by phase (:func:`fastsample.solvers.phases_of`),
each phase a scan of one of three bodies:

- **tables** (a concrete grid): the plan's per-step coefficients (:mod:`fastsample.plan`) with
  the model calls; the loop does none of the solver's scalar work;
- **probing** (a traced grid, solver or process, e.g. to differentiate by them): each step's row
  worked out in the loop from the solver's scalar state, then applied the same way;
- **update**: the solver's own ``update`` (stochastic and non-linear solvers, ``fused=False``).

All three give the same samples up to rounding. ``scan`` is how the steps are iterated
(``lax.scan`` by default; the gradient modes pass their checkpointed scans); :class:`Record` says
what each step emits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .denoisers import convert_prediction
from .plan import PROBE_ERRORS, Plan, Unsupported, apply_row, initial_slots, probing_body, table_body
from .solvers import phases_of

__all__ = ["Record", "run", "lax_scan"]


class Record(NamedTuple):
    """What each step of :func:`run` emits (stacked along a leading step axis).

    Attributes:
        trajectory: the state after the step (``"x"``).
        finite: whether that state is finite (``"finite"``).
        denoised: the data prediction of the step's first model call (``"denoised"``).
        calls: the inputs and times ``(y, t)`` of every model call (``"calls"``: a list over the
            phases of tuples over the step's calls, each stacked over the phase's steps).
        states: the solver's state after the step (``"states"``; steps the solver's ``update``).
        previous: also return the state before the last step (``"previous"``, not stacked).
    """

    trajectory: bool = False
    finite: bool = False
    denoised: bool = False
    calls: bool = False
    states: bool = False
    previous: bool = False


def lax_scan(body, carry, length: int):
    """``lax.scan(body, carry, jnp.arange(length))``: the default way to iterate the steps."""
    return jax.lax.scan(body, carry, jnp.arange(length))


class _Recording:
    """A denoiser that also appends ``(y, t, x0)`` of each evaluation to ``calls`` (used inside one
    trace of a step: the list never leaves it)."""

    def __init__(self, inner, calls: list):
        self.inner, self.calls = inner, calls

    @property
    def process(self):
        return self.inner.process

    def predict(self, x, t, cond=None, target: str = "x0"):
        out = self.inner.predict(x, t, cond, target)
        x0 = out if target == "x0" else convert_prediction(self.process, x, jnp.asarray(t, x.dtype), out, target, "x0")
        self.calls.append((x, jnp.asarray(t, x.dtype), x0))
        return out

    def __call__(self, x, t, cond=None):
        return self.predict(x, t, cond, "x0")


def _emit(record: Record, x1, calls):
    out = {}
    if record.trajectory:
        out["x"] = x1
    if record.finite:
        out["finite"] = jnp.all(jnp.isfinite(x1))
    if record.denoised:
        out["denoised"] = calls[0][2]
    if record.calls:
        out["calls"] = tuple((y, t) for y, t, _ in calls)
    return out


def run(solver, denoiser, times, x, cond=None, noise=None, *, plan: Plan | None = None, fused: bool = True,
        ends_at_zero: bool = False, scan=lax_scan, record: Record | None = None) -> tuple[Any, dict]:
    """Step ``solver`` over the grid ``times`` (a JAX array, traced or not) from ``x``.

    Arguments:
        solver: a fixed-grid solver (configured for its budget).
        denoiser, cond: the model and its conditioning.
        noise: the noise source of a stochastic solver (step ``i`` gets ``noise.at_step(i, ...)``).
        plan: the solver's :class:`~fastsample.plan.Plan` on this grid (a concrete grid): the
            tables body. ``None``: the probing body for a linear solver when ``fused``, else ``update``.
        ends_at_zero: the grid ends at ``t = 0`` (static; it decides the phases).
        scan: ``scan(body, carry, length) -> (carry, ys)`` iterating one phase.
        record: what each step emits.

    Returns:
        ``(x_final, outputs)``: ``outputs`` maps the recorded names to arrays stacked over all steps.
    """
    steps = times.shape[0] - 1
    record = record or Record()
    if record.states:  # only update has the solver's state
        plan, fused = None, False
    if plan is not None:
        runs = [(p.steps, None) for p in plan.phases]
        bodies, carry = _table_bodies(plan, denoiser, cond, record), (x, initial_slots(plan, x))
        return _iterate(bodies, runs, carry, scan, record)
    if fused and noise is None:
        try:
            runs, prober, slots, scalars = probing_body(solver, denoiser, x, times, ends_at_zero)
            bodies = _probing_bodies(runs, prober, denoiser, times, cond, record)
            return _iterate(bodies, runs, (x, slots, scalars), scan, record)
        except (Unsupported, *PROBE_ERRORS):
            pass  # not linear, or it does not run on probe vectors: step its update
    runs = phases_of(solver, steps, ends_at_zero)
    state = solver.init_state(denoiser, x, cond, times[-1], steps)
    bodies = _update_bodies(runs, denoiser, times, cond, noise, record)
    return _iterate(bodies, runs, (x, state), scan, record)


def _iterate(bodies, runs, carry, scan, record: Record):
    outputs, start = [], 0
    for body, (n, _) in zip(bodies, runs, strict=True):
        if n == 0:
            continue
        if record.previous:
            def step(c, j, body=body, start=start):
                inner, _ = c
                new, out = body(inner, start + j)
                return (new, inner[0]), out

            carry, ys = scan(step, (carry, carry[0]), n)
            carry, previous = carry
        else:
            carry, ys = scan(lambda c, j, body=body, start=start: body(c, start + j), carry, n)
        outputs.append(ys)
        start += n
    # calls: one entry per phase (phases may make different numbers of calls per step)
    stacked = {k: [o[k] for o in outputs] if k == "calls" else
               jax.tree.map(lambda *a: jnp.concatenate(a), *[o[k] for o in outputs])
               for k in (outputs[0] if outputs else {})}
    if record.previous:
        stacked["previous"] = previous
    return carry[0], stacked


def _table_bodies(plan: Plan, denoiser, cond, record):
    bodies, start = [], 0
    for tables in plan.phases:
        apply = table_body(tables, denoiser, cond)

        def body(carry, i, apply=apply, start=start):
            calls = [] if record.denoised or record.calls else None
            x1, slots = apply(carry, i - start, calls)
            return (x1, slots), _emit(record, x1, calls)

        bodies.append(body)
        start += tables.steps
    return bodies


def _probing_bodies(runs, prober, denoiser, times, cond, record):
    def make(variant):
        def body(carry, i):
            x, slots, scalars = carry
            calls = [] if record.denoised or record.calls else None
            scalars, row = prober.step(variant, scalars, times[i], times[i + 1])
            x1, slots = apply_row(row, prober.terms(row[1].shape[0]), denoiser, cond, x, slots, calls)
            return (x1, slots, scalars), _emit(record, x1, calls)

        return body

    return [make(variant) for _, variant in runs]


def _update_bodies(runs, denoiser, times, cond, noise, record):
    def make(variant):
        def body(carry, i):
            x, state = carry
            calls = [] if record.denoised or record.calls else None
            den = denoiser if calls is None else _Recording(denoiser, calls)
            step_noise = None if noise is None else noise.at_step(i, times[i], times[i + 1])
            x1, state = variant.update(den, times[i], times[i + 1], x, cond, state, step_noise)
            out = _emit(record, x1, calls)
            if record.states:
                out["states"] = state
            return (x1, state), out

        return body

    return [make(variant) for _, variant in runs]

"""Reproducible noise for stochastic solvers.

A stochastic solver draws its noise through a per-step handle, :class:`StepNoise`, that the
sampling driver builds with ``noise.at_step(i, t0, t1)`` for step ``i`` from ``t0`` to ``t1``:

- ``normal(j)``: the ``j``-th fresh standard normal of the step, shaped like ``x``;
- ``increment(s0, s1, j)``: the Brownian increment ``W(s1) - W(s0)`` over a sub-interval of the
  step, in the process time ``t`` (variance ``|s1 - s0|``);
- ``unit_increment(s0, s1, j)``: the same increment divided by ``sqrt(|s1 - s0|)``, a standard
  normal, the form most solvers use.

Two sources implement them:

- :class:`IndependentNoise`: every draw is independent. Draw ``j`` of step ``i`` for sample ``b``
  comes from ``fold_in(fold_in(fold_in(key, b), i), j)``; an increment is ``sqrt(|s1 - s0|)``
  times draw ``j`` (so sub-intervals of one step must use distinct ``j``).
- :class:`BrownianNoise`: increments come from one Brownian path per sample (a diffrax
  ``VirtualBrownianTree`` keyed by ``fold_in(key, b)``), so the same path is used whatever the
  step count and results converge as NFE grows. ``normal(j)`` draws (noise that is not a
  Brownian increment, e.g. Langevin corrector steps or Restart's forward jumps) are independent
  as above.

The leading axis of ``x`` is the batch axis: the noise of sample ``b`` depends only on
``(key, b)``, never on the batch size or on how the batch is sharded.
"""

from __future__ import annotations

import abc

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["AbstractNoise", "IndependentNoise", "BrownianNoise", "StepNoise", "make_noise", "NOISE_KINDS"]

NOISE_KINDS = ("independent", "brownian")


def _per_sample(x):
    if jnp.ndim(x) < 1:
        raise ValueError(f"stochastic sampling needs a batch axis: x must have ndim >= 1; got shape {jnp.shape(x)}.")
    return jnp.arange(x.shape[0], dtype=jnp.uint32)


def _normal_draw(key, i, j, x):
    """Standard normals shaped like ``x``; sample ``b`` from ``fold_in(fold_in(fold_in(key, b), i), j)``."""

    def one(b):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, b), i), j)
        return jax.random.normal(k, x.shape[1:], x.dtype)

    return jax.vmap(one)(_per_sample(x))


class AbstractNoise(eqx.Module):
    """A noise source: :meth:`at_step` gives the handle of one step."""

    key: jax.Array

    def at_step(self, i, t0, t1) -> StepNoise:
        """The handle of step ``i`` (the scan index) from ``t0`` to ``t1``."""
        return StepNoise(self, jnp.asarray(i), t0, t1)

    @abc.abstractmethod
    def increment(self, i, j, s0, s1, x):
        """``W(s1) - W(s0)`` shaped like ``x`` (see :class:`StepNoise`)."""

    def unit_increment(self, i, j, s0, s1, x):
        d = self.increment(i, j, s0, s1, x)
        return d / jnp.sqrt(jnp.abs(s1 - s0)).astype(x.dtype)

    def normal(self, i, j, x):
        return _normal_draw(self.key, i, j, x)


class StepNoise(eqx.Module):
    """The noise of one step ``i`` from ``t0`` to ``t1`` (built by :meth:`AbstractNoise.at_step`).
    Every method returns an array shaped like ``x`` (leading axis = batch)."""

    source: AbstractNoise
    i: jax.Array
    t0: jax.Array
    t1: jax.Array

    def normal(self, j: int, x):
        """The ``j``-th fresh standard normal draw of this step."""
        return self.source.normal(self.i, j, x)

    def increment(self, s0, s1, x, j: int = 0):
        """``W(s1) - W(s0)`` in process time over a sub-interval of the step (variance ``|s1 - s0|``)."""
        return self.source.increment(self.i, j, s0, s1, x)

    def unit_increment(self, s0, s1, x, j: int = 0):
        """``(W(s1) - W(s0)) / sqrt(|s1 - s0|)``: a standard normal tied to ``[s0, s1]``."""
        return self.source.unit_increment(self.i, j, s0, s1, x)

    def step_normal(self, x, j: int = 0):
        """The standardized Brownian increment over the whole step (draw ``j`` for independent noise)."""
        return self.unit_increment(self.t1, self.t0, x, j)


class IndependentNoise(AbstractNoise):
    """Independent standard normals per step and draw: ``fold_in(fold_in(fold_in(key, b), i), j)``
    for sample ``b``, step ``i``, draw ``j``."""

    def increment(self, i, j, s0, s1, x):
        return jnp.sqrt(jnp.abs(s1 - s0)).astype(x.dtype) * self.normal(i, j, x)

    def unit_increment(self, i, j, s0, s1, x):
        return self.normal(i, j, x)


class BrownianNoise(AbstractNoise):
    """One Brownian path per sample over ``[t0, t1]`` (process time), from a diffrax
    ``VirtualBrownianTree`` keyed by ``fold_in(key, b)`` and resolved to ``tol`` (default
    ``1e-7 (t1 - t0)``): the same path whatever the grid, so solutions converge as NFE grows
    (Li, Wong, Chen, Duvenaud: Scalable Gradients for Stochastic Differential Equations, 2020,
    for the virtual Brownian tree)."""

    t0: float = eqx.field(static=True, default=0.0)
    t1: float = eqx.field(static=True, default=1.0)
    tol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not self.t1 > self.t0:
            raise ValueError(f"BrownianNoise needs t0 < t1; got t0={self.t0}, t1={self.t1}.")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"BrownianNoise tol must be > 0; got {self.tol}.")

    def _tree(self, b, x):
        tol = self.tol if self.tol is not None else 1e-7 * (self.t1 - self.t0)
        return diffrax.VirtualBrownianTree(
            self.t0, self.t1, tol, jax.ShapeDtypeStruct(x.shape[1:], x.dtype), key=jax.random.fold_in(self.key, b),
        )

    def increment(self, i, j, s0, s1, x):
        s0 = jnp.clip(jnp.asarray(s0, x.dtype), self.t0, self.t1)
        s1 = jnp.clip(jnp.asarray(s1, x.dtype), self.t0, self.t1)
        return jax.vmap(lambda b: self._tree(b, x).evaluate(s0, s1))(_per_sample(x))


def make_noise(kind, key, t0: float, t1: float) -> AbstractNoise:
    """The noise source ``kind`` (``"independent"``, ``"brownian"`` or an :class:`AbstractNoise`)
    for a grid inside ``[t0, t1]`` (the Brownian path's range)."""
    if isinstance(kind, AbstractNoise):
        return kind
    if kind == "independent":
        return IndependentNoise(key)
    if kind == "brownian":
        return BrownianNoise(key, float(t0), float(t1))
    raise ValueError(f"unknown noise {kind!r}; allowed: {', '.join(NOISE_KINDS)} or a fastsample.noise source.")

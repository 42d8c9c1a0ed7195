"""Small helpers that keep fastsample working across JAX 0.10 - 0.12."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_float", "is_traced", "ValueCache"]


def is_traced(x) -> bool:
    """Whether ``x`` is an abstract value inside a trace (``jit``, ``grad``, ``vmap``), i.e. has
    no concrete value to check in Python."""
    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    if tracer is not None:
        return isinstance(x, tracer)
    try:  # no Tracer class exported: a tracer refuses conversion to numpy
        np.asarray(x)
        return False
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return True


def as_float(x):
    """``x`` as a JAX array of a floating dtype (integers become the default float)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


class ValueCache:
    """A least-recently-used cache keyed by pytrees *by value*: array leaves by shape, dtype and a
    hash of their bytes, other leaves as themselves (so they must be hashable) and the tree
    structure. For host-side work that depends on a configuration only (a grid, a plan)."""

    def __init__(self, size: int = 128):
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    @staticmethod
    def key(*trees):
        """The key of ``trees``; ``None`` when a leaf is traced or unhashable."""
        leaves, treedef = jax.tree.flatten(trees)
        parts = []
        for leaf in leaves:
            if is_traced(leaf):
                return None
            if isinstance(leaf, np.ndarray | jax.Array):
                a = np.ascontiguousarray(leaf)
                parts.append((a.shape, str(a.dtype), hashlib.sha1(a.tobytes()).hexdigest()))
            else:
                parts.append(leaf)
        key = (treedef, tuple(parts))
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def get(self, key):
        """The value stored under ``key`` (``None``: none, or ``key`` is ``None``)."""
        if key is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key, value):
        """Store ``value`` under ``key`` (nothing when ``key`` is ``None``); returns ``value``."""
        if key is not None:
            self._entries[key] = value
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

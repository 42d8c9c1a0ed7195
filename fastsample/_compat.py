"""Small helpers that keep fastsample working across JAX 0.10 - 0.12."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_float", "is_traced"]


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

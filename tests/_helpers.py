"""Helpers shared by the tests."""

import jax


def counting(model):
    """``(counted_model, calls)``: ``calls`` gains one entry per model evaluation actually run
    (a host callback, so evaluations in branches not taken are not counted)."""
    calls = []

    def counted(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return model(x, t, cond)

    return counted, calls

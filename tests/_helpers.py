"""Helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np

import fastsample as fs


def counting(model):
    """``(counted_model, calls)``: ``calls`` gains one entry per model evaluation actually run
    (a host callback, so evaluations in branches not taken are not counted)."""
    calls = []

    def counted(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return model(x, t, cond)

    return counted, calls


def assert_nfe_matches_calls(denoiser, solver, calls, step_counts, final_zero):
    """For each step count: the NFE ``sample`` reports equals the model calls actually made (``calls``
    from :func:`counting`), and the result is finite."""
    for steps in step_counts:
        calls.clear()
        info = fs.solve(denoiser, jnp.ones((2, 2)), solver, nfe=solver.nfe(steps, final_zero),
                            final_zero=final_zero)
        x = info.x
        x.block_until_ready()
        jax.effects_barrier()
        assert info.stats["nfe"] == len(calls) and info.stats["steps"] == steps
        assert np.all(np.isfinite(np.asarray(x)))

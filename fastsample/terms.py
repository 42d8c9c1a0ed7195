"""diffrax terms for sampling.

:class:`ProbabilityFlowTerm` is the probability-flow ODE ``dx/dt = alpha'(t) x0 + sigma'(t) eps``
(Song et al., Score-Based Generative Modeling through SDEs, 2021) written with the denoiser's
data and noise predictions. Any diffrax solver integrates it; fastsample's solvers read the
``denoiser`` it exposes and use the predictions directly. ``args`` carries the conditioning.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp

from .denoisers import Denoiser

__all__ = ["ProbabilityFlowTerm", "unwrap_term"]


class ProbabilityFlowTerm(diffrax.AbstractTerm):
    """The PF-ODE drift of ``denoiser``; ``args`` is the conditioning passed to the model.

    ``time="t"`` (default) integrates in the process time. ``time="log_snr"`` integrates in the
    half log-SNR ``lambda`` instead: the ODE is the same curve, and it is smooth in ``lambda``
    even where ``lambda(t)`` is only piecewise smooth (``VPDiscrete``), which adaptive reference
    solves need. fastsample's own solvers step in ``t``.
    """

    denoiser: Denoiser
    time: str = eqx.field(static=True, default="t")

    def __check_init__(self):
        if self.time not in ("t", "log_snr"):
            raise ValueError(f"time must be 't' or 'log_snr'; got {self.time!r}.")

    def vf(self, t, y, args):
        return self.x0_and_drift(t, y, args)[1]

    def x0_and_drift(self, t, y, args):
        """The data prediction and the drift, from one model evaluation."""
        process = self.denoiser.process
        t = jnp.asarray(t, dtype=y.dtype)
        if self.time == "t":
            a, s, da, ds = process.derivatives(t)
        else:
            a, s, da, ds = process.derivatives_in_log_snr(t)
            t = process.t_from_log_snr(t)
        x0 = self.denoiser(y, t, args)
        return x0, da * x0 + ds * (y - a * x0) / s

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control


def unwrap_term(terms, t0, t1):
    """Undo diffrax's time-direction wrapping.

    ``diffeqsolve`` integrates backwards in time (``t0 > t1``) by negating times and wrapping each
    term; fastsample's solvers want the original term and times. Returns ``(term, t0, t1)``.
    """
    term = terms
    direction = 1
    while not (isinstance(term, ProbabilityFlowTerm) and term.time == "t"):
        inner = getattr(term, "term", None)
        if inner is None:
            raise ValueError(
                "fastsample solvers need a ProbabilityFlowTerm in time 't' (it exposes the denoiser); "
                f"got {type(terms).__name__}."
            )
        direction = direction * getattr(term, "direction", 1)
        term = inner
    return term, t0 * direction, t1 * direction

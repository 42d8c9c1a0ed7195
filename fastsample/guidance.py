"""Classifier-free guidance: guiding a conditional denoiser, and fixing its condition.

Classifier-free guidance (Ho & Salimans, Classifier-Free Diffusion Guidance, 2022) mixes the
conditional and unconditional outputs of one model,

    D_w(x, t, c) = D(x, t, null) + w (D(x, t, c) - D(x, t, null)),

in the model's own prediction (``eps``, ``x0``, ``v``, ...). Every conversion between predictions
is affine in the output with a coefficient of ``x`` that does not depend on it, so the guided data
prediction is the same whichever prediction the model makes. :class:`fastsample.Denoiser` carries
the guidance (``guidance_scale``, ``uncond``): :func:`classifier_free_guidance` turns a conditional
denoiser into a guided one, and :func:`fix_condition` bakes one condition into a denoiser, so that
tools that pass no ``cond`` (reference solves, solver fitting) see the guided model.

The ground truth for samplers under guidance is
:class:`fastsample.models.ClassConditionalMixture`, whose guided denoiser is exact.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .denoisers import Denoiser

__all__ = ["classifier_free_guidance", "fix_condition"]


def classifier_free_guidance(denoiser: Denoiser, scale, uncond) -> Denoiser:
    """``denoiser`` with classifier-free guidance of weight ``scale`` (``w``; 1 is the conditional
    model, 0 the unconditional one): ``D_w = D(., null) + w (D(., c) - D(., null))``, with ``uncond``
    the null condition. The model must accept a batch of conditions (leading axis); the guided
    denoiser runs it once on the conditional and unconditional inputs stacked (one NFE). ``scale``
    is traced: a new value does not recompile."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    if denoiser.guidance_scale is not None:
        raise ValueError("this denoiser is already guided (guidance_scale is set); guide the unguided one.")
    if uncond is None:
        raise ValueError("classifier-free guidance needs the null condition `uncond`; got None.")
    if not is_traced(scale):
        value = np.asarray(scale, dtype=np.float64)
        if value.ndim != 0 or not np.isfinite(value):
            raise ValueError(f"guidance scale must be a finite scalar; got {scale!r}.")
    return Denoiser(denoiser.model, denoiser.process, denoiser.prediction, guidance_scale=scale, uncond=uncond,
                    thresholding=denoiser.thresholding)


class _FixedCondition(eqx.Module):
    """``model(x, t, None)`` = ``denoiser.raw(x, t, cond)`` with ``cond`` repeated along the batch."""

    denoiser: Denoiser
    cond: object

    def __call__(self, x, t, cond=None):
        if cond is not None:
            raise ValueError("this denoiser has a fixed condition (fix_condition); call it with cond=None.")
        n = x.shape[0]
        batch = jax.tree.map(lambda c: jnp.broadcast_to(jnp.asarray(c)[None], (n, *jnp.shape(c))), self.cond)
        return self.denoiser.raw(x, t, batch)


def fix_condition(denoiser: Denoiser, cond) -> Denoiser:
    """A denoiser that always uses the condition ``cond`` (one condition, without a batch axis: it
    is repeated along the batch), guidance included, and takes ``cond=None``. Fitting and reference
    tools that pass no condition then work with a conditional or guided model."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastsample.Denoiser; got {type(denoiser).__name__}.")
    if cond is None:
        raise ValueError("fix_condition needs a condition; got None.")
    return Denoiser(_FixedCondition(denoiser, cond), denoiser.process, denoiser.prediction,
                    thresholding=denoiser.thresholding)

"""A class-conditional Gaussian mixture whose conditional, unconditional and guided denoisers are exact.

:class:`ClassConditionalMixture` is a Gaussian mixture whose components belong to classes: its
conditional denoiser (the mixture of one class) and its unconditional one (the whole mixture) are
both exact, so the guided PF-ODE is known to solver precision -- the ground truth for samplers under
classifier-free guidance (Ho & Salimans, 2022; e.g. DC-Solver, Zhao et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._compat import is_traced
from ..data import digits
from ..denoisers import Denoiser
from ..guidance import classifier_free_guidance
from .gaussian_mixture import GaussianMixture

__all__ = ["ClassConditionalMixture"]


def _concat(mixtures: Sequence[GaussianMixture], weights) -> GaussianMixture:
    """The mixture ``sum_c weights_c mixtures_c`` as one :class:`GaussianMixture`."""
    means = np.concatenate([np.asarray(m.means, np.float64) for m in mixtures])
    kinds = {m.kind for m in mixtures}
    if kinds == {"isotropic"}:  # keep the cheapest covariance form the classes share
        covs = np.concatenate([np.asarray(m.eigvals, np.float64)[:, 0] for m in mixtures])
    elif kinds <= {"isotropic", "diagonal"}:
        covs = np.concatenate([np.asarray(m.eigvals, np.float64) for m in mixtures])
    else:
        covs = np.concatenate([np.asarray(m.covariances, np.float64) for m in mixtures])
    w = np.concatenate([wc * np.asarray(m.weights, np.float64) for wc, m in zip(weights, mixtures, strict=True)])
    return GaussianMixture(means, covs, w / w.sum())


class ClassConditionalMixture(eqx.Module):
    """A Gaussian mixture with labelled components: class ``c`` has the data distribution
    ``classes[c]`` (a :class:`GaussianMixture`) and probability ``class_weights[c]``; the data
    distribution is their mixture (:attr:`unconditional`).

    Its model (:meth:`model`, :meth:`denoiser`) takes integer labels ``cond`` (shape ``(N,)`` or a
    scalar) in ``0..C-1``, or ``C`` (:attr:`null`) for the unconditional posterior mean; both are
    exact for every ``(alpha, sigma)``. :meth:`guided_denoiser` is the exact guided denoiser for one
    class, evaluating the two mixtures it needs only."""

    classes: tuple[GaussianMixture, ...]
    class_weights: jax.Array
    unconditional: GaussianMixture

    def __init__(self, classes: Sequence[GaussianMixture], class_weights=None):
        classes = tuple(classes)
        if len(classes) < 1 or not all(isinstance(m, GaussianMixture) for m in classes):
            raise ValueError("classes must be a non-empty sequence of GaussianMixture (one per class).")
        dims = {m.dim for m in classes}
        if len(dims) != 1:
            raise ValueError(f"every class must have the same dimension; got {sorted(dims)}.")
        C = len(classes)
        w = np.full(C, 1.0 / C) if class_weights is None else np.asarray(class_weights, np.float64)
        if w.shape != (C,) or not np.all(np.isfinite(w)) or np.any(w <= 0) or abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"class_weights must be {C} positive numbers summing to 1; got {class_weights!r}.")
        self.classes = classes
        self.class_weights = jnp.asarray(w / w.sum())
        self.unconditional = _concat(classes, w / w.sum())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def null(self) -> int:
        """The label of the unconditional model (``C``)."""
        return len(self.classes)

    @property
    def dim(self) -> int:
        return self.classes[0].dim

    def x0(self, x, alpha, sigma, cond):
        """Exact ``E[x_0 | x_t = x, class]`` per sample (``cond == null``: the unconditional mean)."""
        cond = jnp.asarray(cond)
        if not is_traced(cond):
            labels = np.asarray(cond)
            if not np.issubdtype(labels.dtype, np.integer) or np.any(labels < 0) or np.any(labels > self.null):
                raise ValueError(f"class labels must be integers in 0..{self.null} ({self.null}: unconditional); "
                                 f"got {labels!r}.")
        cond = jnp.broadcast_to(cond, x.shape[:-1])
        outs = [m.x0(x, alpha, sigma) for m in (*self.classes, self.unconditional)]
        out = outs[-1]
        for c in range(self.num_classes):
            out = jnp.where((cond == c)[..., None], outs[c], out)
        return out

    def sample(self, key, n: int, label: int | None = None, alpha=1.0, sigma=0.0):
        """Exact samples of ``alpha x_0 + sigma eps``, ``x_0`` from class ``label`` (``None``: any)."""
        mixture = self.unconditional if label is None else self.classes[self._label(label)]
        return mixture.sample(key, n, alpha, sigma)

    def _label(self, label) -> int:
        if not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
            raise ValueError(f"label must be an integer class in 0..{self.num_classes - 1}; got {label!r}.")
        return int(label)

    def model(self, process):
        """``model(x, t, cond) -> x0``: the exact conditional (or, for ``null``, unconditional) mean."""
        return _ClassModel(self, process)

    def denoiser(self, process, guidance_scale=None) -> Denoiser:
        """The exact conditional denoiser (data prediction); with ``guidance_scale``, guided by
        :func:`classifier_free_guidance` with the null label. Call it with ``cond`` = labels."""
        d = Denoiser(self.model(process), process, "x0")
        return d if guidance_scale is None else classifier_free_guidance(d, guidance_scale, jnp.asarray(self.null))

    def guided_denoiser(self, process, label: int, guidance_scale) -> Denoiser:
        """The exact guided denoiser of class ``label``, taking ``cond=None``:
        ``x0_w = x0_uncond + w (x0_label - x0_uncond)`` (two mixture evaluations per call; equal to
        ``fix_condition(self.denoiser(process, w), label)``)."""
        return Denoiser(_GuidedClass(self.classes[self._label(label)], self.unconditional, process,
                                     jnp.asarray(guidance_scale)), process, "x0")

    @classmethod
    def digits(cls, components_per_class: int = 1, covariance: str = "full", reg_covar: float = 1e-2,
               seed: int = 0) -> ClassConditionalMixture:
        """Mixtures fitted to each class of scikit-learn's 8x8 digits (``fastsample.data.digits("all")``,
        pixels in ``[-1, 1]``, 64-D; :meth:`GaussianMixture.fit`), ``components_per_class`` components
        each; class weights are the class frequencies."""
        x, labels = digits("all")
        classes = [GaussianMixture.fit(x[labels == c], components_per_class, covariance, reg_covar, seed)
                   for c in range(10)]
        counts = np.asarray([np.sum(labels == c) for c in range(10)], np.float64)
        return cls(classes, counts / counts.sum())


class _ClassModel(eqx.Module):
    mixture: ClassConditionalMixture
    process: object

    def __call__(self, x, t, cond):
        if cond is None:
            raise ValueError(f"this class-conditional model needs integer labels `cond` (0..{self.mixture.null}).")
        alpha, sigma = self.process.alpha_sigma(t)
        return self.mixture.x0(x, alpha, sigma, cond).astype(x.dtype)


class _GuidedClass(eqx.Module):
    conditional: GaussianMixture
    unconditional: GaussianMixture
    process: object
    scale: jax.Array

    def __call__(self, x, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t)
        u = self.unconditional.x0(x, alpha, sigma)
        c = self.conditional.x0(x, alpha, sigma)
        return (u + self.scale.astype(x.dtype) * (c - u)).astype(x.dtype)

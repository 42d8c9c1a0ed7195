"""Classifier-free guidance, and a class-conditional Gaussian mixture whose guided denoiser is exact.

Classifier-free guidance (Ho & Salimans, Classifier-Free Diffusion Guidance, 2022) mixes the
conditional and unconditional outputs of one model,

    D_w(x, t, c) = D(x, t, null) + w (D(x, t, c) - D(x, t, null)),

in the model's own prediction (``eps``, ``x0``, ``v``, ...). Every conversion between predictions
is affine in the output with a coefficient of ``x`` that does not depend on it, so the guided data
prediction is the same whichever prediction the model makes. :class:`fastsample.Denoiser` carries
the guidance (``guidance_scale``, ``uncond``): :func:`classifier_free_guidance` turns a conditional
denoiser into a guided one, and :func:`fix_condition` bakes one condition into a denoiser, so that
tools that pass no ``cond`` (reference solves, solver fitting) see the guided model.

:class:`ClassConditionalMixture` is a Gaussian mixture whose components belong to classes: its
conditional denoiser (the mixture of one class) and its unconditional one (the whole mixture) are
both exact, so the guided PF-ODE is known to solver precision -- the ground truth for samplers under
guidance (e.g. DC-Solver, Zhao et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .denoisers import Denoiser
from .models.gaussian_mixture import GaussianMixture

__all__ = ["ClassConditionalMixture", "classifier_free_guidance", "fix_condition"]


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
        """Mixtures fitted to each class of scikit-learn's 8x8 digits (pixels in ``[-1, 1]``, 64-D),
        ``components_per_class`` components each; class weights are the class frequencies."""
        from sklearn.datasets import load_digits
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        kinds = {"full": "full", "diag": "diag", "diagonal": "diag", "spherical": "spherical", "isotropic": "spherical"}
        if covariance not in kinds:
            raise ValueError(f"covariance must be 'full', 'diag' or 'spherical' (isotropic); got {covariance!r}.")
        if not isinstance(components_per_class, int) or components_per_class < 1:
            raise ValueError(f"components_per_class must be a positive integer; got {components_per_class!r}.")
        digits = load_digits()
        data = digits.data.astype(np.float64) / 8.0 - 1.0
        classes, counts = [], []
        for c in range(10):
            xc = data[digits.target == c]
            gmm = SkGaussianMixture(n_components=components_per_class, covariance_type=kinds[covariance],
                                    reg_covar=reg_covar, random_state=seed).fit(xc)
            classes.append(GaussianMixture(gmm.means_, gmm.covariances_, gmm.weights_))
            counts.append(len(xc))
        counts = np.asarray(counts, np.float64)
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

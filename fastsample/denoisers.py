"""The ``Denoiser`` wrapper: one model, any prediction type, guidance and thresholding.

A model is any function ``model(x, t, cond) -> prediction`` (``t`` is the process time, a
scalar). ``Denoiser`` knows what the model predicts and under which process, and returns the
data prediction ``x0``, the noise ``eps``, the PF-ODE ``velocity`` or the ``score`` from a single
model evaluation. Classifier-free guidance and thresholding live here, never in solvers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from .processes import AbstractProcess

__all__ = ["Denoiser", "Thresholding", "PREDICTIONS", "TARGETS", "convert_prediction"]

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")
TARGETS = ("x0", "eps", "v", "velocity", "score")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}.")


def _to_x0_eps(process: AbstractProcess, x, t, value, source: str):
    """``(x0, eps)`` implied by a prediction of kind ``source`` at ``(x, t)``."""
    if source == "x0":
        a, s = process.alpha_sigma(t)
        return value, (x - a * value) / s
    if source == "eps":
        a, s = process.alpha_sigma(t)
        return (x - s * value) / a, value
    if source == "score":
        a, s = process.alpha_sigma(t)
        eps = -s * value
        return (x - s * eps) / a, eps
    if source == "v":
        # v = alpha eps - sigma x0 (Salimans & Ho, 2022); exact for any alpha, sigma.
        a, s = process.alpha_sigma(t)
        n = a * a + s * s
        return (a * x - s * value) / n, (s * x + a * value) / n
    if source == "velocity":
        # u = alpha' x0 + sigma' eps: the PF-ODE drift / flow-matching velocity.
        a, s, da, ds = process.derivatives(t)
        det = a * ds - s * da
        return (ds * x - s * value) / det, (a * value - da * x) / det
    raise ValueError(f"unknown prediction {source!r}; allowed: {', '.join(PREDICTIONS)}.")


def _from_x0(process: AbstractProcess, x, t, x0, target: str):
    if target == "x0":
        return x0
    a, s = process.alpha_sigma(t)
    eps = (x - a * x0) / s
    if target == "eps":
        return eps
    if target == "score":
        return -eps / s
    if target == "v":
        return a * eps - s * x0
    if target == "velocity":
        _, _, da, ds = process.derivatives(t)
        return da * x0 + ds * eps
    raise ValueError(f"unknown target {target!r}; allowed: {', '.join(TARGETS)}.")


def convert_prediction(process: AbstractProcess, x, t, value, source: str, target: str):
    """Convert a model output of kind ``source`` at ``(x, t)`` into kind ``target``."""
    _check_choice("prediction", source, PREDICTIONS)
    _check_choice("target", target, TARGETS)
    if source == target:
        return value
    x0, _ = _to_x0_eps(process, x, t, value, source)
    return _from_x0(process, x, t, x0, target)


class Thresholding(eqx.Module):
    """Thresholding of the data prediction.

    ``"static"`` clips ``x0`` to ``[-max_value, max_value]``. ``"dynamic"`` (Imagen, Saharia et
    al. 2022; DPM-Solver++, Lu et al. 2022) takes ``s`` = the ``ratio`` quantile of ``|x0|`` per
    sample (batch axis 0), clamps it to ``[1, max_value]``, and returns ``clip(x0, -s, s) / s``.
    """

    kind: Literal["static", "dynamic"] = eqx.field(static=True, default="dynamic")
    ratio: float = eqx.field(static=True, default=0.995)
    max_value: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        _check_choice("thresholding kind", self.kind, ("static", "dynamic"))
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"thresholding ratio must be in (0, 1]; got {self.ratio}.")
        if not self.max_value > 0:
            raise ValueError(f"thresholding max_value must be > 0; got {self.max_value}.")

    def __call__(self, x0):
        if self.kind == "static":
            return jnp.clip(x0, -self.max_value, self.max_value)
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.quantile(flat, self.ratio, axis=1)
        s = jnp.clip(s, 1.0, self.max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s


class Denoiser(eqx.Module):
    """A model wrapped with its prediction type and process.

    Arguments:
        model: ``model(x, t, cond) -> prediction`` with the shape and dtype of ``x``.
        process: the :class:`~fastsample.processes.AbstractProcess` the model was trained on.
        prediction: what the model predicts: ``eps``, ``x0``, ``v`` (``alpha eps - sigma x0``),
            ``velocity`` (``d x_t / dt``, flow matching) or ``score``.
        guidance_scale: classifier-free guidance weight ``w`` (Ho & Salimans, 2022): the output is
            ``uncond + w (cond - uncond)``; ``None`` disables guidance. A traced value: changing it
            does not recompile.
        uncond: the null condition used for the unconditional branch of guidance.
        thresholding: optional :class:`Thresholding` of the data prediction.

    One call of :meth:`predict` is one model evaluation (one NFE); with guidance the model sees
    the conditional and unconditional inputs as one batch of twice the size.
    """

    model: Callable[..., Any]
    process: AbstractProcess
    prediction: str = eqx.field(static=True, default="eps")
    guidance_scale: jax.Array | None = None
    uncond: Any = None
    thresholding: Thresholding | None = None

    def __init__(self, model, process, prediction="eps", *, guidance_scale=None, uncond=None, thresholding=None):
        _check_choice("prediction", prediction, PREDICTIONS)
        if not isinstance(process, AbstractProcess):
            raise ValueError(f"process must be a fastsample process; got {type(process).__name__}.")
        if isinstance(thresholding, str):
            thresholding = Thresholding(kind=thresholding)
        self.model = model
        self.process = process
        self.prediction = prediction
        self.guidance_scale = None if guidance_scale is None else jnp.asarray(guidance_scale)
        self.uncond = uncond
        self.thresholding = thresholding

    def raw(self, x, t, cond=None):
        """The model's own output (with guidance applied), checked against ``x``."""
        t = jnp.asarray(t, dtype=x.dtype)
        if self.guidance_scale is None:
            out = self.model(x, t, cond)
        else:
            if cond is None or self.uncond is None:
                raise ValueError("classifier-free guidance needs both `cond` and the denoiser's `uncond`.")
            both = jax.tree.map(lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape)]), cond, self.uncond)
            out2 = self.model(jnp.concatenate([x, x]), t, both)
            self._check_output(out2, jnp.concatenate([x, x]))
            out_c, out_u = jnp.split(out2, 2)
            out = out_u + self.guidance_scale.astype(x.dtype) * (out_c - out_u)
        self._check_output(out, x)
        return out

    @staticmethod
    def _check_output(out, x):
        if not hasattr(out, "shape") or out.shape != x.shape or out.dtype != x.dtype:
            got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
            raise ValueError(
                f"model output must have the shape and dtype of x {(x.shape, x.dtype)}; got {got}."
            )

    def predict(self, x, t, cond=None, target: str = "x0"):
        """One model evaluation, returned as ``target`` (``x0``, ``eps``, ``v``, ``velocity``, ``score``)."""
        _check_choice("target", target, TARGETS)
        out = self.raw(x, t, cond)
        if self.thresholding is None:
            return convert_prediction(self.process, x, t, out, self.prediction, target)
        x0 = self.thresholding(convert_prediction(self.process, x, t, out, self.prediction, "x0"))
        return _from_x0(self.process, x, t, x0, target)

    def __call__(self, x, t, cond=None):
        """The data prediction ``x0`` (one model evaluation)."""
        return self.predict(x, t, cond, "x0")

    def with_process(self, process: AbstractProcess) -> Denoiser:
        """The same model seen through another process.

        The data prediction depends only on the log-SNR and on ``x / alpha``, so the model is
        queried at the time of its own process with the same log-SNR, on rescaled input. For
        instance ``d.with_process(EDM())`` gives k-diffusion's view of a VP model, in which
        ``euler`` / ``heun`` step in the EDM noise level ``sigma / alpha``.
        """
        return Denoiser(_Reparameterized(self, process), process, "x0")


class _Reparameterized(eqx.Module):
    denoiser: Denoiser
    process: AbstractProcess

    def __call__(self, x, t, cond):
        own = self.denoiser.process
        t_own = own.t_from_log_snr(self.process.log_snr(t))
        scale = own.alpha(t_own) / self.process.alpha(t)
        return self.denoiser(x * scale, t_own, cond)

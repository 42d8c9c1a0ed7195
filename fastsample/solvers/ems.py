"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023): the
container the solver reads; ``fastsample.learned.estimate_ems`` estimates them from a model.

With data prediction ``x_theta`` and the half log-SNR ``lambda`` as time the PF-ODE reads
``dx/dlambda = (dlog sigma/dlambda) x + alpha x_theta``. DPM-Solver-v3 rewrites it with three
per-dimension statistics (written here in an equivalent scaling in which ``l`` is dimensionless):

    f_theta(x, lambda) = x_theta(x, lambda) - l_lambda * x / alpha_lambda
    dx/dlambda = (dlog sigma/dlambda + l_lambda) x + alpha_lambda f_theta
    g_theta = e^{-int s} f_theta - int e^{-int s} b          (integrals from a reference lambda_s)

``l`` minimises ``E ||grad_x f_theta||_F^2`` (the Jacobian's diagonal is zero on average):
``l = alpha E[diag grad_x x_theta]``; ``s, b`` are the least-squares regression of the total
lambda-derivative ``f'`` of ``f_theta`` along the ODE on ``f_theta`` itself, per dimension:
``s = Cov(f', f) / Var(f)``, ``b = E f' - s E f``, so that ``g_theta' = e^{-int s}(f' - s f - b)``
is as small as possible. ``l = s = b = 0`` gives DPM-Solver++ (``f = g = x_theta``).
"""

from __future__ import annotations

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EMS", "interp"]

_FORMAT_VERSION = 1


class EMS(eqx.Module):
    """EMS on a grid of half log-SNR values: ``lambdas`` (N,) increasing, and ``l``, ``s``, ``b``
    of shape ``(N, *data_shape)``. Outside the grid every statistic is taken as zero."""

    lambdas: jax.Array
    l: jax.Array
    s: jax.Array
    b: jax.Array

    def __check_init__(self):
        n = self.lambdas.shape[0]
        if self.lambdas.ndim != 1 or n < 2:
            raise ValueError(f"EMS lambdas must have shape (N,) with N >= 2; got {self.lambdas.shape}.")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if v.shape[0] != n or v.shape != self.l.shape:
                raise ValueError(f"EMS {name} must have shape (N={n}, *data_shape) like l {self.l.shape}; "
                                 f"got {v.shape}.")

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    @classmethod
    def trivial(cls, process, data_shape, num: int = 200, lambda_min=None, lambda_max=None, dtype=None) -> EMS:
        """All-zero statistics (DPM-Solver-v3 then equals DPM-Solver++)."""
        lams = default_lambda_grid(process, num, lambda_min, lambda_max, dtype)
        z = jnp.zeros((num,) + tuple(data_shape), lams.dtype)
        return cls(lams, z, z, z)

    # ---------------------------------------------------------------- quadrature helpers
    def cumulative(self):
        """Cumulative trapezoid integrals on the grid: ``(L, S, B)`` with ``L = int l``,
        ``S = int s`` and ``B = int e^{-S} b`` from the first grid point."""
        dl = jnp.diff(self.lambdas).reshape((-1,) + (1,) * len(self.data_shape))

        def cum(v):
            inc = 0.5 * (v[1:] + v[:-1]) * dl
            return jnp.concatenate([jnp.zeros_like(v[:1]), jnp.cumsum(inc, axis=0)])

        big_s = cum(self.s)
        return cum(self.l), big_s, cum(jnp.exp(-big_s) * self.b)

    # ---------------------------------------------------------------- persistence
    def save(self, path) -> None:
        meta = dict(version=_FORMAT_VERSION, data_shape=list(self.data_shape), num_lambda=int(self.lambdas.shape[0]))
        np.savez(path, lambdas=np.asarray(self.lambdas), l=np.asarray(self.l), s=np.asarray(self.s),
                 b=np.asarray(self.b), meta=np.asarray(json.dumps(meta)))

    @classmethod
    def load(cls, path, data_shape=None, lambdas=None) -> EMS:
        """Load from :meth:`save`'s file; ``data_shape`` / ``lambdas`` (optional) must match it."""
        with np.load(path, allow_pickle=False) as f:
            missing = {"lambdas", "l", "s", "b", "meta"} - set(f.files)
            if missing:
                raise ValueError(f"{path} is not an EMS file: missing {sorted(missing)}.")
            meta = json.loads(str(f["meta"]))
            arrays = {k: np.asarray(f[k]) for k in ("lambdas", "l", "s", "b")}
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported EMS format version {meta.get('version')}.")
        shape = tuple(meta["data_shape"])
        if arrays["l"].shape != (meta["num_lambda"],) + shape or arrays["lambdas"].shape != (meta["num_lambda"],):
            raise ValueError(f"{path}: arrays {arrays['l'].shape} do not fit the recorded grid "
                             f"({meta['num_lambda']},) and data shape {shape}.")
        if data_shape is not None and tuple(data_shape) != shape:
            raise ValueError(f"{path}: EMS were estimated for data shape {shape}, not {tuple(data_shape)}.")
        if lambdas is not None and (np.shape(lambdas) != arrays["lambdas"].shape
                                    or not np.allclose(lambdas, arrays["lambdas"])):
            raise ValueError(f"{path}: the file's lambda grid does not match the one requested.")
        return cls(*(jnp.asarray(arrays[k]) for k in ("lambdas", "l", "s", "b")))


def interp(grid, values, u):
    """Linear interpolation of ``values`` (N, ...) on increasing ``grid`` at ``u`` (M,), constant
    outside the grid; returns ``(M, ...)``."""
    n = grid.shape[0]
    uc = jnp.clip(u, grid[0], grid[-1])
    i = jnp.clip(jnp.searchsorted(grid, uc, side="right") - 1, 0, n - 2)
    w = (uc - grid[i]) / (grid[i + 1] - grid[i])
    w = w.reshape(w.shape + (1,) * (values.ndim - 1)).astype(values.dtype)
    return values[i] * (1 - w) + values[i + 1] * w


def default_lambda_grid(process, num, lambda_min=None, lambda_max=None, dtype=None):
    dtype = dtype or jnp.result_type(float)
    if lambda_min is None:
        lambda_min = float(process.log_snr(jnp.asarray(process.t_max, dtype)))
    if lambda_max is None:
        lambda_max = float(process.log_snr(jnp.asarray(process.t_min, dtype)))
    lambda_min, lambda_max = max(lambda_min, -12.0), min(lambda_max, 12.0)
    if not (math.isfinite(lambda_min) and math.isfinite(lambda_max) and lambda_min < lambda_max):
        raise ValueError(f"EMS needs a finite lambda range; got [{lambda_min}, {lambda_max}].")
    return jnp.linspace(lambda_min, lambda_max, num, dtype=dtype)

"""Estimating DPM-Solver-v3's empirical model statistics from the model itself (Zheng, Lu, Chen,
Zhu: DPM-Solver-v3, NeurIPS 2023). The statistics and their definitions: ``fastsample.solvers.ems``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..sampling import prior, sample
from ..solvers.ems import EMS, default_lambda_grid

__all__ = ["EMS", "estimate_ems"]


def estimate_ems(denoiser, key, data_shape, num_samples: int = 256, num_lambda: int = 400, *, data=None,
                 lambda_min=None, lambda_max=None, fit_l: bool = True, num_probes: int | None = None,
                 cond=None, eps: float = 1e-12) -> EMS:
    """Estimate the EMS of ``denoiser`` from ``num_samples`` points ``x_lambda = alpha x0 + sigma e``.

    ``data`` (shape ``(num_samples, *data_shape)``) gives the clean samples ``x0``; without it they
    are drawn from the model itself (DPM-Solver++(3M), 50 NFE). The same ``x0`` and noise are used
    at every lambda. ``l`` uses the exact Jacobian diagonal when ``prod(data_shape) <= 256`` and
    ``num_probes`` is None, else a Hutchinson estimate with ``num_probes`` Rademacher probes.
    ``fit_l=False`` keeps ``l = 0`` (only ``s``, ``b``). ``eps`` regularises the regression relative to
    ``E x_theta^2`` (where ``Var f = 0`` it gives ``s = 0``, ``b = E f'``). ``l'`` (in ``f'``) is the
    exact lambda-derivative of the estimate of ``l`` (forward mode). Memory: one lambda at a time (``lax.map``).
    """
    process = denoiser.process
    data_shape = tuple(data_shape)
    dim = int(np.prod(data_shape))
    k_data, k_noise, k_probe = jax.random.split(key, 3)
    if data is None:
        x_T = prior(process, k_data, (num_samples,) + data_shape)
        data = sample(denoiser, x_T, "dpmpp_3m", nfe=50, schedule="logsnr_uniform", cond=cond)
    data = jnp.asarray(data)
    if data.shape[1:] != data_shape:
        raise ValueError(f"data must have shape (num_samples, *{data_shape}); got {data.shape}.")
    dtype = data.dtype
    lams = default_lambda_grid(process, num_lambda, lambda_min, lambda_max, dtype)
    noise = jax.random.normal(k_noise, data.shape, dtype)

    def x0_fn(x, lam):
        return denoiser.predict(x, process.t_from_log_snr(lam), cond, "x0")

    def jac_diag(x, lam):
        f = lambda y: x0_fn(y, lam)  # noqa: E731
        if num_probes is None and dim <= 256:
            basis = jnp.eye(dim, dtype=dtype).reshape((dim,) + (1,) + data_shape)
            cols = jax.lax.map(lambda v: jax.jvp(f, (x,), (jnp.broadcast_to(v, x.shape),))[1], basis)
            return jnp.einsum("dnd->nd", cols.reshape((dim, x.shape[0], dim))).reshape(x.shape)
        probes = jax.random.rademacher(k_probe, (num_probes or 8,) + x.shape, dtype)
        return jnp.mean(jax.lax.map(lambda v: v * jax.jvp(f, (x,), (v,))[1], probes), axis=0)

    def l_at(lam):
        a, s = process.alpha_sigma(process.t_from_log_snr(lam))
        return a * jnp.mean(jac_diag(a * data + s * noise, lam), axis=0)

    if fit_l:  # l and its exact lambda-derivative (same samples and probes at every lambda)
        l, dl = jax.jit(lambda g: jax.lax.map(lambda lam: jax.jvp(l_at, (lam,), (jnp.ones_like(lam),)), g))(lams)
    else:
        l = dl = jnp.zeros((num_lambda,) + data_shape, dtype)

    def sb_at(args):
        lam, l_lam, dl_lam = args
        a, s, da, ds = process.derivatives_in_log_snr(lam)
        x = a * data + s * noise
        x0, dx0 = jax.jvp(x0_fn, (x, lam), (jnp.zeros_like(x), jnp.ones_like(lam)))
        dxdl = (ds / s) * x + a * x0  # the ODE's velocity
        dx0 = dx0 + jax.jvp(lambda y: x0_fn(y, lam), (x,), (dxdl,))[1]
        f = x0 - l_lam * x / a
        df = dx0 - dl_lam * x / a - l_lam * (dxdl / a - x * da / a**2)
        mf, mdf = jnp.mean(f, 0), jnp.mean(df, 0)
        var = jnp.mean((f - mf) ** 2, 0)
        cov = jnp.mean((f - mf) * (df - mdf), 0)
        s_lam = cov / (var + eps * jnp.mean(x0**2) + jnp.finfo(dtype).tiny)  # Var f = 0: s = 0
        return s_lam, mdf - s_lam * mf

    s_arr, b_arr = jax.jit(lambda *g: jax.lax.map(sb_at, g))(lams, l, dl)
    return EMS(lams, l, s_arr, b_arr)

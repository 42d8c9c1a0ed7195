"""Likelihood of held-out digits under a trained network, in bits per dimension.

Config -> results: the first ``num_samples`` held-out digits (the test split of
``fastsample.data.digits``), uniformly dequantised (``x + u``, ``u ~ U(-1/16, 1/16)``: the digits
have 17 levels 1/8 apart in ``[-1, 1]``), get their log-likelihood through the probability-flow
ODE of the model (``fastsample.metrics.pf_ode_log_likelihood``: adaptive Tsit5 at ``rtol``, exact
trace or Hutchinson per ``exact_trace``), reported as discrete bits/dim (Theis et al., 2016).
An analytic model (a Gaussian mixture) also gets its exact log-density, which the ODE estimate
should reproduce. Baselines on the same points: a Gaussian with the mean and covariance of the
(dequantised) training split, and a 10-component full-covariance Gaussian mixture fitted to it
(exact log-densities of their ``sigma(t_min)``-noised marginals, the density the ODE measures).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastsample import data, metrics
from fastsample.config import ExperimentConfig, build_model, build_process
from fastsample.models import GaussianMixture
from fastsample.results import markdown_table, write_rows

BIN_WIDTH = 1.0 / 8.0
COLUMNS = ["model", "n", "bits_per_dim", "stderr", "nll_nats"]


def _row(name, logp, dim):
    bpd = np.asarray(metrics.bits_per_dim(logp, dim, BIN_WIDTH), np.float64)
    return {"model": name, "n": int(bpd.shape[0]), "bits_per_dim": float(bpd.mean()),
            "stderr": float(bpd.std(ddof=1) / np.sqrt(bpd.shape[0])) if bpd.shape[0] > 1 else None,
            "nll_nats": float(-np.mean(np.asarray(logp, np.float64)))}


def _fitted_mixture(x, n_components: int, seed: int) -> GaussianMixture:
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    gmm = SkGaussianMixture(n_components, covariance_type="full", reg_covar=1e-2, random_state=seed).fit(x)
    return GaussianMixture(gmm.means_, gmm.covariances_, gmm.weights_)


def run(cfg: ExperimentConfig, out: Path, progress: bool = True) -> list[dict]:
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    process = build_process(cfg.process)
    model = build_model(cfg.model)
    if model.dim != 64:
        raise ValueError(f"the likelihood experiment needs a digits model (dimension 64); got dimension {model.dim}.")
    denoiser = model.denoiser(process)
    x_train, _ = data.digits("train")
    x_test, _ = data.digits("test")
    n = min(cfg.num_samples, x_test.shape[0])
    k_deq, k_probe = jax.random.split(jax.random.PRNGKey(cfg.seed))
    u = jax.random.uniform(k_deq, (n, 64), dtype, -BIN_WIDTH / 2, BIN_WIDTH / 2)
    x = jnp.asarray(x_test[:n], dtype) + u
    tol = {} if cfg.rtol is None else {"rtol": cfg.rtol, "atol": cfg.rtol}
    logp = metrics.pf_ode_log_likelihood(denoiser, x, key=k_probe, exact_trace=cfg.exact_trace, **tol)
    a, s = process.alpha_sigma(jnp.asarray(process.t_min, dtype))
    rows = [_row(f"{cfg.model.kind} (PF-ODE)", logp, 64)]
    if hasattr(model, "log_prob"):  # an analytic model: its exact log-density checks the ODE estimate
        exact = jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, model)
        rows.append(_row(f"{cfg.model.kind} (exact)", exact.log_prob(x, a, s), 64))
    # the baselines are fitted to the dequantised training split (else constant pixels get zero variance)
    x_fit = x_train + np.random.default_rng(cfg.seed).uniform(-BIN_WIDTH / 2, BIN_WIDTH / 2, x_train.shape)
    gauss = GaussianMixture.gaussian(x_fit.mean(0), np.cov(x_fit.T))
    mixture = _fitted_mixture(x_fit, 10, cfg.seed)
    for name, base in (("gaussian (train mean, covariance)", gauss), ("gmm 10 full (fit to train)", mixture)):
        base = jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, base)
        rows.append(_row(name, base.log_prob(x, a, s), 64))
    write_rows(out, "metrics", rows)
    (out / "table.md").write_text(markdown_table(rows, COLUMNS))
    return rows

"""The solver-fitting loop (fastsample.optimization.fit): a stopped and resumed fit ends bit-identical
to an uninterrupted one; a fit sharded over 8 (simulated) devices equals the 1-device fit up to
reduction order; early stopping keeps the best parameters; bad input gets clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fastsample as fs
from fastsample.distributed import data_mesh
from fastsample.learned import fit_solver, make_reference
from fastsample.models import GaussianMixture
from fastsample.optimization import fit


def _problem(n=64, d=3, seed=0):
    """Least squares ``min_w E (x . w - y)^2``: a closed-form optimum to converge to."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key1, (n, d))
    y = x @ jnp.arange(1.0, d + 1) + 0.01 * jax.random.normal(key2, (n,))
    loss = lambda w, batch: jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    return loss, {"x": x, "y": y}


def test_fit_converges_to_the_least_squares_optimum():
    loss, data = _problem()
    result = fit(loss, jnp.zeros(3), data, val=data, optimizer=optax.adam(0.1), steps=400, progress=False)
    w_star = np.linalg.lstsq(np.asarray(data["x"]), np.asarray(data["y"]), rcond=None)[0]
    np.testing.assert_allclose(result.params, w_star, atol=1e-3)
    assert result.history[-1]["step"] == 400 and "val_loss" in result.history[-1]


def test_resumed_fit_is_bit_identical(tmp_path):
    loss, data = _problem()
    kwargs = dict(val=data, optimizer=optax.adam(0.05), batch_size=16, eval_every=10, checkpoint_every=20,
                  progress=False)
    full = fit(loss, jnp.zeros(3), data, steps=60, **kwargs)
    # the same fit, stopped after 40 steps (its checkpoint at 40) and started again
    fit(loss, jnp.zeros(3), data, steps=40, checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "log.jsonl", **kwargs)
    resumed = fit(loss, jnp.zeros(3), data, steps=60, checkpoint_dir=tmp_path / "ckpt",
                  log_path=tmp_path / "log.jsonl", **kwargs)
    np.testing.assert_array_equal(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.last_params, full.last_params)
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 10, 20, 30, 40, 50, 60]  # step 0: the starting point, also a candidate


def test_early_stopping_keeps_the_best_parameters():
    loss, data = _problem()
    # a learning rate that makes the validation loss climb after the first evaluations
    result = fit(loss, jnp.zeros(3), data, val=data, optimizer=optax.sgd(1.05), steps=500, eval_every=1, patience=3,
                 progress=False)
    assert result.stopped_early and result.steps < 500
    vals = [h["val_loss"] for h in result.history]
    assert result.best_val == min(vals)
    np.testing.assert_allclose(float(loss(result.params, data)), min(vals), rtol=1e-6)


def test_fit_errors_name_the_problem():
    loss, data = _problem()
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 64\]"):
        fit(loss, jnp.zeros(3), data, batch_size=65, progress=False)
    with pytest.raises(ValueError, match="share the leading"):
        fit(loss, jnp.zeros(3), {"x": data["x"], "y": data["y"][:10]}, progress=False)
    with pytest.raises(ValueError, match="need steps >= 0"):
        fit(loss, jnp.zeros(3), data, eval_every=0, progress=False)


def test_fit_on_8_devices_equals_1_device(x64):
    """A solver fit with its data sharded over the 8 CPU devices (tests/conftest.py) equals the
    1-device fit up to reduction order."""
    assert jax.device_count() == 8
    process = fs.VPLinear()
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    train, val = make_reference(denoiser, jax.random.PRNGKey(0), 96, (2,)).split(64)
    out = {}
    for mesh in (None, data_mesh()):
        solver, report = fit_solver("learned_grid", denoiser, train, val, 4, base="ddim", steps=30, batch_size=32,
                                    optimizer=optax.adam(2e-2), mesh=mesh)
        out[mesh is None] = (np.asarray(solver.times), report.fitted_rmse)
    np.testing.assert_allclose(out[False][0], out[True][0], rtol=1e-9)
    np.testing.assert_allclose(out[False][1], out[True][1], rtol=1e-9)
    assert report.fitted_rmse < report.base_rmse

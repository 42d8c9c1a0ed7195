"""Parallel-in-time sampling (fastsample.parallel): sliding-window Picard iteration (ParaDiGMS) with
the update rule of any registry solver (DreamPropeller)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.distributed import data_mesh
from fastsample.models import GaussianMixture
from fastsample.parallel import sample_picard


def _picard(*args, **kwargs):
    """``(samples, stats)`` of :func:`sample_picard`."""
    sol = sample_picard(*args, **kwargs)
    return sol.x, sol.stats


@pytest.fixture(scope="module")
def digits():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # float64 mixture parameters
    try:
        return GaussianMixture.digits(covariance="diag")  # the 64-D digits data; a diagonal fit is quick
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def setup(x64, digits):
    process = fs.VPDiscrete.ddpm_linear()
    denoiser = digits.denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (4, 64), jnp.float64)
    return process, denoiser, x_T


@pytest.fixture
def ring(x64):
    """A cheap model (2-D ring mixture under the discrete DDPM schedule) for the parity tests."""
    process = fs.VPDiscrete.ddpm_linear()
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (4, 2), jnp.float64)
    return process, denoiser, x_T


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m", "ddpm"])
def test_tolerance_zero_is_the_sequential_solver(ring, solver):
    """tol = 0 freezes one evaluation per iteration: the sequential sample, same noise for DDPM."""
    _, denoiser, x_T = ring
    key = jax.random.PRNGKey(3)
    want = fs.sample(denoiser, x_T, solver, nfe=12, key=key)
    got, info = _picard(denoiser, x_T, solver, nfe=12, tol=0.0, max_iters=12, key=key)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert info["iterations"] == 12 and info["converged"] and info["nfe"] == 12 * 12 and info["sequential_nfe"] == 12


def test_small_window_matches_and_counts_model_calls(ring):
    """A window smaller than the grid slides to the end; the NFE reported is the evaluations made
    (one batched call of ``window`` evaluations per iteration)."""
    process, denoiser, x_T = ring
    calls = []

    def counted(x, t, cond):
        jax.debug.callback(lambda t: calls.append(np.size(t)), t)  # under vmap: once per evaluation
        return denoiser.model(x, t, cond)

    want = fs.sample(denoiser, x_T, "dpmpp_2m", nfe=12)
    got, info = _picard(fs.Denoiser(counted, process, prediction="x0"), x_T, "dpmpp_2m", nfe=12, window=5,
                              tol=0.0)
    jax.effects_barrier()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert info["window"] == 5 and 3 <= info["iterations"] <= 12 and info["converged"]  # >= 12 / 5 windows
    assert calls == [1] * info["nfe"] and info["nfe"] == 5 * info["iterations"]
    # Stopped before the window reaches the end: not converged, not the sequential sample.
    got, info = _picard(denoiser, x_T, "dpmpp_2m", nfe=12, window=5, tol=0.0, max_iters=3)
    assert info["iterations"] == 3 and not info["converged"]
    assert float(jnp.max(jnp.abs(got - want))) > 1e-6


def _ddim_bound(denoiser, trajectory, ts, tol):
    """``tol * sum_k ||G_k||_2 sigma_k`` per sample, the first-order bound the convergence test
    implies (see ``fastsample.parallel``): ``G_k`` is the Jacobian of the sequential DDIM sample
    with respect to the input of evaluation ``k``. DDIM steps ``y_{k+1} = c_k y_k + d_k D(y_k)``
    (``c_k = sigma_{k+1}/sigma_k``, ``d_k = alpha_{k+1} - alpha_k c_k``), so
    ``G_k = M_{m-1} ... M_{k+1} d_k J_k`` with ``J_k`` the denoiser's Jacobian on the sequential
    trajectory and ``M_j = c_j I + d_j J_j``."""
    process = denoiser.process
    alpha, sigma = (np.asarray(v) for v in process.alpha_sigma(ts))
    c, d = sigma[1:] / sigma[:-1], alpha[1:] - alpha[:-1] * sigma[1:] / sigma[:-1]

    def jac(y, t):  # (batch, d, d): one Jacobian per sample
        return jax.vmap(jax.jacfwd(lambda v: denoiser(v[None], t)[0]))(y)

    J = np.asarray(jax.jit(jax.vmap(jac))(trajectory[:-1], ts[:-1]))  # (m, batch, dim, dim)
    m, eye = J.shape[0], np.eye(J.shape[-1])
    prod, bound = np.broadcast_to(eye, J.shape[1:]), np.zeros(J.shape[1])
    for k in range(m - 1, -1, -1):
        bound += np.linalg.norm(prod @ (d[k] * J[k]), ord=2, axis=(1, 2)) * sigma[k]
        prod = prod @ (c[k] * eye + d[k] * J[k])
    return tol * bound


def test_tolerance_takes_fewer_iterations_and_respects_the_bound(setup):
    """NFE-50 DDIM on the digits mixture: far fewer parallel iterations than steps, and the distance
    to the sequential sample stays below the tolerance-implied first-order bound."""
    _, denoiser, x_T = setup
    info = fs.solve(denoiser, x_T, "ddim", nfe=50, saveat=fs.SaveAt(steps=True))
    want, trajectory = info.x, info.trajectory
    unit = _ddim_bound(denoiser, trajectory, info.grid.times, 1.0)  # the bound is linear in tol
    for tol, most in ((1e-3, 20), (1e-2, 15)):
        bound = tol * unit
        got, picard = _picard(denoiser, x_T, "ddim", nfe=50, tol=tol)
        err = np.sqrt(np.mean((np.asarray(got) - np.asarray(want)) ** 2, axis=-1))
        assert picard["converged"] and picard["iterations"] <= most, picard
        assert np.all(err <= bound), (tol, err, bound)
        assert np.all(err > 1e-4 * bound)  # the tolerance was used: not the sequential result


def test_errors(setup):
    process, denoiser, x_T = setup
    with pytest.raises(ValueError, match="window must be an integer between 1 and the solver's 10"):
        sample_picard(denoiser, x_T, "ddim", nfe=10, window=11)
    with pytest.raises(ValueError, match="window must be an integer"):
        sample_picard(denoiser, x_T, "ddim", nfe=10, window=0)
    with pytest.raises(ValueError, match="tol must be a non-negative number"):
        sample_picard(denoiser, x_T, "ddim", nfe=10, tol=-1.0)
    with pytest.raises(ValueError, match="max_iters must be a positive integer"):
        sample_picard(denoiser, x_T, "ddim", nfe=10, max_iters=0)
    with pytest.raises(ValueError, match="ddpm is a stochastic solver: pass a PRNG key"):
        sample_picard(denoiser, x_T, "ddpm", nfe=10)
    with pytest.raises(ValueError, match="dpm_solver_adaptive chooses its own steps"):
        sample_picard(denoiser, x_T, "dpm_solver_adaptive", nfe=10)
    with pytest.raises(ValueError, match="x_T must have a batch axis"):
        sample_picard(denoiser, x_T[0, 0], "ddim", nfe=10)
    with pytest.raises(ValueError, match="denoiser must be a fastsample.Denoiser"):
        sample_picard(denoiser.model, x_T, "ddim", nfe=10)
    bad_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh with an axis 'data'"):
        sample_picard(denoiser, x_T, "ddim", nfe=10, mesh=bad_mesh)


def test_sharded_window_equals_one_device(x64):
    """The window's evaluations sharded over the 8 CPU devices (tests/conftest.py) give the 1-device
    sample and iteration count."""
    assert jax.device_count() == 8
    process = fs.VPLinear()
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (4, 2), jnp.float64)
    key = jax.random.PRNGKey(1)
    one = sample_picard(denoiser, x_T, "euler_ancestral", nfe=24, window=16, tol=1e-4, key=key)
    many = sample_picard(denoiser, x_T, "euler_ancestral", nfe=24, window=16, tol=1e-4, key=key, mesh=data_mesh())
    assert float(jnp.max(jnp.abs(one.x - many.x))) < 1e-12
    assert one.stats["iterations"] == many.stats["iterations"] < 24
    with pytest.raises(ValueError, match="window=12 must be a multiple of the mesh's 8 devices"):
        sample_picard(denoiser, x_T, "ddim", nfe=24, window=12, mesh=data_mesh())

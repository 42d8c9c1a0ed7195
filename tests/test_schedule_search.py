"""GITS-style schedule search: the DP is exact, and the searched grid beats log-SNR-uniform steps."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.learned import exact_endpoint
from fastsample.learned.schedule_search import jump_costs, min_cost_path, search_schedule, teacher_states
from fastsample.models import GaussianMixture


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_dp_equals_brute_force(steps):
    rng = np.random.default_rng(steps)
    costs = rng.exponential(size=(8, 8))
    path, total = min_cost_path(costs, steps)
    best = min(
        (sum(costs[a, b] for a, b in itertools.pairwise((0, *mid, 7))), (0, *mid, 7))
        for mid in itertools.combinations(range(1, 7), steps - 1)
    )
    np.testing.assert_allclose(total, best[0], rtol=1e-12)
    assert tuple(path) == best[1]


@pytest.mark.slow
def test_searched_schedule_beats_logsnr_uniform_for_ddim(x64):
    process = fs.VPDiscrete.ddpm_linear()
    denoiser = GaussianMixture.digits().denoiser(process)
    x_search = fs.prior(process, jax.random.PRNGKey(0), (16, 64), jnp.float64)
    x_test = fs.prior(process, jax.random.PRNGKey(1), (64, 64), jnp.float64)  # held-out noise
    target = exact_endpoint(denoiser, x_test, t_end=process.t_min)
    cands = np.asarray(fs.get_timesteps(process, 40, "logsnr_uniform"))
    teacher = teacher_states(denoiser, x_search, cands)
    np.testing.assert_allclose(teacher[:, -1], exact_endpoint(denoiser, x_search, t_end=process.t_min), atol=1e-6)
    costs = jump_costs(denoiser, x_search, cands, teacher=teacher)
    # a jump's cost is the one-step error against the teacher: DDIM over one fine interval is nearly exact
    assert np.mean(np.diag(costs, 1)) < 0.1 * costs[0, -1]

    def rmse(ts):
        x = fs.sample(denoiser, x_test, "ddim", timesteps=jnp.asarray(ts))
        return float(jnp.sqrt(jnp.mean((x - target) ** 2)))

    for nfe in (4, 5, 6):
        path, _ = min_cost_path(costs, nfe)
        searched, uniform = rmse(cands[path]), rmse(fs.get_timesteps(process, nfe, "logsnr_uniform"))
        assert searched < 0.9 * uniform, (nfe, searched, uniform)
    result = search_schedule(denoiser, x_search, 4, candidates=cands)
    np.testing.assert_array_equal(result.path, min_cost_path(costs, 4)[0])
    np.testing.assert_allclose(result.costs, costs, rtol=1e-9)


def test_errors(x64):
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 3\]"):
        min_cost_path(np.ones((4, 4)), 4)
    with pytest.raises(ValueError, match="costs must be a square"):
        min_cost_path(np.ones((4, 3)), 1)
    mixture = GaussianMixture.ring(n=4)
    fm = mixture.denoiser(fs.FlowMatching())
    x_T = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="finite log-SNR for the teacher solve; FlowMatching"):
        search_schedule(fm, x_T, 2, candidates=[1.0, 0.5, 0.1])
    vp = mixture.denoiser(fs.VPLinear())
    with pytest.raises(ValueError, match="candidates must be strictly decreasing"):
        search_schedule(vp, x_T, 2, candidates=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="ddim needs 5 steps for nfe=5 but there are only 3 candidate intervals"):
        search_schedule(vp, x_T, 5, num_candidates=3)
    with pytest.raises(ValueError, match="either explicit `candidates` or t_start/t_end"):
        search_schedule(vp, x_T, 2, candidates=[1.0, 0.5, 0.1], t_start=0.9)

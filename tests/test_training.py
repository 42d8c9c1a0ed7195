import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample import data, metrics
from fastsample.config import TrainConfig, config_from_dict
from fastsample.models.networks import NetworkFn, make_network
from fastsample.models.training import (
    EDMObjective,
    FlowMatchingObjective,
    TrainedNetwork,
    build_from_spec,
    evaluate,
    make_objective,
    network_spec,
    train,
)

S = 1.0  # data standard deviation of the Gaussian test data (EDM's sigma_data stays 0.5)


def _edm_closed_forms(obj, sigma, s=S):
    """Per-element expected EDM loss at noise level sigma for data N(0, s^2 I): with the exact
    denoiser D = s^2 / (s^2 + sigma^2) x, and with a raw network that outputs zero (D = c_skip x)."""
    c_skip, _, _, _ = obj.coefficients(sigma)
    lam = obj.weight(sigma)
    optimum = lam * s**2 * sigma**2 / (s**2 + sigma**2)
    zero = lam * ((c_skip - 1.0) ** 2 * s**2 + c_skip**2 * sigma**2)
    return optimum, zero


def _exact_edm_net(obj, s=S):
    """The raw network F whose preconditioned output is the exact denoiser of N(0, s^2 I)."""

    def net(z, c_noise, cond=None):
        sigma = jnp.exp(4.0 * c_noise)[:, None]
        c_skip, c_out, c_in, _ = obj.coefficients(sigma)
        x = z / c_in
        return (s**2 / (s**2 + sigma**2) * x - c_skip * x) / c_out

    return net


def _zero_net(z, label, cond=None):
    return jnp.zeros_like(z)


def _batched_means(fn, n_batches=20):
    """Mean and standard error of ``fn(key)`` over independent keys."""
    vals = np.array([float(fn(jax.random.PRNGKey(i))) for i in range(n_batches)])
    return vals.mean(), vals.std(ddof=1) / math.sqrt(n_batches)


def test_edm_preconditioning_closed_forms(x64):
    obj = EDMObjective(sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = obj.coefficients(jnp.asarray(0.5))
    np.testing.assert_allclose([c_skip, c_out, c_in, c_noise], [0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2)),
                                                                math.log(0.5) / 4], rtol=1e-15)
    sigma = jnp.logspace(-3, 2, 11)
    _, c_out, c_in, _ = obj.coefficients(sigma)
    # lambda(sigma) c_out^2 = 1: the loss is a unit-weight regression of F; c_in x has unit variance
    np.testing.assert_allclose(obj.weight(sigma) * c_out**2, 1.0, rtol=1e-13)
    np.testing.assert_allclose(c_in**2 * (0.5**2 + sigma**2), 1.0, rtol=1e-13)
    # data with std sigma_data: the zero network (D = c_skip x) is already the exact denoiser, loss 1
    optimum, zero = _edm_closed_forms(obj, sigma, s=0.5)
    np.testing.assert_allclose(optimum, 1.0, rtol=1e-13)
    np.testing.assert_allclose(zero, 1.0, rtol=1e-13)


@pytest.mark.parametrize("sigma", [0.2, 1.0, 3.0])
def test_edm_loss_at_fixed_sigma_matches_closed_forms(x64, sigma):
    obj = EDMObjective(sigma_data=0.5)
    n, d = 40_000, 4
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = S * jax.random.normal(k1, (n, d))
    noise = jax.random.normal(k2, (n, d))
    sig = jnp.full((n,), sigma)
    optimum, zero = _edm_closed_forms(obj, jnp.asarray(sigma))
    for net, expected in ((_exact_edm_net(obj), optimum), (_zero_net, zero)):
        per = np.asarray(obj.per_sample_loss(net, x0, sig, noise))
        se = per.std() / math.sqrt(n)
        assert abs(per.mean() - float(expected)) < 4 * se, (sigma, per.mean(), float(expected), se)
    assert float(zero) > float(optimum) * 1.05  # the two cases are distinguishable


def test_edm_loss_with_log_normal_sigmas_matches_quadrature(x64):
    obj = EDMObjective(sigma_data=0.5, p_mean=-1.2, p_std=1.2)
    z, w = np.polynomial.hermite_e.hermegauss(80)  # E over z ~ N(0, 1)
    sig = jnp.exp(obj.p_mean + obj.p_std * jnp.asarray(z))
    optimum, zero = (float(np.sum(w * np.asarray(v)) / math.sqrt(2 * math.pi)) for v in _edm_closed_forms(obj, sig))
    x = lambda k: S * jax.random.normal(jax.random.split(k, 3)[2], (5000, 4))  # independent of the loss's keys
    for net, expected in ((_exact_edm_net(obj), optimum), (_zero_net, zero)):
        mean, se = _batched_means(lambda k, net=net: obj.loss(net, x(k), k))
        assert abs(mean - expected) < 4 * se, (mean, expected, se)


def test_flow_matching_loss_closed_forms(x64):
    obj = FlowMatchingObjective()

    def exact_velocity(x, t, cond=None):  # E[eps - x0 | x_t] for x0 ~ N(0, S^2 I)
        t = t[:, None]
        return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x

    x = lambda k: S * jax.random.normal(jax.random.split(k, 3)[2], (5000, 3))  # independent of the loss's keys
    # minimum: mean over t ~ U(0, 1) of S^2 / ((1-t)^2 S^2 + t^2) = pi / 2 for S = 1
    mean, se = _batched_means(lambda k: obj.loss(exact_velocity, x(k), k))
    assert abs(mean - math.pi / 2) < 4 * se, (mean, se)
    # zero velocity: E (eps - x0)^2 = 1 + S^2
    mean, se = _batched_means(lambda k: obj.loss(_zero_net, x(k), k))
    assert abs(mean - (1 + S**2)) < 4 * se, (mean, se)


def _random_net(dim):
    return NetworkFn.from_module(make_network("mlp", dim, hidden=16, depth=1, zero_init=False))


def test_edm_network_denoiser_returns_consistent_x0_and_eps(x64):
    obj = EDMObjective()
    net = _random_net(4)
    trained = TrainedNetwork(net, obj, 4)
    d = trained.denoiser()
    assert isinstance(d.process, fs.EDM) and d.prediction == "x0"
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
    sigma = 0.7
    c_skip, c_out, c_in, c_noise = obj.coefficients(jnp.asarray(sigma))
    x0_manual = c_skip * x + c_out * net(c_in * x, c_noise)
    x0, eps = d.predict(x, sigma, target="x0"), d.predict(x, sigma, target="eps")
    np.testing.assert_allclose(x0, x0_manual, rtol=1e-12)
    np.testing.assert_allclose(x0 + sigma * eps, x, rtol=1e-12)  # x = x0 + sigma eps under EDM
    # the same network seen through a VP process: same log-SNR, input divided by alpha
    vp = fs.VPLinear()
    t = 0.4
    a, s = vp.alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(trained.denoiser(vp)(x, t), d(x / a, s / a), rtol=1e-10)
    with pytest.raises(ValueError, match="unknown objective 'ddpm'; allowed: edm, flow_matching"):
        make_objective("ddpm")


def test_flow_network_denoiser_returns_consistent_x0_and_eps(x64):
    net = _random_net(3)
    d = TrainedNetwork(net, FlowMatchingObjective(), 3).denoiser()
    assert isinstance(d.process, fs.FlowMatching) and d.prediction == "velocity"
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 3))
    t = 0.3
    v = net(x, jnp.full((5,), t))
    x0, eps = d.predict(x, t, target="x0"), d.predict(x, t, target="eps")
    np.testing.assert_allclose(x0, x - t * v, rtol=1e-12)  # x_t = (1-t) x0 + t eps, v = eps - x0
    np.testing.assert_allclose(eps, x + (1 - t) * v, rtol=1e-12)


def test_class_conditional_network_gets_the_null_class_for_guidance():
    obj = EDMObjective()
    net = NetworkFn.from_module(make_network("mlp", 4, hidden=16, depth=1, num_classes=3, zero_init=False))
    trained = TrainedNetwork(net, obj, 4, num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 4))
    cond = jnp.asarray([0, 2])
    w = 2.5
    guided = trained.denoiser(guidance_scale=w)(x, 0.8, cond)
    plain = trained.denoiser()
    uncond = plain(x, 0.8, jnp.full((2,), 3))
    np.testing.assert_allclose(guided, uncond + w * (plain(x, 0.8, cond) - uncond), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_trained_digits_network_beats_a_moment_matched_gaussian(tmp_path):
    """A small MLP trained for 1000 steps: in classifier features its samples are closer to the
    held-out digits (Frechet distance) than samples of a Gaussian with the training data's mean
    and covariance, and in raw pixels closer than a Gaussian with the per-pixel means and variances.
    (In raw pixels the full-covariance Gaussian matches exactly what the Frechet distance measures;
    see fastsample.metrics.digits_features.)"""
    cfg = config_from_dict(TrainConfig, {
        "name": "t", "steps": 1000, "warmup_steps": 50, "learning_rate": 2e-3, "steps_per_call": 250,
        "network": {"hidden": 128, "depth": 2}, "output_dir": str(tmp_path),
        "eval_samples": 1000, "eval_solver": "dpmpp_2m", "eval_nfe": 15,
    })
    trained, state, losses = train(cfg, progress=False)
    assert int(state.step) == 1000 and losses[-1] < 0.8 * losses[0]
    m, x = evaluate(trained, cfg)
    assert x.shape == (1000, 64) and np.all(np.isfinite(x))
    assert m["fd_features"] < 0.8 * m["gaussian_fd_features"], m
    x_train, _ = data.digits("train")
    held_out, _ = data.digits("test")
    rng = np.random.default_rng(0)
    diagonal = x_train.mean(0) + x_train.std(0) * rng.standard_normal((1000, 64))
    assert m["fd_pixels"] < 0.5 * float(metrics.frechet_distance(diagonal, held_out)), m


def test_class_conditional_training_with_label_dropout_and_guided_sampling(tmp_path):
    cfg = config_from_dict(TrainConfig, {
        "name": "c", "steps": 20, "steps_per_call": 10, "save_every": 20, "batch_size": 16, "label_dropout": 0.5,
        "network": {"hidden": 16, "depth": 1, "emb_dim": 8, "num_classes": 10}, "output_dir": str(tmp_path),
        "eval_samples": 0, "objective": "flow_matching", "time_distribution": "logit_normal",
    })
    trained, state, losses = train(cfg, progress=False)
    assert trained.num_classes == 10 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    emb = np.asarray(state.params["cond"]["classes"]["embedding"])
    init = np.asarray(build_from_spec(network_spec(cfg, 64)).net.params["cond"]["classes"]["embedding"])
    assert emb.shape == init.shape == (11, 8)  # ten classes and the null class
    assert np.all(np.any(emb != init, axis=1))  # every row trained, the null class through label dropout
    d = trained.denoiser(guidance_scale=2.0)
    assert isinstance(d.process, fs.FlowMatching) and int(d.uncond) == 10
    x = fs.sample(d, fs.prior(d.process, jax.random.PRNGKey(0), (4, 64)), "dpmpp_2m", nfe=4,
                  cond=jnp.asarray([0, 3, 5, 9]))
    assert x.shape == (4, 64) and bool(jnp.all(jnp.isfinite(x)))

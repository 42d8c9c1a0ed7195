"""Classifier-free guidance against closed forms on a class-conditional Gaussian mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.guidance import classifier_free_guidance, fix_condition
from fastsample.models import ClassConditionalMixture, GaussianMixture

MEANS = np.array([[1.5, -0.5], [-1.0, 2.0]])
VARS = np.array([0.3, 0.8])
WEIGHTS = np.array([0.35, 0.65])


def _mixture():
    return ClassConditionalMixture([GaussianMixture(MEANS[c][None], VARS[c][None]) for c in range(2)], WEIGHTS)


def _closed_form(x, alpha, sigma, w, label):
    """Two isotropic Gaussian classes: per-class posterior means, Bayes' rule for the unconditional
    one, and ``u + w (c - u)``."""
    var = alpha**2 * VARS + sigma**2  # (2,)
    post = MEANS[None] + (alpha * VARS / var)[None, :, None] * (x[:, None] - alpha * MEANS[None])  # (N, 2, D)
    logp = np.log(WEIGHTS) - 0.5 * np.sum((x[:, None] - alpha * MEANS[None]) ** 2, -1) / var - np.log(var)
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    uncond = np.einsum("nc,ncd->nd", r, post)
    cond = post[np.arange(len(x)), label]
    return uncond + w * (cond - uncond), cond, uncond


def test_guided_denoiser_matches_the_closed_form(x64):
    process = fs.VPDiscrete.ddpm_linear()
    cc = _mixture()
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 2), jnp.float64)) * 2.0
    labels = np.array([0, 1, 1, 0, 1, 0])
    t = 0.4
    alpha, sigma = (float(v) for v in process.alpha_sigma(jnp.asarray(t, jnp.float64)))
    for w in (0.0, 1.0, 3.0, 7.5):
        want, cond, uncond = _closed_form(x, alpha, sigma, w, labels)
        got = cc.denoiser(process, w)(jnp.asarray(x), t, jnp.asarray(labels))  # the Denoiser's CFG path
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)
        for label in (0, 1):
            rows = labels == label
            fast = cc.guided_denoiser(process, label, w)(jnp.asarray(x[rows]), t)
            fixed = fix_condition(cc.denoiser(process, w), label)(jnp.asarray(x[rows]), t)
            np.testing.assert_allclose(np.asarray(fast), want[rows], rtol=0, atol=1e-12)
            np.testing.assert_allclose(np.asarray(fixed), want[rows], rtol=0, atol=1e-12)
    # the unguided model: labels select the class, the null label the whole mixture
    plain = cc.denoiser(process)
    np.testing.assert_allclose(np.asarray(plain(jnp.asarray(x), t, jnp.asarray(labels))), cond, atol=1e-12)
    np.testing.assert_allclose(np.asarray(plain(jnp.asarray(x), t, jnp.full(6, cc.null))), uncond, atol=1e-12)
    assert abs(float(jnp.sum(cc.unconditional.weights)) - 1.0) < 1e-14


def test_guidance_is_the_same_in_every_prediction(x64):
    """Guiding an eps-, v- or velocity-predicting model gives the same data prediction as guiding
    the x0 model (the conversions are affine with the same coefficient of x)."""
    process = fs.VPLinear()
    cc = _mixture()
    x0_model = cc.model(process)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2), jnp.float64)
    labels = jnp.array([1, 0, 1, 1, 0])
    t, w = 0.55, 4.0
    want = cc.denoiser(process, w)(x, t, labels)
    for prediction in ("eps", "v", "velocity"):
        def model(x, t, cond, prediction=prediction):
            return fs.convert_prediction(process, x, t, x0_model(x, t, cond), "x0", prediction)

        guided = classifier_free_guidance(fs.Denoiser(model, process, prediction), w, cc.null)
        np.testing.assert_allclose(np.asarray(guided(x, t, labels)), np.asarray(want), rtol=0, atol=1e-10)


def test_guided_sampling_runs_through_sample(x64):
    """Sampling with the guided denoiser and per-sample labels equals sampling each class with its
    fixed-condition denoiser; scale 0 samples the whole mixture, scale 1 the class."""
    process = fs.VPDiscrete.ddpm_linear()
    cc = _mixture()
    x_T = fs.prior(process, jax.random.PRNGKey(2), (64, 2), jnp.float64)
    labels = jnp.arange(64) % 2
    got = fs.sample(cc.denoiser(process, 2.0), x_T, "dpmpp_2m", nfe=8, final_zero=True, cond=labels)
    for label in (0, 1):
        rows = np.asarray(labels == label)
        one = fs.sample(cc.guided_denoiser(process, label, 2.0), x_T[rows], "dpmpp_2m", nfe=8, final_zero=True)
        np.testing.assert_allclose(np.asarray(got[rows]), np.asarray(one), atol=1e-12)
    share = []  # the share of samples that the data distribution's classifier assigns to class 0
    for w in (0.0, 1.0):
        x = fs.sample(cc.guided_denoiser(process, 0, w), x_T, "dpmpp_2m", nfe=8, final_zero=True)
        share.append(float(jnp.mean(cc.unconditional.responsibilities(x)[:, 0] > 0.5)))
    assert 0.15 < share[0] < 0.55 and share[1] == 1.0  # w = 0: the mixture (weight 0.35); w = 1: class 0


def test_errors():
    process = fs.VPDiscrete.ddpm_linear()
    cc = _mixture()
    guided = cc.denoiser(process, 2.0)
    with pytest.raises(ValueError, match="already guided"):
        classifier_free_guidance(guided, 3.0, cc.null)
    with pytest.raises(ValueError, match="null condition"):
        classifier_free_guidance(cc.denoiser(process), 3.0, None)
    with pytest.raises(ValueError, match="finite scalar"):
        classifier_free_guidance(cc.denoiser(process), float("nan"), cc.null)
    with pytest.raises(ValueError, match="fastsample.Denoiser"):
        classifier_free_guidance(lambda x, t, c: x, 3.0, cc.null)
    with pytest.raises(ValueError, match="needs a condition"):
        fix_condition(guided, None)
    with pytest.raises(ValueError, match="fixed condition"):
        fix_condition(guided, 0)(jnp.ones((2, 2)), 0.5, jnp.zeros(2, int))
    with pytest.raises(ValueError, match=r"integers in 0\.\.2"):
        cc.denoiser(process)(jnp.ones((2, 2)), 0.5, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="needs integer labels"):
        cc.denoiser(process)(jnp.ones((2, 2)), 0.5)
    with pytest.raises(ValueError, match="class in 0..1"):
        cc.guided_denoiser(process, 2, 3.0)
    with pytest.raises(ValueError, match="class_weights must be 2 positive numbers"):
        ClassConditionalMixture(cc.classes, [0.5, 0.6])
    with pytest.raises(ValueError, match="same dimension"):
        ClassConditionalMixture([cc.classes[0], GaussianMixture([[0.0, 0.0, 0.0]], [1.0])])
    with pytest.raises(ValueError, match="covariance must be"):
        ClassConditionalMixture.digits(covariance="banded")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs

M, C2 = np.array([0.5, -1.0, 2.0]), 0.7  # data N(M, C2 I): closed-form posterior mean


def true_x0(process, x, t):
    a, s = process.alpha_sigma(t)
    return M + a * C2 / (a**2 * C2 + s**2) * (x - a * M)


def model_of_kind(process, kind):
    """A model that predicts `kind` exactly for Gaussian data (formulas written out here)."""

    def model(x, t, cond):
        a, s, da, ds = process.derivatives(t)
        x0 = true_x0(process, x, t)
        eps = (x - a * x0) / s
        return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "velocity": da * x0 + ds * eps,
                "score": -eps / s}[kind]

    return model


PROCS = [fs.VPLinear(), fs.VPCosine(), fs.VE(), fs.EDM(), fs.FlowMatching(), fs.VPDiscrete.ddpm_linear()]


@pytest.mark.parametrize("process", PROCS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("kind", ["x0", "eps", "v", "velocity", "score"])
def test_every_prediction_type_gives_the_same_x0(x64, process, kind):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    t = jnp.asarray(0.37 * process.t_max + 0.6 * process.t_min)
    d = fs.Denoiser(model_of_kind(process, kind), process, kind)
    np.testing.assert_allclose(d(x, t), true_x0(process, x, t), rtol=1e-9, atol=1e-12)
    a, s = process.alpha_sigma(t)
    np.testing.assert_allclose(d.predict(x, t, target="eps"), (x - a * true_x0(process, x, t)) / s, rtol=1e-9,
                               atol=1e-12)
    # Gaussian score in closed form
    score = -(x - a * M) / (a**2 * C2 + s**2)
    np.testing.assert_allclose(d.predict(x, t, target="score"), score, rtol=1e-8, atol=1e-12)
    for target in fs.denoisers.TARGETS:
        back = fs.convert_prediction(process, x, t, d.predict(x, t, target=target), target, kind)
        np.testing.assert_allclose(back, d.raw(x, t), rtol=1e-8, atol=1e-10)


def test_classifier_free_guidance_is_traced_and_exact():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape)
        return x * 0 + cond  # the prediction is the condition itself

    p = fs.VPLinear()
    x = jnp.ones((2, 3))
    cond = jnp.full((2, 3), 2.0)

    @jax.jit
    def f(w):
        return fs.Denoiser(model, p, "x0", guidance_scale=w, uncond=jnp.zeros(3))(x, 0.5, cond)

    np.testing.assert_allclose(f(3.0), 6.0)  # uncond + w (cond - uncond) = 0 + 3 * 2
    np.testing.assert_allclose(f(1.5), 3.0)
    assert calls == [(4, 3)]  # one batched model call, traced once for both scales


def test_thresholding():
    p = fs.VPLinear()
    x0 = jnp.array([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.5]])
    model = lambda x, t, c: x0
    static = fs.Denoiser(model, p, "x0", thresholding=fs.Thresholding("static", max_value=1.0))
    np.testing.assert_allclose(static(jnp.zeros_like(x0), 0.5), np.clip(x0, -1, 1))
    dyn = fs.Denoiser(model, p, "x0", thresholding=fs.Thresholding("dynamic", ratio=1.0, max_value=2.5))
    # row 0: s = clamp(max |x0| = 3, 1, 2.5) = 2.5; row 1: s = clamp(0.5, 1, 2.5) = 1
    expected = np.stack([np.clip(x0[0], -2.5, 2.5) / 2.5, np.asarray(x0[1])])
    np.testing.assert_allclose(dyn(jnp.zeros_like(x0), 0.5), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="thresholding ratio must be in"):
        fs.Thresholding("dynamic", ratio=1.5)
    with pytest.raises(ValueError, match="unknown thresholding kind 'soft'"):
        fs.Thresholding("soft")


def test_bad_model_output_and_names():
    p = fs.VPLinear()
    x = jnp.ones((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"model output must have the shape and dtype of x"):
        fs.Denoiser(lambda x, t, c: x[:, :2], p, "eps")(x, 0.5)
    with pytest.raises(ValueError, match=r"model output must have the shape and dtype of x"):
        fs.Denoiser(lambda x, t, c: x.astype(jnp.float16), p, "eps")(x, 0.5)
    with pytest.raises(ValueError, match="unknown prediction 'noise'; allowed: eps, x0, v, velocity, score"):
        fs.Denoiser(lambda x, t, c: x, p, "noise")
    with pytest.raises(ValueError, match="unknown target"):
        fs.Denoiser(lambda x, t, c: x, p, "eps").predict(x, 0.5, target="y")


def test_with_process_keeps_the_data_prediction(x64):
    vp = fs.VPLinear()
    d = fs.Denoiser(model_of_kind(vp, "eps"), vp, "eps")
    edm = fs.EDM(sigma_min=0.01, sigma_max=50.0)
    e = d.with_process(edm)
    y = jax.random.normal(jax.random.PRNGKey(1), (3, 3))
    for sigma in [0.05, 1.0, 20.0]:
        t_vp = vp.t_from_sigma_edm(sigma)
        np.testing.assert_allclose(e(y, sigma), d(vp.alpha(t_vp) * y, t_vp), rtol=1e-10)

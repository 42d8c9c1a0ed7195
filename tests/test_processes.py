import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs

PROCESSES = {
    "vp_linear": fs.VPLinear(),
    "vp_cosine": fs.VPCosine(),
    "ddpm_linear": fs.VPDiscrete.ddpm_linear(),
    "scaled_linear": fs.VPDiscrete.scaled_linear(),
    "ve": fs.VE(),
    "edm": fs.EDM(),
    "flow": fs.FlowMatching(),
}


def _times(p):
    return np.concatenate([
        np.linspace(p.t_min, p.t_max, 1001),
        np.geomspace(max(p.t_min, 1e-6), p.t_max, 300),
        [p.t_min, p.t_max, 0.0],
    ])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isfinite(a), np.isfinite(b))
    m = np.isfinite(b)
    assert np.array_equal(a[~m], b[~m])
    return np.max(np.abs(a[m] - b[m]) / np.maximum(np.abs(b[m]), 1e-300))


@pytest.mark.parametrize("name", PROCESSES)
def test_float32_agrees_with_float64(x64, name):
    """Every map is accurate in float32 over the whole range, both ends included: float32 and
    float64 evaluations of the same (float32-representable) inputs agree to 1e-5 relative."""
    p = PROCESSES[name]
    t32 = jnp.asarray(_times(p), jnp.float32)
    t64 = t32.astype(jnp.float64)
    assert _rel(p.alpha(t32), p.alpha(t64)) < 1e-5
    assert _rel(p.sigma(t32), p.sigma(t64)) < 1e-5
    assert _rel(p.sigma_edm(t32[:-1]), p.sigma_edm(t64[:-1])) < 1e-5
    lam32, lam64 = p.log_snr(t32), p.log_snr(t64)
    finite = np.isfinite(np.asarray(lam64))
    l32, l64 = np.asarray(lam32, np.float64)[finite], np.asarray(lam64)[finite]
    assert np.max(np.abs(l32 - l64) / np.maximum(1.0, np.abs(l64))) < 1e-5
    lam_in = lam32[:-1][np.isfinite(np.asarray(lam32[:-1]))]
    assert _rel(p.t_from_log_snr(lam_in), p.t_from_log_snr(lam_in.astype(jnp.float64))) < 1e-5


@pytest.mark.parametrize("name", PROCESSES)
def test_inverse_and_conventions(x64, name):
    p = PROCESSES[name]
    ts = jnp.asarray(_times(p)[:-1])
    lam = p.log_snr(ts)
    ok = np.isfinite(np.asarray(lam))
    np.testing.assert_allclose(p.t_from_log_snr(lam[ok]), ts[ok], rtol=1e-9, atol=1e-12)
    # lambda decreases with t: sampling from t_max to t_min increases lambda
    order = np.argsort(np.asarray(ts))
    assert np.all(np.diff(np.asarray(lam)[order][ok[order]]) <= 0)
    # t = 0 is clean data
    assert float(p.sigma(0.0)) == 0.0 and float(p.alpha(0.0)) == 1.0 and float(p.log_snr(0.0)) == np.inf
    if p.variance_preserving:
        np.testing.assert_allclose(p.alpha(ts) ** 2 + p.sigma(ts) ** 2, 1.0, rtol=1e-12)


def test_closed_forms(x64):
    t = jnp.linspace(1e-3, 1.0, 50)
    p = fs.VPLinear(beta_min=0.1, beta_max=20.0)
    log_a = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    np.testing.assert_allclose(p.alpha(t), np.exp(log_a), rtol=1e-13)
    np.testing.assert_allclose(p.sigma(t), np.sqrt(1 - np.exp(2 * log_a)), rtol=1e-12)
    c = fs.VPCosine()
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    tc = np.linspace(1e-3, 0.9946, 50)
    np.testing.assert_allclose(c.alpha(jnp.asarray(tc)) ** 2, f(tc) / f(0.0), rtol=1e-10)
    fm = fs.FlowMatching()
    np.testing.assert_allclose(fm.alpha(t), 1 - t, rtol=1e-14)
    np.testing.assert_allclose(fm.sigma(t), t, rtol=1e-14)
    edm = fs.EDM()
    np.testing.assert_allclose(edm.sigma_edm(jnp.asarray([0.002, 1.0, 80.0])), [0.002, 1.0, 80.0], rtol=1e-14)
    ve = fs.VE(sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(t), 0.01 * 5000.0**t, rtol=1e-12)


def test_discrete_matches_alphas_cumprod(x64):
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    p = fs.VPDiscrete.ddpm_linear()
    t_n = (np.arange(1000) + 1) / 1000
    np.testing.assert_allclose(p.alpha(jnp.asarray(t_n)) ** 2, ac, rtol=1e-10)
    q = fs.VPDiscrete(alphas_cumprod=ac)
    np.testing.assert_allclose(q.log_snr(jnp.asarray(t_n)), p.log_snr(jnp.asarray(t_n)), rtol=1e-10)
    sd = fs.VPDiscrete.scaled_linear()
    b = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(sd.alpha(jnp.asarray(t_n)) ** 2, np.cumprod(1 - b), rtol=1e-10)
    assert p.t_min == 1e-3 and p.t_max == 1.0


def test_bad_process_arguments():
    with pytest.raises(ValueError, match="exactly one of"):
        fs.VPDiscrete()
    with pytest.raises(ValueError, match=r"betas must be .* in \(0, 1\)"):
        fs.VPDiscrete(betas=np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        fs.VPDiscrete(alphas_cumprod=np.array([0.5, 0.9]))
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        fs.EDM(sigma_min=1.0, sigma_max=0.5)


def test_check_times_errors():
    p = fs.VPLinear()
    with pytest.raises(ValueError, match="strictly decreasing"):
        p.check_times(np.array([1.0, 0.5, 0.6]))
    with pytest.raises(ValueError, match=r"leaves the time range of VPLinear: allowed \[0.001, 1.0\]"):
        p.check_times(np.array([1.5, 0.5]))
    with pytest.raises(ValueError, match="at least 2 times"):
        p.check_times(np.array([1.0]))
    p.check_times(np.array([1.0, 0.5, 0.0]))  # a final 0 is clean data
    with pytest.raises(ValueError, match="leaves the time range"):
        p.check_times(np.array([1.0, 0.5, 0.0]), allow_zero=False)


def test_derivatives_match_finite_differences(x64):
    for p in PROCESSES.values():
        t = jnp.asarray(0.5 * (p.t_min + p.t_max) + 0.013)
        a, s, da, ds = p.derivatives(t)
        eps = 1e-6 * max(1.0, p.t_max)
        np.testing.assert_allclose(da, (p.alpha(t + eps) - p.alpha(t - eps)) / (2 * eps), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(ds, (p.sigma(t + eps) - p.sigma(t - eps)) / (2 * eps), rtol=1e-5, atol=1e-9)


def test_jit_does_not_retrace_for_new_values():
    p = fs.VPLinear()
    traces = []

    @jax.jit
    def f(t):
        traces.append(1)
        return p.log_snr(t), p.t_from_log_snr(p.log_snr(t))

    f(jnp.float32(0.3))
    f(jnp.float32(0.7))
    assert len(traces) == 1

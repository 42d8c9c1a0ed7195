import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import counting

import fastsample as fs
from fastsample.inversion import BDIADDIM, bdia_invert, bdia_sample, invert
from fastsample.models import GaussianMixture
from fastsample.solvers import DDIM, DPMSolverMultistep, DPMSolverSinglestep, Heun
from fastsample.solvers.wrappers import GHVB, HB, EpsScaling, TimeShift

POINT = np.array([0.7, -1.3])


def point_model(x, t, cond):
    return jnp.broadcast_to(jnp.asarray(POINT, x.dtype), x.shape)


def ring_setup(prediction="x0", n=16, seed=0):
    p = fs.VPLinear()
    d = GaussianMixture.ring().denoiser(p)
    if prediction == "eps":
        x0_denoiser = d
        d = fs.Denoiser(lambda x, t, c: x0_denoiser.predict(x, t, c, "eps"), p, "eps")
    return p, d, fs.prior(p, jax.random.PRNGKey(seed), (n, 2))


def maxdiff(a, b):
    return float(jnp.max(jnp.abs(a - b)))


BASES = {"ddim": DDIM(), "dpmpp_2m": DPMSolverMultistep(order=2, prediction="x0")}


@pytest.mark.parametrize("base", BASES)
def test_wrappers_reduce_exactly_to_their_base(x64, base):
    p, d, x_T = ring_setup()
    b = BASES[base]
    ref = fs.sample(d, x_T, b, nfe=8)
    same = [HB(b, 1.0), GHVB(b, 1.0), TimeShift(b, 0, 0.0), TimeShift(b, 40, cutoff=2.0), EpsScaling(b, 1.0)]
    for w in same:
        assert maxdiff(fs.sample(d, x_T, w, nfe=8), ref) <= 1e-12, w.name
    # and the knobs do change the sampler (so the reductions above are not vacuous)
    for w in [HB(b, 0.5), GHVB(b, 0.5), TimeShift(b, 40, 0.0), EpsScaling(b, 1.05)]:
        assert maxdiff(fs.sample(d, x_T, w, nfe=8), ref) > 1e-3, w.name


def _xbar_step(p, t0, t1, x, v):
    """x_bar_{n+1} = x_bar_n + (sigma_bar_{n+1} - sigma_bar_n) v, back in x."""
    a0, s0 = p.alpha_sigma(t0)
    a1, s1 = p.alpha_sigma(t1)
    return a1 * (x / a0 + (s1 / a1 - s0 / a0) * v)


def test_hb_and_ghvb_follow_the_papers_formulas(x64):
    p, d, x_T = ring_setup(n=8)
    beta, n = 0.6, 6
    ts = fs.get_timesteps(p, n, "logsnr_uniform")
    # HB on DDIM as the paper writes it, in eps variables (HB steps in x0 variables: same sampler):
    # v_{n+1} = (1 - beta) v_n + beta eps_n, x_bar_{n+1} = x_bar_n + delta_n v_{n+1}
    x, v = x_T, None
    for i in range(n):
        eps = d.predict(x, ts[i], None, "eps")
        v = eps if v is None else (1 - beta) * v + beta * eps
        x = _xbar_step(p, ts[i], ts[i + 1], x, v)
    got = fs.sample(d, x_T, HB(DDIM(), beta), nfe=None, timesteps=ts)
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-10)
    # GHVB of order 2: on a log-SNR-uniform grid DPM-Solver-2M in eps is AB2 in x_bar, and GHVB is
    # x_bar_{n+1} = x_bar_n + delta_n ((2 + beta) v_n - (2 - beta) v_{n-1}) / (2 beta), warm-up order 1.
    x, vs = x_T, []
    for i in range(n):
        eps = d.predict(x, ts[i], None, "eps")
        vs.append(eps if not vs else (1 - beta) * vs[-1] + beta * eps)
        comb = vs[-1] if i == 0 else ((2 + beta) * vs[-1] - (2 - beta) * vs[-2]) / (2 * beta)
        x = _xbar_step(p, ts[i], ts[i + 1], x, comb)
    base = DPMSolverMultistep(order=2, prediction="eps", lower_order_final=False)
    got = fs.sample(d, x_T, GHVB(base, beta), nfe=None, timesteps=ts)
    np.testing.assert_allclose(got, x, rtol=1e-9, atol=1e-9)
    # HB on DPM-Solver++(2M): momentum on the data-prediction combination D0 + (D0 - D1) / (2 r)
    x, v, prev = x_T, None, None
    for i in range(n):
        m = d(x, ts[i])
        comb = m if prev is None or i == n - 1 else m + 0.5 * (m - prev)  # r = 1; last step order 1
        v = comb if v is None else (1 - beta) * v + beta * comb
        h = p.log_snr(ts[i + 1]) - p.log_snr(ts[i])
        x = (p.sigma(ts[i + 1]) / p.sigma(ts[i])) * x - p.alpha(ts[i + 1]) * jnp.expm1(-h) * v
        prev = m
    got = fs.sample(d, x_T, HB(DPMSolverMultistep(order=2, prediction="x0"), beta), nfe=None, timesteps=ts)
    np.testing.assert_allclose(got, x, rtol=1e-9, atol=1e-9)


def test_time_shift_picks_the_matching_noise_level_and_moves_the_result_a_little(x64):
    p, d, x_T = ring_setup("eps")
    ts_solver = TimeShift(DDIM(), window=40, cutoff=0.3)
    view = ts_solver.wrap(d)
    x = 0.5 * jax.random.normal(jax.random.PRNGKey(7), (64, 2))  # variance ~ 0.25
    var = float(jnp.mean(jnp.var(x, axis=1, ddof=1)))
    for t in (0.05, 0.2, 0.6, 0.95):
        cands = np.clip(t + np.arange(-20, 21) * (p.t_max - p.t_min) / 999, p.t_min, p.t_max)
        best = cands[np.argmin(np.abs(var - np.asarray(p.sigma(jnp.asarray(cands))) ** 2))]
        expected = best if t > 0.3 else t
        assert float(view.shifted_time(x, jnp.asarray(t))) == pytest.approx(expected, abs=1e-12)
        # the noise prediction is the model's at the shifted time
        tau = view.shifted_time(x, jnp.asarray(t))
        np.testing.assert_array_equal(view.predict(x, t, None, "eps"), d.predict(x, tau, None, "eps"))
    ref = fs.sample(d, x_T, "ddim", nfe=10)
    shifted = fs.sample(d, x_T, TimeShift(DDIM(), window=20, cutoff=0.0), nfe=10)
    diff = maxdiff(shifted, ref)
    assert np.isfinite(diff) and 1e-4 < diff < 0.5, diff


def test_eps_scaling_closed_form(x64):
    p = fs.VPLinear()
    d = fs.Denoiser(point_model, p, "x0")
    es = EpsScaling(DDIM(), scale=1.01, slope=0.05)
    view = es.wrap(d)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    for t in (0.9, 0.3):
        a, s = p.alpha_sigma(jnp.asarray(t))
        lam = 1.01 + 0.05 * t
        eps = (x - a * POINT) / (s * lam)
        np.testing.assert_allclose(view.predict(x, t, None, "eps"), eps, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(view(x, t), (x - s * eps) / a, rtol=1e-12, atol=1e-12)
    # one DDIM step uses the scaled noise: x1 = alpha1 x0' + sigma1 eps'
    t0, t1 = 0.9, 0.3
    a0, s0 = p.alpha_sigma(jnp.asarray(t0))
    a1, s1 = p.alpha_sigma(jnp.asarray(t1))
    eps = (x - a0 * POINT) / (s0 * (1.01 + 0.05 * t0))
    x1 = fs.sample(d, x, es, nfe=None, timesteps=jnp.array([t0, t1]))
    np.testing.assert_allclose(x1, a1 * (x - s0 * eps) / a0 + s1 * eps, rtol=1e-12, atol=1e-12)


def test_reported_nfe_equals_model_calls():
    p = fs.EDM()
    model, calls = counting(lambda x, t, c: 0.5 * x)
    d = fs.Denoiser(model, p, "x0")
    x = jnp.ones((2, 2))
    cases = [
        (HB(Heun(), 0.7), True),
        (GHVB(DPMSolverMultistep(order=3, prediction="eps"), 0.7), False),
        (TimeShift(DPMSolverSinglestep(order=2, prediction="x0"), window=10, cutoff=1.0), True),
        (EpsScaling(DDIM(), 1.02), False),
        (BDIADDIM(), False),
    ]
    for solver, final_zero in cases:
        nfe = solver.nfe(4, final_zero)
        calls.clear()
        info = fs.solve(d, x, solver, nfe=nfe, schedule="karras", final_zero=final_zero)
        out = info.x
        out.block_until_ready()
        jax.effects_barrier()
        assert info.stats["nfe"] == nfe == len(calls), (solver.name, info.stats["nfe"], len(calls))
    back = fs.grid(d.process, 5, "karras", solver="ddim").reversed()
    for run, expected in [
        (lambda: fs.solve(d, x, "ddim", grid=back).stats["nfe"], 5),
        (lambda: bdia_invert(d, x, x, nfe=5, schedule="karras").block_until_ready() is None or 4, 4),
    ]:
        calls.clear()
        reported = run()
        jax.effects_barrier()
        assert reported == expected == len(calls)


def test_bdia_inverts_exactly_and_ddim_inversion_does_not(x64):
    p, d, x_T = ring_setup()
    for nfe in (10, 50):
        x_last, x_prev = bdia_sample(d, x_T, nfe)
        assert maxdiff(bdia_invert(d, x_last, x_prev, nfe), x_T) < 1e-5, nfe
    errors = []
    for nfe in (10, 20, 50):
        x = fs.sample(d, x_T, "ddim", nfe=nfe)
        errors.append(maxdiff(invert(d, x, "ddim", nfe=nfe), x_T))
    assert errors[0] > 1e-4 and errors[2] < errors[1] < errors[0], errors
    # gamma = 0 is DDIM; gamma = 1 is a different (second-order-like) sampler
    ref = fs.sample(d, x_T, "ddim", nfe=10)
    assert maxdiff(fs.sample(d, x_T, BDIADDIM(0.0), nfe=10), ref) <= 1e-12
    assert maxdiff(fs.sample(d, x_T, BDIADDIM(1.0), nfe=10), ref) > 1e-3


def test_ddim_inversion_is_exact_for_single_point_data(x64):
    p = fs.VPLinear()
    d = fs.Denoiser(point_model, p, "x0")
    x_T = fs.prior(p, jax.random.PRNGKey(2), (5, 2))
    info = fs.solve(d, x_T, "ddim", nfe=7)
    x = info.x
    np.testing.assert_allclose(invert(d, x, "ddim", nfe=7), x_T, rtol=1e-12, atol=1e-12)
    inv_info = fs.solve(d, x, "ddim", grid=info.grid.reversed())
    np.testing.assert_allclose(inv_info.x, x_T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(inv_info.grid.times, info.grid.times[::-1])
    # and the other way round: invert then sample
    x_min = 0.3 * x_T + 0.1
    np.testing.assert_allclose(fs.sample(d, invert(d, x_min, "ddim", nfe=7), "ddim", nfe=7), x_min,
                               rtol=1e-12, atol=1e-12)


def test_inversion_grid_validation():
    p = fs.VPLinear()
    d = fs.Denoiser(point_model, p, "x0")
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        invert(d, x, "ddim", nfe=None, timesteps=np.array([1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="time range of VPLinear"):
        invert(d, x, "ddim", nfe=None, timesteps=np.array([0.1, 0.5, 2.0]))
    with pytest.raises(ValueError, match="starts at t > 0"):  # flow matching's range ends at t = 0
        invert(fs.Denoiser(point_model, fs.FlowMatching(), "x0"), x, "ddim", nfe=3, schedule="time_uniform")
    with pytest.raises(ValueError, match="gamma > 0"):
        bdia_invert(d, x, x, nfe=3, gamma=0.0)
    with pytest.raises(ValueError, match="beta must be in"):
        HB(DDIM(), 0.0)
    with pytest.raises(ValueError, match="GHVB needs a multistep solver"):
        GHVB(Heun(), 0.5)
    # a wrapper keeps its base's refusal of a start at pure noise
    flow = fs.Denoiser(point_model, fs.FlowMatching(), "x0")
    with pytest.raises(ValueError, match="finite log-SNR"):
        fs.sample(flow, x, TimeShift(DPMSolverSinglestep(order=2), window=4), nfe=5, schedule="time_uniform")

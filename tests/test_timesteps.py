import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastsample.processes import EDM, VE, FlowMatching, VPCosine, VPDiscrete, VPLinear
from fastsample.timesteps import (
    AYS_SIGMAS,
    SCHEDULES,
    available_schedules,
    beta_ppf,
    get_timesteps,
    leading_indices,
    linspace_indices,
    trailing_indices,
    validate_timesteps,
)

PROCESSES = {
    "vp_linear": VPLinear(),
    "vp_cosine": VPCosine(),
    "vp_discrete": VPDiscrete.scaled_linear(),
    "ve": VE(),
    "edm": EDM(),
    "flow": FlowMatching(),
}
CONTINUOUS = [
    "time_uniform",
    "time_quadratic",
    "logsnr_uniform",
    "exponential",
    "karras",
    "polyexponential",
    "beta",
]
SD15 = np.array(AYS_SIGMAS["sd15"])


def _ends(name, process):
    """Valid (t_start, t_end) choices: defaults (where finite) and an explicit interior pair."""
    lo, hi = process.t_min, process.t_max
    inner = (lo + 0.9 * (hi - lo), lo + 0.05 * (hi - lo))
    if name == "flow":
        return [(0.99, 0.01), inner]
    return [(None, None), inner]


def _sigma_edm(process, ts):
    with jax.enable_x64(True):
        return np.asarray(process.sigma_edm(jnp.asarray(np.asarray(ts, np.float64))))


def _cast(x):
    return np.asarray(x, dtype=jnp.result_type(float))


def test_registry():
    assert set(available_schedules()) == set(SCHEDULES)
    assert available_schedules() == sorted(SCHEDULES)
    for name in CONTINUOUS + ["ays", "leading", "trailing", "linspace"]:
        assert name in SCHEDULES


# ------------------------------------------------------------------ endpoints and monotonicity


@pytest.mark.parametrize("pname", list(PROCESSES))
@pytest.mark.parametrize("schedule", CONTINUOUS + ["ays"])
@pytest.mark.parametrize("final_zero", [False, True])
def test_endpoints_and_monotone(pname, schedule, final_zero):
    process = PROCESSES[pname]
    for t_start, t_end in _ends(pname, process):
        if final_zero and t_end is None and process.t_min == 0:
            continue
        for n in (1, 2, 7):
            ts = get_timesteps(process, n, schedule, t_start=t_start, t_end=t_end, final_zero=final_zero)
            assert ts.shape == (n + 1,)
            assert ts.dtype == jnp.result_type(float)
            ts = np.asarray(ts)
            assert np.all(np.diff(ts) < 0), ts
            assert ts[0] == _cast(process.t_max if t_start is None else t_start)
            last = process.t_min if t_end is None else t_end
            if final_zero:
                assert ts[-1] == 0.0
                if n > 1:
                    assert ts[-2] == _cast(last)
            else:
                assert ts[-1] == _cast(last)
            validate_timesteps(process, ts)


@pytest.mark.parametrize("pname", ["vp_linear", "vp_cosine", "vp_discrete", "ve", "edm"])
@pytest.mark.parametrize("schedule", CONTINUOUS)
def test_default_ends_are_t_max_t_min(pname, schedule):
    process = PROCESSES[pname]
    ts = np.asarray(get_timesteps(process, 12, schedule))
    assert ts[0] == _cast(process.t_max) and ts[-1] == _cast(process.t_min)


def test_flow_matching_defaults_for_time_schedules():
    ts = np.asarray(get_timesteps(FlowMatching(), 4, "time_uniform"))
    np.testing.assert_allclose(ts, [1.0, 0.75, 0.5, 0.25, 0.0])
    ts = np.asarray(get_timesteps(FlowMatching(), 4, "time_quadratic"))
    np.testing.assert_allclose(ts, [1.0, 0.5625, 0.25, 0.0625, 0.0], rtol=1e-6)


def test_output_dtype_follows_x64():
    assert get_timesteps(EDM(), 5, "karras").dtype == jnp.result_type(float)
    with jax.enable_x64(True):
        assert get_timesteps(EDM(), 5, "karras").dtype == jnp.float64


def test_usable_inside_jit():
    process = VPDiscrete.scaled_linear()

    @jax.jit
    def f(x):
        return x * get_timesteps(process, 5, "logsnr_uniform")

    np.testing.assert_allclose(np.asarray(f(1.0)), np.asarray(get_timesteps(process, 5, "logsnr_uniform")))


# ----------------------------------------------------------------------------- final_zero


@pytest.mark.parametrize("schedule", CONTINUOUS)
def test_final_zero_appends_exact_zero(schedule):
    process = VPLinear()
    with jax.enable_x64(True):
        ts = np.asarray(get_timesteps(process, 8, schedule, final_zero=True))
        ref = np.asarray(get_timesteps(process, 7, schedule))
    assert ts.shape == (9,) and ts[-1] == 0.0
    np.testing.assert_array_equal(ts[:-1], ref)
    one = np.asarray(get_timesteps(process, 1, schedule, final_zero=True))
    np.testing.assert_array_equal(one, _cast([process.t_max, 0.0]))


# ------------------------------------------------------------------------------ log-SNR uniform


@pytest.mark.parametrize("pname", ["vp_linear", "vp_cosine", "vp_discrete", "ve", "edm", "flow"])
def test_logsnr_uniform_constant_lambda_steps(pname):
    process = PROCESSES[pname]
    kw = {"t_start": 0.99, "t_end": 1e-3} if pname == "flow" else {}
    with jax.enable_x64(True):
        ts = get_timesteps(process, 15, "logsnr_uniform", **kw)
        lam = np.asarray(process.log_snr(ts))
    d = np.diff(lam)
    assert np.all(d > 0)
    np.testing.assert_allclose(d, d.mean(), atol=1e-6)
    # also in float32 output (looser: float32 rounding of t)
    lam32 = np.asarray(process.log_snr(get_timesteps(process, 15, "logsnr_uniform", **kw)))
    np.testing.assert_allclose(np.diff(lam32), d.mean(), atol=1e-4)


def test_exponential_is_logsnr_uniform_and_polyexponential_rho1():
    p = VPCosine()
    a = np.asarray(get_timesteps(p, 9, "logsnr_uniform"))
    np.testing.assert_array_equal(a, np.asarray(get_timesteps(p, 9, "exponential")))
    np.testing.assert_allclose(a, np.asarray(get_timesteps(p, 9, "polyexponential", rho=1.0)), rtol=1e-6)


# ----------------------------------------------------------------------------------- karras


def test_karras_matches_edm_formula():
    process = EDM(0.002, 80.0)
    rho = 7.0
    with jax.enable_x64(True):
        ts = np.asarray(get_timesteps(process, 18, "karras", rho=rho))
        ts_edm = np.asarray(get_timesteps(process, 18, "karras", rho=rho, final_zero=True))
    i = np.arange(19)
    ref = (80 ** (1 / rho) + i / 18 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(ts, ref, rtol=1e-12)
    # by hand: (80^(1/7) + k/18 (0.002^(1/7) - 80^(1/7)))^7 for k = 0, 1, 2
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert ts[0] == 80.0
    assert ts[1] == pytest.approx((a + (b - a) / 18) ** 7, rel=1e-12)
    assert ts[2] == pytest.approx((a + 2 * (b - a) / 18) ** 7, rel=1e-12)
    np.testing.assert_allclose(ts[:3], [80.0, 58.671476727, 42.415189319], rtol=1e-10)
    # EDM's own 18-step sampler: t_i = (...i/(N-1)...)^rho for i < N, t_N = 0.
    i = np.arange(18)
    ref_edm = (80 ** (1 / rho) + i / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(ts_edm[:-1], ref_edm, rtol=1e-12)
    assert ts_edm[-1] == 0.0
    np.testing.assert_allclose(ts_edm[:3], [80.0, 57.585984721, 40.785573797], rtol=1e-10)
    # float32 output agrees to float32 precision
    np.testing.assert_allclose(np.asarray(get_timesteps(process, 18, "karras")), ref, rtol=2e-6)


def test_karras_on_vp_is_in_sigma_edm():
    process = VPDiscrete.scaled_linear()
    with jax.enable_x64(True):
        ts = get_timesteps(process, 10, "karras", rho=7.0)
        s = np.asarray(process.sigma_edm(ts))
    s_max, s_min = s[0], s[-1]
    ref = (s_max ** (1 / 7) + np.arange(11) / 10 * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, ref, rtol=1e-9)


# --------------------------------------------------------------------------------------- AYS


def test_ays_tables_published_values():
    assert AYS_SIGMAS["sd15"] == (
        14.615,
        6.475,
        3.861,
        2.697,
        1.886,
        1.396,
        0.963,
        0.652,
        0.399,
        0.152,
        0.029,
    )
    assert AYS_SIGMAS["sdxl"] == (
        14.615,
        6.315,
        3.771,
        2.181,
        1.342,
        0.862,
        0.555,
        0.380,
        0.234,
        0.113,
        0.029,
    )
    assert AYS_SIGMAS["svd"] == (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)


@pytest.mark.parametrize("model", ["sd15", "sdxl", "deepfloyd_if", "svd"])
def test_ays_10_steps_is_the_table(model):
    table = np.array(AYS_SIGMAS[model])
    process = EDM(sigma_min=0.001, sigma_max=1000.0)  # covers every table
    ts = np.asarray(get_timesteps(process, 10, "ays", t_start="table", t_end="table", model=model))
    np.testing.assert_array_equal(ts, _cast(table))  # EDM: t == sigma_edm
    with jax.enable_x64(True):
        ts64 = np.asarray(get_timesteps(process, 10, "ays", t_start="table", t_end="table", model=model))
    np.testing.assert_allclose(ts64, table, rtol=1e-14)


def test_ays_sd15_on_covering_process_and_flow_matching():
    ts = np.asarray(get_timesteps(EDM(sigma_min=0.02, sigma_max=14.7), 10, "ays", t_start="table", t_end="table",
                                  model="sd15"))
    np.testing.assert_array_equal(ts, _cast(SD15))
    flow = FlowMatching()
    with jax.enable_x64(True):
        ts = get_timesteps(flow, 10, "ays", t_start="table", t_end="table", model="sd15")
        np.testing.assert_allclose(np.asarray(flow.sigma_edm(ts)), SD15, rtol=1e-12)


def test_ays_interpolation_keeps_table_points():
    with jax.enable_x64(True):
        ts20 = np.asarray(get_timesteps(EDM(0.02, 14.7), 20, "ays", t_start="table", t_end="table", model="sd15"))
    np.testing.assert_allclose(ts20[::2], SD15, rtol=1e-14)
    np.testing.assert_allclose(ts20[1::2], np.sqrt(SD15[:-1] * SD15[1:]), rtol=1e-12)  # log-midpoints
    # AYS how-to interpolation (np.interp of log sigma on the normalised index) for other counts
    for n in (4, 7, 13):
        with jax.enable_x64(True):
            ts = np.asarray(get_timesteps(EDM(0.02, 14.7), n, "ays", t_start="table", t_end="table", model="sd15"))
        ref = np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, 11), np.log(SD15[::-1])))[::-1]
        np.testing.assert_allclose(ts, ref, rtol=1e-12)


def test_ays_final_zero():
    # num_steps=11 with final_zero: the 11 table points and a 0 (A1111/ComfyUI convention).
    with jax.enable_x64(True):
        ts = np.asarray(get_timesteps(EDM(0.02, 14.7), 11, "ays", t_start="table", t_end="table", final_zero=True))
        ts10 = np.asarray(get_timesteps(EDM(0.02, 14.7), 10, "ays", t_start="table", t_end="table", final_zero=True))
    np.testing.assert_allclose(ts[:-1], SD15, rtol=1e-14)
    assert ts[-1] == 0.0
    ref = np.exp(np.interp(np.linspace(0, 1, 10), np.linspace(0, 1, 11), np.log(SD15[::-1])))[::-1]
    np.testing.assert_allclose(ts10[:-1], ref, rtol=1e-12)
    assert ts10.shape == (11,) and ts10[-1] == 0.0


def test_ays_on_stable_diffusion_process_clips_to_range():
    process = VPDiscrete.scaled_linear()  # sigma_edm range 0.02916 .. 14.6146, table 0.029 .. 14.615
    with jax.enable_x64(True):
        ts = np.asarray(get_timesteps(process, 10, "ays"))
        s = np.asarray(process.sigma_edm(jnp.asarray(ts)))
    assert ts[0] == process.t_max and ts[-1] == process.t_min
    np.testing.assert_allclose(s, SD15, rtol=6e-3)
    assert np.all(np.diff(ts) < 0)


def test_ays_rescales_table_into_narrower_range():
    process = EDM(0.002, 80.0)
    with jax.enable_x64(True):
        ts = np.asarray(get_timesteps(process, 10, "ays", model="svd"))
    svd = np.array(AYS_SIGMAS["svd"])
    assert ts[0] == 80.0 and ts[-1] == 0.002
    lt, ls = np.log(ts), np.log(svd)
    # affine in log sigma
    np.testing.assert_allclose((lt - lt[-1]) / (lt[0] - lt[-1]), (ls - ls[-1]) / (ls[0] - ls[-1]), atol=1e-12)
    # explicit ends also rescale
    ts = np.asarray(get_timesteps(EDM(0.002, 80.0), 10, "ays", t_start=10.0, t_end=0.1))
    assert ts[0] == _cast(10.0) and ts[-1] == _cast(0.1)


def test_ays_custom_table():
    ts = np.asarray(get_timesteps(EDM(0.002, 80.0), 3, "ays", t_start="table", t_end="table",
                                  sigmas=[10.0, 1.0, 0.1, 0.01, 0.0]))
    np.testing.assert_allclose(ts, [10.0, 1.0, 0.1, 0.01], rtol=1e-6)


# -------------------------------------------------------------------------------------- beta


def test_beta_ppf_inverts_incomplete_beta():
    special = pytest.importorskip("scipy.special")
    q = np.linspace(0, 1, 41)
    for a, b in [(0.6, 0.6), (0.3, 2.0), (5.0, 0.5), (2.0, 3.0)]:
        x = beta_ppf(q, a, b)
        assert x[0] == 0.0 and x[-1] == 1.0
        np.testing.assert_allclose(special.betainc(a, b, x), q, atol=1e-10, rtol=0)
        np.testing.assert_allclose(x, special.betaincinv(a, b, q), atol=1e-10, rtol=0)


def test_beta_ppf_without_scipy_known_values():
    # Beta(1, 1) is uniform; Beta(2, 1) has cdf x^2; Beta(1, 2) has cdf 1 - (1 - x)^2.
    q = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(beta_ppf(q, 1.0, 1.0), q, atol=1e-12)
    np.testing.assert_allclose(beta_ppf(q, 2.0, 1.0), np.sqrt(q), atol=1e-12)
    np.testing.assert_allclose(beta_ppf(q, 1.0, 2.0), 1 - np.sqrt(1 - q), atol=1e-12)
    # symmetric: ppf(1 - q) = 1 - ppf(q)
    np.testing.assert_allclose(beta_ppf(1 - q, 0.6, 0.6), 1 - beta_ppf(q, 0.6, 0.6), atol=1e-12)


def test_beta_schedule():
    process = EDM()
    with jax.enable_x64(True):
        b = np.asarray(get_timesteps(process, 10, "beta", alpha=1.0, beta=1.0))
        u = np.asarray(get_timesteps(process, 10, "time_uniform"))
        ts = np.asarray(get_timesteps(process, 10, "beta"))
    np.testing.assert_allclose(b, u, rtol=1e-12, atol=1e-12)
    ref = 80.0 + (0.002 - 80.0) * beta_ppf(np.arange(11) / 10, 0.6, 0.6)
    np.testing.assert_allclose(ts, ref, rtol=1e-12, atol=1e-12)
    steps = -np.diff(ts)
    assert steps[0] < steps[5] and steps[-1] < steps[5]  # denser at both ends


# --------------------------------------------------------------------- diffusers spacings


def test_diffusers_indices_n10():
    np.testing.assert_array_equal(leading_indices(1000, 10), [900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    np.testing.assert_array_equal(leading_indices(1000, 10, steps_offset=1), np.arange(901, 0, -100))
    np.testing.assert_array_equal(
        trailing_indices(1000, 10), [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    )
    np.testing.assert_array_equal(
        linspace_indices(1000, 10), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    )
    # non-divisible counts (diffusers: round(arange(N, 0, -N/n)) - 1; round(linspace(0, N-1, n)))
    np.testing.assert_array_equal(trailing_indices(1000, 3), [999, 666, 332])
    for n in (48, 61, 103, 1000):  # float-arange edge cases: n indices, all valid and distinct
        idx = trailing_indices(1000, n)
        assert idx.shape == (n,) and idx[0] == 999 and idx[-1] >= 0 and np.all(np.diff(idx) < 0)
    np.testing.assert_array_equal(linspace_indices(1000, 4), [999, 666, 333, 0])
    np.testing.assert_array_equal(leading_indices(1000, 3), [666, 333, 0])


def test_diffusers_grids():
    process = VPDiscrete.scaled_linear()
    with jax.enable_x64(True):
        lead = np.asarray(get_timesteps(process, 10, "leading", final_zero=True))
        lead1 = np.asarray(get_timesteps(process, 10, "leading", steps_offset=1))
        trail = np.asarray(get_timesteps(process, 10, "trailing"))
        trail0 = np.asarray(get_timesteps(process, 10, "trailing", final_zero=True))
        lin = np.asarray(get_timesteps(process, 10, "linspace", final_zero=True))
    np.testing.assert_allclose(lead, np.append((np.arange(900, -1, -100) + 1) / 1000, 0.0), rtol=1e-15)
    np.testing.assert_allclose(
        lead1, np.append((np.arange(901, 0, -100) + 1) / 1000, process.t_min), rtol=1e-15
    )
    np.testing.assert_allclose(trail, np.append(np.arange(1000, 99, -100) / 1000, process.t_min), rtol=1e-15)
    assert trail[0] == process.t_max and trail0[-1] == 0.0
    np.testing.assert_allclose(trail0[:-1], trail[:-1], rtol=0)
    np.testing.assert_allclose(lin[:-1], (linspace_indices(1000, 10) + 1) / 1000, rtol=1e-15)
    assert lin[-1] == 0.0 and lin.shape == (11,)


# ---------------------------------------------------------------------------------- errors


def test_unknown_schedule():
    with pytest.raises(ValueError, match=r"unknown schedule 'foo'; known: ays, beta, exponential, karras"):
        get_timesteps(EDM(), 10, "foo")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, r"num_steps must be an integer >= 1; got 0"),
        ({"num_steps": 2.5}, r"num_steps must be an integer >= 1; got 2.5"),
        ({"num_steps": True}, r"num_steps must be an integer >= 1"),
        ({"rho": 0.0}, r"karras: rho must be a finite number > 0; got 0.0"),
        ({"rho": -1}, r"rho must be a finite number > 0; got -1"),
        ({"t_start": 1.0, "t_end": 2.0}, r"t_start must be > t_end; got t_start=1.0, t_end=2.0"),
        ({"t_start": 100.0}, r"t_start=100.0 is outside the time range of EDM: allowed \[0.002, 80.0\]"),
        ({"t_end": 0.0}, r"t_end=0.0 is outside the time range of EDM"),
        ({"sigma": 3}, r"schedule 'karras' got unknown option\(s\) sigma; allowed: rho"),
    ],
)
def test_bad_inputs(kwargs, match):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        get_timesteps(EDM(), schedule="karras", **kwargs)


def test_schedule_specific_errors():
    with pytest.raises(ValueError, match=r"logsnr_uniform needs a finite log-SNR.*FlowMatching.*t_start"):
        get_timesteps(FlowMatching(), 10, "logsnr_uniform")
    with pytest.raises(ValueError, match=r"karras needs a finite sigma_edm at t_start"):
        get_timesteps(FlowMatching(), 10, "karras")
    with pytest.raises(ValueError, match=r"final_zero=True appends t=0 after t_end, so t_end must be > 0"):
        get_timesteps(FlowMatching(), 10, "time_uniform", final_zero=True)
    with pytest.raises(ValueError, match=r"ays: unknown model 'sd3'; known: deepfloyd_if, sd15, sdxl, svd"):
        get_timesteps(EDM(), 10, "ays", model="sd3")
    with pytest.raises(ValueError, match=r"ays: sigmas must be a 1-D, strictly decreasing"):
        get_timesteps(EDM(), 10, "ays", sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"beta: alpha must be a finite number > 0; got 0"):
        get_timesteps(EDM(), 10, "beta", alpha=0)
    with pytest.raises(ValueError, match=r"beta_ppf: q must lie in \[0, 1\]"):
        beta_ppf([1.5], 0.6, 0.6)


def test_diffusers_spacing_errors():
    sd = VPDiscrete.scaled_linear()
    with pytest.raises(ValueError, match=r"schedule 'leading' .* needs a VPDiscrete process, got EDM"):
        get_timesteps(EDM(), 10, "leading")
    with pytest.raises(ValueError, match=r"trailing: num_steps=1001 exceeds num_train_timesteps=1000"):
        get_timesteps(sd, 1001, "trailing")
    with pytest.raises(ValueError, match=r"leading: the last index is training step 0.*final_zero=True"):
        get_timesteps(sd, 10, "leading")
    with pytest.raises(ValueError, match=r"linspace: the last index is training step 0"):
        get_timesteps(sd, 10, "linspace")
    with pytest.raises(ValueError, match=r"does not take t_start/t_end"):
        get_timesteps(sd, 10, "trailing", t_start=0.5)
    with pytest.raises(ValueError, match=r"leading: steps_offset must be an integer >= 0; got -1"):
        get_timesteps(sd, 10, "leading", steps_offset=-1)
    with pytest.raises(ValueError, match=r"leading: steps_offset=100 pushes the first index to 1000"):
        get_timesteps(sd, 10, "leading", steps_offset=100)
    with pytest.raises(
        ValueError, match=r"schedule 'trailing' got unknown option\(s\) steps_offset; allowed: none"
    ):
        get_timesteps(sd, 10, "trailing", steps_offset=1)


@pytest.mark.parametrize(
    "ts, match",
    [
        ([1.0], r"at least 2 times"),
        ([[1.0, 0.5]], r"1-D array"),
        ([1.0, 0.5, 0.5], r"strictly decreasing"),
        ([1.0, math.nan], r"finite"),
        ([2.0, 0.5], r"leaves the time range of VPLinear"),
        ([1.0, 0.5, 0.0004], r"leaves the time range"),
    ],
)
def test_validate_timesteps_rejects(ts, match):
    with pytest.raises(ValueError, match=match):
        validate_timesteps(VPLinear(), np.array(ts))


def test_validate_timesteps_accepts_final_zero():
    ts = get_timesteps(VPLinear(), 5, "time_uniform", final_zero=True)
    assert validate_timesteps(VPLinear(), ts) is ts

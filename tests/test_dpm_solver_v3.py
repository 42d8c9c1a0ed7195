"""DPM-Solver-v3: reduction to DPM-Solver++, EMS of a Gaussian in closed form, accuracy, I/O, NFE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_nfe_matches_calls

import fastsample as fs
from fastsample.learned import EMS, estimate_ems
from fastsample.models import GaussianMixture
from fastsample.solvers import DPMSolverMultistep
from fastsample.solvers.dpm_solver_v3 import DPMSolverV3


def _rmse(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_trivial_ems_is_dpm_solver_pp(x64, order):
    """With l = s = b = 0, g = x_theta and the local approximation is the Taylor polynomial through
    the last ``order`` outputs, integrated exactly: DPM-Solver++ multistep in its Taylor ("heun")
    second-order form, with the third-order update that integrates the quadratic exactly."""
    p = fs.VPLinear()
    d = GaussianMixture.ring(n=8, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(3), (64, 2), jnp.float64)
    v3 = DPMSolverV3(ems=EMS.trivial(p, (2,), num=200), order=order)
    pp = DPMSolverMultistep(order=order, prediction="x0", solver_type="heun", exact_third_order=True)
    other = DPMSolverMultistep(order=order, prediction="x0", solver_type="midpoint", exact_third_order=False)
    for nfe in (5, 10):
        a = fs.sample(d, x_T, v3, nfe=nfe)
        np.testing.assert_allclose(a, fs.sample(d, x_T, pp, nfe=nfe), rtol=1e-10, atol=1e-10)
        if order > 1 and nfe == 5:  # the comparison can tell the variants apart
            assert float(jnp.max(jnp.abs(a - fs.sample(d, x_T, other, nfe=nfe)))) > 1e-4


M = np.array([1.0, -0.5])
C2 = np.array([0.25, 2.25])


@pytest.fixture(scope="module")
def gaussian():
    with jax.enable_x64(True):
        p = fs.VPLinear()
        g = GaussianMixture.gaussian(M, C2)
        d = g.denoiser(p)
        data = g.sample(jax.random.PRNGKey(0), 256)
        ems = estimate_ems(d, jax.random.PRNGKey(1), (2,), data=data, num_lambda=1000)
        ems0 = estimate_ems(d, jax.random.PRNGKey(1), (2,), data=data, num_lambda=300, fit_l=False)
    return p, d, ems, ems0


def test_gaussian_ems_match_closed_form(x64, gaussian):
    """For N(m, c^2) data x_theta = A + B x is affine, with kappa = a^2 c^2 / (a^2 c^2 + s^2),
    B = kappa / a, A = (1 - kappa) m.
    * l = a E[diag grad x_theta] = kappa; then f = x_theta - l x / a = (1 - kappa) m does not depend
      on x: Var f = 0, the regression gives s = 0 and b = E f' = -kappa' m, kappa' = 2 kappa (1 - kappa).
    * with l = 0, f = A + B x and along the ODE (dx/dlambda = (dlog s/dlambda) x + a f)
      f' = P + Q x with Q = B' + B dlog s/dlambda + a B^2, P = A' + a B A; regressing f' on f gives
      s = Q / B, b = P - s A."""
    p, _, ems, ems0 = gaussian
    lam = np.asarray(ems.lambdas)[:, None]
    kappa = C2 * np.exp(2 * lam) / (C2 * np.exp(2 * lam) + 1)
    np.testing.assert_allclose(ems.l, kappa, atol=1e-10)
    np.testing.assert_allclose(ems.s, 0.0, atol=1e-10)
    np.testing.assert_allclose(ems.b, -2 * kappa * (1 - kappa) * M, atol=1e-10)

    def coeffs(lam):
        t = p.t_from_log_snr(lam)
        a, s = p.alpha(t), p.sigma(t)
        kap = a**2 * C2 / (a**2 * C2 + s**2)
        return (1 - kap) * M, kap / a, a, jnp.log(s)

    def closed(lam):
        (A, B, a, _), (dA, dB, _, dlogs) = jax.jvp(coeffs, (lam,), (jnp.ones_like(lam),))
        Q = dB + B * dlogs + a * B**2
        s = Q / B
        return s, dA + a * B * A - s * A

    s_exp, b_exp = jax.vmap(closed)(ems0.lambdas)
    np.testing.assert_allclose(ems0.l, 0.0)
    np.testing.assert_allclose(ems0.s, s_exp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ems0.b, b_exp, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(ems0.s))) > 0.5  # the closed form is not trivial


def test_gaussian_data_is_nearly_exact(x64, gaussian):
    p, d, ems, _ = gaussian
    x_T = fs.prior(p, jax.random.PRNGKey(3), (64, 2), jnp.float64)
    ref = fs.reference_solve(d, x_T)
    for order, corrector in [(1, False), (3, False), (2, True)]:
        err = _rmse(fs.sample(d, x_T, DPMSolverV3(ems=ems, order=order, corrector=corrector), nfe=5), ref)
        base = _rmse(fs.sample(d, x_T, DPMSolverMultistep(order=order, prediction="x0"), nfe=5), ref)
        assert err < 1e-4 and err < base / 1000, (order, err, base)
    # with l = 0 the regression statistics s, b alone make g constant (f' = s f + b exactly)
    _, _, _, ems0 = gaussian
    for order in (2, 3):
        err = _rmse(fs.sample(d, x_T, DPMSolverV3(ems=ems0, order=order), nfe=5), ref)
        assert err < 1e-3, (order, err)


def test_corrector_converges_and_improves_the_predictor(x64):
    """The same-order corrector (new output + reference + older outputs) keeps the order and
    lowers the error; with trivial EMS, on the ring mixture."""
    p = fs.VPLinear()
    d = GaussianMixture.ring(n=8, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(3), (64, 2), jnp.float64)
    ref = fs.reference_solve(d, x_T)
    ems = EMS.trivial(p, (2,), num=200)
    steps = np.array([16, 32])
    errs = {pc: [_rmse(fs.sample(d, x_T, DPMSolverV3(ems=ems, order=2, corrector=pc), nfe=int(n),
                                 schedule="logsnr_uniform"), ref) for n in steps] for pc in (False, True)}
    for pc in (False, True):
        assert -np.polyfit(np.log(steps), np.log(errs[pc]), 1)[0] > 1.9, errs
    assert all(c < p_ / 3 for c, p_ in zip(errs[True], errs[False], strict=True)), errs


@pytest.fixture(scope="module")
def digits():
    with jax.enable_x64(True):
        p = fs.VPDiscrete.ddpm_linear()
        g = GaussianMixture.digits()
        d = g.denoiser(p)
        x_T = fs.prior(p, jax.random.PRNGKey(3), (128, 64), jnp.float64)
        ref = fs.reference_solve(d, x_T)
        ems = estimate_ems(d, jax.random.PRNGKey(1), (64,), data=g.sample(jax.random.PRNGKey(0), 128),
                           num_lambda=120, num_probes=8)
    return d, x_T, ref, ems


@pytest.mark.parametrize("nfe", [5, 10])
def test_digits_no_worse_than_dpmpp_2m(x64, digits, nfe):
    d, x_T, ref, ems = digits
    err = _rmse(fs.sample(d, x_T, DPMSolverV3(ems=ems, order=2), nfe=nfe), ref)
    err_pc = _rmse(fs.sample(d, x_T, DPMSolverV3(ems=ems, order=2, corrector=True), nfe=nfe), ref)
    base = _rmse(fs.sample(d, x_T, "dpmpp_2m", nfe=nfe), ref)
    print(f"digits NFE {nfe}: dpm_solver_v3(2) {err:.4f}, with corrector {err_pc:.4f}, dpmpp_2m {base:.4f}")
    assert err <= base and err_pc <= err, (err, err_pc, base)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    lams = jnp.linspace(-5.0, 5.0, 50)
    ems = EMS(lams, *(jnp.asarray(rng.normal(size=(50, 3, 2)), jnp.float32) for _ in range(3)))
    path = tmp_path / "ems.npz"
    ems.save(path)
    back = EMS.load(path, data_shape=(3, 2), lambdas=lams)
    for name in ("lambdas", "l", "s", "b"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ems, name))
    with pytest.raises(ValueError, match=r"estimated for data shape \(3, 2\), not \(6,\)"):
        EMS.load(path, data_shape=(6,))
    with pytest.raises(ValueError, match="lambda grid does not match"):
        EMS.load(path, lambdas=jnp.linspace(-4.0, 5.0, 50))
    np.savez(tmp_path / "bad.npz", lambdas=np.zeros(3))
    with pytest.raises(ValueError, match="not an EMS file"):
        EMS.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("order,corrector", [(1, False), (3, True)])  # the default: test_contracts.py
@pytest.mark.parametrize("final_zero", [False, True])
def test_reported_nfe_equals_model_calls_and_no_nan(order, corrector, final_zero):
    calls = []

    def model(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return 0.5 * x

    p = fs.VPLinear()
    d = fs.Denoiser(model, p, "x0")
    rng = np.random.default_rng(1)
    lams = jnp.linspace(-6.0, 7.0, 64)
    ems = EMS(lams, *(jnp.asarray(0.3 * rng.normal(size=(64, 2)), jnp.float32) for _ in range(3)))
    s = DPMSolverV3(ems=ems, order=order, corrector=corrector)
    assert_nfe_matches_calls(d, s, calls, (1, 5), final_zero)


def test_bad_options():
    p = fs.VPLinear()
    with pytest.raises(ValueError, match="DPMSolverV3 needs `ems`"):
        DPMSolverV3()
    with pytest.raises(ValueError, match="order must be in 1..3"):
        DPMSolverV3(ems=EMS.trivial(p, (2,)), order=4)
    d = fs.Denoiser(lambda x, t, c: x, p, "x0")
    with pytest.raises(ValueError, match=r"EMS data shape \(3,\) does not fit"):
        fs.sample(d, jnp.ones((1, 2)), DPMSolverV3(ems=EMS.trivial(p, (3,))), nfe=3)

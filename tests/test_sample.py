import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.models import GaussianMixture

POINT = np.array([0.7, -1.3])


def point_model(x, t, cond):
    return jnp.broadcast_to(jnp.asarray(POINT, x.dtype), x.shape)


def exact_point_flow(process, x_T, t_start, t_end):
    """Single-point data: eps = (x - alpha m) / sigma is constant along the PF-ODE."""
    a0, s0 = process.alpha_sigma(t_start)
    a1, s1 = process.alpha_sigma(t_end)
    return a1 * POINT + s1 * (x_T - a0 * POINT) / s0


PROCS = {
    "vp_linear": fs.VPLinear(),
    "vp_discrete": fs.VPDiscrete.scaled_linear(),
    "vp_cosine": fs.VPCosine(),
    "ve": fs.VE(),
    "edm": fs.EDM(),
    "flow": fs.FlowMatching(t_min=1e-3),
}


@pytest.mark.parametrize("name", PROCS)
@pytest.mark.parametrize("final_zero", [False, True])
def test_ddim_is_exact_for_single_point_data(x64, name, final_zero):
    p = PROCS[name]
    d = fs.Denoiser(point_model, p, "x0")
    x_T = fs.prior(p, jax.random.PRNGKey(0), (5, 2))
    schedule = "time_uniform" if name == "flow" else "logsnr_uniform"
    for nfe in (1, 2, 3, 7):
        info = fs.solve(d, x_T, "ddim", nfe=nfe, schedule=schedule, final_zero=final_zero)
        x = info.x
        assert info.stats["nfe"] == nfe
        expected = POINT if final_zero else exact_point_flow(p, x_T, p.t_max, p.t_min)
        np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), rtol=1e-12, atol=1e-12)


def test_flow_matching_starts_at_pure_noise(x64):
    """t = 1 has alpha = 0 (log-SNR -inf): exponential-integrator coefficients stay finite."""
    p = fs.FlowMatching()
    d = fs.Denoiser(lambda x, t, c: jnp.broadcast_to(jnp.asarray(POINT), x.shape) - 0 * x, p, "x0")
    x_T = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
    x = fs.sample(d, x_T, "ddim", nfe=4, schedule="time_uniform", final_zero=True)
    np.testing.assert_allclose(x, np.broadcast_to(POINT, x.shape), rtol=1e-12)


def gaussian_closed_form(process, x_T, m, c2, t_start, t_end):
    """PF-ODE for data N(m, c2 I): z = (x - alpha m) / sqrt(alpha^2 c2 + sigma^2) is constant."""
    a0, s0 = process.alpha_sigma(t_start)
    a1, s1 = process.alpha_sigma(t_end)
    z = (x_T - a0 * m) / jnp.sqrt(a0**2 * c2 + s0**2)
    return a1 * m + jnp.sqrt(a1**2 * c2 + s1**2) * z


@pytest.mark.parametrize("name", ["vp_linear", "edm", "flow"])
def test_reference_and_solvers_match_the_gaussian_closed_form(x64, name):
    p = PROCS[name]
    m, c2 = np.array([1.0, -0.5, 0.25]), 0.3
    gmm = GaussianMixture.gaussian(m, c2 * np.eye(3))
    d = gmm.denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(2), (16, 3))
    exact = gaussian_closed_form(p, x_T, m, c2, p.t_max, p.t_min)
    np.testing.assert_allclose(fs.reference_solve(d, x_T), exact, rtol=1e-8, atol=1e-8)
    schedule = "time_uniform" if name == "flow" else "logsnr_uniform"
    for solver in ("ddim", "euler", "heun"):
        errs = [float(jnp.max(jnp.abs(fs.sample(d, x_T, solver, nfe=n, schedule=schedule) - exact)))
                for n in (16, 64, 256)]
        assert errs[2] < errs[1] < errs[0], (solver, errs)
        assert errs[2] < 2e-2, (solver, errs)


def _fitted_order(errors, steps):
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return -slope


@pytest.mark.parametrize("proc", ["vp_linear", "edm"])
@pytest.mark.parametrize("solver,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("midpoint", 2)])
def test_convergence_order_on_a_2d_mixture(x64, proc, solver, order):
    p = PROCS[proc]
    d = GaussianMixture.ring(n=8, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(3), (64, 2))
    s = fs.get_solver(solver)
    steps = np.array([32, 64, 128, 256])
    grid = dict(schedule="karras") if proc == "edm" else dict(schedule="time_uniform")
    if proc == "vp_linear" and solver == "ddim":
        grid = dict(schedule="logsnr_uniform")
    ts0 = fs.get_timesteps(p, 1, grid["schedule"])
    ref = fs.reference_solve(d, x_T, t_start=float(ts0[0]), t_end=float(ts0[-1]))
    errors = []
    for n in steps:
        x = fs.sample(d, x_T, solver, nfe=s.nfe(int(n)), **grid)
        errors.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
    assert abs(_fitted_order(errors, steps) - order) < 0.3, errors


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_euler_and_midpoint_are_diffraxs_own(x64, solver):
    """fastsample's Euler / midpoint rule are diffrax's ``Euler`` / ``Midpoint`` on the
    probability-flow term (every solver equals itself under ``diffeqsolve``: test_contracts.py)."""
    p = fs.VPLinear()
    d = GaussianMixture.ring().denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(4), (8, 2))
    sol = fs.solve(d, x_T, solver, nfe=12)
    ts = jnp.asarray(sol.grid.times)
    own = diffrax.Euler() if solver == "euler" else diffrax.Midpoint()
    ref = diffrax.diffeqsolve(fs.ProbabilityFlowTerm(d), own, ts[0], ts[-1], None, x_T,
                              stepsize_controller=diffrax.StepTo(ts), max_steps=len(ts))
    np.testing.assert_allclose(ref.ys[-1], sol.x, rtol=1e-10, atol=1e-10)


def test_euler_in_edm_variables_equals_ddim(x64):
    """DDIM is Euler on the ODE in (x / alpha, sigma / alpha): seen through EDM, a VP model's
    Euler step is DDIM."""
    p = fs.VPLinear()
    d = GaussianMixture.ring().denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(5), (8, 2))
    info = fs.solve(d, x_T, "ddim", nfe=6)
    x_ddim = info.x
    edm = fs.EDM(sigma_min=float(p.sigma_edm(p.t_min)), sigma_max=float(p.sigma_edm(p.t_max)))
    ts_edm = p.sigma_edm(info.grid.times)
    y = fs.sample(d.with_process(edm), x_T / p.alpha(p.t_max), "euler", nfe=None, timesteps=ts_edm)
    np.testing.assert_allclose(y * p.alpha(p.t_min), x_ddim, rtol=1e-9, atol=1e-9)


def test_trajectory_shape_and_endpoints():
    p = fs.VPLinear()
    d = fs.Denoiser(point_model, p, "x0")
    x_T = jnp.ones((3, 2))
    sol = fs.solve(d, x_T, "ddim", nfe=5, saveat=fs.SaveAt(steps=True))
    x, traj = sol.x, sol.trajectory
    assert traj.shape == (6, 3, 2)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], x)


def test_bad_inputs_raise_clear_errors():
    p = fs.VPLinear()
    d = fs.Denoiser(point_model, p, "x0")
    x_T = jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"unknown solver 'rk9'; known: .*ddim.*euler.*heun"):
        fs.sample(d, x_T, "rk9", nfe=5)
    with pytest.raises(ValueError, match=r"unknown schedule 'foo'; known: .*karras.*logsnr_uniform"):
        fs.sample(d, x_T, "ddim", nfe=5, schedule="foo")
    with pytest.raises(ValueError, match="nfe=1 is below heun's minimum of 2"):
        fs.sample(d, x_T, "heun", nfe=1)
    with pytest.raises(ValueError, match=r"heun cannot use exactly nfe=5; reachable NFE: \[2, 4, 6"):
        fs.sample(d, x_T, "heun", nfe=5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fs.sample(d, x_T, "ddim", nfe=None, timesteps=np.array([1.0, 0.2, 0.5]))
    with pytest.raises(ValueError, match=r"leaves the time range of VPLinear: allowed \[0.001, 1.0\]"):
        fs.sample(d, x_T, "ddim", nfe=None, timesteps=np.array([2.0, 0.2, 0.01]))
    with pytest.raises(ValueError, match="model output must have the shape and dtype of x"):
        fs.sample(fs.Denoiser(lambda x, t, c: x[:1], p, "x0"), x_T, "ddim", nfe=3)
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        fs.sample(d, x_T, "ddim", nfe=2.5)


def test_check_finite_names_the_first_bad_step():
    p = fs.EDM()
    # the model breaks below sigma = 1: the first step that ends below 1 produces NaN
    d = fs.Denoiser(lambda x, t, c: jnp.where(t < 1.0, jnp.nan, 0.0) * x, p, "x0")
    ts = jnp.array([80.0, 10.0, 2.0, 0.5, 0.1, 0.01])
    with pytest.raises(Exception, match=r"not finite after step 3 "):
        fs.sample(d, jnp.ones((2, 2)), "ddim", nfe=None, timesteps=ts, check_finite=True)
    x = fs.sample(d, jnp.ones((2, 2)), "ddim", nfe=None, timesteps=ts)  # without the check: NaN
    assert not np.all(np.isfinite(np.asarray(x)))


def test_auto_defaults_are_the_benchmarked_choice_and_work_from_pure_noise(x64):
    from fastsample.grid import default_choice

    assert default_choice(fs.VPDiscrete.ddpm_linear()) == ("ipndm", "ays")
    assert default_choice(fs.FlowMatching()) == ("unipc_3", "beta")  # t = 1: alpha = 0
    d = fs.Denoiser(point_model, fs.VPDiscrete.ddpm_linear(), "x0")
    x_T = fs.prior(d.process, jax.random.PRNGKey(0), (3, 2))
    np.testing.assert_array_equal(fs.sample(d, x_T, nfe=7), fs.sample(d, x_T, "ipndm", nfe=7, schedule="ays"))
    flow = fs.Denoiser(point_model, fs.FlowMatching(), "x0")
    x = fs.sample(flow, jax.random.normal(jax.random.PRNGKey(1), (3, 2)), nfe=6)
    np.testing.assert_allclose(x, np.broadcast_to(POINT, x.shape), atol=1e-10)  # single point: exact

"""Stochastic samplers: exact reductions at zero noise, marginals, distribution quality, strong
convergence with the Brownian tree, reproducible noise, NFE counts and error messages."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import counting

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.solvers import (
    DDIM,
    ERSDE,
    AncestralDDIM,
    DPMSolverMultistep,
    DPMSolverMultistepSDE,
    DPMSolverSDE,
    EDMStochastic,
    EulerMaruyama,
    PCLangevin,
    Restart,
    SASolver,
)

KEY = jax.random.key(7)

#: every registered stochastic solver with the options the tests use (restart: an interval inside
#: every grid below)
STOCHASTIC = {
    "euler_maruyama": {},
    "euler_ancestral": {},
    "ddpm": {},
    "ddim": {"eta": 0.5},
    "edm_stochastic": {"S_churn": 20.0},
    "dpmpp_2m_sde": {},
    "dpmpp_3m_sde": {},
    "dpmpp_sde": {},
    "sa_solver": {},
    "er_sde": {},
    "restart": {"intervals": (0.1, 1.0), "K": 1, "restart_steps": 2},
    "pc_langevin": {},
}


def _default(name):
    try:
        return fs.get_solver(name)
    except ValueError:  # solvers that need options (dpm_solver_v3)
        return None


def test_registry_covers_every_stochastic_solver():
    registered = {n for n in fs.available_solvers() if isinstance(_default(n), fs.AbstractStochasticSolver)}
    assert registered == set(STOCHASTIC) - {"ddim"}
    assert isinstance(fs.get_solver("ddim"), DDIM) and isinstance(fs.get_solver("ddim", eta=0.3), AncestralDDIM)


# ----- reductions at zero noise ------------------------------------------------------------------

REDUCTIONS = [  # (stochastic solver at zero noise, ODE counterpart, exact bit equality)
    (AncestralDDIM(eta=0.0), DDIM(), True),
    (AncestralDDIM(eta=0.0, label="euler_ancestral"), DDIM(), True),
    (EulerMaruyama(eta=0.0), fs.get_solver("euler"), True),
    (EDMStochastic(S_churn=0.0), fs.get_solver("heun"), True),
    (DPMSolverMultistepSDE(order=2, eta=0.0), fs.get_solver("dpmpp_2m"), True),
    (DPMSolverMultistepSDE(order=2, eta=0.0, solver_type="heun"), DPMSolverMultistep(order=2, solver_type="heun"),
     True),
    (DPMSolverMultistepSDE(order=3, eta=0.0), fs.get_solver("dpmpp_3m"), True),
    (DPMSolverSDE(eta=0.0), fs.get_solver("dpmpp_2s"), False),
    (SASolver(1, 0, tau=0.0), DDIM(), False),
    (SASolver(2, 0, tau=0.0), DPMSolverMultistep(order=2, solver_type="heun"), False),
    (SASolver(3, 0, tau=0.0), DPMSolverMultistep(order=3, solver_type="heun", exact_third_order=True), False),
    (ERSDE(order=1, noise_scale="ode"), DDIM(), False),
    (Restart(fs.get_solver("heun"), K=0), fs.get_solver("heun"), True),
    (Restart(fs.get_solver("dpmpp_2m"), intervals=((0.1, 1.0), (1.0, 5.0)), K=(0, 0)), fs.get_solver("dpmpp_2m"), True),
]


PROCESSES = [fs.VPLinear(), fs.EDM(), fs.VPDiscrete.ddpm_linear()]


@pytest.mark.parametrize("case", range(len(REDUCTIONS)))
def test_zero_noise_reduces_to_the_ode_solver(x64, case):
    """Each pair on one process of three, alternating grids that stop at t_min and end at t = 0."""
    sde, ode, bitwise = REDUCTIONS[case]
    p = PROCESSES[case % 3]
    d = GaussianMixture.ring(n=4, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(0), (16, 2))
    ts = np.asarray(fs.get_timesteps(p, 6, "karras", final_zero=case % 2 == 1))
    x_sde = fs.sample(d, x_T, sde, nfe=None, timesteps=ts, key=KEY)
    # the ODE solver's own steps (fused=False): its per-step tables agree only to rounding
    x_ode = fs.sample(d, x_T, ode, nfe=None, timesteps=ts, fused=False)
    assert np.all(np.isfinite(x_sde))
    if bitwise:
        np.testing.assert_array_equal(x_sde, x_ode, err_msg=sde.name)
    else:
        np.testing.assert_allclose(x_sde, x_ode, rtol=0, atol=1e-12, err_msg=sde.name)


def test_pc_langevin_without_corrector_is_its_predictor(x64):
    p = fs.VPLinear()
    d = GaussianMixture.ring(n=4, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(0), (16, 2))
    em = fs.sample(d, x_T, "euler_maruyama", nfe=6, key=KEY)
    np.testing.assert_array_equal(fs.sample(d, x_T, PCLangevin(corrector_steps=0), nfe=6, key=KEY), em)
    # snr = 0: the corrector evaluates but does not move the point (the predictor's noise is unchanged)
    np.testing.assert_allclose(fs.sample(d, x_T, PCLangevin(snr=0.0), nfe=12, key=KEY), em, rtol=0, atol=1e-12)


def test_dpmpp_2m_sde_matches_the_published_update(x64):
    """SDE-DPM-Solver++(2M) as written in k-diffusion (EDM variables, midpoint), step by step."""
    p = fs.EDM()
    d = GaussianMixture.ring(n=4, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(1), (32, 2))
    solver = DPMSolverMultistepSDE(order=2, eta=0.7, lower_order_final=False)
    info = fs.solve(d, x_T, solver, nfe=8, schedule="karras", key=KEY)
    x = info.x
    ts, noise, eta = np.asarray(info.grid.times), fs.IndependentNoise(KEY), 0.7
    y, old, h_last = x_T, None, None
    for i in range(len(ts) - 1):
        s, s_next = ts[i], ts[i + 1]
        den = d(y, s)
        h = np.log(s) - np.log(s_next)
        y_new = s_next / s * np.exp(-eta * h) * y - np.expm1(-h - eta * h) * den
        if old is not None:
            y_new = y_new - 0.5 * np.expm1(-h - eta * h) * (h / h_last) * (den - old)
        y = y_new + s_next * np.sqrt(-np.expm1(-2 * eta * h)) * noise.at_step(i, s, s_next).step_normal(y)
        old, h_last = den, h
    np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


# ----- marginals and distribution quality ---------------------------------------------------------

MEAN, STD = np.array([1.0, -0.5]), 0.5


#: NFE for the marginal test: first-order samplers have an O(h) variance bias (e.g. ddpm: -36%,
#: -11%, -2% at NFE 20, 80, 320 on this problem), the others are run at NFE ~ 40
FIRST_ORDER = {"euler_maruyama", "euler_ancestral", "ddpm", "ddim", "pc_langevin"}


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_gaussian_data_marginal_mean_and_variance(x64, name):
    """Data N(mu, s^2 I), VP linear process, grid ending at t = 0, started from the exact marginal
    at t_max: the sample mean and variance match mu and s^2 within 4 Monte-Carlo standard errors
    plus a discretization allowance of 0.03 on the mean and 6% on the variance, at NFE ~ 40
    (first-order samplers: NFE ~ 200). The reported NFE is checked against counted model calls."""
    p = fs.VPLinear()
    g = GaussianMixture.gaussian(MEAN, STD**2)
    n = 4000
    a, s = p.alpha_sigma(p.t_max)
    x_T = g.sample(jax.random.PRNGKey(2), n, a, s)
    solver = fs.get_solver(name, **STOCHASTIC[name])
    start = 200 if name in FIRST_ORDER else 40
    nfe = next(k for k in range(start, start + 20) if _reachable(solver, k, True))
    model, calls = counting(g.denoiser(p).model)
    info = fs.solve(fs.Denoiser(model, p, "x0"), x_T, solver, nfe=nfe, schedule="logsnr_uniform",
                        final_zero=True, key=KEY)
    x = info.x
    x = np.asarray(x)
    jax.effects_barrier()
    assert info.stats["nfe"] == nfe == len(calls)  # the NFE a solver reports is the count of model calls
    se_mean = STD / np.sqrt(n)
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), 4 * se_mean + 0.03)
    var = x.var(0)
    np.testing.assert_array_less(np.abs(var / STD**2 - 1), 4 * np.sqrt(2 / n) + 0.06)


def _reachable(solver, nfe, final_zero):
    try:
        solver.steps_for_nfe(nfe, final_zero)
        return True
    except ValueError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "sa_solver", "er_sde"])
def test_mixture_sliced_wasserstein_decreases_with_nfe(name):
    """2-D ring mixture (EDM, Karras grid to sigma = 0): the sliced Wasserstein distance to exact
    samples falls from NFE ~10 to NFE ~50 and is below 0.12 at NFE ~50 (two independent exact
    sample sets of 3000 points are 0.056 apart; dpmpp_2m, an ODE solver, reaches 0.078)."""
    p = fs.EDM()
    g = GaussianMixture.ring(n=8, radius=2.0, std=0.2)
    n = 3000
    x_T = fs.prior(p, jax.random.PRNGKey(3), (n, 2))
    exact = g.sample(jax.random.PRNGKey(4), n)
    solver = fs.get_solver(name, **STOCHASTIC[name])
    out = []
    for target in (10, 50):
        nfe = next(k for k in range(target, target + 10) if _reachable(solver, k, True))
        x = fs.sample(g.denoiser(p), x_T, solver, nfe=nfe, schedule="karras", final_zero=True, key=KEY)
        out.append(float(fs.metrics.sliced_wasserstein(x, exact, jax.random.PRNGKey(5))))
    assert out[1] < out[0], out
    assert out[1] < 0.12, out


def test_euler_maruyama_strong_order_with_the_brownian_tree(x64):
    """The same Brownian path at 8..64 steps: the error to a 512-step solution on that path
    falls with order >= 0.5 (Euler-Maruyama's strong order; the reverse SDE's noise is additive, so
    about 1 is seen). With independent noise per step there is no convergence. (Every grid is
    written as 512 steps, coarse ones with zero-length steps, so that one compilation serves all.)"""
    p = fs.VPLinear()
    d = GaussianMixture.gaussian(MEAN, STD**2).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(6), (16, 2))
    brownian = fs.BrownianNoise(KEY, 0.0, p.t_max, tol=1e-5)
    fine_ts = np.asarray(fs.get_timesteps(p, 512, "time_uniform"))

    @jax.jit
    def run(ts, noise):
        return fs.sample(d, x_T, "euler_maruyama", nfe=None, timesteps=ts, key=KEY, noise=noise)

    def padded(n):  # the n-step grid on 513 points: each step followed by zero-length steps
        return jnp.asarray(np.append(np.repeat(fine_ts[:-1:512 // n], 512 // n), fine_ts[-1]))

    fine = run(padded(512), brownian)
    steps = np.array([8, 16, 32, 64])
    errs = [float(jnp.sqrt(jnp.mean((run(padded(int(n)), brownian) - fine) ** 2))) for n in steps]
    order = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert 0.5 <= order <= 1.3, (order, errs)
    indep = float(jnp.sqrt(jnp.mean((run(padded(64), fs.IndependentNoise(KEY)) - fine) ** 2)))
    assert indep > 5 * errs[-1], (indep, errs)


# ----- reproducible noise -------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["brownian"])  # independent noise, every solver: test_contracts.py
def test_sample_b_does_not_depend_on_the_batch_and_same_key_is_bitwise(x64, noise):
    p = fs.EDM()
    d = GaussianMixture.ring(n=4, radius=2.0, std=0.3).denoiser(p)
    x_T = fs.prior(p, jax.random.PRNGKey(8), (8, 2))
    for name in ("pc_langevin",) if noise == "brownian" else ("dpmpp_sde", "edm_stochastic"):
        solver = fs.get_solver(name, **STOCHASTIC[name])
        nfe = 12 if _reachable(solver, 12, False) else 13
        full = fs.sample(d, x_T, solver, nfe=nfe, key=KEY, noise=noise)
        np.testing.assert_array_equal(full, fs.sample(d, x_T, solver, nfe=nfe, key=KEY, noise=noise))
        part = fs.sample(d, x_T[:5], solver, nfe=nfe, key=KEY, noise=noise)
        np.testing.assert_allclose(part, full[:5], rtol=1e-12, atol=1e-12, err_msg=name)
        other = fs.sample(d, x_T, solver, nfe=nfe, key=jax.random.key(8), noise=noise)
        assert float(jnp.min(jnp.abs(other - full))) > 0, name


def test_noise_sources():
    x = jnp.zeros((3, 4))
    ind = fs.IndependentNoise(KEY).at_step(2, 1.0, 0.5)
    # draw j of step i for sample b is fold_in(fold_in(fold_in(key, b), i), j)
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(KEY, 1), 2), 3)
    np.testing.assert_array_equal(ind.normal(3, x)[1], jax.random.normal(k, (4,)))
    assert not np.allclose(ind.normal(0, x), ind.normal(1, x))
    # Brownian increments add up over sub-intervals and have variance |s1 - s0|
    bm = fs.BrownianNoise(KEY, 0.0, 1.0).at_step(0, 1.0, 0.2)
    big = jnp.zeros((4000, 1))
    whole, a, b = jax.jit(lambda: (bm.increment(0.2, 1.0, big), bm.increment(0.2, 0.5, big),
                                   bm.increment(0.5, 1.0, big)))()
    np.testing.assert_allclose(whole, a + b, atol=1e-5)
    assert abs(float(jnp.var(whole)) / 0.8 - 1) < 4 * np.sqrt(2 / 4000)
    assert abs(float(jnp.mean(a * b))) < 4 * np.sqrt(0.3 * 0.5 / 4000)  # independent increments


# ----- NFE counts ---------------------------------------------------------------------------------


# ----- errors -------------------------------------------------------------------------------------


def test_errors():
    p = fs.EDM()
    d = GaussianMixture.ring(n=4).denoiser(p)
    x_T = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="dpmpp_2m_sde is a stochastic solver"):
        fs.sample(d, x_T, "dpmpp_2m_sde", nfe=5)
    with pytest.raises(ValueError, match="unknown noise 'pink'"):
        fs.sample(d, x_T, "ddpm", nfe=5, key=KEY, noise="pink")
    # a key given to a deterministic solver is ignored
    np.testing.assert_array_equal(fs.sample(d, x_T, "dpmpp_2m", nfe=5, key=KEY), fs.sample(d, x_T, "dpmpp_2m", nfe=5))
    bad = [
        ("euler_ancestral", {"eta": -1.0}, "eta must be >= 0"),
        ("edm_stochastic", {"S_churn": -1.0}, "S_churn must be >= 0"),
        ("sa_solver", {"predictor_order": 4}, "predictor_order must be 1, 2 or 3"),
        ("sa_solver", {"corrector_order": 5}, "corrector_order must be 0"),
        ("er_sde", {"order": 4}, "order must be 1, 2 or 3"),
        ("er_sde", {"noise_scale": "loud"}, "noise_scale must be one of"),
        ("restart", {"intervals": (2.0, 1.0)}, "0 < s_min < s_max"),
        ("restart", {"K": -1}, "K must be an integer >= 0"),
        ("restart", {"inner": "ddpm"}, "deterministic"),
        ("pc_langevin", {"corrector_steps": -1}, "corrector_steps must be an integer >= 0"),
        ("pc_langevin", {"predictor": "heun"}, "predictor must be one of"),
        ("ddpm", {"variance": "huge"}, "variance must be one of"),
    ]
    for name, options, message in bad:
        with pytest.raises(ValueError, match=message):
            fs.get_solver(name, **options)
    with pytest.raises(ValueError, match="not crossed by a step of the grid"):
        fs.sample(d, x_T, "restart", nfe=30, key=KEY, solver_options={"intervals": (1e-4, 1.0)})
    term = fs.ProbabilityFlowTerm(d)
    with pytest.raises(ValueError, match="run it with fastsample.sample"):
        diffrax.diffeqsolve(term, fs.get_solver("ddpm"), 80.0, 1.0, None, x_T,
                            stepsize_controller=diffrax.StepTo(jnp.asarray([80.0, 10.0, 1.0])))

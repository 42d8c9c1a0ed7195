"""Gradients through samplers (fastsample.gradients, ``sample(..., gradient=...)``).

Closed form used below. For Gaussian data ``N(mu, s^2 I)`` the noised marginal at ``t`` is
``N(alpha_t mu, r_t^2 I)`` with ``r_t = sqrt(alpha_t^2 s^2 + sigma_t^2)``, and the data prediction
is ``D(x) = mu + alpha s^2 / r^2 (x - alpha mu)``. In the half log-SNR the PF-ODE reads
``dx/dlambda = (dlog sigma/dlambda) x + alpha D``; for ``u = x - alpha mu`` (using
``dalpha/dlambda = alpha (dlog sigma/dlambda + 1)``) it becomes ``du/dlambda = (dlog sigma/dlambda +
alpha^2 s^2 / r^2) u = (dlog r/dlambda) u``. Hence ``x_t = alpha_t mu + (r_t / r_T)(x_T - alpha_T mu)``
(checked against the adaptive reference solve in tests/test_sample.py) and, exactly,

    d x_0 / d x_T = (r_0 / r_T) I.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample import gradients as G
from fastsample.models import GaussianMixture
from fastsample.noise import make_noise
from fastsample.solvers import DPMSolverMultistepSDE

PROC = fs.VPLinear()


def _slope(ns, errors):
    """Least-squares slope of log|error| against log(1/N): the convergence order."""
    return float(np.polyfit(np.log(1.0 / np.asarray(ns, float)), np.log(np.abs(errors)), 1)[0])


# ---------------------------------------------------------------- Gaussian data: d x_0 / d x_T


@pytest.mark.parametrize(
    "solver, mode, order",
    [
        ("ddim", "full", 1),
        ("ddim", G.Adjoint(order=1), 1),  # AdjointDEIS-1
        ("dpmpp_2m", "adjoint", 2),  # AdjointDEIS-2M
        # BDIA-DDIM with gamma = 1 is a symmetric two-step (leapfrog-type) scheme: second order.
        (fs.BDIADDIM(1.0), "reversible", 2),
    ],
    ids=["full-ddim", "adjoint1", "adjoint2m", "reversible-bdia"],
)
def test_gaussian_jacobian_converges_to_r0_over_rT_at_the_solver_order(x64, solver, mode, order):
    s, mu = 0.6, 0.4
    den = GaussianMixture.gaussian(np.full(2, mu), s * s).denoiser(PROC)
    x_T = jnp.array([[0.3, -1.2]])
    ns, errors = (32, 64, 128), []
    for n in ns:  # one model evaluation per step for these solvers: n steps
        grad = jax.grad(lambda x, n=n: jnp.sum(
            fs.sample(den, x, solver, nfe=n, schedule="logsnr_uniform", gradient=mode)[:, 0]))(x_T)
        a, sig = PROC.alpha_sigma(fs.get_timesteps(PROC, n, "logsnr_uniform")[jnp.array([0, -1])])
        r = jnp.sqrt(a**2 * s * s + sig**2)
        assert abs(float(grad[0, 1])) < 1e-12  # the Jacobian is (r_0 / r_T) I: no leakage between coordinates
        errors.append(float(grad[0, 0]) - float(r[1] / r[0]))
    assert abs(errors[-1]) < 0.05, errors
    slope = _slope(ns, errors)
    assert order - 0.25 < slope < order + 0.5, (errors, slope)


# ------------------------------------------------------ a conditional mixture with guidance


class CondMixture(eqx.Module):
    """A Gaussian mixture shifted by the conditioning ``c``: ``D(x) = c + D_0(x - alpha c)``, with
    learnable means and log-variances (the "model parameters")."""

    means: jax.Array
    log_var: jax.Array
    process: fs.AbstractProcess

    def __call__(self, x, t, cond):
        a, s = self.process.alpha_sigma(t)
        return cond + GaussianMixture(self.means, jnp.exp(self.log_var)).x0(x - a * cond, a, s)


def _problem(batch=3):
    rng = np.random.default_rng(0)
    model = CondMixture(jnp.asarray(rng.normal(size=(3, 2)) * 1.5), jnp.log(jnp.array([0.3, 0.5, 0.2])), PROC)
    params = dict(
        x_T=jnp.asarray(rng.normal(size=(batch, 2))),
        model=model,
        cond=jnp.asarray(rng.normal(size=(batch, 2)) * 0.3),
        guidance=jnp.asarray(1.5),
    )
    weights = jnp.asarray(rng.normal(size=(batch, 2)))
    return params, weights


def _loss(params, weights, solver, mode, *, nfe=None, timesteps=None, gamma=None, final_zero=False):
    den = fs.Denoiser(params["model"], PROC, "x0", guidance_scale=params["guidance"], uncond=jnp.zeros(2))
    if gamma is not None:
        solver = fs.BDIADDIM(params["gamma"])
    if timesteps is not None:
        timesteps = params["ts"]
    x = fs.sample(den, params["x_T"], solver, nfe=nfe, schedule="logsnr_uniform", timesteps=timesteps,
                  final_zero=final_zero, cond=params["cond"], gradient=mode)
    return jnp.sum(weights * x)


def _grads(params, weights, solver, mode, **kw):
    return eqx.filter_grad(lambda p: _loss(p, weights, solver, mode, **kw))(params)


def _assert_trees_close(a, b, rtol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(v))))
        assert float(jnp.max(jnp.abs(u - v))) <= rtol * scale, (u, v)


def test_full_remat_binomial_and_reversible_agree_in_float64(x64):
    """BDIA-DDIM on a 10-step traced grid: gradients w.r.t. x_T, model parameters, cond, guidance
    scale, the solver's gamma and the time grid agree to 1e-6 across the exact modes."""
    params, weights = _problem()
    params["ts"] = fs.get_timesteps(PROC, 10, "logsnr_uniform")
    params["gamma"] = jnp.asarray(0.9)
    reference = _grads(params, weights, None, "full", timesteps=True, gamma=True)
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(eqx.filter(reference,
                                                                                       eqx.is_inexact_array)))
    for mode in ("remat", G.Binomial(3), "reversible", G.Full(unroll=True), G.Full(unroll=4)):
        _assert_trees_close(_grads(params, weights, None, mode, timesteps=True, gamma=True), reference, 1e-6)


def test_multistep_and_final_zero_agree_across_checkpointing_modes(x64):
    """dpmpp_2m (history in the carry), 11 steps ending at t = 0: binomial equals full; and
    BDIA's reversible gradients equal full on a grid ending at t = 0."""
    params, weights = _problem()
    full = _grads(params, weights, "dpmpp_2m", "full", nfe=11, final_zero=True)
    _assert_trees_close(_grads(params, weights, "dpmpp_2m", "binomial", nfe=11, final_zero=True), full, 1e-6)
    bdia = fs.BDIADDIM(1.0)
    _assert_trees_close(_grads(params, weights, bdia, "reversible", nfe=7, final_zero=True),
                        _grads(params, weights, bdia, "full", nfe=7, final_zero=True), 1e-6)


def _directional_fd(f, params, key, eps=1e-5):
    """``(d/de f(params + e v) at 0`` by central differences, ``v``)`` for a random direction ``v``
    over the inexact arrays of ``params``."""
    diff = eqx.filter(params, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(diff)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves, strict=True)])
    shift = lambda e: eqx.apply_updates(params, jax.tree.map(lambda u: e * u, v))  # noqa: E731
    return (f(shift(eps)) - f(shift(-eps))) / (2 * eps), v


def _dot(g, v):
    return sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(eqx.filter(g, eqx.is_inexact_array)),
                                                      jax.tree.leaves(v), strict=True))


GROUPS = ("x_T", "model", "cond", "guidance")


def test_finite_differences_for_parameters_conditioning_and_guidance(x64):
    """``full`` (hence remat / binomial / reversible, which equal it) matches central differences
    of the sampler to 1e-7. The adjoint approximates the same gradient of the exact flow: its
    distance to ``full`` falls at second order (AdjointDEIS-2M; both converge at order 2)."""
    params, weights = _problem()
    f = jax.jit(lambda p: _loss(p, weights, "dpmpp_2m", "full", nfe=24))
    rel = {}
    for n in (24, 48):
        full = _grads(params, weights, "dpmpp_2m", "full", nfe=n)
        adjoint = _grads(params, weights, "dpmpp_2m", "adjoint", nfe=n)
        for i, name in enumerate(GROUPS):
            fd, v = _directional_fd(lambda q, name=name: f({**params, name: q}), params[name],
                                    jax.random.fold_in(jax.random.PRNGKey(1), i))
            if n == 24:
                assert abs(_dot(full[name], v) - fd) <= 1e-7 * max(1.0, abs(fd)), name
            rel[name, n] = abs(_dot(adjoint[name], v) - _dot(full[name], v)) / abs(_dot(full[name], v))
    for name in GROUPS:
        assert rel[name, 24] < 0.1, rel
        assert rel[name, 48] < rel[name, 24] / 2.8, rel  # order 2 gives about 4


# ---------------------------------------------------------------------------------- memory


class WideModel(eqx.Module):
    """``x0 = tanh(x W1 + t) W2``: one model call keeps two ``batch x width`` activations (16 states
    for ``width = 8 dim``); its parameters are 4 states for ``batch = 256``."""

    w1: jax.Array
    w2: jax.Array

    def __call__(self, x, t, cond):
        return jnp.tanh(x @ self.w1 + t) @ self.w2


def _temp_bytes(mode, n, solver="ddim"):
    dim, width, batch = 64, 512, 256
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    model = WideModel(jax.random.normal(key1, (dim, width)) / 8, jax.random.normal(key2, (width, dim)) / 32)

    def loss(model, x):
        return jnp.sum(fs.sample(fs.Denoiser(model, PROC, "x0"), x, solver, nfe=n, schedule="logsnr_uniform",
                                 gradient=mode) ** 2)

    x = jnp.zeros((batch, dim), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(model, x).compile()
    stats = compiled.memory_analysis()
    # XLA:CPU reports it on every supported JAX (0.10-0.12); the memory targets need it
    assert stats is not None and getattr(stats, "temp_size_in_bytes", None) is not None, (
        f"memory_analysis() is unavailable on backend {jax.default_backend()!r} with jax {jax.__version__}")
    return stats.temp_size_in_bytes, batch * dim * 4


@pytest.mark.slow
def test_compiled_temporary_memory_of_each_mode():
    full, state = _temp_bytes("full", 64)
    remat, _ = _temp_bytes("remat", 64)
    binomial, _ = _temp_bytes("binomial", 64)
    assert remat * 10 <= full, (full, remat)
    assert binomial * 10 <= full, (full, binomial)
    assert binomial < remat, (remat, binomial)
    for mode, solver in (("adjoint", "ddim"), ("reversible", fs.BDIADDIM(1.0))):
        small, _ = _temp_bytes(mode, 16, solver)
        large, _ = _temp_bytes(mode, 64, solver)
        # 48 more steps cost less than one state (full grows by about 48 x 17 states).
        assert large - small < state, (mode, small, large)
        assert large * 10 <= full, (mode, large, full)


# ------------------------------------------------------------------------------- stochastic


def test_stochastic_solvers_differentiate_a_fixed_noise_path(x64):
    params, weights = _problem()
    params = {k: params[k] for k in ("x_T", "model")}

    def loss(p, mode):
        den = fs.Denoiser(p["model"], PROC, "x0")
        x = fs.sample(den, p["x_T"], "euler_ancestral", nfe=9, key=jax.random.PRNGKey(3),
                      cond=jnp.zeros_like(p["x_T"]), gradient=mode)
        return jnp.sum(weights * x)

    full = eqx.filter_grad(lambda p: loss(p, "full"))(params)
    _assert_trees_close(eqx.filter_grad(lambda p: loss(p, "binomial"))(params), full, 1e-6)
    fd, v = _directional_fd(jax.jit(lambda p: loss(p, "full")), params, jax.random.PRNGKey(4))
    assert abs(_dot(full, v) - fd) <= 1e-6 * max(1.0, abs(fd))
    with pytest.raises(ValueError, match="'dpmpp_sde' is not one"):  # no SDE adjoint for the singlestep SDE solver
        fs.sample(fs.Denoiser(params["model"], PROC, "x0"), params["x_T"], "dpmpp_sde", nfe=8,
                  key=jax.random.PRNGKey(3), cond=jnp.zeros_like(params["x_T"]), gradient="adjoint")


# ---------------------------------------------------------------------------- bad input


def test_bad_gradient_requests_raise_clear_errors():
    den = GaussianMixture.gaussian(np.zeros(2), 1.0).denoiser(PROC)
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match="unknown gradient mode 'bogus'; allowed: full, remat, binomial"):
        fs.sample(den, x, "ddim", nfe=4, gradient="bogus")
    with pytest.raises(ValueError, match="reversible.*BDIADDIM"):
        fs.sample(den, x, "ddim", nfe=4, gradient="reversible")
    with pytest.raises(ValueError, match="gamma > 0"):
        fs.sample(den, x, fs.BDIADDIM(0.0), nfe=4, gradient="reversible")
    with pytest.raises(ValueError, match="trajectory"):
        fs.solve(den, x, "ddim", nfe=4, gradient="adjoint", saveat=fs.SaveAt(steps=True))
    with pytest.raises(ValueError, match="branching must be an integer >= 2"):
        G.Binomial(branching=1)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        G.Adjoint(order=3)
    for bad in (0, False, 1.5):
        with pytest.raises(ValueError, match="unroll must be a positive integer or True"):
            G.Full(unroll=bad)
    with pytest.raises(ValueError, match="dpm_solver_adaptive supports gradient='full' only"):
        fs.sample(den, x, "dpm_solver_adaptive", nfe=None, gradient="remat")
    # The continuous adjoint has no gradient for the time grid: asking for one is an error.
    ts = fs.get_timesteps(PROC, 4, "logsnr_uniform")
    with pytest.raises(ValueError, match="gradient='adjoint' gives no gradient with respect to the time grid"):
        jax.grad(lambda t: jnp.sum(fs.sample(den, x, "ddim", nfe=None, timesteps=t, gradient="adjoint")))(ts)


def test_checkpointed_scan_equals_lax_scan_for_any_length():
    def body(c, i):
        c = jnp.sin(c) + 0.1 * i
        return c, c * 2

    def value_and_grad(scan):
        return jax.jit(jax.value_and_grad(lambda c: (lambda out: (out[1].sum(), out))(scan(c)), has_aux=True))

    for n, b in ((0, 2), (17, 2), (17, 3)):  # 17 = 2 * 8 + 1 = 3 * 5 + 2: remainders at several levels
        (_, (carry, ys)), g = value_and_grad(lambda c, n=n, b=b: G.checkpointed_scan(body, c, n, b))(0.3)
        (_, (carry_ref, ys_ref)), g_ref = value_and_grad(lambda c, n=n: jax.lax.scan(body, c, jnp.arange(n)))(0.3)
        np.testing.assert_allclose(carry, carry_ref, rtol=1e-6)
        np.testing.assert_allclose(ys, ys_ref, rtol=1e-6)
        np.testing.assert_allclose(g, g_ref, rtol=1e-6)


# ------------------------------------------------------------------- SDE adjoint, AdjointDPM


def _sde_adjoint_sample(den, x_T, solver, ts, key, cond=None, kind="independent"):
    """The SDE adjoint's solve with the noise source ``fastsample.sample(..., key=key, noise=kind)`` builds."""
    solver = fs.get_solver(solver)
    return G.Adjoint().solve(solver, den, x_T, ts, cond, make_noise(kind, key, 0.0, float(PROC.t_max)))[0]


@pytest.mark.slow
@pytest.mark.parametrize("solver, eta", [("ddpm", 1.0), (DPMSolverMultistepSDE(order=1, eta=0.5), 0.5)],
                         ids=["ddpm", "sde-dpm-solver++1-eta0.5"])
def test_sde_adjoint_jacobian_converges_to_the_fixed_noise_closed_form(x64, solver, eta):
    """Gaussian data, the reverse SDE of noise level ``nu`` with its noise held fixed:
    ``dx/dlambda = (dlog sigma/dlambda - nu + (1 + nu) alpha^2 s^2 / r^2) x + ...``, and
    ``int alpha^2 s^2 / r^2 dlambda = log(r_0 sigma_T / (r_T sigma_0))``, so ``d x_0 / d x_T =
    (r_0 / r_T)^(1 + nu) (alpha_T / alpha_0)^nu`` (``nu = 1``: DDPM). The SDE adjoint converges to
    it at first order, and its forward pass is ``fastsample.sample``'s with the same key."""
    s, mu = 0.6, 0.4
    den = GaussianMixture.gaussian(np.full(2, mu), s * s).denoiser(PROC)
    x_T, key = jnp.array([[0.3, -1.2]]), jax.random.PRNGKey(0)
    ns, errors = (32, 64, 128), []
    for n in ns:
        ts = fs.get_timesteps(PROC, n, "logsnr_uniform")
        np.testing.assert_array_equal(_sde_adjoint_sample(den, x_T, solver, ts, key),
                                      fs.sample(den, x_T, solver, nfe=None, timesteps=ts, key=key))
        grad = jax.jit(jax.grad(lambda x, ts=ts: jnp.sum(_sde_adjoint_sample(den, x, solver, ts, key)[:, 0])))(x_T)
        a, sig = PROC.alpha_sigma(ts[jnp.array([0, -1])])
        r = jnp.sqrt(a**2 * s * s + sig**2)
        exact = float((r[1] / r[0]) ** (1 + eta) * (a[0] / a[1]) ** eta)
        assert abs(float(grad[0, 1])) < 1e-12
        errors.append(float(grad[0, 0]) / exact - 1.0)
    assert abs(errors[-1]) < 0.25, errors
    assert 0.75 < _slope(ns, errors) < 1.5, errors


@pytest.mark.slow
def test_sde_adjoint_parameters_and_conditioning_converge_to_full(x64):
    """DDPM through a conditional Gaussian model (learnable mean and log-variance), the same key:
    the SDE adjoint's gradients for ``x_T``, the mean and ``cond`` (for Gaussian data they do not
    depend on the noise) approach ``full``'s at first order; the log-variance's (which does) to 1e-3."""
    rng = np.random.default_rng(0)
    model = CondMixture(jnp.asarray(rng.normal(size=(1, 2))), jnp.log(jnp.array([0.3])), PROC)
    params = dict(x_T=jnp.asarray(rng.normal(size=(3, 2))), model=model, cond=jnp.asarray(rng.normal(size=(3, 2))))
    weights, key = jnp.asarray(rng.normal(size=(3, 2))), jax.random.PRNGKey(5)

    def loss(p, ts, adjoint):
        den = fs.Denoiser(p["model"], PROC, "x0")
        if adjoint:
            x = _sde_adjoint_sample(den, p["x_T"], "ddpm", ts, key, p["cond"])
        else:
            x = fs.sample(den, p["x_T"], "ddpm", nfe=None, timesteps=ts, key=key, cond=p["cond"])
        return jnp.sum(weights * x)

    ns, rel = (32, 64, 128), {"x_T": [], "means": [], "cond": [], "log_var": []}
    for n in ns:
        ts = fs.get_timesteps(PROC, n, "logsnr_uniform")
        full, adj = (eqx.filter_jit(eqx.filter_grad(lambda p, a=a, ts=ts: loss(p, ts, a)))(params)
                     for a in (False, True))
        for name, get in (("x_T", lambda g: g["x_T"]), ("means", lambda g: g["model"].means),
                          ("cond", lambda g: g["cond"]), ("log_var", lambda g: g["model"].log_var)):
            rel[name].append(float(jnp.linalg.norm(get(adj) - get(full)) / jnp.linalg.norm(get(full))))
    for name in ("x_T", "means", "cond"):
        assert 0.75 < _slope(ns, rel[name]) < 1.5, (name, rel)
    assert rel["means"][-1] < 1e-4 and rel["cond"][-1] < 1e-4 and rel["x_T"][-1] < 0.25, rel
    assert max(rel["log_var"]) < 1e-3, rel


@pytest.mark.slow
def test_adjointdpm_converges_at_its_order_and_agrees_with_adjointdeis(x64):
    """AdjointDPM (Euler / Adams-Bashforth 2 in ``rho = sigma / alpha``) on Gaussian data: ``d x_0 / d x_T``
    converges to ``r_0 / r_T`` at orders 1 and 2, and its distance to AdjointDEIS falls as N grows."""
    s, mu = 0.6, 0.4
    den = GaussianMixture.gaussian(np.full(2, mu), s * s).denoiser(PROC)
    x_T = jnp.array([[0.3, -1.2]])
    ns = (64, 128, 256)

    def jac(solver, mode, n):
        g = jax.grad(lambda x: fs.sample(den, x, solver, nfe=n, schedule="logsnr_uniform", gradient=mode)[0, 0])
        return float(g(x_T)[0, 0])

    for solver, order in (("ddim", 1), ("dpmpp_2m", 2)):
        errors, gaps = [], []
        for n in ns:
            a, sig = PROC.alpha_sigma(fs.get_timesteps(PROC, n, "logsnr_uniform")[jnp.array([0, -1])])
            r = jnp.sqrt(a**2 * s * s + sig**2)
            dpm = jac(solver, G.Adjoint(order=order, method="adjointdpm"), n)
            errors.append(dpm - float(r[1] / r[0]))
            gaps.append(abs(dpm - jac(solver, G.Adjoint(order=order), n)))
        assert order - 0.25 < _slope(ns, errors) < order + 0.5, (solver, errors)
        assert gaps[-1] < gaps[0] / 2 ** (2 * order - 0.5) and abs(errors[-1]) < 0.15, (solver, gaps, errors)


def test_adjoint_modes_refuse_what_they_cannot_do():
    den = GaussianMixture.gaussian(np.zeros(2), 1.0).denoiser(PROC)
    x, key = jnp.ones((1, 2)), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="Adjoint method must be one of adjointdeis, adjointdpm; got 'bogus'"):
        G.Adjoint(method="bogus")
    with pytest.raises(ValueError, match="method='adjointdpm'.*is the probability-flow ODE's adjoint"):
        fs.sample(den, x, "ddpm", nfe=4, key=key, gradient=G.Adjoint(method="adjointdpm"))
    with pytest.raises(ValueError, match="SDE adjoint.*is first order: use Adjoint\\(order=1\\)"):
        fs.sample(den, x, "ddpm", nfe=4, key=key, gradient=G.Adjoint(order=2))
    with pytest.raises(ValueError, match="'edm_stochastic' is not one"):
        fs.sample(den, x, "edm_stochastic", nfe=4, key=key, gradient="adjoint")
    ts = fs.get_timesteps(PROC, 4, "logsnr_uniform")
    with pytest.raises(ValueError, match="needs the sampler's noise source"):
        G.Adjoint().solve(fs.get_solver("ddpm"), den, x, ts, None)
    assert G.Adjoint().resolved_order(fs.get_solver("ddpm")) == 1
    assert G.Adjoint().resolved_order(fs.get_solver("ddim")) == 2


def test_sample_runs_the_sde_adjoint_with_its_own_noise():
    den = GaussianMixture.gaussian(np.zeros(2), 1.0).denoiser(PROC)
    x, key = jnp.ones((2, 2)), jax.random.PRNGKey(0)
    ts = fs.get_timesteps(PROC, 8, "logsnr_uniform")
    g = jax.grad(lambda x: jnp.sum(fs.sample(den, x, "ddpm", timesteps=ts, key=key, gradient="adjoint")))(x)
    ref = jax.grad(lambda x: jnp.sum(_sde_adjoint_sample(den, x, "ddpm", ts, key)))(x)
    np.testing.assert_allclose(g, ref, rtol=1e-6)


def _sde_temp_bytes(n):
    dim, width, batch = 64, 512, 256
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    model = WideModel(jax.random.normal(key1, (dim, width)) / 8, jax.random.normal(key2, (width, dim)) / 32)
    ts = fs.get_timesteps(PROC, n, "logsnr_uniform").astype(jnp.float32)
    noise = make_noise("independent", jax.random.PRNGKey(1), 0.0, float(PROC.t_max))

    def loss(model, x, mode):
        den = fs.Denoiser(model, PROC, "x0")
        if mode == "adjoint":
            out = G.Adjoint().solve(fs.get_solver("ddpm"), den, x, ts, None, noise)[0]
        else:
            out = fs.sample(den, x, "ddpm", nfe=None, timesteps=ts, key=jax.random.PRNGKey(1))
        return jnp.sum(out**2)

    x = jnp.zeros((batch, dim), jnp.float32)
    return [jax.jit(jax.grad(lambda m, x, mode=mode: loss(m, x, mode), argnums=(0, 1))).lower(model, x).compile()
            .memory_analysis().temp_size_in_bytes for mode in ("adjoint", "full")], batch * dim * 4


@pytest.mark.slow
def test_compiled_memory_of_the_sde_adjoint_and_adjointdpm():
    """AdjointDPM does not grow with N; the SDE adjoint keeps one state per step (no activations):
    from N = 16 to 64 it grows by at most 1.1 states per step, and uses 10x less than ``full``."""
    small, _ = _temp_bytes(G.Adjoint(method="adjointdpm"), 16)
    large, state = _temp_bytes(G.Adjoint(method="adjointdpm"), 64)
    assert large - small < state, (small, large)
    (adj16, _), state = _sde_temp_bytes(16)
    (adj64, full64), _ = _sde_temp_bytes(64)
    assert adj64 - adj16 <= 1.1 * 48 * state, (adj16, adj64)
    assert adj64 * 10 <= full64, (adj64, full64)

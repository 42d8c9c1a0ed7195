"""Learned solvers: programs reproduce their base solvers exactly, fitted solvers beat them on
held-out noise, and fitted solvers save, load and refuse misuse."""

import json
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fastsample as fs
from fastsample.learned import (
    Bespoke,
    LearnedGrid,
    NonStationary,
    ProgramSolver,
    extract_program,
    fit_dode,
    fit_solver,
    load_solver,
    make_reference,
    save_solver,
)
from fastsample.learned.distill import _mixing
from fastsample.models import GaussianMixture


def _setup(process, n=64, seed=0):
    mixture = GaussianMixture.ring(n=6)
    denoiser = mixture.denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(seed), (n, mixture.dim), jnp.float64)
    return denoiser, x_T


@pytest.mark.parametrize(
    "solver, steps, final_zero",
    [("ddim", 5, False), ("dpmpp_2m", 5, True), ("heun", 3, True), ("unipc_3", 6, False), ("ipndm", 5, True)],
)
def test_extracted_program_reproduces_its_solver(x64, solver, steps, final_zero):
    process = fs.VPLinear()
    denoiser, x_T = _setup(process)
    ts = fs.get_timesteps(process, steps, "logsnr_uniform", final_zero=final_zero)
    expected = fs.sample(denoiser, x_T, solver, nfe=None, timesteps=ts)
    program = extract_program(solver, process, ts)
    assert program.nfe == fs.get_solver(solver).nfe(steps, final_zero)
    assert np.all(np.triu(np.asarray(program.B)[: program.nfe]) == 0)
    got = fs.sample(denoiser, x_T, ProgramSolver.from_program(program, process="VPLinear"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_ddim_program_has_the_closed_form_coefficients(x64):
    """DDIM: x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (alpha_{i+1} - alpha_i sigma_{i+1}/sigma_i) D_i."""
    process = fs.VPLinear()
    ts = np.asarray(fs.get_timesteps(process, 3, "time_uniform"))
    p = extract_program("ddim", process, ts)
    a, s = (np.asarray(v) for v in process.alpha_sigma(jnp.asarray(ts)))
    np.testing.assert_allclose(p.a, s / s[0], rtol=1e-12)
    for i in range(3):
        np.testing.assert_allclose(p.B[i + 1, i], a[i + 1] - a[i] * s[i + 1] / s[i], rtol=1e-12)
    np.testing.assert_allclose(p.times, ts[:-1])


def test_programs_refuse_nonlinear_and_wrong_use(x64):
    process = fs.VPLinear()
    denoiser, x_T = _setup(process, n=4)
    ts = fs.get_timesteps(process, 4, "logsnr_uniform")
    solver = ProgramSolver.from_program(extract_program("ddim", process, ts), process="VPLinear", method="dode")
    with pytest.raises(ValueError, match="fitted for nfe=4; got nfe=6"):
        fs.sample(denoiser, x_T, solver, nfe=6)
    with pytest.raises(ValueError, match="fitted for process VPLinear; got EDM"):
        fs.sample(GaussianMixture.ring(n=6).denoiser(fs.EDM()), x_T, solver)
    with pytest.raises(ValueError, match="do not pass `timesteps`"):
        fs.sample(denoiser, x_T, solver, timesteps=ts)


@pytest.mark.parametrize("process", [fs.VPLinear(), fs.FlowMatching(t_min=1e-3, t_max=1 - 1e-3)])
def test_parametrized_solvers_start_at_their_base_solver(x64, process):
    denoiser, x_T = _setup(process)
    n = 5
    ts = np.asarray(fs.get_timesteps(process, n, "logsnr_uniform", final_zero=True))
    rk1 = Bespoke.create(process, ts, order=1)
    p1 = rk1.init(ts)
    assert rk1.num_params(p1) == 4 * n - 1
    euler = fs.sample(denoiser, x_T, "euler", nfe=None, timesteps=ts)
    np.testing.assert_allclose(fs.sample(denoiser, x_T, rk1.solver(p1)), euler, atol=1e-12)
    rk2 = Bespoke.create(process, ts, order=2)
    p2 = rk2.init(ts)
    assert rk2.num_params(p2) == 8 * n - 1
    midpoint = diffrax.diffeqsolve(fs.ProbabilityFlowTerm(denoiser), diffrax.Midpoint(), ts[0], ts[-1], None, x_T,
                                   stepsize_controller=diffrax.StepTo(ts=ts)).ys[0]
    np.testing.assert_allclose(fs.sample(denoiser, x_T, rk2.solver(p2)), midpoint, atol=1e-12)
    np.testing.assert_allclose(fs.sample(denoiser, x_T, "midpoint", nfe=None, timesteps=ts), midpoint, atol=1e-12)
    base = fs.sample(denoiser, x_T, "dpmpp_2m", nfe=None, timesteps=ts)
    bns = NonStationary.create(process, "dpmpp_2m", ts)
    np.testing.assert_allclose(fs.sample(denoiser, x_T, bns.solver(bns.init(ts))), base, atol=1e-12)
    grid = LearnedGrid.create(process, "dpmpp_2m", ts)
    np.testing.assert_allclose(grid.timesteps(grid.init(ts)), ts, atol=1e-15)
    np.testing.assert_allclose(grid.sample(denoiser, x_T, grid.init(ts)), base, atol=1e-12)


def test_bespoke_constraints_hold_for_any_parameters(x64):
    process = fs.VPLinear()
    ts = fs.get_timesteps(process, 4, "logsnr_uniform", final_zero=True)
    model = Bespoke.create(process, ts, order=2)
    params = jax.tree.map(lambda p: p + 3.0 * jax.random.normal(jax.random.PRNGKey(1), p.shape), model.init(ts))
    t = np.asarray(model.times(params))
    assert t[0] == ts[0] and t[-1] == 0.0 and np.all(np.diff(t) < 0)
    assert np.all(np.exp(np.asarray(params["log_s"])) > 0)


def test_hermite_reference_trajectory_matches_a_direct_solve(x64):
    process = fs.VPLinear()
    denoiser, _ = _setup(process)
    ref = make_reference(denoiser, jax.random.PRNGKey(0), 8, (2,), trajectory_points=257)
    t = 0.37
    direct = fs.reference_solve(denoiser, ref.x_T, t_end=t)
    np.testing.assert_allclose(ref.at(process, t), direct, atol=5e-7)  # cubic Hermite, h = 0.05 in lambda
    np.testing.assert_array_equal(ref.at(process, 0.0), ref.x_end)


@pytest.fixture(scope="module")
def ring_reference():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    process = fs.VPLinear()
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    ref = make_reference(denoiser, jax.random.PRNGKey(0), 192, (2,), trajectory_points=33)
    yield denoiser, *ref.split(128)
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.slow
@pytest.mark.parametrize("method, nfe", [("learned_grid", 4), ("bns", 4), ("bespoke_rk2", 6), ("dode", 6),
                                         ("iia", 6)])
def test_fitted_solver_beats_its_base_on_held_out_noise(ring_reference, method, nfe):
    denoiser, train, val = ring_reference
    solver, report = fit_solver(method, denoiser, train, val, nfe, base="ddim", steps=150, eval_every=25,
                                optimizer=optax.adam(2e-2))
    assert report.fitted_rmse < 0.8 * report.base_rmse, report
    assert solver.fitted_nfe == nfe


@pytest.mark.slow
@pytest.mark.parametrize("method, nfe", [("bns", 4), ("bespoke_rk2", 6)])
def test_warm_start_begins_at_the_learned_grid_and_improves_on_it(ring_reference, method, nfe):
    """BNS / Bespoke contain every grid of their base: started from the fitted learned grid (of
    ddim / the midpoint rule), their first held-out loss is the grid's, and the fit improves it."""
    denoiser, train, val = ring_reference
    _, report = fit_solver(method, denoiser, train, val, nfe, base="ddim", steps=100, eval_every=25,
                           optimizer=optax.adam(2e-2), warm_start=True)
    grid = report.warm_start
    assert grid.method == "learned_grid" and grid.base == ("ddim" if method == "bns" else "midpoint")
    assert report.base_rmse == grid.base_rmse  # the base solver on the schedule, as for every method
    np.testing.assert_allclose(report.history[0]["val_loss"], grid.fitted_rmse ** 2, rtol=1e-9)
    assert grid.fitted_rmse < grid.base_rmse and report.fitted_rmse < 0.9 * grid.fitted_rmse, report
    assert report.timesteps.shape == grid.timesteps.shape


@pytest.mark.slow
def test_bespoke_local_loss_fit_improves_the_endpoint(ring_reference):
    denoiser, train, val = ring_reference
    _, report = fit_solver("bespoke_rk1", denoiser, train, val, 6, loss="local", steps=150, optimizer=optax.adam(2e-2))
    assert report.fitted_rmse < 0.8 * report.base_rmse, report


def test_dode_coefficients_are_least_squares_optima(x64):
    """Each fitted lambda minimises the squared error of the next evaluation point."""
    process = fs.VPLinear()
    denoiser, x_T = _setup(process, n=32)
    ts = np.asarray(fs.get_timesteps(process, 4, "logsnr_uniform", final_zero=True))
    solver, lambdas = fit_dode(denoiser, "ddim", ts, x_T, teacher_factor=5)
    base = extract_program("ddim", process, ts)
    assert lambdas[0] == 0 and np.all(lambdas[1:] != 0)
    sol = fs.solve(denoiser, x_T, "ddim", nfe=None, timesteps=fs.learned.refine_grid(process, ts, 5),
                           saveat=fs.SaveAt(steps=True))
    teacher = sol.trajectory
    target = teacher[-1]

    def final_error(lams):
        M = _mixing(4, {k: [lams[k]] for k in range(1, 4)}, jnp.float64)
        s = ProgramSolver.from_program(base._replace(B=jnp.asarray(base.B) @ M), process="VPLinear")
        return float(jnp.sum((fs.sample(denoiser, x_T, s) - target) ** 2))

    best = final_error(lambdas)
    np.testing.assert_allclose(fs.sample(denoiser, x_T, solver), fs.sample(denoiser, x_T, ProgramSolver.from_program(
        base._replace(B=jnp.asarray(base.B) @ _mixing(4, {k: [lambdas[k]] for k in range(1, 4)}, jnp.float64)),
        process="VPLinear")), atol=1e-12)
    for delta in (1e-3, -1e-3):
        bumped = lambdas.copy()
        bumped[3] += delta  # the last lambda only moves the sample: its optimum is exact
        assert final_error(bumped) > best


def test_saved_solver_round_trip(x64, tmp_path):
    process = fs.VPLinear()
    denoiser, x_T = _setup(process, n=8)
    ts = fs.get_timesteps(process, 4, "logsnr_uniform", final_zero=True)
    solver, _ = fit_dode(denoiser, "dpmpp_2m", ts, x_T, teacher_factor=3)
    path = save_solver(tmp_path / "dode4", solver, extra={"note": "test"})
    loaded = load_solver(path)
    np.testing.assert_array_equal(fs.sample(denoiser, x_T, loaded), fs.sample(denoiser, x_T, solver))
    assert (loaded.method, loaded.base, loaded.fitted_nfe, loaded.process) == ("dode", "dpmpp_2m", 4, "VPLinear")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        save_solver(path, solver)
    with pytest.raises(ValueError, match="not a saved fastsample solver"):
        load_solver(tmp_path)
    with pytest.raises(ValueError, match="fitted for nfe=4; got nfe=10"):
        fs.sample(denoiser, x_T, loaded, nfe=10)


@pytest.mark.slow
def test_fit_command_writes_loadable_solvers(tmp_path):
    from fastsample.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "fit_digits.yaml"
    args = ["fit", str(config), "model.kind=gmm_ring", "model.n_components=6", "process.kind=vp_linear", "nfe=[4]",
            "schedule_options={}", "fit.methods=[learned_grid,bns,dode]", "fit.steps=5", "fit.eval_every=5",
            "fit.num_train=32", "fit.num_val=16", "fit.batch_size=16", "plots=false", f"output_dir={tmp_path / 'out'}",
            f"fit.checkpoint_dir={tmp_path / 'ckpt'}", "--quiet"]
    assert main(args) == 0
    (folder,) = (tmp_path / "out").iterdir()
    rows = json.loads((folder / "metrics.json").read_text())
    assert [r["method"] for r in rows] == ["learned_grid", "bns", "dode"] and all(r["rmse"] > 0 for r in rows)
    solver = load_solver(folder / "solvers" / "learned_grid_dpmpp_2m_nfe4")
    assert solver.fitted_nfe == 4 and solver.process == "VPLinear"
    assert (tmp_path / "ckpt" / "fit_digits" / "learned_grid_dpmpp_2m_nfe4").is_dir()  # the fit can resume
    # bns starts from its own learned grid (the config's warm_start), which keeps checkpoints of its own
    assert (tmp_path / "ckpt" / "fit_digits" / "bns_dpmpp_2m_nfe4.learned_grid").is_dir()
    assert load_solver(folder / "solvers" / "bns_dpmpp_2m_nfe4").method == "bns"


def test_fit_solver_refuses_mismatched_reference_and_method(x64):
    process = fs.VPLinear()
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    train, val = make_reference(denoiser, jax.random.PRNGKey(0), 12, (2,), t_end=process.t_min).split(8)
    with pytest.raises(ValueError, match=r"final_zero=True needs reference endpoints at t = 0"):
        fit_solver("dode", denoiser, train, val, 4, base="ddim")
    with pytest.raises(ValueError, match="unknown method 'ld3'; known: learned_grid"):
        fit_solver("ld3", denoiser, train, val, 4)
    with pytest.raises(ValueError, match="loss='local' is Bespoke's loss"):
        fit_solver("bns", denoiser, train, val, 4, final_zero=False, loss="local")
    with pytest.raises(ValueError, match="bespoke_rk2 uses 2 evaluations per step; nfe=5 is odd"):
        fit_solver("bespoke_rk2", denoiser, train, val, 5, final_zero=False)
    with pytest.raises(ValueError, match="warm_start applies to bespoke_rk1, bespoke_rk2, bns; not to dode"):
        fit_solver("dode", denoiser, train, val, 4, final_zero=False, warm_start=True)
    ts = np.asarray(fs.get_timesteps(process, 4, "logsnr_uniform"))
    with pytest.raises(ValueError, match="do not pass `timesteps` too"):
        fit_solver("bns", denoiser, train, val, 4, final_zero=False, warm_start=True, timesteps=ts)
    with pytest.raises(ValueError, match="give bespoke_rk2 \\(ddim\\) 8 evaluations, not nfe=4"):
        fit_solver("bespoke_rk2", denoiser, train, val, 4, base="ddim", final_zero=False, timesteps=ts)
    with pytest.raises(ValueError, match="final_zero=True but the timesteps end at t = "):
        fit_solver("bns", denoiser, *make_reference(denoiser, jax.random.PRNGKey(0), 12, (2,)).split(8), 4,
                   timesteps=ts)

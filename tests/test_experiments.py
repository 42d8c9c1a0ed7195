import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample import metrics
from fastsample.cli import main
from fastsample.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    build_model,
    config_from_dict,
    load_config,
)
from fastsample.models import GaussianMixture
from fastsample.models.networks import NetworkFn, make_network
from fastsample.models.training import EDMObjective, TrainedNetwork

ROOT = Path(__file__).resolve().parents[1]
TINY = ["steps=20", "steps_per_call=10", "save_every=10", "network.hidden=16", "network.depth=1",
        "network.emb_dim=8", "eval_samples=64", "eval_nfe=4", "eval_solver=ddim", "--quiet"]


# ---------------------------------------------------------------------------- config errors


def test_new_config_keys_are_validated():
    cfg = load_config(ROOT / "configs" / "train_digits.yaml", cls=TrainConfig)
    assert cfg.network.kind == "mlp" and cfg.objective == "edm" and cfg.steps >= 1000
    with pytest.raises(ConfigError, match=r"unknown config key 'network.widht'; allowed keys: channels, depth"):
        config_from_dict(TrainConfig, {"network": {"widht": 3}})
    with pytest.raises(ConfigError, match=r"objective='ddpm' is not allowed; choose one of: edm, flow_matching"):
        config_from_dict(TrainConfig, {"objective": "ddpm"})
    with pytest.raises(ConfigError, match=r"data='mnist' is not allowed; choose one of: digits, moons"):
        config_from_dict(TrainConfig, {"data": "mnist"})
    with pytest.raises(ConfigError, match=r"network.num_classes must be 0 for data='moons'"):
        config_from_dict(TrainConfig, {"data": "moons", "network": {"num_classes": 10}})
    with pytest.raises(ConfigError, match=r"network.kind='unet' needs image data"):
        config_from_dict(TrainConfig, {"data": "rings", "network": {"kind": "unet"}})
    with pytest.raises(ConfigError, match=r"network.emb_dim must be even"):
        config_from_dict(TrainConfig, {"network": {"emb_dim": 7}})
    with pytest.raises(ConfigError, match=r"ema_decay and label_dropout must be in \[0, 1\)"):
        config_from_dict(TrainConfig, {"ema_decay": 1.0})
    with pytest.raises(ConfigError, match=r"dequantize must be >= 0 \(0: none\); got -0.1"):
        config_from_dict(TrainConfig, {"dequantize": -0.1})
    with pytest.raises(ConfigError, match=r"steps must be >= 1; got 0"):
        config_from_dict(TrainConfig, {"steps": 0})
    with pytest.raises(ConfigError, match=r"learning_rate must be of type|wrong type"):
        config_from_dict(TrainConfig, {"learning_rate": "fast"})
    assert config_from_dict(TrainConfig, {"learning_rate": "1e-3"}).learning_rate == 1e-3  # YAML 1.1's 1e-3
    with pytest.raises(ConfigError, match=r"model.checkpoint must name a checkpoint folder"):
        config_from_dict(ExperimentConfig, {"model": {"kind": "network"}})
    with pytest.raises(ConfigError, match=r"model.checkpoint is only used with model.kind='network'"):
        config_from_dict(ExperimentConfig, {"model": {"checkpoint": "x"}})
    with pytest.raises(ConfigError, match=r"rtol must be in \(0, 1\) or null"):
        config_from_dict(ExperimentConfig, {"rtol": 2.0})
    with pytest.raises(ValueError, match="checkpoint folder 'nowhere' does not exist"):
        build_model(ModelConfig(kind="network", checkpoint="nowhere"))


def test_cli_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert set(out) == {"solvers", "schedules", "learned solvers", "gradient modes", "processes", "models", "networks",
                        "objectives", "training data", "experiments"}
    assert out["learned solvers"].split(", ") == list(fs.learned.METHODS)
    assert out["gradient modes"].split(", ") == list(fs.available_gradients())
    assert out["solvers"].split(", ") == fs.available_solvers()
    assert out["schedules"].split(", ") == fs.available_schedules()
    assert "flow_matching" in out["processes"] and "network" in out["models"] and out["networks"] == "mlp, unet"
    assert {"compare_solvers", "sweep_network", "likelihood", "fit_solvers", "optimize_noise"} <= set(
        out["experiments"].split(", "))


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_model_then_sweep_the_network_from_the_cli(tmp_path, capsys):
    args = ["train-model", str(ROOT / "configs" / "train_digits.yaml"), "name=cli", f"output_dir={tmp_path}", *TINY]
    assert main(args) == 0
    run = tmp_path / "cli"
    row = json.loads((run / "eval.json").read_text())
    assert row["step"] == 20 and math.isfinite(row["final_loss"]) and row["num_samples"] == 64
    assert row["fd_features"] > 0 and (run / "samples.png").is_file()
    assert "| cli | 20 |" in capsys.readouterr().out
    assert main([*args, "eval_samples=0"]) == 0  # resumes: the finished run is not trained again
    assert json.loads((run / "eval.json").read_text())["step"] == 20

    out = tmp_path / "results"
    assert main(["run", str(ROOT / "configs" / "sweep_digits_network.yaml"), f"model.checkpoint={run}",
                 "solvers=[ddim, dpmpp_2m]", "nfe=[4, 8]", "num_samples=16", "rtol=1e-6", f"output_dir={out}",
                 "--quiet"]) == 0
    (folder,) = out.iterdir()
    for name in ("config.yaml", "environment.json", "metrics.json", "metrics.csv", "table.md", "error_vs_nfe.png",
                 "samples/reference.png", "samples/ddim_nfe4.png", "samples/dpmpp_2m_nfe8.png"):
        assert (folder / name).is_file(), name
    rows = json.loads((folder / "metrics.json").read_text())
    assert rows[0]["rmse"] == 0.0 and rows[0]["fd_pixels"] > 0
    for solver in ("ddim", "dpmpp_2m"):
        r4, r8 = (next(r for r in rows if r["solver"] == solver and r["nfe"] == n) for n in (4, 8))
        assert r8["rmse"] < r4["rmse"] and r8["psnr"] > r4["psnr"]  # closer to the adaptive solve with more NFE
    assert "fd_features" in (folder / "metrics.csv").read_text().splitlines()[0]


class _TraceCounter(eqx.Module):
    """Counts how often the sampler is traced (the model body runs in Python only when traced)."""

    inner: object
    traces: list = eqx.field(static=True)

    def __call__(self, x, t, cond=None):
        self.traces.append(1)
        return self.inner(x, t, cond)


def test_sweeps_compile_once_per_nfe():
    """Grids (schedules, explicit timesteps) and guidance scales are traced: a sweep over them at
    one NFE traces the sampler once."""
    obj = EDMObjective()
    net = NetworkFn.from_module(make_network("mlp", 4, hidden=8, depth=1, emb_dim=8, num_classes=2, zero_init=False))
    traces = []
    model = _TraceCounter(obj.model(net), traces)
    x_T = fs.prior(obj.process(), jax.random.PRNGKey(0), (3, 4))
    cond = jnp.asarray([0, 1, 0])
    outs = []
    for schedule in ("karras", "logsnr_uniform", "time_uniform"):
        for w in (1.0, 3.0):
            d = fs.Denoiser(model, obj.process(), "x0", guidance_scale=w, uncond=jnp.asarray(2))
            outs.append(fs.sample(d, x_T, "dpmpp_2m", nfe=6, schedule=schedule, cond=cond))
            if len(outs) == 1:
                first = len(traces)
    assert first >= 1 and len(traces) == first
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])  # really different runs
    fs.sample(d, x_T, "dpmpp_2m", nfe=7, schedule="karras", cond=cond)  # a new NFE is a new shape
    assert len(traces) > first


# ---------------------------------------------------------------------------- likelihood


def test_pf_ode_nll_of_mixture_samples_equals_exact_log_density(x64):
    """The issue's likelihood asserts on a multimodal mixture: exact trace within 1e-4, Hutchinson
    within Monte-Carlo error (the prior is the exact marginal at t_max, as the change of variables needs)."""
    P = fs.VPLinear()
    g = GaussianMixture.ring(n=4, radius=1.5, std=0.4)
    a0, s0 = P.alpha_sigma(jnp.asarray(P.t_min))
    a1, s1 = P.alpha_sigma(jnp.asarray(P.t_max))
    x = g.sample(jax.random.PRNGKey(0), 8, a0, s0)
    exact = g.log_prob(x, a0, s0)
    _, x_T, delta = metrics.pf_ode_log_likelihood(g.denoiser(P), x, exact_trace=True, rtol=1e-10, atol=1e-10,
                                                  return_parts=True)
    np.testing.assert_allclose(g.log_prob(x_T, a1, s1) + delta, exact, atol=1e-4)
    R = 48
    _, x_T, delta = metrics.pf_ode_log_likelihood(g.denoiser(P), jnp.tile(x, (R, 1)), key=jax.random.PRNGKey(1),
                                                  exact_trace=False, probe="gaussian", rtol=1e-6, atol=1e-6,
                                                  return_parts=True)
    est = (g.log_prob(x_T, a1, s1) + delta).reshape(R, 8)
    err, se = np.asarray(est.mean(0) - exact), np.asarray(est.std(0)) / math.sqrt(R)
    assert np.all(se > 1e-3) and np.all(np.abs(err) < 4 * se), (err, se)


@pytest.mark.slow
def test_likelihood_experiment_matches_the_exact_density_of_a_mixture(tmp_path):
    out = tmp_path / "results"
    assert main(["run", str(ROOT / "configs" / "likelihood_digits.yaml"), "model.kind=gmm_digits",
                 "model.checkpoint=''", "model.n_components=2", "model.covariance=diag", "num_samples=4",
                 "exact_trace=true", "rtol=1e-6", f"output_dir={out}", "--quiet"]) == 0
    (folder,) = out.iterdir()
    rows = {r["model"]: r for r in json.loads((folder / "metrics.json").read_text())}
    ode, exact = rows["gmm_digits (PF-ODE)"], rows["gmm_digits (exact)"]
    assert ode["n"] == exact["n"] == 4
    # the N(0, sigma_max^2) prior neglects the data mean at sigma_max = 80: well below 0.05 nats
    assert abs(ode["nll_nats"] - exact["nll_nats"]) < 0.05, (ode, exact)
    np.testing.assert_allclose(exact["bits_per_dim"], exact["nll_nats"] / (64 * math.log(2)) + 3, rtol=1e-12)
    assert {"gaussian (train mean, covariance)", "gmm 10 full (fit to train)"} <= set(rows)
    assert (folder / "table.md").is_file() and (folder / "metrics.csv").is_file()


def test_trained_network_model_config_builds_a_denoiser(tmp_path):
    obj = EDMObjective()
    trained = TrainedNetwork(NetworkFn.from_module(make_network("mlp", 2, hidden=8, depth=1, emb_dim=8)), obj, 2)
    assert trained.denoiser().process == obj.process()
    assert isinstance(trained.denoiser(fs.VPCosine()).process, fs.VPCosine)

"""DRaFT-K (experiments/draft.py): the truncated gradient, and the experiment end to end."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs
from fastsample.cli import _load_experiment
from fastsample.models import GaussianMixture

DRAFT = _load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "draft.py")
PROC = fs.VPLinear()


def _fd(f, means, v, eps=1e-6):
    return (f(means + eps * v) - f(means - eps * v)) / (2 * eps)


def test_truncated_gradient_is_the_full_one_for_k_equal_n_and_the_last_k_steps_one_otherwise(x64):
    """A 3-component 2-D mixture whose means are the "weights", DDIM on 4 steps. ``k = 4``: the
    gradient equals central differences of the whole sampler. ``k = 2``: it equals central
    differences of the last two steps started from the state the unperturbed model reaches after
    two steps, and differs from the full gradient."""
    rng = np.random.default_rng(0)
    mixture = GaussianMixture(jnp.asarray(rng.normal(size=(3, 2))), jnp.array([0.3, 0.2, 0.4]))
    x_T, w = jnp.asarray(rng.normal(size=(5, 2))), jnp.asarray(rng.normal(size=(5, 2)))
    v = jnp.asarray(rng.normal(size=(3, 2)))
    ts = fs.get_timesteps(PROC, 4, "logsnr_uniform")

    def den(means):
        return eqx.tree_at(lambda m: m.means, mixture, means).denoiser(PROC)

    def truncated(means, k):
        return jnp.sum(w * DRAFT.truncated_sample(den(means), x_T, ts, k))

    full = jax.jit(lambda m: jnp.sum(w * fs.sample(den(m), x_T, "ddim", nfe=None, timesteps=ts)))
    x_mid = fs.sample(den(mixture.means), x_T, "ddim", nfe=None, timesteps=ts[:3])
    last_two = jax.jit(lambda m: jnp.sum(w * fs.sample(den(m), x_mid, "ddim", nfe=None, timesteps=ts[2:])))
    fd_full, fd_last = _fd(full, mixture.means, v), _fd(last_two, mixture.means, v)
    g4 = float(jnp.vdot(jax.grad(truncated)(mixture.means, 4), v))
    g2 = float(jnp.vdot(jax.grad(truncated)(mixture.means, 2), v))
    assert abs(g4 - fd_full) < 1e-7 * max(1.0, abs(fd_full)), (g4, fd_full)
    assert abs(g2 - fd_last) < 1e-7 * max(1.0, abs(fd_last)), (g2, fd_last)
    assert abs(g2 - fd_full) > 1e-2 * abs(fd_full), (g2, fd_full)  # truncation changes the gradient
    assert float(truncated(mixture.means, 2)) == pytest.approx(float(full(mixture.means)), rel=1e-12)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        DRAFT.truncated_sample(den(mixture.means), x_T, ts, 5)


def test_classifier_matches_scikit_learn():
    clf = DRAFT.DigitClassifier(0)
    x, _ = fs.data.digits("test", seed=0)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(clf.logits(jnp.asarray(x[:20], jnp.float32)))),
                               clf.sklearn.predict_proba(x[:20]), atol=1e-4)


def test_draft_experiment_end_to_end_raises_the_reward(tmp_path):
    """A tiny run through ``fastsample run``: a network trained for 300 steps, 6 DRaFT-2 steps at a
    large learning rate; the held-out reward and the training-batch reward both rise."""
    from fastsample.cli import main

    overrides = ["train.steps=300", "train.save_every=300", "train.steps_per_call=150", "train.network.hidden=32",
                 "train.network.depth=1", "train.batch_size=128", "nfe=4", "k=2", "steps=6", "batch_size=16",
                 "learning_rate=3e-3", "eval_samples=32", "plots=false", f"output_dir={tmp_path}"]
    assert main(["run", "--quiet", str(Path(__file__).resolve().parents[1] / "configs" / "draft_digits.yaml"),
                 *overrides]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = json.loads((folder / "metrics.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    train = [r for r in rows if r["part"] == "train"]
    evals = [r for r in rows if r["part"] == "eval"]
    assert len(train) == 6 and [r["step"] for r in evals] == [0, 6]
    assert evals[1]["reward"] > evals[0]["reward"] + 0.5, evals
    assert np.mean([r["reward"] for r in train[-2:]]) > np.mean([r["reward"] for r in train[:2]]), train
    assert (folder / "table.md").exists()

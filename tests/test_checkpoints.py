import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample.models.training as training
from fastsample.config import TrainConfig, config_from_dict
from fastsample.models.checkpoints import NetworkCheckpoints, load_network, read_meta

TINY = {"name": "tiny", "data": "moons", "toy_samples": 1000, "steps": 40, "batch_size": 32, "steps_per_call": 10,
        "save_every": 20, "warmup_steps": 5, "lr_schedule": "constant",
        "network": {"hidden": 16, "depth": 1, "emb_dim": 8}, "eval_samples": 0}


def _cfg(tmp_path, **over):
    return config_from_dict(TrainConfig, {**TINY, "output_dir": str(tmp_path), **over})


def _assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def no_pickle(monkeypatch):
    """Reading a checkpoint must not unpickle anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while reading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


def test_checkpoint_round_trip_is_bit_identical(tmp_path, no_pickle):
    cfg = _cfg(tmp_path)
    trained, state, _ = training.train(cfg, progress=False, stop_at=20)
    run = tmp_path / "tiny"
    store = NetworkCheckpoints(run)
    assert store.steps() == [20]
    template = jax.tree.map(jnp.zeros_like, state)
    restored = store.restore(template)
    _assert_trees_identical(restored, state)  # params, EMA, optimizer state, step, PRNG key
    assert int(restored.step) == 20 and restored.key.dtype == jnp.uint32
    meta = read_meta(run)
    assert meta["step"] == 20 and meta["config"]["network"]["hidden"] == 16 and meta["spec"]["kind"] == "mlp"

    net = load_network(run)  # EMA weights by default
    _assert_trees_identical(net.net.params, state.ema)
    _assert_trees_identical(load_network(run, ema=False).net.params, state.params)
    # a restored network is a Denoiser in one call, identical to the trained one
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
    np.testing.assert_array_equal(net.denoiser()(x, 0.7), trained.denoiser()(x, 0.7))
    assert net.dim == 2 and type(net.denoiser().process).__name__ == "EDM"


def test_resumed_training_equals_uninterrupted(tmp_path):
    cfg = _cfg(tmp_path)
    _, full, full_losses = training.train(cfg, progress=False, run_dir=tmp_path / "full")

    # stopped at step 30 (a chunk boundary between checkpoints), then resumed
    _, part, _ = training.train(cfg, progress=False, run_dir=tmp_path / "stopped", stop_at=30)
    assert int(part.step) == 30 and NetworkCheckpoints(tmp_path / "stopped").latest_step() == 30
    _, resumed, resumed_losses = training.train(cfg, progress=False, run_dir=tmp_path / "stopped")
    _assert_trees_identical(resumed, full)
    assert resumed_losses == full_losses[-len(resumed_losses):] and len(resumed_losses) == 1

    # interrupted (Ctrl-C) during the third chunk: the last completed chunk is saved, resume matches
    calls = []
    original = training.train_steps

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    training.train_steps = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            training.train(cfg, progress=False, run_dir=tmp_path / "interrupted")
    finally:
        training.train_steps = original
    assert NetworkCheckpoints(tmp_path / "interrupted").latest_step() == 20
    _, resumed, _ = training.train(cfg, progress=False, run_dir=tmp_path / "interrupted")
    _assert_trees_identical(resumed, full)

    # a finished run returns at once; a longer one continues from it
    _, again, losses = training.train(cfg, progress=False, run_dir=tmp_path / "full")
    assert losses == [] and int(again.step) == 40
    _assert_trees_identical(again, full)


def test_resume_refuses_a_different_configuration(tmp_path):
    training.train(_cfg(tmp_path), progress=False, stop_at=10)
    with pytest.raises(ValueError, match=r"different training run \(learning_rate: 0.001 -> 0.01\)"):
        training.train(_cfg(tmp_path, learning_rate=1e-2), progress=False)
    # steps may change (a longer run continues)
    _, state, _ = training.train(_cfg(tmp_path, steps=50), progress=False, stop_at=20)
    assert int(state.step) == 20


def test_load_network_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_network(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint in"):
        load_network(tmp_path / "empty")

"""fastsample.distributed: sharded sampling gives every sample the values it gets on one device
(8 simulated CPU devices), a fit on 8 devices equals the 1-device fit up to reduction order, two
local processes (jax.distributed, gloo collectives) fit and sample like one process and write a
checkpoint that one process restores, and bad settings get errors that name them."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding

import fastsample as fs
from fastsample import distributed as dist
from fastsample.cli import main
from fastsample.models import GaussianMixture
from fastsample.optimization import fit

ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSAMPLE_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                    "JAX_PROCESS_ID"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


@pytest.fixture
def no_dist_env(monkeypatch):
    for name in [v for names in dist.ENV_VARS.values() for v in names]:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- one process, in-process


def test_initialize_without_a_job_is_a_noop(no_dist_env, monkeypatch):
    assert dist.initialize() is False
    monkeypatch.setenv("FASTSAMPLE_NUM_PROCESSES", "1")
    assert dist.initialize() is False
    assert not dist.is_initialized() and dist.is_main_process() and dist.process_count() == 1


def test_initialize_errors_name_the_setting(no_dist_env, monkeypatch):
    with pytest.raises(ValueError, match="num_processes=2 needs a coordinator address"):
        dist.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="must be host:port; got 'localhost'"):
        dist.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="needs this process's id"):
        dist.initialize("localhost:1234", 2)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 1\] for num_processes=2; got 2"):
        dist.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="process_id=1 needs num_processes > 1"):
        dist.initialize(process_id=1)
    monkeypatch.setenv("FASTSAMPLE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="FASTSAMPLE_NUM_PROCESSES must be a non-negative integer; got 'two'"):
        dist.initialize()
    monkeypatch.delenv("FASTSAMPLE_NUM_PROCESSES")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")  # JAX's own variables are read too
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match="num_processes=3 needs this process's id"):
        dist.initialize()
    assert not dist.is_initialized()


def test_cli_refuses_a_job_without_coordinator(no_dist_env, capsys):
    assert main(["sample", str(ROOT / "configs" / "quickstart.yaml"), "--num-processes", "2", "--process-id", "0"]) == 2
    assert "num_processes=2 needs a coordinator address" in capsys.readouterr().err


def test_mesh_errors():
    with pytest.raises(ValueError, match="must be None, 'all' or a jax.sharding.Mesh with a 'data' axis; got 'al'"):
        dist.resolve_mesh("al")
    with pytest.raises(ValueError, match=r"needs an axis named 'data'.*\('model',\)"):
        dist.resolve_mesh(Mesh(np.array(jax.devices()[:1]), ("model",)))
    with pytest.raises(ValueError, match="mesh must be None, 'all' or a jax.sharding.Mesh; got int"):
        dist.shard_batch(np.zeros(4), 3)
    with pytest.raises(ValueError, match="axis 1 does not exist in an array of shape"):
        dist.shard_batch(np.zeros(4), "all", axis=1)


def test_one_device_mesh_changes_no_sample():
    process = fs.VPLinear()
    d = GaussianMixture.ring(n=6).denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (8, 2))
    kw = dict(nfe=6, key=jax.random.PRNGKey(1), noise="brownian")
    plain = fs.sample(d, x_T, "dpmpp_2m_sde", **kw)
    sharded = fs.sample(d, np.asarray(x_T), "dpmpp_2m_sde", mesh=dist.data_mesh(jax.devices()[:1]), **kw)
    assert isinstance(sharded.sharding, NamedSharding) and sharded.sharding.mesh.axis_names == ("data",)
    np.testing.assert_array_equal(dist.gather(sharded), np.asarray(plain))
    tree = dist.shard_batch({"a": np.arange(6.0).reshape(3, 2), "b": np.arange(3)}, dist.data_mesh(jax.devices()[:1]))
    np.testing.assert_array_equal(dist.gather(tree)["a"], np.arange(6.0).reshape(3, 2))


# ----------------------------------------------------------------------------- 8 simulated devices
# (tests/conftest.py gives this process 8 CPU devices)


def test_eight_devices_give_the_one_device_samples_and_fit(x64):
    assert jax.device_count() == 8
    process = fs.VPLinear()
    model = GaussianMixture.ring(n=6)
    d64 = model.denoiser(process)
    d32 = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                       model).denoiser(process)
    mesh8 = dist.data_mesh()
    key, x_T = jax.random.PRNGKey(1), fs.prior(process, jax.random.PRNGKey(0), (16, 2), jnp.float64)
    for solver, noise in [("ddim", "independent"), ("dpmpp_2m", "independent"), ("euler_ancestral", "independent"),
                          ("dpmpp_2m_sde", "brownian")]:
        one = np.asarray(fs.sample(d64, x_T, solver, nfe=6, key=key, noise=noise))
        y = fs.sample(d64, x_T, solver, nfe=6, key=key, noise=noise, mesh=mesh8)
        assert len(y.sharding.device_set) == 8 and y.dtype == jnp.float64
        assert float(np.max(np.abs(dist.gather(y) - one))) <= 1e-12, solver  # the same samples, up to rounding
        if solver in ("euler_ancestral", "dpmpp_2m_sde"):  # one sample per device: the first 8 alone
            y = fs.sample(d64, x_T[:8], solver, nfe=6, key=key, noise=noise, mesh=mesh8)
            assert float(np.max(np.abs(dist.gather(y) - one[:8]))) <= 1e-12, solver
    x32 = x_T.astype(jnp.float32)  # float32, the default: the same samples up to rounding
    one = np.asarray(fs.sample(d32, x32, "dpmpp_2m_sde", nfe=6, key=key, noise="brownian"))
    y = fs.sample(d32, x32, "dpmpp_2m_sde", nfe=6, key=key, noise="brownian", mesh=mesh8)
    # XLA:CPU's kernels for 2 rows per device may round differently (measured 2.4e-7 on |x| <= 4.4)
    assert y.dtype == jnp.float32 and float(np.max(np.abs(dist.gather(y) - one))) <= 1e-5 * np.max(np.abs(one))

    # the fitting loop: least squares on 8 devices vs 1
    kx, ky = jax.random.split(jax.random.PRNGKey(3))
    data = {"x": jax.random.normal(kx, (64, 3))}
    data["y"] = data["x"] @ jnp.arange(1.0, 4.0) + 0.01 * jax.random.normal(ky, (64,))
    loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    kw = dict(val=data, optimizer=optax.adam(0.05), steps=40, batch_size=16, eval_every=10, progress=False)
    w1 = fit(loss, jnp.zeros(3), data, **kw)
    w8 = fit(loss, jnp.zeros(3), data, mesh=mesh8, **kw)
    np.testing.assert_allclose(np.asarray(w8.params), np.asarray(w1.params), rtol=1e-9)
    np.testing.assert_allclose(w8.best_val, w1.best_val, rtol=1e-9)
    assert np.any(np.asarray(w1.params) != 0)

    with pytest.raises(ValueError, match="batch size .12 along axis 0. must be a multiple of the 8 devices"):
        dist.shard_batch(np.zeros((12, 2)), mesh8)
    with pytest.raises(ValueError, match="batch size .12 along axis 0. must be a multiple of the 8 devices"):
        fs.sample(d64, x_T[:12], "ddim", nfe=4, mesh=mesh8)
    with pytest.raises(ValueError, match=r"batch_size \(12\) and the number of examples \(64\) must be multiples "
                                         "of the 8 devices"):
        fit(loss, jnp.zeros(3), data, batch_size=12, mesh=mesh8, steps=1, progress=False)


# ----------------------------------------------------------------------------- two local processes

_LEAST_SQUARES = """
kx, ky = jax.random.split(jax.random.PRNGKey(3))
data = {"x": jax.random.normal(kx, (64, 3))}
data["y"] = data["x"] @ jnp.arange(1.0, 4.0) + 0.01 * jax.random.normal(ky, (64,))
loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
fit_kw = dict(val=data, optimizer=optax.adam(0.05), steps=30, batch_size=16, eval_every=10, checkpoint_every=10,
              progress=False)
"""

_WORKER = textwrap.dedent(
    """
    import json, sys
    from fastsample import distributed as dist

    dist.initialize()  # from FASTSAMPLE_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import fastsample as fs
    from fastsample.models import GaussianMixture
    from fastsample.optimization import fit
    """
) + _LEAST_SQUARES + textwrap.dedent(
    """
    # no mesh: in a multi-process job fit shards the global data over every device of every process
    result = fit(loss, jnp.zeros(3), data, checkpoint_dir=sys.argv[2], log_path=sys.argv[3], **fit_kw)
    out = {"processes": jax.process_count(), "devices": jax.device_count(), "main": dist.is_main_process(),
           "params": np.asarray(result.params).tolist(), "best_val": result.best_val}
    process = fs.VPLinear()
    denoiser = GaussianMixture.ring(n=6).denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(1), (16, 2))
    x = fs.sample(denoiser, x_T, "dpmpp_2m_sde", nfe=6, key=jax.random.PRNGKey(2), mesh="all")
    out["local_rows"] = int(sum(s.data.shape[0] for s in x.addressable_shards))
    out["sample"] = dist.gather(x).tolist()
    if dist.is_main_process():
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_fit_and_sample_like_one(tmp_path, x64):
    script, result, ckpt, log = (tmp_path / "worker.py", tmp_path / "result.json", tmp_path / "ckpt",
                                 tmp_path / "log.jsonl")
    script.write_text(_WORKER)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(result), str(ckpt), str(log)], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(2, FASTSAMPLE_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       FASTSAMPLE_NUM_PROCESSES="2", FASTSAMPLE_PROCESS_ID=str(i)))
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                logs.append(p.communicate()[0])
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n\n".join(f"--- process {i} (rc {c}):\n{text[-3000:]}"
                                        for i, (c, text) in enumerate(zip(codes, logs, strict=False)))
    pair = json.loads(result.read_text())
    assert pair["processes"] == 2 and pair["devices"] == 4 and pair["main"]
    assert pair["local_rows"] == 8  # each process holds its half of the 16 samples

    # the same fit and sample in this one process, on one device
    scope = {"jax": jax, "jnp": jax.numpy, "optax": optax}
    exec(_LEAST_SQUARES, scope)
    single = fit(scope["loss"], jax.numpy.zeros(3), scope["data"], **scope["fit_kw"])
    np.testing.assert_allclose(pair["params"], np.asarray(single.params), rtol=1e-9)
    np.testing.assert_allclose(pair["best_val"], single.best_val, rtol=1e-9)
    assert single.best_val < 0.3 * single.history[0]["val_loss"]  # it fitted something
    process = fs.VPLinear()
    x = fs.sample(GaussianMixture.ring(n=6).denoiser(process), fs.prior(process, jax.random.PRNGKey(1), (16, 2)),
                  "dpmpp_2m_sde", nfe=6, key=jax.random.PRNGKey(2))
    np.testing.assert_allclose(pair["sample"], np.asarray(x), rtol=0, atol=1e-12)
    # one writer: the log has each evaluation once
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 10, 20, 30]

    # the pair's checkpoints restore here: at step 30 nothing is left to fit and the pair's parameters
    # come back; from step 20 the last 10 steps run here on one device
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [20, 30]
    restored = fit(scope["loss"], jax.numpy.zeros(3), scope["data"], checkpoint_dir=ckpt, **scope["fit_kw"])
    np.testing.assert_array_equal(np.asarray(restored.params), np.asarray(pair["params"]))
    assert restored.history == []
    shutil.rmtree(ckpt / "30")
    resumed = fit(scope["loss"], jax.numpy.zeros(3), scope["data"], checkpoint_dir=ckpt, **scope["fit_kw"])
    np.testing.assert_allclose(np.asarray(resumed.params), np.asarray(pair["params"]), rtol=1e-9)

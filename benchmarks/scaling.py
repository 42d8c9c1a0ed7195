"""Scaling with the device count: sampling throughput and solver-fitting steps per second.

For the digits Gaussian mixture (64-D, 10 full-covariance components): samples per second of
``fastsample.sample`` (``dpmpp_2m``, NFE 10) with the batch sharded over a ``"data"`` mesh of
1, 2, 4, 8 devices, and steps per second of ``fastsample.optimization.fit`` fitting a learned grid
(LD3-style, ``dpmpp_2m`` at NFE 5, endpoint loss) with its batch sharded the same way. Each device
count runs in its own process with that many simulated CPU devices (``JAX_NUM_CPU_DEVICES``); the
simulated devices share the machine's cores, so on CPU this measures the cost of sharding, not a
speed-up. ``--gpu`` adds the same measurement on the GPUs of this machine (all of them).
Writes ``benchmarks/results/scaling.json`` and ``scaling.md``.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--batch 2048] [--fit-batch 256] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    """One measurement in this process, on all its devices."""
    import jax
    import jax.numpy as jnp
    import optax
    from timing import timeit  # benchmarks/timing.py

    import fastsample as fs
    from fastsample.distributed import data_mesh
    from fastsample.learned.parametrized import LearnedGrid
    from fastsample.models import GaussianMixture
    from fastsample.optimization import fit

    devices = jax.device_count()
    mesh = data_mesh() if devices > 1 else None  # one device: the plain (unsharded) path
    process = fs.VPDiscrete.ddpm_linear()
    model = GaussianMixture.digits(n_components=10, covariance="full", seed=0)
    denoiser = model.denoiser(process)

    x_T = fs.prior(process, jax.random.PRNGKey(0), (args.batch, model.dim), jnp.float32)
    run = lambda x: fs.sample(denoiser, x, "dpmpp_2m", nfe=args.nfe, mesh=mesh)
    seconds = timeit(run, x_T, repeats=args.repeats)

    # fitting: a learned grid for dpmpp_2m at NFE 5 against 50-step DDIM endpoints (the targets'
    # values do not change the cost of a step)
    n = 4 * args.fit_batch
    xs = fs.prior(process, jax.random.PRNGKey(1), (n, model.dim), jnp.float32)
    targets = fs.sample(denoiser, xs, "ddim", nfe=50)
    ts = fs.get_timesteps(process, 5, "logsnr_uniform")
    grid = LearnedGrid.create(process, "dpmpp_2m", ts)
    loss = lambda p, b: jnp.mean((grid.sample(denoiser, b["x_T"], p) - b["x_end"]) ** 2)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grid.init(ts))
    every = args.fit_steps // 3
    result = fit(loss, params, {"x_T": xs, "x_end": targets}, optimizer=optax.adam(1e-2), steps=3 * every,
                 batch_size=args.fit_batch, eval_every=every, mesh=mesh, progress=False)
    # the first interval holds the compilation: time the last two
    fit_seconds = (result.history[-1]["seconds"] - result.history[0]["seconds"]) / (2 * every)
    return {"platform": jax.default_backend(), "devices": devices, "device_kind": jax.devices()[0].device_kind,
            "batch": args.batch, "nfe": args.nfe, "sample_ms": 1e3 * seconds, "samples_per_s": args.batch / seconds,
            "fit_batch": args.fit_batch, "fit_steps_per_s": 1.0 / fit_seconds}


def _spawn(args, devices: int | None, platform: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=platform,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if devices is not None:
        env.update(JAX_NUM_CPU_DEVICES=str(devices), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--nfe", str(args.nfe),
           "--fit-batch", str(args.fit_batch), "--fit-steps", str(args.fit_steps), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=Path(__file__).parent)
    if proc.returncode:
        raise RuntimeError(f"the {platform} worker with {devices} devices failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--fit-batch", type=int, default=256)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="also measure on this machine's GPUs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from fastsample.results import environment, markdown_table

    rows = []
    for k in args.devices:
        rows.append(_spawn(args, k, "cpu"))
        print(rows[-1], flush=True)
    if args.gpu:
        rows.append(_spawn(args, None, "cuda"))
        print(rows[-1], flush=True)
    base = {r["platform"]: r for r in rows if r["devices"] == 1}
    for r in rows:
        ref = base.get(r["platform"])
        r["sample_speedup"] = r["samples_per_s"] / ref["samples_per_s"] if ref else None
        r["fit_speedup"] = r["fit_steps_per_s"] / ref["fit_steps_per_s"] if ref else None
    OUT.mkdir(exist_ok=True)
    result = {"benchmark": "scaling", "environment": environment(), "cpu_cores": os.cpu_count(), "rows": rows}
    (OUT / "scaling.json").write_text(json.dumps(result, indent=2))
    columns = ["platform", "devices", "samples_per_s", "sample_speedup", "fit_steps_per_s", "fit_speedup"]
    table = (f"## Scaling with the device count (digits mixture; sample: dpmpp_2m, NFE {args.nfe}, batch "
             f"{args.batch}; fit: learned grid, batch {args.fit_batch})\n\n"
             f"CPU rows use simulated devices sharing {os.cpu_count()} cores: they measure the cost of "
             "sharding, not a speed-up.\n\n" + markdown_table(rows, columns))
    (OUT / "scaling.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

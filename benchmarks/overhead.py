"""Driver overhead: how much slower is ``fastsample.sample`` than calling the model alone?

For the digits Gaussian mixture (64-D, 10 full-covariance components) at batch 4096 and NFE 10:
wall time of ``sample`` for each solver (from its per-step tables, and with ``fused=False``)
divided by a ``lax.scan`` that only calls the denoiser 10 times ("bare"), and the same for
``diffrax.diffeqsolve`` with ``StepTo``; compile time of ``sample`` at NFE 10 and 100 (grid traced
or known while tracing). Writes ``benchmarks/results/overhead.json`` and ``overhead.md``.

    python benchmarks/overhead.py [--batch 4096] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
from timing import timeit  # benchmarks/timing.py

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.results import environment, markdown_table

OUT = Path(__file__).resolve().parent / "results"


def compile_seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    process = fs.VPDiscrete.ddpm_linear()
    denoiser = GaussianMixture.digits().denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (args.batch, 64), jnp.float32)
    ts = fs.get_timesteps(process, args.nfe, "logsnr_uniform").astype(jnp.float32)

    @jax.jit
    def bare(x, ts):
        def body(x, t):
            return denoiser(x, t), None

        return jax.lax.scan(body, x, ts[:-1])[0]

    t_bare = timeit(bare, x_T, ts, repeats=args.repeats)
    rows = [{"driver": "bare lax.scan of denoiser calls", "solver": "-", "nfe": args.nfe,
             "ms": 1e3 * t_bare, "ratio_to_bare": 1.0}]

    term = fs.ProbabilityFlowTerm(denoiser)
    for name in fs.available_solvers():
        try:
            solver = fs.get_solver(name)
        except ValueError:
            continue  # needs options (dpm_solver_v3: estimated statistics)
        if not isinstance(solver, fs.AbstractFastSolver) or isinstance(solver, fs.AbstractStochasticSolver):
            continue  # adaptive step size (no fixed grid) or stochastic (benchmarks/stochastic.py)
        try:
            steps = solver.steps_for_nfe(args.nfe)
        except ValueError:
            continue
        grid = fs.get_timesteps(process, steps, "logsnr_uniform").astype(jnp.float32)
        # the grid known while tracing: a linear solver's per-step tables are constants of the program
        for driver, fused in (("fastsample.sample (lax.scan)", True), ("fastsample.sample, fused=False", False)):
            run = jax.jit(lambda x, solver=solver, grid=grid, fused=fused: fs.sample(
                denoiser, x, solver, nfe=None, timesteps=grid, fused=fused))
            t = timeit(run, x_T, repeats=args.repeats)
            rows.append({"driver": driver, "solver": name, "nfe": args.nfe, "ms": 1e3 * t, "ratio_to_bare": t / t_bare})

        @jax.jit
        def with_diffrax(x, ts, solver=solver):
            sol = diffrax.diffeqsolve(term, solver, ts[0], ts[-1], None, x,
                                      stepsize_controller=diffrax.StepTo(ts), max_steps=ts.shape[0])
            return sol.ys[-1]

        t = timeit(with_diffrax, x_T, grid, repeats=args.repeats)
        rows.append({"driver": "diffrax.diffeqsolve + StepTo", "solver": name, "nfe": args.nfe,
                     "ms": 1e3 * t, "ratio_to_bare": t / t_bare})

    compile_rows = []
    for name in ("ddim", "unipc"):
        for nfe in (10, 100):
            grid = fs.get_timesteps(process, nfe, "logsnr_uniform").astype(jnp.float32)
            for grid_kind, fused in (("traced", True), ("traced", False), ("known", True)):
                if grid_kind == "traced":
                    run, args_ = jax.jit(lambda x, ts, name=name, fused=fused: fs.sample(
                        denoiser, x, name, nfe=None, timesteps=ts, fused=fused)), (x_T, grid)
                else:
                    run, args_ = jax.jit(lambda x, name=name, grid=grid: fs.sample(
                        denoiser, x, name, nfe=None, timesteps=grid)), (x_T,)
                compile_rows.append({"solver": name, "nfe": nfe, "grid": grid_kind, "fused": fused,
                                     "compile_s": compile_seconds(run, *args_)})

    OUT.mkdir(exist_ok=True)
    result = {"benchmark": "overhead", "batch": args.batch, "environment": environment(),
              "timing": rows, "compile": compile_rows}
    (OUT / "overhead.json").write_text(json.dumps(result, indent=2))
    table = (f"## Driver overhead (digits mixture, batch {args.batch}, NFE {args.nfe}, "
             f"{result['environment']['backend']})\n\n" + markdown_table(rows)
             + "\n## Compile time of `sample`\n\n" + markdown_table(compile_rows))
    (OUT / "overhead.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

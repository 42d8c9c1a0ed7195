"""Parallel-in-time sampling (sliding-window Picard iteration, ``fastsample.parallel.sample_picard``):
parallel iterations and model evaluations against the number of steps N, the window size and the
tolerance, with the error to the sequential sample and wall times.

Model: the exact denoiser of the digits mixture (64-D, 10 full-covariance components) under the
discrete DDPM schedule (``VPDiscrete.ddpm_linear``), DDIM and DPM-Solver++(2M) on the default grid,
float32, a batch of 16. ``iters`` is the sequential depth of the parallel sampler (rounds of
batched model calls) against N for the sequential solver; ``nfe`` is the evaluations it makes in
all (``iters * window``); ``rmse`` is the distance to the sequential sample. Wall times: the
sequential ``fastsample.sample`` and ``sample_picard`` after compilation, on this machine. On a
CPU the window's evaluations run one after another (no parallel hardware), so Picard costs about
``nfe / N`` times the sequential work here; its speed-up needs a device that evaluates the window
in the time of one evaluation.

    python benchmarks/parallel_in_time.py [--quick]

Writes ``benchmarks/results/parallel_in_time.json`` and ``parallel_in_time.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.parallel import sample_picard
from fastsample.results import environment, markdown_table

OUT = Path(__file__).resolve().parent / "results"


def timed(fn, repeats=3):
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool):
    process = fs.VPDiscrete.ddpm_linear()
    denoiser = GaussianMixture.digits().denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (16, 64), jnp.float32)
    steps = [25, 50] if quick else [25, 50, 100, 200]
    windows = [None, 8] if quick else [None, 32, 8]
    tols = [1e-3, 1e-2] if quick else [1e-4, 1e-3, 1e-2]
    rows = []
    for solver in ["ddim", "dpmpp_2m"]:
        for n in steps:
            seq = fs.sample(denoiser, x_T, solver, nfe=n)
            t_seq = timed(lambda s=solver, n=n: fs.sample(denoiser, x_T, s, nfe=n), repeats=2)
            for window in windows:
                if window is not None and window >= n:
                    continue
                for tol in tols:
                    solution = sample_picard(denoiser, x_T, solver, nfe=n, window=window, tol=tol)
                    x, info = solution.x, solution.stats
                    t_par = timed(lambda s=solver, n=n, w=window, tol=tol: sample_picard(
                        denoiser, x_T, s, nfe=n, window=w, tol=tol).x, repeats=2)
                    rmse = float(jnp.sqrt(jnp.mean((x - seq) ** 2)))
                    rows.append({
                        "solver": solver, "N": n, "window": info["window"], "tol": tol,
                        "iters": info["iterations"], "N/iters": round(n / info["iterations"], 2), "nfe": info["nfe"],
                        "nfe/N": round(info["nfe"] / n, 2), "converged": info["converged"], "rmse": rmse,
                        "seq_s": round(t_seq, 4), "picard_s": round(t_par, 4),
                    })
                    print(rows[-1], flush=True)
    return rows


def tables(rows):
    md = ["# Parallel-in-time sampling: sliding-window Picard iteration (ParaDiGMS / DreamPropeller)\n",
          "Digits mixture (64-D, exact denoiser), VPDiscrete DDPM schedule, batch 16, float32, CPU. `iters`: "
          "parallel iterations (sequential depth); N: sequential steps = NFE; `nfe`: evaluations made "
          "(`iters * window`); `rmse`: distance to the sequential sample. `seq_s` / `picard_s`: wall seconds after "
          "compilation, best of repeats (the CPU runs the window's evaluations one after another, so Picard does "
          "about `nfe/N` times the sequential work and no wall-time speed-up is expected here; it needs hardware "
          "that evaluates a window in the time of one evaluation).\n"]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        md.append(f"## {solver}\n")
        md.append(markdown_table([r for r in rows if r["solver"] == solver],
                                 ["N", "window", "tol", "iters", "N/iters", "nfe", "nfe/N", "rmse", "converged",
                                  "seq_s", "picard_s"]))
    return "\n".join(md)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer step counts, windows and tolerances")
    args = parser.parse_args()
    start = time.time()
    rows = run(args.quick)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "parallel_in_time.json").write_text(json.dumps(
        {"benchmark": "parallel_in_time", "environment": environment(), "seconds": round(time.time() - start, 1),
         "quick": args.quick, "rows": rows}, indent=1))
    (OUT / "parallel_in_time.md").write_text(tables(rows))
    print(tables(rows))


if __name__ == "__main__":
    main()

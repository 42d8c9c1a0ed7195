"""Solver sweep on a trained network: every (solver, NFE) against the network's own adaptive
probability-flow ODE solve.

Config -> results: one shared batch of noise is sampled by each solver at each NFE budget and
compared with ``fastsample.reference_solve`` of the same network (adaptive Dopri8, tolerance
``rtol``): RMSE, relative error, PSNR. For 8x8 digits the samples are also compared with the
held-out digits (Frechet distance in pixels and in classifier features); ``sample_plots`` writes
a digit grid (or, for 2-D data, a scatter plot) per solver and NFE. Works for any model with
``.denoiser(process)`` and ``.dim`` (``model.kind: network`` names a checkpoint).

Each (solver, NFE) compiles its sampler once (the grid is a traced value).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import fastsample as fs
from fastsample import data, metrics
from fastsample.config import ExperimentConfig, build_model, build_process
from fastsample.results import largest_reachable, markdown_table, plot_error_vs_nfe, plot_samples, write_rows

COLUMNS = ["solver", "nfe_budget", "nfe", "steps", "rmse", "rel_error", "psnr", "fd_pixels", "fd_features"]


def quality(x, held_out) -> dict:
    """Frechet distances of digit samples to the held-out digits (empty for other data)."""
    if held_out is None:
        return {}
    x = np.asarray(x, np.float64)
    return {"fd_pixels": float(metrics.frechet_distance(x, held_out)),
            "fd_features": float(metrics.frechet_distance(metrics.digits_features(x),
                                                          metrics.digits_features(held_out)))}


def run(cfg: ExperimentConfig, out: Path, progress: bool = True) -> list[dict]:
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    process = build_process(cfg.process)
    model = build_model(cfg.model)
    denoiser = model.denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(cfg.seed), (cfg.num_samples, model.dim), dtype)
    tol = {} if cfg.rtol is None else {"rtol": cfg.rtol, "atol": cfg.rtol}
    reference = np.asarray(fs.reference_solve(denoiser, x_T, **tol), np.float64)
    scale = float(np.sqrt(np.mean(reference**2)))
    held_out = data.digits("test")[0] if model.dim == 64 else None
    samples_dir = out / "samples"
    if cfg.sample_plots:
        samples_dir.mkdir()
        plot_samples(reference, samples_dir / "reference.png", "reference (adaptive Dopri8)")

    rows = [{"solver": "reference (adaptive Dopri8)", "rmse": 0.0, "rel_error": 0.0, **quality(reference, held_out)}]
    for name, budget in tqdm(list(itertools.product(cfg.solvers, sorted(cfg.nfe))), desc="solvers x NFE",
                             disable=not progress):
        solver = fs.get_solver(name)
        steps, nfe = largest_reachable(solver, budget)
        if steps is None:
            rows.append({"solver": name, "nfe_budget": budget, "nfe": None, "note": "budget below minimum"})
            continue
        solution = fs.solve(denoiser, x_T, solver, nfe=nfe, schedule=cfg.schedule,
                            schedule_options=cfg.schedule_options)
        x, used = np.asarray(solution.x, np.float64), solution.stats["nfe"]
        rmse = float(metrics.rmse(x, reference))
        rows.append({"solver": name, "nfe_budget": budget, "nfe": used, "steps": solution.stats["steps"],
                     "rmse": rmse,
                     "rel_error": rmse / scale, "psnr": float(metrics.psnr(x, reference)),
                     **quality(x, held_out)})
        if cfg.sample_plots:
            plot_samples(x, samples_dir / f"{name}_nfe{used}.png", f"{name}, NFE {used}", reference=reference)

    write_rows(out, "metrics", rows)
    (out / "table.md").write_text(markdown_table(rows, COLUMNS))
    if cfg.plots:
        plot_error_vs_nfe(rows, out / "error_vs_nfe.png", title=f"{cfg.name}: RMSE to reference")
    return rows

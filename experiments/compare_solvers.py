"""Compare solvers at several NFE budgets against the exact-model reference solution.

Config -> results: for every (solver, NFE) the samples from one shared batch of noise are
compared with an adaptive float64 reference solve of the same probability-flow ODE. A solver
that cannot use exactly the budget uses the largest NFE below it (the table says which).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import fastsample as fs
from fastsample.config import ExperimentConfig, build_model, build_process
from fastsample.results import largest_reachable, markdown_table, plot_error_vs_nfe, plot_samples, write_rows

# nll: mean negative log-density of the samples under the exact noised marginal at t_min.
COLUMNS = ["solver", "nfe_budget", "nfe", "steps", "rmse", "rel_error", "max_abs_error", "nll"]


def run(cfg: ExperimentConfig, out: Path, progress: bool = True) -> list[dict]:
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    process = build_process(cfg.process)
    model = build_model(cfg.model)
    model = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, model)
    denoiser = model.denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(cfg.seed), (cfg.num_samples, model.dim), dtype)

    reference = fs.reference_solve(denoiser, x_T.astype(jnp.float64) if jax.config.jax_enable_x64 else x_T)
    reference = np.asarray(reference, np.float64)
    scale = float(np.sqrt(np.mean(reference**2)))
    a_end, s_end = process.alpha_sigma(jnp.asarray(process.t_min, dtype))

    rows = [{"solver": "reference (adaptive Dopri8)", "rmse": 0.0, "rel_error": 0.0, "max_abs_error": 0.0,
             "nll": float(-jnp.mean(model.log_prob(jnp.asarray(reference, dtype), a_end, s_end)))}]
    combos = list(itertools.product(cfg.solvers, sorted(cfg.nfe)))
    for name, budget in tqdm(combos, desc="solvers x NFE", disable=not progress):
        solver = fs.get_solver(name)
        steps, nfe = largest_reachable(solver, budget)
        if steps is None:
            rows.append({"solver": name, "nfe_budget": budget, "nfe": None, "note": "budget below minimum"})
            continue
        solution = fs.solve(denoiser, x_T, solver, nfe=nfe, schedule=cfg.schedule,
                            schedule_options=cfg.schedule_options)
        x, used = solution.x, solution.stats["nfe"]
        err = np.asarray(x, np.float64) - reference
        rmse = float(np.sqrt(np.mean(err**2)))
        nll = float(-jnp.mean(model.log_prob(x, a_end, s_end)))
        rows.append({
            "solver": name, "nfe_budget": budget, "nfe": used, "steps": solution.stats["steps"], "rmse": rmse,
            "rel_error": rmse / scale, "max_abs_error": float(np.max(np.abs(err))), "nll": nll,
        })
        if cfg.sample_plots:  # digit grids (64-D) or scatter plots over the reference (2-D)
            (out / "samples").mkdir(exist_ok=True)
            plot_samples(x, out / "samples" / f"{name}_nfe{used}.png", f"{name}, NFE {used}", reference)

    write_rows(out, "metrics", rows)
    (out / "table.md").write_text(markdown_table(rows, COLUMNS))
    if cfg.plots:
        plot_error_vs_nfe(rows, out / "error_vs_nfe.png", title=f"{cfg.name}: RMSE to reference")
    return rows


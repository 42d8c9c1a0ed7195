"""Fit learned solvers for a model (``fastsample fit CONFIG``) and compare them with their bases.

Config -> results: a reference set (noise and exact PF-ODE endpoints; ``fit.num_train`` to fit on,
``fit.num_val`` held out) is drawn once; every ``fit.methods`` x ``nfe`` is fitted (gradient
methods checkpoint to ``fit.checkpoint_dir`` and resume from there), saved under
``solvers/<method>_<base>_nfe<k>`` (load with ``fastsample.learned.load_solver``) and scored by
held-out RMSE beside its base solver. Writes the table, metrics and an RMSE-vs-NFE plot.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fastsample.config import ExperimentConfig, build_model, build_process
from fastsample.learned import fit_solver, get_method, make_reference, save_solver
from fastsample.results import markdown_table, write_rows

COLUMNS = ["method", "base", "nfe", "params", "base_rmse", "rmse", "improvement", "fit_seconds"]


def run(cfg: ExperimentConfig, out: Path, progress: bool = True) -> list[dict]:
    import time

    fit = cfg.fit
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    process = build_process(cfg.process)
    model = build_model(cfg.model)
    denoiser = model.denoiser(process)
    ref = make_reference(denoiser, jax.random.PRNGKey(cfg.seed), fit.num_train + fit.num_val, (model.dim,),
                         t_end=0.0 if fit.final_zero else process.t_min,
                         trajectory_points=257 if fit.loss == "local" else 0, dtype=dtype)
    train, val = ref.split(fit.num_train)
    rows = []
    combos = [(m, n) for m in fit.methods for n in sorted(cfg.nfe)]
    for method, nfe in tqdm(combos, desc="methods x NFE", disable=not progress):
        tag = f"{method}_{fit.base}_nfe{nfe}"
        start = time.perf_counter()
        try:
            solver, report = fit_solver(
                method, denoiser, train, val, nfe, base=fit.base, schedule=_schedule(cfg),
                schedule_options=cfg.schedule_options, final_zero=fit.final_zero, loss=fit.loss,
                optimizer=optax.adam(optax.cosine_decay_schedule(fit.learning_rate, fit.steps)),
                steps=fit.steps, batch_size=min(fit.batch_size, fit.num_train), eval_every=fit.eval_every,
                patience=fit.patience, seed=cfg.seed,
                warm_start=fit.warm_start and get_method(method).contains_base_grid,
                checkpoint_dir=Path(fit.checkpoint_dir).resolve() / cfg.name / tag,
                log_path=out / "logs" / f"{tag}.jsonl", progress=False,
            )
        except ValueError as e:  # e.g. an NFE the base solver cannot use exactly
            rows.append({"method": method, "base": fit.base, "nfe": nfe, "note": str(e)})
            continue
        save_solver(out / "solvers" / tag, solver, extra={"config": cfg.name, "base_rmse": report.base_rmse,
                                                          "rmse": report.fitted_rmse})
        rows.append({"method": report.method, "base": report.base, "nfe": nfe, "params": report.num_params,
                     "base_rmse": report.base_rmse, "rmse": report.fitted_rmse,
                     "improvement": report.base_rmse / report.fitted_rmse,
                     "fit_seconds": round(time.perf_counter() - start, 1)})
    write_rows(out, "metrics", rows)
    (out / "table.md").write_text(markdown_table(rows, COLUMNS))
    if cfg.plots:
        _plot(rows, out / "rmse_vs_nfe.png", cfg.name)
    return rows


def _schedule(cfg: ExperimentConfig) -> str:
    return "logsnr_uniform" if cfg.schedule == "auto" else cfg.schedule


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if "rmse" in r):
        pts = sorted((r["nfe"], r["rmse"], r["base_rmse"]) for r in rows if r["method"] == method and "rmse" in r)
        line, = ax.semilogy([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.semilogy([p[0] for p in pts], [p[2] for p in pts], ls=":", color=line.get_color())
    ax.set_xlabel("NFE")
    ax.set_ylabel("held-out RMSE (dotted: base solver)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return np.nan

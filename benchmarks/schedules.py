"""Sampling schedules on the digits Gaussian mixture (64-D, exact denoiser, VPDiscrete DDPM-linear):
Align Your Steps optimised for this model, the published AYS table (SD1.5, rescaled to the range),
Karras (rho 7), log-SNR uniform, and the GITS dynamic-programming search, for dpmpp_2m, unipc and
dpmpp_2m_sde at NFE 5, 6, 8, 10, 15, 20. Every grid runs from t_max to t_min (no final step to 0).

* Deterministic solvers: RMSE of the samples to the exact PF-ODE endpoint at t_min of the same
  held-out noise (``--test`` draws).
* dpmpp_2m_sde: sliced Wasserstein-2 to exact samples of the noised marginal at t_min (same size),
  and the mean exact NLL of the samples under that marginal (exact samples' own NLL listed).
* AYS (``fastsample.learned.ays.optimize_ays``): 10 -> 20 -> 40 steps on ``--data`` mixture samples,
  then the 40-step table interpolated log-linearly to each step count (``get_timesteps(..., "ays",
  sigmas=...)``). GITS (``fastsample.learned.schedule_search``): the jump-cost matrix of DDIM steps on
  100 log-SNR-uniform candidates, teacher trajectories of ``--search`` noises (not the test noise),
  and the DP path for each step count.

    python benchmarks/schedules.py [--test 256] [--from-json benchmarks/results/schedules.json]

Writes ``benchmarks/results/schedules.json``, ``schedules.md`` and ``schedules.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fastsample as fs  # noqa: E402
from fastsample.learned import exact_endpoint  # noqa: E402
from fastsample.learned.ays import optimize_ays  # noqa: E402
from fastsample.learned.schedule_search import jump_costs, min_cost_path, teacher_states  # noqa: E402
from fastsample.metrics import gmm_nll, sliced_wasserstein  # noqa: E402
from fastsample.models import GaussianMixture  # noqa: E402
from fastsample.results import environment, markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SOLVERS = ["dpmpp_2m", "unipc", "dpmpp_2m_sde"]
SCHEDULES = ["ays_optimized", "ays_published", "karras", "logsnr_uniform", "gits"]
NFES = [5, 6, 8, 10, 15, 20]


def run(n_test: int, n_search: int, n_data: int, seed: int):
    process = fs.VPDiscrete.ddpm_linear()
    mixture = GaussianMixture.digits()
    denoiser = mixture.denoiser(process)
    key = jax.random.PRNGKey(seed)
    k_test, k_search, k_data, k_ays, k_sde, k_exact, k_sw = jax.random.split(key, 7)
    x_test = fs.prior(process, k_test, (n_test, 64), jnp.float64)
    t0 = time.time()
    target = exact_endpoint(denoiser, x_test, t_end=process.t_min)
    a_min, s_min = (float(v) for v in process.alpha_sigma(jnp.asarray(process.t_min, jnp.float64)))
    exact = mixture.sample(k_exact, n_test, a_min, s_min)
    print(f"reference in {time.time() - t0:.1f}s", flush=True)

    t0 = time.time()
    ays = optimize_ays(denoiser, mixture.sample(k_data, n_data), 10, key=k_ays, num_samples=128, sweeps=15,
                       refine_sweeps=4, num_candidates=9, patience=4)
    ays_seconds = time.time() - t0
    print(f"AYS optimised in {ays_seconds:.1f}s: 10-step sigmas {np.round(ays.stages[0], 4).tolist()}", flush=True)

    t0 = time.time()
    cands = np.asarray(fs.get_timesteps(process, 100, "logsnr_uniform"))
    x_search = fs.prior(process, k_search, (n_search, 64), jnp.float64)
    costs = jump_costs(denoiser, x_search, cands, base="ddim",
                       teacher=teacher_states(denoiser, x_search, cands))
    gits_seconds = time.time() - t0
    print(f"GITS cost matrix in {gits_seconds:.1f}s", flush=True)

    def grid(name, steps):
        if name == "ays_optimized":
            return ays.timesteps_for(process, steps)
        if name == "ays_published":
            return fs.get_timesteps(process, steps, "ays")
        if name == "gits":
            return jnp.asarray(cands[min_cost_path(costs, steps)[0]])
        return fs.get_timesteps(process, steps, name)

    rows = []
    for solver_name in SOLVERS:
        solver = fs.get_solver(solver_name)
        for nfe in NFES:
            steps = solver.steps_for_nfe(nfe)
            for name in SCHEDULES:
                ts = grid(name, steps)
                info = fs.solve(denoiser, x_test, solver_name, timesteps=ts, key=k_sde)
                x = info.x
                assert info.stats["nfe"] == nfe
                row = {"solver": solver_name, "schedule": name, "nfe": nfe, "steps": steps}
                if solver_name == "dpmpp_2m_sde":
                    row["sw"] = float(sliced_wasserstein(x, exact, k_sw))
                    row["nll"] = float(gmm_nll(mixture, x, a_min, s_min))
                else:
                    row["rmse"] = float(jnp.sqrt(jnp.mean((x - target) ** 2)))
                if not np.all(np.isfinite(np.asarray(x))):
                    row["failure"] = "non-finite"
                rows.append(row)
            print(solver_name, nfe, {r["schedule"]: round(r.get("rmse", r.get("sw", np.nan)), 4)
                                     for r in rows[-len(SCHEDULES):]}, flush=True)
    extra = {"ays_seconds": ays_seconds, "gits_seconds": gits_seconds,
             "ays_sigmas_10": ays.stages[0].tolist(), "ays_sigmas_40": ays.sigmas.tolist(),
             "ays_val_klub": ays.val_klub, "exact_nll": float(gmm_nll(mixture, exact, a_min, s_min)),
             "exact_sw_floor": float(sliced_wasserstein(mixture.sample(jax.random.fold_in(k_exact, 1), n_test, a_min,
                                                                       s_min), exact, k_sw))}
    return rows, extra


def tables(rows, extra):
    md = []
    for solver in SOLVERS:
        metric = "sw" if solver == "dpmpp_2m_sde" else "rmse"
        label = ("sliced W2 to exact samples (NLL in brackets)" if metric == "sw"
                 else "RMSE to the exact PF-ODE endpoint")
        md.append(f"## {solver}: {label}\n")
        out = []
        for name in SCHEDULES:
            row = {"schedule": name}
            for nfe in NFES:
                hit = [r for r in rows if r["solver"] == solver and r["schedule"] == name and r["nfe"] == nfe]
                if hit:
                    r = hit[0]
                    row[f"NFE {nfe}"] = (f"{r['sw']:.4f} ({r['nll']:.1f})" if metric == "sw" else f"{r['rmse']:.4f}")
            out.append(row)
        md.append(markdown_table(out, ["schedule", *[f"NFE {n}" for n in NFES]]))
        best = {}
        for nfe in NFES:
            cand = [r for r in rows if r["solver"] == solver and r["nfe"] == nfe]
            best[nfe] = min(cand, key=lambda r: r[metric])["schedule"]
        md.append("Best per NFE: " + ", ".join(f"{n}: {s}" for n, s in best.items()) + "\n")
    md.append(f"Exact samples' own NLL: {extra['exact_nll']:.1f}; SW between two exact sample sets: "
              f"{extra['exact_sw_floor']:.4f}. AYS optimisation {extra['ays_seconds']:.0f} s, GITS cost matrix "
              f"{extra['gits_seconds']:.0f} s.\n")
    md.append("AYS 10-step sigmas (EDM): " + ", ".join(f"{s:.4g}" for s in extra["ays_sigmas_10"]) + "\n")
    return "\n".join(md)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, solver in zip(axes, SOLVERS, strict=True):
        metric = "sw" if solver == "dpmpp_2m_sde" else "rmse"
        for i, name in enumerate(SCHEDULES):
            pts = sorted((r["nfe"], r[metric]) for r in rows if r["solver"] == solver and r["schedule"] == name)
            ax.semilogy([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=plt.cm.tab10(i))
        ax.set_title(f"{solver} (digits mixture, VPDiscrete)")
        ax.set_xlabel("NFE")
        ax.set_ylabel("sliced W2 to exact samples" if metric == "sw" else "RMSE to exact endpoint")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=256, help="held-out noises (and exact samples)")
    parser.add_argument("--search", type=int, default=32, help="noises of the GITS search")
    parser.add_argument("--data", type=int, default=4000, help="mixture samples for AYS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", help="re-render the table and plot from an earlier run's JSON")
    args = parser.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    if args.from_json:
        blob = json.loads(Path(args.from_json).read_text())
        rows, extra = blob["rows"], blob["extra"]
    else:
        start = time.time()
        rows, extra = run(args.test, args.search, args.data, args.seed)
        blob = {"benchmark": "schedules", "environment": environment(), "args": vars(args),
                "seconds": time.time() - start, "extra": extra, "rows": rows}
        tmp = OUT / "schedules.json.partial"
        tmp.write_text(json.dumps(blob, indent=1))
        tmp.replace(OUT / "schedules.json")
    md = tables(rows, extra)
    (OUT / "schedules.md").write_text(md)
    plot(rows, OUT / "schedules.png")
    print(md)


if __name__ == "__main__":
    main()

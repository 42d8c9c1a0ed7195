"""Sample quality of every training-free solver x schedule x final step x NFE, against the exact
probability-flow ODE solution, on the digits Gaussian mixture (64-D, exact denoiser).

Processes: VPDiscrete (DDPM-linear), EDM, FlowMatching. For each solver and NFE the same noise
is integrated; the error is the RMSE to the exact PF-ODE endpoint at sigma = 0 (computed by an
adaptive float64 solve in EDM variables down to sigma_edm = 1e-9, where the mixture's denoiser
is still exact), so grids that stop at t_min pay for the noise they leave. Final-step variants:
``t_min`` (stop there), ``zero`` (a last step from t_min to sigma = 0) and ``zero@s`` (the last
nonzero point at EDM sigma ``s``, then a step to sigma = 0). A NaN or a diverged run (RMSE above
the data scale) is a failure, listed separately, not a row.

    python benchmarks/quality.py [--quick] [--from-json benchmarks/results/quality.json]

Writes ``benchmarks/results/quality.json``, ``quality.md`` and ``quality_<process>.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import fastsample as fs  # noqa: E402
from fastsample.models import GaussianMixture  # noqa: E402
from fastsample.results import environment, markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SCHEDULES = ["time_uniform", "logsnr_uniform", "karras", "ays", "beta"]
NFES = [3, 4, 5, 6, 8, 10, 15, 20]
FINALS = ["t_min", "zero", "zero@0.03", "zero@0.1"]


def _fixed_nfe_without_options(name: str) -> bool:
    """Solvers this benchmark runs: deterministic, fixed NFE and no required options (not the
    adaptive solver, not dpm_solver_v3, whose statistics are estimated per model; stochastic
    solvers are in benchmarks/stochastic.py)."""
    try:
        solver = fs.get_solver(name)
        return isinstance(solver, fs.AbstractFastSolver) and not isinstance(solver, fs.AbstractStochasticSolver)
    except ValueError:
        return False


def processes():
    return {
        "vp_discrete": fs.VPDiscrete.ddpm_linear(),
        "edm": fs.EDM(),
        "flow_matching": fs.FlowMatching(t_min=1e-3, t_max=1 - 1e-3),
    }


def exact_endpoint(mixture, process, x_T):
    """The PF-ODE solution at sigma = 0 from x_T at t_max, integrated in EDM variables."""
    s_max = float(process.sigma_edm(process.t_max))
    edm = fs.EDM(sigma_min=1e-9, sigma_max=s_max)
    y_T = x_T / process.alpha(process.t_max)
    return fs.reference_solve(mixture.denoiser(edm), y_T)


def run(quick: bool = False, batch: int = 256):
    mixture = GaussianMixture.digits()
    solvers = [s for s in fs.available_solvers() if _fixed_nfe_without_options(s)]
    nfes = [5, 10] if quick else NFES
    rows, failures = [], []
    for pname, process in processes().items():
        denoiser = mixture.denoiser(process)
        x_T = fs.prior(process, jax.random.PRNGKey(0), (batch, 64), jnp.float64)
        target = exact_endpoint(mixture, process, x_T)
        scale = float(jnp.sqrt(jnp.mean(target**2)))
        combos = list(itertools.product(solvers, SCHEDULES, FINALS, nfes))
        for solver, schedule, final, nfe in tqdm(combos, desc=pname, mininterval=5):
            # every grid starts at t_max, where x_T was drawn (AYS tables are rescaled to the range)
            options = {"t_start": process.t_max, "t_end": process.t_min}
            if final.startswith("zero@"):
                options["t_end"] = float(process.t_from_sigma_edm(float(final[5:])))
            if schedule == "ays":
                options["model"] = "sd15"
            key = dict(process=pname, solver=solver, schedule=schedule, final=final, nfe=nfe)
            try:
                x = fs.sample(denoiser, x_T, solver, nfe=nfe, schedule=schedule, final_zero=final != "t_min",
                              schedule_options=options)
            except ValueError as e:  # this solver cannot use exactly this NFE / grid
                if "cannot use exactly" in str(e) or "below" in str(e):
                    continue
                failures.append({**key, "failure": str(e)[:200]})
                continue
            rmse = float(jnp.sqrt(jnp.mean((x - target) ** 2)))
            if not np.isfinite(rmse) or rmse > 10 * scale:
                failures.append({**key, "failure": f"diverged (rmse={rmse:.3g})"})
                continue
            rows.append({**key, "rmse": rmse})
    return rows, failures


def best_table(rows, process, nfes):
    """Per solver: the best (schedule, final) at each NFE."""
    out = []
    for solver in sorted({r["solver"] for r in rows if r["process"] == process}):
        row = {"solver": solver}
        for nfe in nfes:
            cands = [r for r in rows if r["process"] == process and r["solver"] == solver and r["nfe"] == nfe]
            if cands:
                b = min(cands, key=lambda r: r["rmse"])
                row[f"NFE {nfe}"] = f"{b['rmse']:.3g} ({b['schedule']}, {b['final']})"
        out.append(row)
    return out


def plot(rows, process, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "os^vD<>px*h"
    for i, solver in enumerate(sorted({r["solver"] for r in rows if r["process"] == process})):
        pts = {}
        for r in rows:
            if r["process"] == process and r["solver"] == solver:
                pts[r["nfe"]] = min(pts.get(r["nfe"], np.inf), r["rmse"])
        if pts:
            xs = sorted(pts)
            ax.loglog(xs, [pts[n] for n in xs], marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20),
                      label=solver)
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE to the exact sigma=0 endpoint (best schedule)")
    ax.set_title(f"digits mixture, {process}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 5 and 10 only")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--from-json", help="re-render the table and plots from an earlier run's JSON")
    args = parser.parse_args(argv)
    stem = "quality_quick" if args.quick else "quality"
    OUT.mkdir(exist_ok=True)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, failures = saved["rows"], saved["failures"]
    else:
        start = time.time()
        rows, failures = run(args.quick, args.batch)
        (OUT / f"{stem}.json").write_text(json.dumps(
            {"benchmark": "quality", "environment": environment(), "seconds": time.time() - start,
             "rows": rows, "failures": failures}, indent=1))
    nfes = sorted({r["nfe"] for r in rows})
    md = []
    for process in processes():
        md.append(f"## {process}: best RMSE per solver (schedule, final step)\n")
        md.append(markdown_table(best_table(rows, process, nfes)))
        plot(rows, process, OUT / f"{stem}_{process}.png")
    md.append(f"\n## Failures (NaN or divergence): {len(failures)}\n")
    md.append(markdown_table(failures) if failures else "none\n")
    (OUT / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

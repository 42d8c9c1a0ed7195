"""Learned solvers against their base solvers and the best training-free solver, on the digits
Gaussian mixture (64-D, exact denoiser), at NFE 4, 5, 6, 8, 10 (flow matching: 5, 10).

For each process (VPDiscrete DDPM-linear; FlowMatching) one reference set of noise and exact
PF-ODE endpoints at sigma = 0 is drawn (``--train`` pairs to fit on, ``--val`` held out); every
method is fitted at every NFE with the final step to sigma = 0, and the held-out RMSE to the exact
endpoint is reported beside its base solver's and beside the best training-free configuration of
``benchmarks/results/quality.json`` (re-run on the same held-out noise). Gradient-fitted methods
take ``--steps`` Adam steps (cosine decay from ``--lr``, batches of 128); the best parameters on the
held-out set are kept. BNS and Bespoke start from the learned grid of their base solver
(``fit_solver(..., warm_start=True)``; Bespoke's base is Euler / the midpoint rule, whose learned
grid is reported as its own row). The anchor, dpmpp_2m on Karras sigmas with a final step to
sigma = 0, is measured too.

    python benchmarks/learned.py [--quick] [--steps 3000] [--lr 5e-3]

Writes ``benchmarks/results/learned.json``, ``learned.md`` and ``learned_<process>.png``.
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
import optax  # noqa: E402

import fastsample as fs  # noqa: E402
from fastsample.learned import (  # noqa: E402
    fit_solver,
    get_method,  # noqa: E402
    make_reference,
)
from fastsample.models import GaussianMixture  # noqa: E402
from fastsample.results import environment, markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
#: NFEs per process (flow matching: the two budgets of the issue's targets, to bound the run time)
NFES = {"vp_discrete": [4, 5, 6, 8, 10], "flow_matching": [5, 10]}
#: (method, base solver); iPNDM is the best training-free base at these budgets (quality.md);
#: Bespoke's bases are Euler / the midpoint rule on the same schedule.
#: "bespoke" is RK2 at even NFE and RK1 at odd NFE (RK2 spends two evaluations per step).
METHODS = [("learned_grid", "ipndm"), ("bns", "ipndm"), ("bespoke", None), ("dode", "ipndm"), ("iia", "ddim")]
#: the last positive time of every base grid, as an EDM noise level (then a step to sigma = 0)
LAST_SIGMA = 0.03


def processes():
    return {"vp_discrete": fs.VPDiscrete.ddpm_linear(), "flow_matching": fs.FlowMatching(t_min=1e-3, t_max=1 - 1e-3)}


def _rmse(x, y) -> float:
    return float(jnp.sqrt(jnp.mean((x - y) ** 2)))


def best_training_free(process_name: str, nfe: int):
    """The best (solver, schedule, final) at ``nfe`` in the quality benchmark, or None."""
    path = OUT / "quality.json"
    if not path.exists():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"] if r["process"] == process_name and r["nfe"] == nfe]
    return min(rows, key=lambda r: r["rmse"]) if rows else None


def _training_free(denoiser, process, x_T, target, row) -> float:
    options = {"t_start": process.t_max, "t_end": process.t_min}
    final = row["final"]
    if final.startswith("zero@"):
        options["t_end"] = float(process.t_from_sigma_edm(float(final[5:])))
    x = fs.sample(denoiser, x_T, row["solver"], nfe=row["nfe"], schedule=row["schedule"], final_zero=final != "t_min",
                  schedule_options=options)
    return _rmse(x, target)


def run(quick: bool, steps: int, n_train: int, n_val: int, lr: float):
    mixture = GaussianMixture.digits()
    methods = METHODS[:2] + METHODS[4:5] if quick else METHODS
    rows = []
    for pname, process in processes().items():
        nfes = [5, 10] if quick else NFES[pname]
        denoiser = mixture.denoiser(process)
        t0 = time.time()
        ref = make_reference(denoiser, jax.random.PRNGKey(0), n_train + n_val, (64,), dtype=jnp.float64)
        train, val = ref.split(n_train)
        print(f"{pname}: reference set in {time.time() - t0:.1f}s", flush=True)
        t_end = float(process.t_from_sigma_edm(LAST_SIGMA))
        karras = fs.sample(denoiser, val.x_T, "dpmpp_2m", nfe=10, schedule="karras", final_zero=True)
        rows.append({"process": pname, "method": "anchor: dpmpp_2m karras", "nfe": 10,
                     "rmse": _rmse(karras, val.x_end)})
        for nfe in nfes:
            best = best_training_free(pname, nfe)
            if best is not None:
                rows.append({"process": pname, "method": "best training-free", "nfe": nfe,
                             "base": f"{best['solver']} ({best['schedule']}, {best['final']})",
                             "rmse": _training_free(denoiser, process, val.x_T, val.x_end, best)})
            for method, base in methods:
                if method == "bespoke":
                    method = "bespoke_rk1" if nfe % 2 else "bespoke_rk2"
                schedule, options = "logsnr_uniform", {"t_end": t_end}
                start = time.time()
                opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
                solver, report = fit_solver(method, denoiser, train, val, nfe, base=base or "ipndm",
                                            schedule=schedule, schedule_options=options, steps=steps,
                                            batch_size=min(128, n_train), eval_every=50, optimizer=opt,
                                            warm_start=get_method(method).contains_base_grid)
                row = {"process": pname, "method": method if method != "bespoke_rk1" and method != "bespoke_rk2"
                       else "bespoke", "nfe": nfe, "base": f"{report.base} ({schedule})",
                       "rmse": report.fitted_rmse, "base_rmse": report.base_rmse, "params": report.num_params,
                       "fit_seconds": round(time.time() - start, 1)}
                if report.warm_start is not None:
                    row["learned_grid_rmse"] = report.warm_start.fitted_rmse
                    if method.startswith("bespoke"):  # the learned grid of Bespoke's own base, for free
                        grid = report.warm_start
                        rows.append({"process": pname, "method": f"learned_grid ({grid.base})", "nfe": nfe,
                                     "base": f"{grid.base} ({schedule})", "rmse": grid.fitted_rmse,
                                     "base_rmse": grid.base_rmse, "params": grid.num_params})
                if not np.isfinite(row["rmse"]):
                    row["failure"] = "non-finite"
                rows.append(row)
                print(row, flush=True)
    return rows


def table(rows, process, nfes):
    """One row per method; each cell: held-out RMSE (and the base solver's, with its schedule)."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows if r["process"] == process and "anchor" not in r["method"]))
    for method in methods:
        row = {"method": method}
        for nfe in nfes:
            hit = [r for r in rows if r["process"] == process and r["method"] == method and r["nfe"] == nfe]
            if hit:
                r = hit[0]
                base = f"base {r['base_rmse']:.4f}, {r['base']}" if "base_rmse" in r else r.get("base", "")
                row[f"NFE {nfe}"] = f"{r['rmse']:.4f} ({base})"
        fits = [r["fit_seconds"] for r in rows if r["process"] == process and r["method"] == method
                and "fit_seconds" in r]
        if fits:
            row["fit s (mean)"] = f"{np.mean(fits):.0f}"
        out.append(row)
    return out, ["method", *[f"NFE {n}" for n in nfes], "fit s (mean)"]


def plot(rows, process, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    groups = {}
    for r in rows:
        if r["process"] == process and "anchor" not in r["method"]:
            label = r["method"]
            groups.setdefault(label, {})[r["nfe"]] = r["rmse"]
    for i, (label, pts) in enumerate(groups.items()):
        xs = sorted(pts)
        dashed = label == "best training-free"
        ax.semilogy(xs, [pts[n] for n in xs], "--" if dashed else "-", marker="o", label=label,
                    color="k" if dashed else plt.cm.tab10(i % 10))
    ax.set_xlabel("NFE")
    ax.set_ylabel("held-out RMSE to the exact sigma=0 endpoint")
    ax.set_title(f"learned solvers, digits mixture, {process}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 5 and 10, three methods")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of the gradient-fitted methods")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (Adam, cosine decay)")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--from-json", help="re-render the table and plots from an earlier run's JSON")
    args = parser.parse_args(argv)
    stem = "learned_quick" if args.quick else "learned"
    OUT.mkdir(exist_ok=True)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
    else:
        start = time.time()
        rows = run(args.quick, args.steps, args.train, args.val, args.lr)
        tmp = OUT / f"{stem}.json.partial"
        tmp.write_text(json.dumps({"benchmark": "learned", "environment": environment(), "steps": args.steps,
                                   "lr": args.lr, "seconds": time.time() - start, "rows": rows}, indent=1))
        tmp.replace(OUT / f"{stem}.json")
    md = []
    for process in processes():
        nfes = sorted({r["nfe"] for r in rows if r["process"] == process})
        anchor = [r for r in rows if r["process"] == process and "anchor" in r["method"]]
        md.append(f"## {process}: held-out RMSE to the exact endpoint (final step to sigma = 0)\n")
        if anchor:
            md.append(f"Anchor: dpmpp_2m, Karras sigmas, NFE 10: {anchor[0]['rmse']:.4f}.\n")
        md.append(markdown_table(*table(rows, process, nfes)))
        plot(rows, process, OUT / f"{stem}_{process}.png")
    (OUT / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

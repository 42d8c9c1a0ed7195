"""Distribution quality of the stochastic samplers beside the best ODE solvers, against exact samples.

Models: exact denoisers of a 2-D ring mixture (8 modes) and of the digits mixture (64-D,
10 components), under the EDM process, Karras grid ending at sigma = 0. For each solver and NFE
the same starting noise and key are used; metrics against exact samples of the mixture:
sliced Wasserstein-2 (SW), unbiased MMD^2 (median bandwidth), the mean exact NLL of the samples
under the mixture (the exact samples' own value is the reference) and the mode-weight error
(L1 distance of the mode frequencies to the mixture weights). Every solver runs at the smallest
NFE it can reach at or above each target (``nfe`` column). A NaN, or a budget a solver refuses
(Restart's interval not crossed by a short grid), is listed as a failure.

    python benchmarks/stochastic.py [--quick] [--from-json benchmarks/results/stochastic.json]

Writes ``benchmarks/results/stochastic.json``, ``stochastic.md`` and ``stochastic.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.results import environment, markdown_table

OUT = Path(__file__).resolve().parent / "results"
STOCHASTIC = {
    "euler_maruyama": {},
    "euler_ancestral": {},
    "ddpm": {},
    "edm_stochastic": {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003},
    "dpmpp_2m_sde": {},
    "dpmpp_3m_sde": {},
    "dpmpp_sde": {},
    "sa_solver": {},
    "er_sde": {},
    # (2 Heun steps back from sigma = 2 were too coarse: SW 0.29 at NFE 51 on the ring; 5 steps from 1.0 are not)
    "restart": {"intervals": (0.1, 1.0), "K": 1, "restart_steps": 5},
    "pc_langevin": {},
}
ODE = ["dpmpp_2m", "unipc", "heun"]
NFES = [10, 20, 50]


def datasets(batch):
    return {
        "ring2d": (GaussianMixture.ring(n=8, radius=2.0, std=0.2), batch),
        "digits": (GaussianMixture.digits(), max(batch // 2, 200)),
    }


def reachable(solver, target):
    for nfe in range(target, target + 12):
        try:
            solver.steps_for_nfe(nfe, True)
            return nfe
        except ValueError:
            continue
    return None


def run(quick=False, batch=2000):
    process = fs.EDM()
    nfes = [10, 20] if quick else NFES
    rows, failures = [], []
    for dname, (mixture, n) in datasets(500 if quick else batch).items():
        denoiser = mixture.denoiser(process)
        x_T = fs.prior(process, jax.random.PRNGKey(0), (n, mixture.dim))
        exact = mixture.sample(jax.random.PRNGKey(1), n)
        ref = {"sw": float(fs.metrics.sliced_wasserstein(mixture.sample(jax.random.PRNGKey(2), n), exact,
                                                         jax.random.PRNGKey(3))),
               "nll": float(fs.metrics.gmm_nll(mixture, exact))}
        for name in list(STOCHASTIC) + ODE:
            solver = fs.get_solver(name, **STOCHASTIC.get(name, {}))
            for target in nfes:
                nfe = reachable(solver, target)
                if nfe is None:
                    continue
                start = time.time()
                key = dict(data=dname, solver=name, kind="ode" if name in ODE else "sde", target=target, nfe=nfe)
                try:
                    x = fs.sample(denoiser, x_T, solver, nfe=nfe, schedule="karras", final_zero=True,
                                  key=jax.random.key(4))
                except ValueError as e:  # e.g. a grid too short to cross a restart interval
                    failures.append({**key, "failure": str(e)[:160]})
                    continue
                x.block_until_ready()
                if not bool(jnp.all(jnp.isfinite(x))):
                    failures.append({**key, "failure": "NaN"})
                    continue
                rows.append({**key,
                             "sw": float(fs.metrics.sliced_wasserstein(x, exact, jax.random.PRNGKey(3))),
                             "mmd": float(fs.metrics.mmd(x, exact)),
                             "nll": float(fs.metrics.gmm_nll(mixture, x)),
                             "nll_exact": ref["nll"], "sw_floor": ref["sw"],
                             "mode_err": float(fs.metrics.mode_weight_error(mixture, x)),
                             "seconds": round(time.time() - start, 2)})
    return rows, failures


def tables(rows):
    md = []
    for dname in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == dname]
        targets = sorted({r["target"] for r in sub})
        md.append(f"## {dname}: sliced W2 / MMD^2 / NLL / mode-weight error (NFE reached in parentheses)\n")
        md.append(f"SW between two exact sample sets (Monte-Carlo floor): {sub[0]['sw_floor']:.4f}; "
                  f"exact samples' NLL: {sub[0]['nll_exact']:.4f}\n")
        table = []
        for solver in dict.fromkeys(r["solver"] for r in sub):
            row = {"solver": solver}
            for t in targets:
                r = next((r for r in sub if r["solver"] == solver and r["target"] == t), None)
                if r:
                    row[f"NFE {t}"] = (f"{r['sw']:.4f} / {r['mmd']:.2e} / {r['nll']:.3f} / {r['mode_err']:.3f}"
                                       f" ({r['nfe']})")
            table.append(row)
        md.append(markdown_table(table))
        md.append("\nBest by sliced W2 at each NFE:\n")
        for t in targets:
            at = [r for r in sub if r["target"] == t]
            best = min(at, key=lambda r: r["sw"])
            best_ode = min((r for r in at if r["kind"] == "ode"), key=lambda r: r["sw"], default=None)
            best_sde = min((r for r in at if r["kind"] == "sde"), key=lambda r: r["sw"], default=None)
            md.append(f"- NFE {t}: **{best['solver']}** ({best['sw']:.4f}); best SDE {best_sde['solver']} "
                      f"({best_sde['sw']:.4f}), best ODE {best_ode['solver']} ({best_ode['sw']:.4f})")
        md.append("")
    return "\n".join(md)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5))
    for ax, dname in zip(np.atleast_1d(axes), names, strict=True):
        sub = [r for r in rows if r["data"] == dname]
        for i, solver in enumerate(dict.fromkeys(r["solver"] for r in sub)):
            pts = sorted((r["nfe"], r["sw"]) for r in sub if r["solver"] == solver)
            style = "--" if solver in ODE else "-"
            ax.loglog(*zip(*pts, strict=True), style, marker="os^vD<>px*h"[i % 11], color=plt.cm.tab20(i % 20),
                      label=solver)
        ax.axhline(sub[0]["sw_floor"], color="gray", lw=0.8, label="exact vs exact")
        ax.set_xlabel("NFE")
        ax.set_ylabel("sliced Wasserstein-2 to exact samples")
        ax.set_title(f"{dname} mixture, EDM, Karras grid to sigma = 0")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 10 and 20, 500 samples")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--from-json", help="re-render the table and plot from an earlier run's JSON")
    args = parser.parse_args(argv)
    stem = "stochastic_quick" if args.quick else "stochastic"
    OUT.mkdir(exist_ok=True)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, failures = saved["rows"], saved["failures"]
    else:
        start = time.time()
        rows, failures = run(args.quick, args.batch)
        (OUT / f"{stem}.json").write_text(json.dumps(
            {"benchmark": "stochastic", "environment": environment(), "seconds": time.time() - start,
             "rows": rows, "failures": failures}, indent=1))
    md = tables(rows) + f"\n## Failures (NaN or refused budget): {len(failures)}\n\n"
    md += markdown_table(failures) if failures else "none\n"
    (OUT / f"{stem}.md").write_text(md)
    plot(rows, OUT / f"{stem}.png")
    print(md)


if __name__ == "__main__":
    main()

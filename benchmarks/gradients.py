"""Gradients through sampling: memory, time and error of each mode of ``fastsample.gradients``.

For the digits Gaussian mixture (64-D, 10 full-covariance components, ``VPDiscrete`` DDPM-linear
process) at batch 256 in float32: the gradient of ``sum(w * x_0)`` with respect to ``x_T`` and the
mixture's means (the "model parameters") through ``fastsample.sample`` at N = 16 ... 256 steps,
for every gradient mode. Columns: temporary memory of the compiled gradient
(``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``; ``null`` where the
backend does not report it), median wall time of one gradient, and the relative L2 error of the
gradient against ``full`` on the same grid with the same solver (dpmpp_2m; BDIA-DDIM for
``reversible``, which is compared with ``full`` through BDIA-DDIM; DDPM with a fixed key for the SDE
adjoint, compared with ``full`` through DDPM with the same key). The adjoint's error is its
discretisation error against the discrete sampler's gradient (both approximate the exact flow's).

Writes ``benchmarks/results/gradients.json``, ``gradients.md`` and ``gradients.png``.

    python benchmarks/gradients.py [--batch 256] [--nfe 16 32 64 128 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from timing import timeit  # benchmarks/timing.py

import fastsample as fs
from fastsample import gradients as G
from fastsample.models import GaussianMixture
from fastsample.noise import make_noise
from fastsample.results import environment, markdown_table

OUT = Path(__file__).resolve().parent / "results"
KEY = jax.random.PRNGKey(2)  # the noise of the stochastic (DDPM) rows

#: (label, gradient mode, solver)
MODES = [
    ("full", "full", "dpmpp_2m"),
    ("remat", "remat", "dpmpp_2m"),
    ("binomial", "binomial", "dpmpp_2m"),
    ("adjoint (2M)", "adjoint", "dpmpp_2m"),
    ("adjoint (1)", G.Adjoint(order=1), "dpmpp_2m"),
    ("adjointdpm (AB2)", G.Adjoint(method="adjointdpm"), "dpmpp_2m"),
    ("adjointdpm (Euler)", G.Adjoint(order=1, method="adjointdpm"), "dpmpp_2m"),
    ("full (ddpm)", "full", "ddpm"),
    ("adjoint SDE (ddpm)", G.Adjoint(), "ddpm"),
    ("full (bdia)", "full", fs.BDIADDIM(1.0)),
    ("reversible (bdia)", "reversible", fs.BDIADDIM(1.0)),
]
COLUMNS = ["mode", "nfe", "temp_MiB", "time_ms", "rel_error_vs_full"]


def temp_bytes(compiled):
    stats = compiled.memory_analysis()
    return None if stats is None else getattr(stats, "temp_size_in_bytes", None)


def rel_error(g, ref) -> float:
    flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
    return float(jnp.linalg.norm(flat(g) - flat(ref)) / jnp.linalg.norm(flat(ref)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nfe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--replot", action="store_true", help="only redraw gradients.png from gradients.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        _plot(json.loads((out / "gradients.json").read_text())["rows"], out / "gradients.png")
        return

    process = fs.VPDiscrete.ddpm_linear()
    mixture = GaussianMixture.digits()
    mixture = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, mixture)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (args.batch, 64), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), x_T.shape, jnp.float32)

    rows = []
    for nfe in args.nfe:
        grads = {}
        for label, mode, solver in MODES:
            def loss(means, x, mode=mode, solver=solver, nfe=nfe):
                den = eqx.tree_at(lambda m: m.means, mixture, means).denoiser(process)
                if solver == "ddpm" and isinstance(mode, G.Adjoint):  # the SDE adjoint, given sample()'s noise
                    ts = fs.get_timesteps(process, nfe, "logsnr_uniform").astype(x.dtype)
                    noise = make_noise("independent", KEY, 0.0, float(process.t_max))
                    return jnp.sum(w * mode.solve(fs.get_solver(solver), den, x, ts, None, noise)[0])
                return jnp.sum(w * fs.sample(den, x, solver, nfe=nfe, schedule="logsnr_uniform", gradient=mode,
                                             key=KEY))

            fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
            t0 = time.perf_counter()
            compiled = fn.lower(mixture.means, x_T).compile()
            compile_s = time.perf_counter() - t0
            temp = temp_bytes(compiled)
            grads[label] = compiled(mixture.means, x_T)
            seconds = timeit(compiled, mixture.means, x_T, repeats=args.repeats)
            ref = grads["full (bdia)" if "bdia" in label else "full (ddpm)" if "ddpm" in label else "full"]
            rows.append({
                "mode": label, "nfe": nfe, "temp_MiB": None if temp is None else temp / 2**20,
                "time_ms": 1e3 * seconds, "compile_s": compile_s, "rel_error_vs_full": rel_error(grads[label], ref),
            })
            print(rows[-1], flush=True)

    meta = {"environment": environment(), "batch": args.batch, "model": "GaussianMixture.digits (64-D, K=10, full)",
            "process": "VPDiscrete.ddpm_linear", "dtype": "float32", "loss": "sum(w * x_0), grad wrt (means, x_T)"}
    (out / "gradients.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = (f"Gradient of sum(w * x_0) w.r.t. (x_T, means) through `fastsample.sample`; digits mixture, batch "
              f"{args.batch}, float32, {jax.default_backend()} ({jax.devices()[0].device_kind}). temp = compiled "
              "temporary memory; error = relative L2 vs `full` (same grid and solver).\n\n")
    (out / "gradients.md").write_text(header + markdown_table(rows, COLUMNS + ["compile_s"]))
    _plot(rows, out / "gradients.png")
    print(markdown_table(rows, COLUMNS))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, label in enumerate(dict.fromkeys(r["mode"] for r in rows)):
        rs = [r for r in rows if r["mode"] == label]
        n = [r["nfe"] for r in rs]
        dashed = "bdia" in label or "ddpm" in label
        style = dict(marker="o", label=label, color=f"C{i % 10}", ls="--" if dashed else "-")
        if all(r["temp_MiB"] is not None for r in rs):
            axes[0].loglog(n, [r["temp_MiB"] for r in rs], **style)
        axes[1].loglog(n, [r["time_ms"] for r in rs], **style)
        err = [(r["nfe"], r["rel_error_vs_full"]) for r in rs if r["rel_error_vs_full"] > 0]
        if err:
            axes[2].loglog(*zip(*err, strict=True), **style)
    for ax, title in zip(axes, ["temporary memory (MiB)", "time per gradient (ms)", "relative error vs full"],
                         strict=True):
        ax.set_xlabel("steps N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Driver overhead: how much slower is ``fastsample.sample`` than the same solver written by hand?

Problem: the digits Gaussian mixture (64-D, 10 full-covariance components) denoiser on
``VPDiscrete.ddpm_linear()``, float32, batch 4096, NFE 10 on the ``logsnr_uniform`` grid ending at
``t_min`` (``final_zero=False``), the same grid for every driver.

For each of ddim, dpmpp_2m, unipc and ipndm, median wall times of the following, timed in turn in
each round (``timing.timeit_interleaved``: drift of a shared machine hits them alike):

- ``hand-written``: a jitted ``lax.scan`` whose step calls the denoiser and applies the solver's
  published update, written here from the papers, with per-step coefficients computed in NumPy
  float64 on the host (:func:`hand_written`); checked to give ``sample``'s samples (``rel_diff``:
  ``max |x - x_hand| / max |x_hand|``, asserted below ``1e-3`` in float32, where rounding
  differences reach 1.4e-4 at batch 4096; ``--check`` compares the algorithms in float64);
- ``sample (eager)``: ``fs.sample(den, x, solver, nfe=10, schedule=...)`` called without a jit;
- ``jit(sample, nfe)``: the same call inside the user's ``jax.jit`` (grid built while tracing);
- ``jit(sample, grid)``: ``jax.jit`` of ``fs.sample(den, x, solver, grid=g)`` with
  ``g = fs.grid(...)`` built outside; ``... fused=False`` steps the solver's own ``update``;

as ratios to the hand-written scan (target: at most 1.05) and to ``bare``, a ``lax.scan`` of the
10 denoiser calls alone (the floor). The hand-written, bare and ``jit`` rows close over the
denoiser (its arrays are constants of the program); the eager call passes it to the library's own
``jit`` as an argument, so it is also compared (``vs_hand_arg``) with the hand-written scan taking
the denoiser as an argument (where XLA cannot fold the model's arrays either). Also the compile
time of ``jax.jit(lambda x: fs.sample(den, x, solver, nfe=N)).lower(x).compile()`` for N = 10
and 100 (ddim, unipc), which should not grow with N: the first time for the grid (``first_s``,
with the solver's plan computed on the host) and again
(``lower_s`` + ``compile_s``). ``--check`` first checks the hand-written solvers against ``sample`` in
float64 (``rel_diff < 1e-10``); ``--all`` adds every fixed-grid deterministic solver of the
registry (``sample`` with and without ``fused``, and ``diffrax.diffeqsolve`` with ``StepTo``).
Writes ``overhead.json`` and ``overhead.md`` to ``--out`` (default ``benchmarks/results``) once
every measurement has succeeded.

    python benchmarks/overhead.py [--batch 4096] [--nfe 10] [--repeats 20] [--check] [--all] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from timing import timeit, timeit_interleaved  # benchmarks/timing.py

import fastsample as fs
from fastsample.models import GaussianMixture
from fastsample.results import environment, markdown_table

SCHEDULE = "logsnr_uniform"
SOLVERS = ("ddim", "dpmpp_2m", "unipc", "ipndm")


# --------------------------------------------------------------------- hand-written solvers
#
# Every solver here is a linear multistep method: step i calls the denoiser once, D_i = D(x_i, t_i),
# and x_{i+1} = W[i] . (x_i, D_i, H_1, ..., H_K) with H the last K pushed values (D_{i-1}, ...,
# or iPNDM's noise predictions eps = (x - alpha D) / sigma). The builders below return W as
# float64 NumPy rows over that basis, written from the papers' updates in log-SNR lam = log(a/s).


class Table(NamedTuple):
    times: np.ndarray  # (n + 1,) the grid
    W: np.ndarray  # (n, 2 + K) coefficients of x_i, D_i, H_1..H_K in x_{i+1}
    push: np.ndarray | None  # (n, 2) coefficients of x_i, D_i in the value pushed to H (None: D_i)


def _on_host(process, times):
    """``(lam, alpha, sigma)`` at ``times``, NumPy float64."""
    with jax.enable_x64(True):
        t = jnp.asarray(times, jnp.float64)
        return tuple(np.asarray(f(t), np.float64) for f in (process.log_snr, process.alpha, process.sigma))


def _phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_j z^j / (j + k)!`` (``phi_1 = expm1(z) / z``, ``phi_(k+1) = (phi_k - 1/k!) / z``)."""
    out = math.expm1(z) / z
    for j in range(1, k):
        out = (out - 1.0 / math.factorial(j)) / z
    return out


def _order(i: int, n: int, order: int) -> int:
    """Warm-up (order <= i + 1) and, on grids under 15 steps, lower-order final steps (order <= n - i)."""
    return min(order, i + 1, n - i if n < 15 else order)


def ddim(times, lam, a, s) -> Table:
    """DDIM (Song et al. 2021) = DPM-Solver++(1): ``x' = (s'/s) x - a' expm1(-h) D``."""
    X, D = np.eye(2)
    h = np.diff(lam)
    W = [s[i + 1] / s[i] * X - a[i + 1] * np.expm1(-h[i]) * D for i in range(len(h))]
    return Table(times, np.stack(W), None)


def dpmpp_2m(times, lam, a, s) -> Table:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): with ``r = h_prev / h``,
    ``x' = (s'/s) x - a' expm1(-h) ((1 + 1/(2r)) D - 1/(2r) D_prev)``; first and last step order 1."""
    X, D, D1 = np.eye(3)
    h, n = np.diff(lam), len(lam) - 1
    W = []
    for i in range(n):
        d = D if _order(i, n, 2) == 1 else D + h[i] / (2 * h[i - 1]) * (D - D1)
        W.append(s[i + 1] / s[i] * X - a[i + 1] * np.expm1(-h[i]) * d)
    return Table(times, np.stack(W), None)


def unipc(times, lam, a, s) -> Table:
    """UniPC-2 with B(h) = expm1(-h) ("bh2"), data prediction (Zhao et al. 2023): the UniC corrector
    of x_i with D_i (UniC-p after a predictor step of order p), then the UniP-2 predictor
    from the corrected point with the same D_i; orders as DPM-Solver++(2M); the last point is not
    corrected. With ``r_k = (lam_(i-k) - lam_i) / h`` and ``D1_k = (D_(i-k) - D_i) / r_k``:
    ``x' = (s'/s) x - a' expm1(-h) D_i - a' B(h) sum_k rho_k D1_k``."""
    X, D, D1, D2 = np.eye(4)
    h, n = np.diff(lam), len(lam) - 1
    order = [_order(i, n, 2) for i in range(n)]

    def predictor(i, m0, m1):
        """``sum_k rho_k D1_k`` of UniP at step i (``m0`` = D_i, ``m1`` = D_(i-1)): rho = 1/2 for order 2."""
        return 0.5 * (m1 - m0) / ((lam[i - 1] - lam[i]) / h[i]) if order[i] == 2 else 0 * X

    W = []
    for i in range(n):
        x = X
        if i > 0:  # UniC at x_i: redo step i - 1 with D_i at r = 1; the predicted x_i only differs in its sum
            hh = -h[i - 1]
            B = math.expm1(hh)
            b = [math.factorial(k) * hh * _phi(k + 1, hh) / B for k in (1, 2)]
            if order[i - 1] == 1:
                corr = 0.5 * (D - D1)
            else:  # rho solves [[1, 1], [r, 1]] rho = b (the earlier output at r, the new one at 1)
                r = (lam[i - 2] - lam[i - 1]) / h[i - 1]
                rho = (b[0] - b[1]) / (1 - r)
                corr = rho * (D2 - D1) / r + (b[0] - rho) * (D - D1)
            x = X + a[i] * B * (predictor(i - 1, D1, D2) - corr)
        W.append(s[i + 1] / s[i] * x - a[i + 1] * np.expm1(-h[i]) * (D + predictor(i, D, D1)))
    return Table(times, np.stack(W), None)


AB = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def ipndm(times, lam, a, s) -> Table:
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth of order min(4, i + 1) with equal-step
    coefficients on the noise predictions eps = (x - a D) / s, the derivative of x / a in
    rho = s / a: ``x' = (a'/a) x + a' (rho' - rho) eps'`` (``a' (rho' - rho) = -s' expm1(lam' - lam)``)."""
    X, D, *E = np.eye(5)
    n = len(lam) - 1
    W = []
    for i in range(n):
        eps = [X / s[i] - a[i] / s[i] * D, *E]
        e = sum(c * v for c, v in zip(AB[min(4, i + 1) - 1], eps, strict=False))
        W.append(a[i + 1] / a[i] * X - s[i + 1] * np.expm1(lam[i + 1] - lam[i]) * e)
    return Table(times, np.stack(W), np.stack([1 / s[:n], -a[:n] / s[:n]], 1))


BUILDERS = {"ddim": ddim, "dpmpp_2m": dpmpp_2m, "unipc": unipc, "ipndm": ipndm}


def hand_written(denoiser, table: Table, dtype, as_argument: bool = False):
    """``x_T -> x_0``: a jitted ``lax.scan`` over the steps of ``table`` (its rows as scan inputs).
    ``as_argument``: the denoiser is an argument of the jitted function (as the library's own
    ``jit`` gets it in an eager ``sample`` call, and as a network's parameters usually are) instead
    of closed over (its arrays constants of the program, which XLA can fold)."""
    K = table.W.shape[1] - 2
    xs = jax.tree.map(lambda v: jnp.asarray(v, dtype), (table.times[:-1], table.W, table.push))

    def body(carry, row, denoiser):
        x, hist = carry
        t, w, push = row
        d = denoiser(x, t)
        x1 = w[0] * x + w[1] * d
        for j in range(K):
            x1 = x1 + w[2 + j] * hist[j]
        new = d if push is None else push[0] * x + push[1] * d
        return (x1, (new, *hist[:-1]) if K else ()), None

    def scan(x, den):
        def step(carry, row):
            return body(carry, row, den)

        return jax.lax.scan(step, (x, (jnp.zeros_like(x),) * K), xs)[0][0]

    if as_argument:
        run = eqx.filter_jit(scan)
        return lambda x: run(x, denoiser)
    return jax.jit(lambda x: scan(x, denoiser))


# ------------------------------------------------------------------------------ measurements


def rel_diff(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def problem(batch, dtype):
    process = fs.VPDiscrete.ddpm_linear()
    denoiser = GaussianMixture.digits().denoiser(process)
    x_T = fs.prior(process, jax.random.PRNGKey(0), (batch, 64), dtype)
    return process, denoiser, x_T


def table_for(name, process, nfe) -> tuple[fs.Grid, Table]:
    g = fs.grid(process, nfe=nfe, schedule=SCHEDULE, solver=name, final_zero=False)
    return g, BUILDERS[name](g.times, *_on_host(process, g.times))


def check_float64(nfe, batch=64, tol=1e-10):
    """The hand-written solvers against ``sample`` in float64."""
    rows = []
    with jax.enable_x64(True):
        process, den, x_T = problem(batch, jnp.float64)
        for name in SOLVERS:
            g, table = table_for(name, process, nfe)
            diff = rel_diff(fs.sample(den, x_T, name, grid=g), hand_written(den, table, jnp.float64)(x_T))
            print(f"float64 parity {name}: {diff:.2e}")
            assert diff < tol, f"{name}: hand-written and sample differ by {diff:.2e} in float64"
            rows.append({"solver": name, "dtype": "float64", "rel_diff": diff})
    return rows


def compile_times(name, nfe, batch) -> dict:
    """``.lower(x).compile()`` of ``jax.jit(lambda x: sample(den, x, name, nfe=nfe))``: the first
    time for this grid (``first_s``: also computes the solver's plan on the host), then again with
    a new ``jit`` (``lower_s``: tracing, the plan cached; ``compile_s``: XLA)."""
    _, den, x_T = problem(batch, jnp.float32)
    out = {"solver": name, "nfe": nfe}
    for key in ("first", "again"):
        fn = jax.jit(lambda x: fs.sample(den, x, name, nfe=nfe, schedule=SCHEDULE))
        t0 = time.perf_counter()
        lowered = fn.lower(x_T)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        if key == "first":
            out["first_s"] = t2 - t0
        else:
            out.update(lower_s=t1 - t0, compile_s=t2 - t1)
    return out


def registry(process, nfe) -> dict:
    """``--all``: ``{name: (solver, grid)}`` of every fixed-grid deterministic solver of the registry
    that can spend exactly ``nfe``."""
    out = {}
    for name in fs.available_solvers():
        try:
            solver = fs.get_solver(name)
            if isinstance(solver, fs.AbstractFastSolver) and not isinstance(solver, fs.AbstractStochasticSolver):
                if isinstance(solver, fs.solvers.AbstractBudgetSolver):  # for diffrax (sample configures it)
                    solver = solver.for_budget(nfe)
                out[name] = solver, fs.grid(process, nfe=nfe, schedule=SCHEDULE, solver=solver)
        except ValueError:
            continue  # needs options (dpm_solver_v3) or cannot spend exactly nfe
    return out


def registry_rows(grids, den, x_T, repeats, t_bare):
    rows, term = [], fs.ProbabilityFlowTerm(den)
    for name, (solver, g) in grids.items():
        ts = g.array(x_T.dtype)
        runs = {
            "jit(sample, grid)": jax.jit(lambda x, g=g, name=name: fs.sample(den, x, name, grid=g)),
            "jit(sample, grid), fused=False": jax.jit(lambda x, g=g, name=name: fs.sample(den, x, name, grid=g,
                                                                                           fused=False)),
            "diffrax + StepTo": jax.jit(lambda x, s=solver, ts=ts: diffrax.diffeqsolve(
                term, s, ts[0], ts[-1], None, x, stepsize_controller=diffrax.StepTo(ts), max_steps=len(ts)).ys[-1]),
        }
        for driver, fn in runs.items():
            t = timeit(fn, x_T, repeats=repeats)
            rows.append({"solver": name, "driver": driver, "ms": 1e3 * t, "vs_bare": t / t_bare})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="also check the hand-written solvers in float64")
    parser.add_argument("--all", action="store_true", help="also time every fixed-grid solver of the registry")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    # compile times first, while the plans of these grids are not cached (nfe=7: one-time warm-up)
    compiles = []
    for name in ("ddim", "unipc"):
        compile_times(name, 7, args.batch)
        compiles += [compile_times(name, nfe, args.batch) for nfe in (10, 100)]
    parity = check_float64(args.nfe) if args.check else []

    process, den, x_T = problem(args.batch, jnp.float32)
    grids = registry(process, args.nfe) if args.all else {}
    times = fs.grid(process, nfe=args.nfe, schedule=SCHEDULE, solver="ddim").array(jnp.float32)

    @jax.jit
    def bare(x):
        return jax.lax.scan(lambda x, t: (den(x, t), None), x, times[:-1])[0]

    rows = []
    for name in SOLVERS:
        g, table = table_for(name, process, args.nfe)
        hand = hand_written(den, table, jnp.float32)
        ref = hand(x_T)
        runs = {
            "bare (denoiser calls only)": bare,
            "hand-written": hand,
            "hand-written, denoiser as argument": hand_written(den, table, jnp.float32, as_argument=True),
            "sample (eager)": lambda x, name=name: fs.sample(den, x, name, nfe=args.nfe, schedule=SCHEDULE),
            "jit(sample, nfe)": jax.jit(lambda x, name=name: fs.sample(den, x, name, nfe=args.nfe, schedule=SCHEDULE)),
            "jit(sample, grid)": jax.jit(lambda x, name=name, g=g: fs.sample(den, x, name, grid=g)),
            "jit(sample, grid), fused=False": jax.jit(lambda x, name=name, g=g: fs.sample(den, x, name, grid=g,
                                                                                           fused=False)),
        }
        diffs = {}
        for driver, fn in list(runs.items())[2:]:
            diffs[driver] = rel_diff(fn(x_T), ref)
            print(f"float32 parity {name}, {driver}: {diffs[driver]:.2e}")
            assert diffs[driver] < 1e-3, f"{name}, {driver}: differs from the hand-written one by {diffs[driver]:.2e}"
        t = timeit_interleaved(runs, x_T, repeats=args.repeats)  # every driver in each round: drift hits all alike
        t_hand, t_arg = t["hand-written"], t["hand-written, denoiser as argument"]
        t_bare = t["bare (denoiser calls only)"]
        for driver in runs:
            rows.append({"solver": name, "driver": driver, "ms": 1e3 * t[driver], "vs_hand": t[driver] / t_hand,
                         "vs_hand_arg": t[driver] / t_arg, "vs_bare": t[driver] / t_bare,
                         "rel_diff": diffs.get(driver, 0.0 if driver == "hand-written" else None)})
    others = registry_rows(grids, den, x_T, args.repeats, t_bare)

    env = environment()
    result = {"benchmark": "overhead", "batch": args.batch, "nfe": args.nfe, "schedule": SCHEDULE,
              "final_zero": False, "dtype": "float32", "repeats": args.repeats, "environment": env,
              "timing": rows, "compile": compiles, "parity_float64": parity, "registry": others}
    md = (f"## Driver overhead (digits mixture, VPDiscrete, batch {args.batch}, NFE {args.nfe}, {SCHEDULE}, "
          f"float32, {env['backend']})\n\n" + markdown_table(rows)
          + "\n## Trace and compile time of `jax.jit(lambda x: sample(den, x, solver, nfe=N))`\n\n"
          + markdown_table(compiles))
    if parity:
        md += "\n## Hand-written vs `sample` in float64\n\n" + markdown_table(parity)
    if others:
        md += "\n## Every fixed-grid deterministic solver\n\n" + markdown_table(others)
    md += "\n## Environment\n\n" + markdown_table([env])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2))
    (args.out / "overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

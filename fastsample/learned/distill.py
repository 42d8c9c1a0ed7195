"""Closed-form learned solvers: per-evaluation corrections fitted by least squares.

Both methods replace some data predictions ``D_k`` fed to the base solver by
``D_k + sum_q gamma_kq (D_{k-q+1} - D_{k-q})`` and fit the ``gamma`` of one evaluation at a time,
in order, so that the next evaluation point (or the sample) matches a target; each fit is a
linear least-squares problem because that point is linear in ``gamma``.

- D-ODE (Distilling ODE Solvers of Diffusion Models into Smaller Steps, Kim et al., 2023): one
  scalar per model evaluation (``q = 1``), the target a teacher: the base solver with 10x the
  steps, from the same noise.
- IIA (On Accelerating Diffusion-Based Sampling Process via Improved Integration Approximation,
  Zhang et al., 2023): up to two coefficients per step on its last evaluation, the target the
  base solver run on ``M`` fine sub-steps from the student's own state at the start of the step
  (a local integration approximation). IIA-DDIM, IIA-EDM (``heun``), IIA-DPM-Solver
  (``dpmpp_2m``).

The result is a :class:`~fastsample.learned.program.ProgramSolver`.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..processes import AbstractProcess
from ..sampling import SaveAt, sample, solve
from .program import LinearProgram, ProgramSolver, extract_program

__all__ = ["fit_dode", "fit_iia", "refine_grid"]


def refine_grid(process: AbstractProcess, ts, factor: int) -> np.ndarray:
    """``ts`` with every interval cut into ``factor`` pieces, uniform in the half log-SNR (uniform
    in ``t`` for an interval that ends at ``t = 0``); the original points are kept exactly."""
    ts = np.asarray(ts, np.float64)
    if factor < 1:
        raise ValueError(f"factor must be >= 1; got {factor}.")
    fine = [ts[:1]]
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        if t1 == 0.0:  # the final denoising step stays one step (times below t_min do not exist)
            piece = np.array([0.0])
        else:
            lam = np.linspace(float(process.log_snr(jnp.asarray(t0))), float(process.log_snr(jnp.asarray(t1))),
                              factor + 1)[1:-1]
            inner = np.asarray([float(process.t_from_log_snr(jnp.asarray(v))) for v in lam])
            piece = np.concatenate([inner, [t1]])
        fine.append(piece)
    return np.concatenate(fine)


def _mixing(m: int, rows: dict, dtype):
    """``M`` with ``D_tilde = M D``: identity plus, for evaluation ``k``, ``sum_q gamma_q
    (e_{k-q+1} - e_{k-q})``."""
    M = jnp.eye(m, dtype=dtype)
    for k, gammas in rows.items():
        for q, g in enumerate(gammas, start=1):
            M = M.at[k, k - q + 1].add(g).at[k, k - q].add(-g)
    return M


@eqx.filter_jit
def _evaluate(denoiser, y, t, cond):
    return denoiser(y, t, cond)


def _fit_rowwise(denoiser, program: LinearProgram, x_T, cond, corrections: dict[int, int], target_fn):
    """Fit the corrections ``{evaluation k: number of differences}`` in order; ``target_fn(k, ys)``
    returns the target for evaluation point ``k + 1`` (the sample when ``k + 1 = m``)."""
    m = program.nfe
    a, B = jnp.asarray(program.a, x_T.dtype), jnp.asarray(program.B, x_T.dtype)
    fitted: dict[int, list] = {}
    D, ys = [], []

    def point(r, M):
        Bt = B @ M
        return a[r] * x_T + sum(Bt[r, j] * D[j] for j in range(len(D)) if j < r)

    for k in range(m):
        M = _mixing(m, fitted, x_T.dtype)
        ys.append(point(k, M))
        D.append(_evaluate(denoiser, ys[k], jnp.asarray(program.times[k], x_T.dtype), cond))
        q = min(corrections.get(k, 0), k)
        if q == 0:
            continue
        y0 = point(k + 1, M)
        basis = [B[k + 1, k] * (D[k - p] - D[k - p - 1]) for p in range(q)]
        G = jnp.stack([b.reshape(-1) for b in basis], axis=1)
        residual = (target_fn(k, ys) - y0).reshape(-1)
        gamma, *_ = jnp.linalg.lstsq(G, residual)
        fitted[k] = [gamma[p] for p in range(q)]
    M = _mixing(m, fitted, x_T.dtype)
    gammas = np.zeros((m, max([len(v) for v in fitted.values()] + [1])))
    for k, v in fitted.items():
        gammas[k, :len(v)] = np.asarray(v)
    return program._replace(B=B @ M), gammas


def _meta(method, base, process, ts):
    return dict(method=method, base=base, process=type(process).__name__, final_zero=bool(np.asarray(ts)[-1] == 0.0))


def fit_dode(denoiser, base: str, ts, x_T, *, cond=None, teacher_factor: int = 10):
    """D-ODE: ``(solver, lambdas)`` for ``base`` on the grid ``ts``, fitted on the noise batch
    ``x_T`` against the base solver on ``ts`` refined ``teacher_factor`` times."""
    process = denoiser.process
    program = extract_program(base, process, ts)
    fine = refine_grid(process, ts, teacher_factor)
    traj = solve(denoiser, x_T, base, timesteps=jnp.asarray(fine, x_T.dtype), cond=cond,
                 saveat=SaveAt(steps=True)).trajectory
    times = np.concatenate([np.asarray(program.times), [float(program.t_end)]])
    index = [int(np.argmin(np.abs(fine - t))) for t in times]
    if max(abs(fine[i] - t) for i, t in zip(index, times, strict=True)) > 1e-12:
        raise ValueError(f"{base} evaluates off its grid; D-ODE needs teacher states at its evaluation times.")
    program_fit, lambdas = _fit_rowwise(denoiser, program, x_T, cond, dict.fromkeys(range(1, program.nfe), 1),
                                        lambda k, ys: traj[index[k + 1]])
    solver = ProgramSolver.from_program(program_fit, **_meta("dode", base, process, ts))
    return solver, lambdas[:, 0]


def fit_iia(denoiser, base: str, ts, x_T, *, cond=None, substeps: int = 10, terms: int = 2):
    """IIA: ``(solver, gammas)`` for ``base`` on ``ts``, with ``terms`` (1 or 2) coefficients on
    the last evaluation of each step, fitted against ``base`` on ``substeps`` fine steps from
    the student's state at the start of that step."""
    if terms not in (1, 2):
        raise ValueError(f"terms must be 1 or 2; got {terms}.")
    process = denoiser.process
    ts = np.asarray(ts, np.float64)
    program = extract_program(base, process, ts)
    step_of = program.step_of
    first = {s: step_of.index(s) for s in set(step_of)}
    last = {s: len(step_of) - 1 - step_of[::-1].index(s) for s in set(step_of)}

    def target(k, ys):
        step = step_of[k]
        fine = refine_grid(process, ts[step:step + 2], substeps)
        return sample(denoiser, ys[first[step]], base, timesteps=jnp.asarray(fine, ys[0].dtype), cond=cond)

    corrections = {last[s]: terms for s in last}
    program_fit, gammas = _fit_rowwise(denoiser, program, x_T, cond, corrections, target)
    return ProgramSolver.from_program(program_fit, **_meta("iia", base, process, ts)), gammas

"""DC-Solver: dynamic compensation of multistep samplers, fitted ratios and their cascade regression.

Zhao, Wang, Zhou, Lu: DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic
Compensation (ECCV 2024, arXiv:2409.03755), Sec. 3; the reference code (github.com/wl-zhao/DC-Solver)
fixes the details followed here.

**Dynamic compensation.** Before step ``i`` (from ``t_i``) of a multistep solver, the newest model
output ``m_i`` (in the solver's prediction, evaluated at ``t_i``) is replaced by the Lagrange
interpolant through the ``K + 1`` newest outputs, evaluated at a time shifted by the compensation
ratio ``rho_i``:

    m~_i = sum_{k=0}^{K} L_k(tau_i) m_{i-k},      tau_i = t_{i-1} + rho_i (t_i - t_{i-1}),
    L_k(tau) = prod_{j != k} (tau - t_{i-j}) / (t_{i-k} - t_{i-j}),

with the earlier outputs ``m_{i-k}`` themselves the compensated ones (they are what the history
holds). The interpolation variable is the time ``t`` (the paper's timestep; Lagrange interpolation
and ``tau`` are unchanged by an affine map of ``t``), ``K = 2`` by default; ``variable="lambda"``
interpolates in the half log-SNR instead. ``rho_i = 1`` gives ``tau_i = t_i`` and ``m~_i = m_i``:
the base solver. Steps with fewer than ``K`` earlier outputs (the first ``K``) are not compensated.

For UniPC (the paper's target) the compensated output drives the predictor UniP and is what the
history keeps (so the next corrector's ``m_prev`` and every later difference use it), while the
corrector UniC that runs before step ``i`` uses the raw ``m_i`` as its new output: the
misalignment DC-Solver compensates is the one between ``m_i``, evaluated at the predicted point,
and the corrected point the predictor continues from. For predictor-only multistep solvers
(``dpmpp_2m``, ``dpmpp_3m``, ...) the compensation is a plug-in: the compensated output replaces
the raw one everywhere.

With the ratios fixed the compensated output is a linear combination of model outputs, so a DC
solver is still a :class:`~fastsample.learned.program.LinearProgram`: :meth:`DCSolver.program`
extracts it and :func:`fit_dc_solver` returns it as a saveable
:class:`~fastsample.learned.program.ProgramSolver`.

**Fitting** (the paper's search): on about 10 noises, with the exact trajectory as ground truth,
the ratios are found one step at a time, in order: ``rho_i`` minimises the mean squared distance
between the state the sampler reaches at ``t_{i+1}`` (after UniC's correction there, which uses the
model output at the predicted point) and the true state at ``t_{i+1}``, earlier ratios fixed;
Adam(W) with learning rate 0.1 from ``rho_i = 1``.

**Cascade polynomial regression** (CPR): the ratio of step ``i`` under ``n`` steps and
guidance scale ``w`` is a polynomial in the normalised step ``x = (i + 1) / n`` whose coefficients
are polynomials in ``g = w / 12`` whose coefficients are polynomials in ``nu = n / 50`` (degree 2
each in the reference code). The cascade is linear in its innermost coefficients:
``rho = sum_abc theta_abc x^a g^b nu^c``, so :class:`CascadeRegression` fits ``theta`` by linear
least squares on ratios searched at a few configurations and predicts the ratios of unseen ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..denoisers import Denoiser
from ..grid import Grid
from ..loop import Record, run
from ..sampling import grid as build_grid
from ..sampling import sample
from ..solvers import (
    AbstractFittedSolver,
    AbstractLinearSolver,
    AbstractStochasticSolver,
    AbstractWrapper,
    get_solver,
)
from ..solvers.exponential import AbstractMultistepSolver, History
from ..solvers.unipc import UniPC, unic_correct
from .io import model_fingerprint
from .program import LinearProgram, ProgramSolver, extract_program
from .reference import ReferenceSet

__all__ = [
    "CascadeRegression",
    "DCReport",
    "DCSolver",
    "DCState",
    "compensate",
    "fit_dc_solver",
    "lagrange_weights",
]

VARIABLES = ("t", "lambda")
OBJECTIVES = ("greedy", "endpoint")


def lagrange_weights(nodes, tau):
    """``L_k(tau) = prod_{j != k} (tau - s_j) / (s_k - s_j)`` for distinct ``nodes`` ``s_0..s_K``:
    the polynomial of degree ``K`` through ``(s_k, v_k)`` takes the value ``sum_k L_k(tau) v_k`` at
    ``tau``. Returns shape ``(K + 1,)``. At ``tau = s_0`` the weights are exactly ``(1, 0, ..., 0)``."""
    nodes = [jnp.asarray(s) for s in nodes]
    out = []
    for k, sk in enumerate(nodes):
        w = jnp.ones_like(jnp.asarray(tau))
        for j, sj in enumerate(nodes):
            if j != k:
                w = w * (tau - sj) / (sk - sj)
        out.append(w)
    return jnp.stack(out)


def compensate(m, node, hist: History, ratio, order: int):
    """DC-Solver's compensated output ``m~ = sum_k L_k(tau) m_k`` (see the module docstring): ``m``
    the newest output at ``node``, the ``order`` (``K``) earlier ones newest first in ``hist``
    (``hist.ells`` their nodes), ``tau = node + (ratio - 1) (node - s_1)`` (``= s_1 + ratio (node -
    s_1)``, written so that ``ratio = 1`` gives ``node`` exactly). Returns ``m`` itself while ``hist``
    holds fewer than ``order`` outputs."""
    on = hist.count >= order
    nodes = [node]
    for k in range(order):
        # before the history fills, distinct finite dummies keep values and gradients finite
        nodes.append(jnp.where(on, hist.ells[k], node - (k + 1.0)))
    tau = node + (ratio - 1.0) * (node - nodes[1])
    w = lagrange_weights(nodes, tau).astype(m.dtype)
    out = w[0] * m
    for k in range(order):
        out = out + w[k + 1] * hist.values[k]
    return jnp.where(on, out, m)


class DCState(NamedTuple):
    """State of :class:`DCSolver`: the base solver's state and the compensated outputs with their
    nodes (``t`` or ``lambda``; in ``History.ells``), whose ``step`` counts the steps taken."""

    base: Any
    dc: History


class DCSolver(AbstractWrapper, AbstractLinearSolver, AbstractFittedSolver):
    """Dynamic compensation (DC-Solver, Zhao et al. 2024) around a multistep solver ``base`` (a
    registry name or instance: ``unipc``, ``unipc_3``, ``dpmpp_2m``, ``dpmpp_3m``, ...): before step
    ``i`` the newest output is replaced by its order-``dc_order`` Lagrange interpolant at the time
    shifted by ``ratios[i]`` (module docstring). ``ratios`` has one entry per step (default: ones,
    the base solver); the first ``dc_order`` entries have no effect. The ratios are pytree leaves:
    new values do not recompile, and gradients flow to them. Same NFE as ``base``; any grid with
    ``len(ratios)`` steps."""

    base: AbstractMultistepSolver
    ratios: jax.Array
    timesteps: jax.Array | None
    dc_order: int = eqx.field(static=True)
    variable: str = eqx.field(static=True)
    process: str = eqx.field(static=True)
    prefix: ClassVar[str] = "dc"

    def __init__(self, base="unipc", ratios=None, *, steps: int | None = None, dc_order: int = 2,
                 variable: str = "t", timesteps=None, process: str = ""):
        base = get_solver(base)
        if not isinstance(base, AbstractMultistepSolver) or isinstance(base, AbstractStochasticSolver):
            raise ValueError(f"DC-Solver compensates a deterministic multistep solver (unipc, unipc_3, dpmpp_2m, "
                             f"dpmpp_3m, deis, ipndm, ...); got {base.name}.")
        if ratios is None:
            if not isinstance(steps, int) or steps < 1:
                raise ValueError(f"give the ratios, or the number of steps (a positive integer); got steps={steps!r}.")
            ratios = jnp.ones((steps,))
        elif steps is not None and jnp.shape(ratios) != (steps,):
            raise ValueError(f"steps={steps} but {jnp.shape(ratios)[0] if jnp.ndim(ratios) else 0} ratios were given.")
        self.base = base
        self.ratios = jnp.asarray(ratios)
        self.timesteps = None if timesteps is None else jnp.asarray(timesteps)
        self.dc_order = dc_order
        self.variable = variable
        self.process = process

    def __check_init__(self):
        if self.ratios.ndim != 1 or self.ratios.shape[0] < 1:
            raise ValueError(f"ratios must be a 1-D array with one ratio per step; got shape {self.ratios.shape}.")
        if not isinstance(self.dc_order, int) or self.dc_order < 1:
            raise ValueError(f"dc_order (K) must be a positive integer; got {self.dc_order!r}.")
        if self.variable not in VARIABLES:
            raise ValueError(f"variable must be one of {', '.join(VARIABLES)}; got {self.variable!r}.")
        if self.timesteps is not None and self.timesteps.shape != (self.ratios.shape[0] + 1,):
            raise ValueError(f"timesteps must hold one more time than there are ratios ({self.ratios.shape[0] + 1}); "
                             f"got shape {self.timesteps.shape}.")

    @property
    def steps(self) -> int:
        return int(self.ratios.shape[0])

    def order(self, terms):
        return self.base.order

    def fitted_grid(self, process, nfe):
        """The grid the ratios were fitted on (``None``: any grid of ``len(ratios)`` steps); refuses
        another process or budget, as fitted programs do."""
        if self.timesteps is None:
            return None
        if self.process and type(process).__name__ != self.process:
            raise ValueError(f"this DC solver was fitted for process {self.process}; got {type(process).__name__}. "
                             "Fit it again for this process.")
        grid = Grid.from_times(np.asarray(self.timesteps, np.float64))
        fitted = grid.nfe(self)
        if nfe is not None and nfe != fitted:
            raise ValueError(f"this DC solver was fitted for nfe={fitted}; got nfe={nfe}. Pass nfe=None (or the "
                             "fitted NFE), or fit (or predict with CascadeRegression) ratios for this budget.")
        return grid

    def _node(self, process, t):
        return t if self.variable == "t" else process.log_snr(t)

    def check_grid(self, process, times) -> None:
        self.base.check_grid(process, times)
        self._check_steps(len(times) - 1)

    def _check_steps(self, num_steps):
        if isinstance(num_steps, int) and num_steps != self.steps:
            raise ValueError(f"{self.name} has {self.steps} ratios (one per step); the grid has {num_steps} steps. "
                             f"Use nfe={self.nfe(self.steps)} or a grid of {self.steps + 1} times.")

    def init_state(self, denoiser, x, cond, t_end, num_steps):
        self._check_steps(num_steps)
        base = self.base.init_state(denoiser, x, cond, t_end, num_steps)
        return DCState(base, History.empty(self.dc_order, x, t_end, num_steps))

    def update(self, denoiser, t0, t1, x, cond, state: DCState, noise=None):
        base, process = self.base, denoiser.process
        m = base.evaluate(denoiser, t0, x, cond)
        node = jnp.asarray(self._node(process, t0), x.dtype)
        ratio = self.ratios[jnp.minimum(state.dc.step, self.steps - 1)].astype(x.dtype)
        m_dc = compensate(m, node, state.dc, ratio, self.dc_order)
        stepper = base
        if isinstance(base, UniPC) and base.use_corrector:
            # UniC corrects with the raw output; the predictor (and the history) take the compensated
            # one: UniPC's own step with its correction switched off (same history and weights).
            x = unic_correct(process, base.prediction, base.variant, base.corrector_scale, t0, x, m, state.base)
            stepper = dataclasses.replace(base, use_corrector=False)
        x1, base_state = stepper.advance(process, t0, t1, x, m_dc, state.base)
        return x1, DCState(base_state, state.dc.push(m_dc, node))

    def start_point(self, state: DCState, x):
        """The state the last step started from: UniPC's corrected point, else ``x`` (its input)."""
        if isinstance(self.base, UniPC) and self.base.use_corrector:
            return state.base.x_prev
        return x

    def program(self, process, ts=None) -> LinearProgram:
        """This solver on the grid ``ts`` (default: its fitted grid) as a :class:`LinearProgram`."""
        return extract_program(self, process, self._grid(ts))

    def _grid(self, ts):
        if ts is None:
            if self.timesteps is None:
                raise ValueError("this DC solver has no fitted grid: pass the timesteps.")
            ts = self.timesteps
        return np.asarray(ts, np.float64)

    def to_program_solver(self, denoiser: Denoiser, ts=None, **meta) -> ProgramSolver:
        """The saveable :class:`ProgramSolver` of this solver on ``ts`` (default: its fitted grid),
        ``method="dc_solver"``; it samples like this solver (up to rounding)."""
        ts = self._grid(ts)
        meta = {"method": "dc_solver", "base": self.base.name, "process": type(denoiser.process).__name__,
                "final_zero": bool(ts[-1] == 0.0), "fingerprint": model_fingerprint(denoiser), **meta}
        return ProgramSolver.from_program(self.program(denoiser.process, ts), **meta)


def _states(solver: DCSolver, denoiser, x_T, ts, cond):
    """The sampler's state at ``ts[1:]`` (``(steps, *x_T.shape)``): at inner points the state after
    UniC's correction there (the point the next predictor starts from), at the end the sample."""
    x, out = run(solver, denoiser, ts, x_T, cond, record=Record(trajectory=True, states=True))
    inputs = jnp.concatenate([x_T[None], out["x"][:-1]])
    starts = jax.vmap(solver.start_point)(out["states"], inputs)
    return jnp.concatenate([starts[1:], x[None]])


class DCReport(NamedTuple):
    """What :func:`fit_dc_solver` did: the base solver, NFE, grid and fitted ratios, the held-out RMSE
    of the base solver and of the fitted one, and per optimisation (``history``) the training loss
    before and after it (``{"step", "loss_base", "loss_fitted", "ratio"}``; one entry for the
    ``endpoint`` objective)."""

    base: str
    nfe: int
    timesteps: np.ndarray
    ratios: np.ndarray
    base_rmse: float
    fitted_rmse: float
    history: list


def _rmse(x, y) -> float:
    return float(jnp.sqrt(jnp.mean((x - y) ** 2)))


#: the paper's optimiser (AdamW, learning rate 0.1; no weight decay on one scalar), shared so that
#: repeated fits reuse the compiled search
_ADAM = optax.adam(0.1)


@eqx.filter_jit
def _search(solver: DCSolver, denoiser, x_T, grid, targets, cond, index, mask, opt, iterations: int):
    """``iterations`` steps of ``opt`` on the ratios selected by ``mask``, minimising the squared
    error of the state ``index`` of :func:`_states` to ``targets[index]`` (``targets`` has one entry
    per step, or one for the endpoint). Returns the best ratios seen (the starting ones included),
    their loss and the starting loss."""

    def loss(ratios):
        states = _states(eqx.tree_at(lambda s: s.ratios, solver, ratios), denoiser, x_T, grid, cond)
        return jnp.mean((states[index] - targets[jnp.minimum(index, targets.shape[0] - 1)]) ** 2)

    def body(carry, _):
        r, opt_state = carry
        value, grad = jax.value_and_grad(loss)(r)
        updates, opt_state = opt.update(grad * mask, opt_state, r)
        return (optax.apply_updates(r, updates * mask), opt_state), (value, r)

    start = solver.ratios
    (last, _), (values, seen) = jax.lax.scan(body, (start, opt.init(start)), None, length=iterations)
    values = jnp.concatenate([values, loss(last)[None]])
    seen = jnp.concatenate([seen, last[None]])
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    best = jnp.argmin(values)
    return seen[best], values[best], values[0]


def fit_dc_solver(
    denoiser: Denoiser,
    train: ReferenceSet,
    val: ReferenceSet,
    nfe: int,
    *,
    base: str = "unipc",
    schedule: str = "logsnr_uniform",
    schedule_options: dict | None = None,
    final_zero: bool = True,
    grid: Grid | None = None,
    timesteps=None,
    dc_order: int = 2,
    variable: str = "t",
    objective: str = "greedy",
    iterations: int = 40,
    optimizer: optax.GradientTransformation | None = None,
    cond=None,
    val_cond=None,
) -> tuple[DCSolver, DCReport]:
    """Fit DC-Solver's compensation ratios for ``denoiser`` at ``nfe`` evaluations.

    ``train`` (about 10 noises suffice, as in the paper) holds the ground truth: with
    ``objective="greedy"`` (the paper's search) its trajectory (``make_reference(...,
    trajectory_points=K)``), and each ratio in turn minimises the error of the state at the end of
    its step (module docstring); ``objective="endpoint"`` fits all ratios at once to the endpoint.
    Each optimisation runs ``iterations`` steps of ``optimizer`` (default Adam, learning rate 0.1)
    from ``rho = 1`` and keeps the best ratios seen, so the training loss never exceeds the base
    solver's. The grid is the base solver's for ``nfe`` on ``schedule`` from the reference's
    ``t_start`` (:func:`fastsample.grid`), or the given ``grid`` (or ``timesteps``). ``val`` is held out: it is
    sampled with the base and the fitted solver and reported. ``cond`` / ``val_cond`` (default
    ``cond``) condition the model on the training / held-out noises (e.g. one class label each).

    Returns ``(solver, report)``: the :class:`DCSolver` with the fitted ratios and grid (it samples
    through :func:`fastsample.sample` on that grid; :meth:`DCSolver.to_program_solver` makes the
    saveable :class:`ProgramSolver`) and a :class:`DCReport`.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer; got {iterations!r}.")
    if objective == "greedy" and train.lams.shape[0] < 2:
        raise ValueError("objective='greedy' fits each step to the true trajectory: make the training set with "
                         "make_reference(..., trajectory_points=200) (or use objective='endpoint').")
    process = denoiser.process
    if timesteps is not None:
        if grid is not None:
            raise ValueError("give either `grid` or `timesteps`, not both.")
        grid = Grid.from_times(timesteps, process)
    if grid is None:
        if final_zero != (train.t_end == 0.0):
            raise ValueError(f"final_zero={final_zero} needs reference endpoints at t {'= 0' if final_zero else '> 0'};"
                             f" these are at t = {train.t_end}.")
        grid = build_grid(process, nfe, schedule, solver=base, final_zero=final_zero,
                          **{"t_start": train.t_start, **(schedule_options or {})})
    grid.check(process)
    ts = np.asarray(grid.times, np.float64)
    dtype = train.x_T.dtype
    solver = DCSolver(base, jnp.ones((ts.shape[0] - 1,), dtype), dc_order=dc_order, variable=variable,
                      timesteps=jnp.asarray(ts, dtype), process=type(process).__name__)
    steps = solver.steps
    if solver.nfe(steps, bool(ts[-1] == 0.0)) != nfe:
        raise ValueError(f"the grid has {steps} steps, which cost {solver.nfe(steps)} evaluations, not nfe={nfe}.")
    if not np.isclose(ts[-1], train.t_end, rtol=1e-12, atol=0):
        raise ValueError(f"the grid ends at t = {ts[-1]} but the reference endpoints are at t = {train.t_end}.")
    grid = jnp.asarray(ts, dtype)
    if objective == "greedy":
        targets = jnp.stack([train.at(process, grid[i + 1]) for i in range(steps - 1)] + [train.x_end])
    else:
        targets = train.x_end[None]
    opt = optimizer or _ADAM
    history = []
    if objective == "greedy":
        for i in range(min(dc_order, steps), steps):
            mask = jnp.zeros((steps,), dtype).at[i].set(1.0)
            ratios, fitted, start = _search(solver, denoiser, train.x_T, grid, targets, cond, jnp.asarray(i), mask, opt,
                                            iterations)
            solver = eqx.tree_at(lambda s: s.ratios, solver, ratios)
            history.append({"step": i, "loss_base": float(start), "loss_fitted": float(fitted),
                            "ratio": float(ratios[i])})
    elif steps > dc_order:
        mask = (jnp.arange(steps) >= dc_order).astype(dtype)
        ratios, fitted, start = _search(solver, denoiser, train.x_T, grid, targets, cond, jnp.asarray(steps - 1), mask,
                                        opt, iterations)
        solver = eqx.tree_at(lambda s: s.ratios, solver, ratios)
        history.append({"step": steps - 1, "loss_base": float(start), "loss_fitted": float(fitted)})
    vgrid = jnp.asarray(ts, val.x_T.dtype)
    val_cond = cond if val_cond is None else val_cond
    fitted_x = sample(denoiser, val.x_T, solver, cond=val_cond)
    base_x = sample(denoiser, val.x_T, solver.base, timesteps=vgrid, cond=val_cond)
    report = DCReport(solver.base.name, nfe, ts, np.asarray(solver.ratios), _rmse(base_x, val.x_end),
                      _rmse(fitted_x, val.x_end), history)
    return solver, report


class CascadeRegression(NamedTuple):
    """DC-Solver's cascade polynomial regression (CPR): compensation ratios as a polynomial in the
    normalised step ``x = (i + 1) / nfe``, guidance ``g = w / guidance_norm`` and budget
    ``nu = nfe / nfe_norm`` (the cascade of the paper, written as the tensor-product polynomial it
    equals): ``rho_i = sum_abc coeffs[a, b, c] x^a g^b nu^c``. The first ``warmup`` steps (DC's
    order ``K``) are not compensated and predict 1. Fit with :meth:`fit`."""

    coeffs: np.ndarray  # (degree_step + 1, degree_guidance + 1, degree_nfe + 1)
    warmup: int
    guidance_norm: float
    nfe_norm: float

    @staticmethod
    def _features(steps, nfe, scale, degrees, guidance_norm, nfe_norm):
        x = (np.asarray(steps, np.float64) + 1.0) / nfe
        g, nu = scale / guidance_norm, nfe / nfe_norm
        da, db, dc = degrees
        return np.stack([x**a * g**b * nu**c for a in range(da + 1) for b in range(db + 1) for c in range(dc + 1)],
                        axis=-1)

    @classmethod
    def fit(cls, configs: Sequence[tuple[int, float]], ratios: Sequence, *, degrees=(2, 2, 2), warmup: int = 2,
            guidance_norm: float = 12.0, nfe_norm: float = 50.0) -> CascadeRegression:
        """Least-squares fit (minimum norm where the configurations leave directions undetermined,
        e.g. a single NFE) to ``ratios[j]`` (one per step, steps ``>= warmup`` used) searched at
        ``configs[j] = (nfe, guidance_scale)``. ``degrees``: polynomial degrees in the step, the
        guidance scale and the NFE (the paper's: 2, 2, 2)."""
        configs, ratios = list(configs), [np.asarray(r, np.float64) for r in ratios]
        if not configs or len(configs) != len(ratios):
            raise ValueError(f"need one ratio array per configuration; got {len(configs)} configurations and "
                             f"{len(ratios)} ratio arrays.")
        if (len(degrees) != 3 or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in degrees)):
            raise ValueError(f"degrees must be three non-negative integers (step, guidance, nfe); got {degrees!r}.")
        if not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer; got {warmup!r}.")
        rows, values = [], []
        for (nfe, scale), r in zip(configs, ratios, strict=True):
            if not isinstance(nfe, (int, np.integer)) or nfe <= warmup:
                raise ValueError(f"each configuration's nfe must be an integer above warmup={warmup}; got {nfe!r}.")
            if r.shape != (nfe,) or not np.all(np.isfinite(r)):
                raise ValueError(f"configuration (nfe={nfe}, guidance={scale}) needs {nfe} finite ratios; "
                                 f"got shape {r.shape}.")
            steps = np.arange(warmup, nfe)
            rows.append(cls._features(steps, nfe, float(scale), degrees, guidance_norm, nfe_norm))
            values.append(r[warmup:])
        A, b = np.concatenate(rows), np.concatenate(values)
        theta = np.linalg.lstsq(A, b, rcond=None)[0]
        coeffs = theta.reshape(degrees[0] + 1, degrees[1] + 1, degrees[2] + 1)
        return cls(coeffs, int(warmup), float(guidance_norm), float(nfe_norm))

    @property
    def degrees(self) -> tuple[int, int, int]:
        return tuple(d - 1 for d in self.coeffs.shape)

    def predict(self, nfe: int, guidance_scale: float) -> np.ndarray:
        """The ``nfe`` ratios (one per step; the first ``warmup`` are 1) for an unseen configuration."""
        if not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"nfe must be a positive integer; got {nfe!r}.")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite; got {guidance_scale!r}.")
        steps = np.arange(min(self.warmup, nfe), nfe)
        out = np.ones(nfe)
        out[steps] = self._features(steps, nfe, float(guidance_scale), self.degrees, self.guidance_norm,
                                    self.nfe_norm) @ self.coeffs.ravel()
        return out

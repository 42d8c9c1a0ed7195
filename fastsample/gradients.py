"""Differentiating through samplers: reverse-mode gradients at bounded memory.

``fastsample.sample(..., gradient=MODE)`` chooses how ``jax.grad`` / ``jax.vjp`` of a loss on the
samples is computed, with respect to ``x_T``, every inexact array of the ``Denoiser`` pytree (model
parameters, guidance scale), the conditioning, and (for the first three modes) the time grid and
learned-solver parameters. The forward values are the same in every mode.

Modes (``N`` steps, ``S`` the size of the sampler's carry, ``A`` the activations of one model call):

* ``"full"`` (:class:`Full`): plain ``lax.scan``; stores every step's residuals, ``O(N (S + A))``.
* ``"remat"`` (:class:`Remat`): ``jax.checkpoint`` around each step; stores the ``N`` carries and
  recomputes one step at a time, ``O(N S + A)``; one extra forward pass.
* ``"binomial"`` (:class:`Binomial`): recursive checkpointing with nested checkpointed scans of
  ``branching`` chunks; ``O(branching log_branching(N) S + A)`` memory and ``log_branching(N)``
  forward passes (the ``O(log N)`` memory / ``O(N log N)`` compute class of binomial checkpointing,
  Griewank 1992 / treeverse, without revolve's optimal constants).
  These three differentiate the discrete sampler exactly: their gradients agree to rounding.
* ``"adjoint"`` (:class:`Adjoint`): the continuous adjoint of the probability-flow ODE solved
  backwards on the same grid by an exponential integrator, first order or two-step multistep
  (AdjointDEIS: Efficient Gradients for Diffusion Models, Blasingame and Liu, 2024), or in
  AdjointDPM's reparameterisation (``Adjoint(method="adjointdpm")``; Pan et al., 2023); for
  stochastic solvers the adjoint of the reverse SDE with the noise held fixed (AdjointDEIS's SDE
  case, first order). For the PF-ODE memory is independent of ``N`` (the SDE adjoint keeps one
  state per step, no activations); the gradient is that of the exact flow, up to the adjoint
  solver's discretisation error (order 1 or 2), not the discrete sampler's gradient.
* ``"reversible"`` (:class:`Reversible`): exact gradients of BDIA-DDIM (Zhang, Lewis, Kleijn:
  Exact Diffusion Inversion via Bi-directional Integration Approximation, 2024) without storing
  the trajectory: the backward pass reconstructs each state by inverting the BDIA step. Memory is
  independent of ``N``; gradients equal ``"full"`` up to rounding.

The adjoint, in the half log-SNR ``lambda`` and the data prediction ``D(x, lambda)`` (derived
here; AdjointDEIS writes the same equations with the noise prediction): the PF-ODE is
``d(x / sigma) / d lambda = e^lambda D``. With ``a = dL/dx`` and ``b = sigma a``, the adjoint and the
parameter gradient ``G(lambda) = int_lambda^lambda_end e^l b^T dD/dtheta dl`` obey

    d b / d lambda = -e^lambda sigma (dD/dx)^T b,      d G / d lambda = -e^lambda (dD/dtheta)^T b,

so ``Z = (x / sigma, b, G)`` satisfies ``dZ / d lambda = e^lambda M(Z, lambda)`` with
``M = (D, -sigma J_x^T b, -J_theta^T b)``: one vector-Jacobian product of the model per step
gives all of ``M``. The linear part is integrated exactly; ``M`` is held constant over a step
(order 1, the DDIM / DPM-Solver-1 weight ``e^lambda_s - e^lambda_t``) or extrapolated linearly from
the previous step (order 2, the DPM-Solver++(2M) coefficients). The state ``x`` is re-integrated
backwards alongside (DDIM / 2M inversion). A grid ending at ``t = 0`` ends with the data prediction
at the last positive time; that step's vector-Jacobian product is taken exactly, from the state
before it (kept by the forward pass).

With the noise held fixed, the reverse SDE that a first-order stochastic step with contraction
``rho = e^{-nu h}`` discretises (``nu = eta`` for SDE-DPM-Solver++, ``nu = 1`` for DDPM) is, in
``lambda``, ``dx = ((dlog sigma/dlambda - nu) x + (1 + nu) alpha D) dlambda + noise``; its adjoint
``da/dlambda = -(dlog sigma/dlambda - nu) a - (1 + nu) alpha J_x^T a`` contains no noise, and its
exponential integrator is ``a_t = rho (sigma_s/sigma_t) a_s + (alpha_s^2/alpha_t)(1 - rho e^{-h}) J_x^T a_s``
(``rho = 1``: the PF-ODE's). The states could be reconstructed backwards with the same noise ``w``
(regenerated from the key), ``x_t = (x_s - alpha_s (1 - rho e^{-h}) D(x_s) - w) / (rho sigma_s / sigma_t)``,
but that inversion is unstable: the reverse SDE contracts strongly, so inverting its steps amplifies
every error (on a three-component 2-D mixture with 128 DDPM steps the reconstructed ``x_T`` is off by
about 90). The SDE adjoint therefore keeps the forward states: one state per step, no activations,
memory ``O(N S + A)``.

Gaussian data ``N(mu, s^2 I)``: the exact flow is ``x_t = alpha_t mu + (r_t / r_T)(x_T - alpha_T mu)``
with ``r = sqrt(alpha^2 s^2 + sigma^2)``, so ``d x_0 / d x_T = (r_0 / r_T) I`` (tests/test_gradients.py).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_traced
from .loop import Record, run
from .solvers import AbstractReversibleSolver, AbstractSDESolver, AbstractStochasticSolver

__all__ = [
    "AbstractGradient",
    "Full",
    "Remat",
    "Binomial",
    "Adjoint",
    "Reversible",
    "GRADIENTS",
    "available_gradients",
    "get_gradient",
    "checkpointed_scan",
    "ADJOINT_METHODS",
]


# ------------------------------------------------------------------------------------------ modes


class AbstractGradient(eqx.Module):
    """How reverse-mode gradients flow through a sampler (a memory mode).

    Scan modes (``custom = False``) iterate the sampler's own steps (:func:`fastsample.loop.run`)
    with :meth:`scan`; custom-VJP modes replace the whole solve by :meth:`solve`, a
    ``jax.custom_vjp`` whose forward pass is the same loop and whose backward pass stores nothing
    per step.
    """

    name: ClassVar[str]
    custom: ClassVar[bool] = False

    def check(self, solver, *, saves_steps: bool = False) -> None:
        """Raise ``ValueError`` if this mode cannot differentiate ``solver``."""

    def scan(self, body, init, length: int):
        """``lax.scan(body, init, jnp.arange(length))`` with this mode's checkpointing."""
        raise NotImplementedError(f"gradient mode {self.name!r} replaces the scan (see `solve`).")

    def solve(self, solver, denoiser, x, ts, cond, noise=None, plan=None, ends_at_zero: bool = False):
        """``(x_final, finite)``: the sampler's output and per-step finiteness flags. ``noise`` is
        the sampler's :class:`fastsample.noise.AbstractNoise` (stochastic solvers; step ``i`` uses
        ``noise.at_step(i, ts[i], ts[i + 1])`` as in ``fastsample.sample``); ``plan`` the solver's
        plan on a concrete grid (:mod:`fastsample.plan`); ``ends_at_zero`` whether ``ts`` ends at 0."""
        raise NotImplementedError(f"gradient mode {self.name!r} runs the sampler's scan (see `scan`).")


class Full(AbstractGradient):
    """Plain ``lax.scan``: every step's residuals are stored (fastest, most memory).

    ``unroll`` is ``lax.scan``'s: ``True`` unrolls the whole loop into straight-line code, which
    lets XLA fuse one step's solver arithmetic with the next step's model input and drops the
    loop's per-iteration bookkeeping (worth it on accelerators for few steps of a small model;
    ``scripts/bench_accelerator`` measures it). The samples are the same."""

    unroll: int | bool = eqx.field(static=True, default=1)
    name = "full"

    def __check_init__(self):
        if not (self.unroll is True or (isinstance(self.unroll, int) and not isinstance(self.unroll, bool)
                                        and self.unroll >= 1)):
            raise ValueError(f"Full unroll must be a positive integer or True; got {self.unroll!r}.")

    def scan(self, body, init, length: int):
        return jax.lax.scan(body, init, jnp.arange(length), unroll=self.unroll)


class Remat(AbstractGradient):
    """``jax.checkpoint`` around each step: the backward pass keeps one carry per step and
    recomputes the step's activations (one extra forward pass)."""

    name = "remat"

    def scan(self, body, init, length: int):
        return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), init, jnp.arange(length))


class Binomial(AbstractGradient):
    """Recursive checkpointing: the steps are cut into ``branching`` checkpointed chunks, each
    cut again, down to chunks of at most ``branching`` rematerialised steps. The backward pass
    keeps about ``branching`` carries per level (``ceil(log_branching N)`` levels), plus one
    cotangent accumulator for closed-over parameters per level, and recomputes each level once:
    ``O(log N)`` memory for ``O(N log N)`` compute, as binomial checkpointing (Griewank,
    Achieving logarithmic growth of temporal and spatial complexity in reverse automatic
    differentiation, 1992), though not with revolve's optimal schedule."""

    branching: int = eqx.field(static=True, default=2)
    name = "binomial"

    def __check_init__(self):
        if not isinstance(self.branching, int) or self.branching < 2:
            raise ValueError(f"Binomial branching must be an integer >= 2; got {self.branching!r}.")

    def scan(self, body, init, length: int):
        return checkpointed_scan(body, init, length, self.branching)


def checkpointed_scan(body, init, length: int, branching: int = 2):
    """``lax.scan(body, init, jnp.arange(length))`` with recursive checkpointing (see
    :class:`Binomial`). ``body(carry, i) -> (carry, y)``; the ``y`` are stacked as by ``lax.scan``."""
    if not isinstance(length, int | np.integer) or length < 0:
        raise ValueError(f"length must be a non-negative integer; got {length!r}.")
    return _recursive_scan(body, init, jnp.asarray(0, jnp.int32), int(length), branching)


def _recursive_scan(body, carry, start, n: int, b: int):
    if n <= b:  # the leaves are rematerialised steps: one step's activations live at a time
        return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), carry, start + jnp.arange(n, dtype=jnp.int32))
    m, r = divmod(n, b)

    def chunk(c, j):
        return _recursive_scan(body, c, start + j * m, m, b)

    carry, ys = jax.lax.scan(jax.checkpoint(chunk, prevent_cse=False), carry, jnp.arange(b, dtype=jnp.int32))
    ys = jax.tree.map(lambda y: y.reshape((b * m,) + y.shape[2:]), ys)
    if r:
        tail = jax.checkpoint(lambda c: _recursive_scan(body, c, start + b * m, r, b), prevent_cse=False)
        carry, ys_tail = tail(carry)
        ys = jax.tree.map(lambda u, v: jnp.concatenate([u, v]), ys, ys_tail)
    return carry, ys


ADJOINT_METHODS = ("adjointdeis", "adjointdpm")


class Adjoint(AbstractGradient):
    """Continuous adjoint of the sampler's differential equation, solved backwards on the sampling
    grid by an exponential integrator; for the PF-ODE its memory does not grow with the step count.

    ``method="adjointdeis"`` (default; AdjointDEIS: Efficient Gradients for Diffusion Models,
    Blasingame and Liu, 2024): the adjoint in the half log-SNR with the data prediction, of
    ``order`` 1 or 2 (2: the two-step multistep AdjointDEIS-2M). For a stochastic solver it is the
    adjoint of the reverse SDE with the sampler's noise held fixed, which is an ODE (the noise is
    additive): first order only. Its forward states are kept, one per step (inverting stochastic
    steps backwards is unstable), so its memory grows by one state per step, not by the network's
    activations.

    ``method="adjointdpm"`` (AdjointDPM: Adjoint Sensitivity Method for Gradient Backpropagation of
    Diffusion Probabilistic Models, Pan et al., 2023): the PF-ODE reparameterised as
    ``dy/drho = eps(alpha y, t)`` with ``y = x / alpha``, ``rho = sigma / alpha``, and the augmented
    adjoint ``d(a_y, g)/drho = -(a_y^T deps/dy, a_y^T deps/dtheta)`` solved in ``rho`` by Euler
    (``order`` 1) or two-step Adams-Bashforth (2). Deterministic solvers only.

    ``order=None`` means 2 for the PF-ODE and 1 for the SDE. Gradients flow to ``x_T``, the
    denoiser's model parameters and guidance scale, and ``cond``; they are those of the exact flow
    (for the SDE: of the exact solution with the same noise) up to ``O(h^order)``, not the discrete
    sampler's. The time grid, the process and solver parameters have no continuous-adjoint
    gradient: differentiating them is a ``ValueError`` (use ``"full"``, ``"remat"`` or
    ``"binomial"``). The forward pass runs the chosen solver, the backward pass its own adjoint
    solver.
    """

    order: int | None = eqx.field(static=True, default=None)
    method: str = eqx.field(static=True, default="adjointdeis")
    name = "adjoint"
    custom = True

    def __check_init__(self):
        if self.order not in (None, 1, 2) or isinstance(self.order, bool):
            raise ValueError(f"Adjoint order must be 1 or 2 (AdjointDEIS-1, AdjointDEIS-2M), or None (2 for the "
                             f"PF-ODE, 1 for the SDE); got {self.order!r}.")
        if self.method not in ADJOINT_METHODS:
            raise ValueError(f"Adjoint method must be one of {', '.join(ADJOINT_METHODS)}; got {self.method!r}.")

    def check(self, solver, *, saves_steps: bool = False) -> None:
        _check_trajectory(self, saves_steps)
        if not _is_stochastic(solver):
            return
        if self.method != "adjointdeis":
            raise ValueError(f"Adjoint(method={self.method!r}) is the probability-flow ODE's adjoint; {solver.name!r} "
                             "is stochastic: use Adjoint(method='adjointdeis') (the SDE adjoint) or 'full', 'remat', "
                             "'binomial'.")
        if self.order == 2:
            raise ValueError(f"the SDE adjoint (stochastic solver {solver.name!r}) is first order: use "
                             "Adjoint(order=1) or Adjoint().")
        if not isinstance(solver, AbstractSDESolver):
            raise ValueError(
                f"gradient='adjoint' supports the stochastic solvers whose step is an exponential step of a reverse "
                f"SDE plus additive noise (ddpm, ddim with eta > 0, euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde); "
                f"{solver.name!r} is not one: use 'full', 'remat' or 'binomial', which differentiate its fixed noise "
                "path exactly."
            )

    def resolved_order(self, solver) -> int:
        """The order used with ``solver``: ``order``, or 1 (SDE) / 2 (PF-ODE) when it is ``None``."""
        return self.order or (1 if _is_stochastic(solver) else 2)

    def solve(self, solver, denoiser, x, ts, cond, noise=None, plan=None, ends_at_zero: bool = False):
        sde = _is_stochastic(solver)
        if sde:
            self.check(solver)
            if noise is None:
                raise ValueError(f"gradient='adjoint' with the stochastic solver {solver.name!r} needs the sampler's "
                                 "noise source: call Adjoint.solve(..., noise=fastsample.noise.make_noise(...)).")
        return _adjoint_solve((x, denoiser, cond, solver, ts, noise if sde else None),
                              (self.method, self.resolved_order(solver), ends_at_zero), plan)


class Reversible(AbstractGradient):
    """Exact gradients of BDIA-DDIM (``fastsample.BDIADDIM``, ``gamma > 0``) at memory independent
    of the step count: the backward pass inverts each BDIA step (Zhang, Lewis, Kleijn, Exact
    Diffusion Inversion via Bi-directional Integration Approximation, 2024) instead of storing
    it. Gradients flow to everything ``"full"`` differentiates (``x_T``, the denoiser, ``cond``,
    ``gamma`` and the time grid) and equal it up to rounding."""

    name = "reversible"
    custom = True

    def check(self, solver, *, saves_steps: bool = False) -> None:
        _check_custom(self, solver, saves_steps)
        if not isinstance(solver, AbstractReversibleSolver):
            raise ValueError(
                f"gradient='reversible' inverts BDIA-DDIM steps: use solver=fastsample.BDIADDIM(gamma) "
                f"(gamma > 0); got {solver.name!r}. For other solvers "
                "use 'remat', 'binomial' or 'adjoint'."
            )
        if solver.start is not None:
            raise ValueError("gradient='reversible' needs BDIADDIM without `start` (the first step is DDIM).")
        gamma = solver.gamma
        if not is_traced(gamma) and not float(np.asarray(gamma)) > 0:
            raise ValueError(f"gradient='reversible' needs BDIA gamma > 0 (a step is invertible only then); "
                             f"got gamma={float(np.asarray(gamma))}.")

    def solve(self, solver, denoiser, x, ts, cond, noise=None, plan=None, ends_at_zero: bool = False):
        return _reversible_solve((x, denoiser, cond, solver, ts), ends_at_zero, plan)


GRADIENTS: dict[str, type[AbstractGradient]] = {
    cls.name: cls for cls in (Full, Remat, Binomial, Adjoint, Reversible)
}


def available_gradients() -> list[str]:
    """Names accepted by ``fastsample.sample(..., gradient=...)``."""
    return list(GRADIENTS)


def get_gradient(gradient: str | AbstractGradient) -> AbstractGradient:
    """A gradient mode from its name (``"full"``, ``"remat"``, ``"binomial"``, ``"adjoint"``,
    ``"reversible"``) or an instance (e.g. ``Binomial(branching=4)``, ``Adjoint(order=1)``)."""
    if isinstance(gradient, AbstractGradient):
        return gradient
    if isinstance(gradient, str) and gradient in GRADIENTS:
        return GRADIENTS[gradient]()
    raise ValueError(f"unknown gradient mode {gradient!r}; allowed: {', '.join(GRADIENTS)} "
                     "(or an instance of fastsample.gradients.AbstractGradient).")


def _is_stochastic(solver) -> bool:
    """Whether ``solver`` draws noise."""
    return isinstance(solver, AbstractStochasticSolver)


def _check_trajectory(mode: AbstractGradient, saves_steps: bool) -> None:
    if saves_steps:
        raise ValueError(f"gradient={mode.name!r} does not keep the trajectory (SaveAt(steps=...) or "
                         "SaveAt(denoised=...)): save nothing, or use 'full', 'remat' or 'binomial'.")


def _check_custom(mode: AbstractGradient, solver, saves_steps: bool) -> None:
    _check_trajectory(mode, saves_steps)
    if _is_stochastic(solver):
        raise ValueError(
            f"gradient={mode.name!r} supports deterministic (probability-flow ODE) solvers only; "
            f"{solver.name!r} is stochastic: use 'full', 'remat' or 'binomial', which differentiate the fixed "
            "noise path exactly (or 'adjoint', the SDE adjoint, for the solvers it names)."
        )


# ----------------------------------------------------------------------------- shared machinery


def _forward(solver, denoiser, x, ts, cond, noise, plan, ends_at_zero: bool, keep_states=False):
    """Run the sampler (:func:`fastsample.loop.run`) storing nothing: ``(x_N, x_{N-1}, finite)``
    (``finite[i]``: the state after step ``i`` is finite). ``keep_states``: also return the states
    after every step, ``(N, *x.shape)``."""
    x_n, out = run(solver, denoiser, ts, x, cond, noise, plan=plan, ends_at_zero=ends_at_zero,
                   record=Record(trajectory=keep_states, finite=True, previous=True))
    if keep_states:
        return x_n, out["previous"], out["finite"], out["x"]
    return x_n, out["previous"], out["finite"]


def _refuse(perturbed, what: str, mode: str, hint: str) -> None:
    if any(jax.tree.leaves(perturbed)):
        raise ValueError(f"gradient={mode!r} gives no gradient with respect to {what}; {hint}")


def _tree_add(u, v):
    return jax.tree.map(lambda p, q: p + q, u, v)


def _zero_cotangent(ct, like):
    return jnp.zeros_like(like) if ct is None else ct


def _ends(inputs, ends_at_zero, plan):
    """The custom-VJP forward pass: outputs, and the last two states as residuals."""
    x, denoiser, cond, solver, ts = inputs[:5]
    noise = inputs[5] if len(inputs) > 5 else None
    x_n, x_before, finite = _forward(solver, denoiser, x, ts, cond, noise, plan, ends_at_zero)
    return (x_n, finite), (x_n, x_before)


# ------------------------------------------------------------------------------------ adjoint


@eqx.filter_custom_vjp
def _adjoint_solve(inputs, how, plan):
    x, denoiser, cond, solver, ts, noise = inputs
    x_n, _, finite = _forward(solver, denoiser, x, ts, cond, noise, plan, how[2])
    return x_n, finite


@_adjoint_solve.def_fwd
def _adjoint_fwd(perturbed, inputs, how, plan):
    _, p_denoiser, _, p_solver, p_ts, _ = perturbed
    hint = "use gradient='full', 'remat' or 'binomial' to differentiate it."
    _refuse(p_ts, "the time grid (given as traced `timesteps`, or derived from a differentiated process)",
            "adjoint", hint)
    _refuse(p_solver, "solver parameters", "adjoint", hint)
    _refuse(p_denoiser.process, "the noise process", "adjoint",
            "differentiate only the model (e.g. eqx.partition the Denoiser) or " + hint)
    x, denoiser, cond, solver, ts, noise = inputs
    if noise is None:
        return _ends(inputs, how[2], plan)
    # The SDE: the states are kept (one per step, no activations). Reconstructing them backwards is
    # unstable: the reverse SDE contracts strongly, so inverting its steps amplifies every error.
    x_n, x_before, finite, states = _forward(solver, denoiser, x, ts, cond, noise, plan, how[2], keep_states=True)
    return (x_n, finite), (x_n, x_before, states)


@_adjoint_solve.def_bwd
def _adjoint_bwd(residuals, grad_obj, perturbed, inputs, how, plan):
    x_n, x_before, *states = residuals
    ct = _zero_cotangent(grad_obj[0], x_n)
    x_T, denoiser, cond, solver, ts, noise = inputs
    _, p_denoiser, p_cond, _, _, _ = perturbed
    diff, static = eqx.partition((denoiser, cond), (p_denoiser, p_cond))
    method, order, _ = how

    def model(x, d, t):
        den, c = eqx.combine(d, static)
        return den(x, t, c)

    log_rho = None
    if noise is not None:  # forward step i (ts[i] -> ts[i + 1]) contracts by rho_i (the reverse SDE it discretises)
        def log_rho(i):
            return solver.sde_log_rho(denoiser.process, ts[i], ts[i + 1])

    state_at = None
    if states:  # the state at ts[i]: x_T, or the one after step i - 1
        def state_at(i):
            return jnp.where(i == 0, x_T, states[0][jnp.maximum(i - 1, 0)])

    a0, grads = adjoint_backward(model, diff, denoiser.process, x_n, x_before, ct, ts, order, method, log_rho,
                                 state_at)
    g_denoiser, g_cond = grads
    none = jax.tree.map(lambda _: None, eqx.filter((solver, noise), eqx.is_inexact_array))
    return a0, g_denoiser, g_cond, none[0], None, none[1]


def adjoint_backward(model, params, process, x_n, x_before, ct, ts, order: int = 2, method: str = "adjointdeis",
                     log_rho=None, state_at=None):
    """Solve the adjoint backwards over the grid ``ts`` (see the module docstring and :class:`Adjoint`).

    ``model(x, params, t)`` is the data prediction; ``x_n`` the sampler's output at ``ts[-1]`` and
    ``x_before`` its state at ``ts[-2]`` (used when ``ts[-1] = 0``: that step is ``x_n = D(x_before)``
    and its VJP is taken exactly); ``ct`` the cotangent of ``x_n``. ``method``: ``"adjointdeis"``
    or ``"adjointdpm"``. ``log_rho(i)`` (stochastic samplers): forward step ``i`` contracts by
    ``rho = e^{log_rho}``, i.e. discretises the reverse SDE of that noise level (default: ``rho = 1``,
    the PF-ODE). ``state_at(i)`` (optional): the forward state at ``ts[i]``, used instead of
    reconstructing it backwards (needed for the SDE, whose steps do not invert stably).
    Returns ``(dL/dx_T, dL/dparams)``. One model VJP per step.

    Both methods share one step. With ``A``, ``W`` such that the forward step from ``t`` to ``s`` is
    ``x_s = A x_t + W F(x_t)`` (``F``: ``D`` for AdjointDEIS, ``eps`` for AdjointDPM; plus noise for
    the SDE) and model outputs frozen at ``s``, the backward step is

        x_t = (x_s - W F) / A,    a_t = A a_s + (alpha_s / alpha_t) W J_F^T a_s,    g_t = g_s + W J_theta^T a_s,

    the exponential integrator of the (augmented) adjoint ODE. Order 2 extrapolates ``F``,
    ``alpha^2 J_F^T a`` and ``s_x J_theta^T a`` (``s_x = sigma`` resp. ``alpha``, the slowly varying
    quantities of each method's variables) linearly from the previous node, in ``lambda``
    (AdjointDEIS-2M, the DPM-Solver++(2M) coefficient) resp. ``rho`` (Adams-Bashforth 2). A step from
    pure noise (``alpha_t = 0``) uses the data-prediction form, holds ``sigma^2 J_D^T a`` and is
    first order.
    """
    if method not in ADJOINT_METHODS:
        raise ValueError(f"adjoint method must be one of {', '.join(ADJOINT_METHODS)}; got {method!r}.")
    n = ts.shape[0] - 1
    dpm = method == "adjointdpm"
    lam = process.log_snr(ts)
    alpha, sig = process.alpha_sigma(ts)
    safe_alpha = jnp.where(alpha > 0, alpha, 1.0)
    u = sig / safe_alpha if dpm else lam  # the variable of the order-2 extrapolation
    zero_g = jax.tree.map(jnp.zeros_like, params)
    zero = jnp.zeros_like(x_n)
    int0 = jnp.asarray(0, jnp.int32)

    def vjp(x, a, t):
        d, pull = jax.vjp(lambda x_, p_: model(x_, p_, t), x, params)
        vx, vp = pull(a)
        return d, vx, vp

    def step(carry, k):
        # From ts[k] (s) back to ts[k - 1] (t); forward step k - 1 went from t to s.
        x, a, g, f_prev, p_prev, q_prev, u_prev, count = carry
        d, vx, vp = vjp(x, a, ts[k])
        al_s, s_s, s_t = alpha[k], sig[k], sig[k - 1]
        h = lam[k] - lam[k - 1]
        from_noise = ~jnp.isfinite(lam[k - 1])  # a step out of alpha = 0 (pure noise)
        lr = jnp.zeros_like(h) if log_rho is None else log_rho(k - 1)
        a_coef, w_coef = (s_s / s_t) * jnp.exp(lr), al_s * -jnp.expm1(lr - h)  # x_s = A x_t + W D (+ noise)
        if dpm:  # x_s = (alpha_s / alpha_t) x_t + (sigma_s - alpha_s sigma_t / alpha_t) eps (the same DDIM step)
            a_dpm = al_s / safe_alpha[k - 1]
            a_coef = jnp.where(from_noise, a_coef, a_dpm)
            w_coef = jnp.where(from_noise, w_coef, s_s - a_dpm * s_t)
            use_eps = ~from_noise
            f = jnp.where(use_eps, (x - al_s * d) / s_s, d)
            jx = jnp.where(use_eps, (a - al_s * vx) / s_s, vx)
            jp = jax.tree.map(lambda v: jnp.where(use_eps, -(al_s / s_s), 1.0) * v, vp)
            s_x = jnp.where(use_eps, al_s, s_s)
        else:
            f, jx, jp, s_x = d, vx, vp, s_s
        p = al_s * al_s * jx
        q = jax.tree.map(lambda v: s_x * v, jp)
        second = (order >= 2) & (count > 0) & ~from_noise
        k2 = jnp.where(second, (u[k - 1] - u[k]) / (2.0 * jnp.where(second, u[k] - u_prev, 1.0)), 0.0)

        def ext(cur, prev):
            return cur + k2 * (cur - prev)

        if state_at is None:
            x_t = jnp.where(a_coef > 0, (x - w_coef * ext(f, f_prev)) / jnp.where(a_coef > 0, a_coef, 1.0), x)
        else:
            x_t = state_at(k - 1)
        # (alpha_s / alpha_t) W J^T a = W / (alpha_t alpha_s) p; out of pure noise sigma^2 J^T a is held instead.
        c_p = jnp.where(from_noise, w_coef * s_s / (s_t * al_s * al_s), w_coef / (safe_alpha[k - 1] * al_s))
        a_t = a_coef * a + c_p * ext(p, p_prev)
        g = _tree_add(g, jax.tree.map(lambda cur, prev: (w_coef / s_x) * ext(cur, prev), q, q_prev))
        return (x_t, a_t, g, f, p, q, u[k], count + 1), None

    def last_to_zero(_):
        # x_N = D(x_{N-1}, t_{N-1}) exactly: take its VJP from the stored state.
        _, vx, vp = vjp(x_before, ct, ts[n - 1])
        return x_before, vx, vp, zero, zero, zero_g, u[n - 1], int0

    def last_continuous(_):
        return step((x_n, ct, zero_g, zero, zero, zero_g, u[n], int0), n)[0]

    carry = jax.lax.cond(ts[n] == 0, last_to_zero, last_continuous, None)
    carry, _ = jax.lax.scan(step, carry, jnp.arange(n - 1, 0, -1))
    return carry[1], carry[2]


# --------------------------------------------------------------------------------- reversible


@eqx.filter_custom_vjp
def _reversible_solve(inputs, ends_at_zero, plan):
    x, denoiser, cond, solver, ts = inputs
    x_n, _, finite = _forward(solver, denoiser, x, ts, cond, None, plan, ends_at_zero)
    return x_n, finite


@_reversible_solve.def_fwd
def _reversible_fwd(perturbed, inputs, ends_at_zero, plan):
    return _ends(inputs, ends_at_zero, plan)


@_reversible_solve.def_bwd
def _reversible_bwd(residuals, grad_obj, perturbed, inputs, ends_at_zero, plan):
    x_n, x_before = residuals
    ct = _zero_cotangent(grad_obj[0], x_n)
    x_T, denoiser, cond, solver, ts = inputs
    _, p_denoiser, p_cond, p_solver, p_ts = perturbed
    diff, static = eqx.partition((denoiser, cond, solver), (p_denoiser, p_cond, p_solver))
    dtype = x_n.dtype

    def gamma_of(d):
        return jnp.asarray(eqx.combine(d, static)[2].gamma, dtype)

    def parts(x, d, t0, t1, tp):
        den, c, sol = eqx.combine(d, static)
        return sol.bdia_parts(den, t0, t1, tp, x, c)

    def affine(x, d, t0, t1, tp):
        # A BDIA step is affine(x_k) + gamma x_{k-1}.
        forward, backward = parts(x, d, t0, t1, tp)
        return forward - gamma_of(d) * backward

    gamma = gamma_of(diff)
    _, pull_gamma = jax.vjp(gamma_of, diff)

    def step(carry, k):
        # Step k maps (x_k, x_{k-1}) to (x_{k+1}, x_k); invert it, then pull the cotangents back.
        x_hi, x_mid, a_hi, a_mid, g, gts = carry
        f, pull = jax.vjp(affine, x_mid, diff, ts[k], ts[k + 1], ts[k - 1])
        x_lo = (x_hi - f) / gamma
        vx, vd, v0, v1, vp = pull(a_hi)
        (vg,) = pull_gamma(jnp.vdot(a_hi, x_lo).astype(dtype))
        gts = gts.at[k].add(v0).at[k + 1].add(v1).at[k - 1].add(vp)
        return (x_mid, x_lo, a_mid + vx, gamma * a_hi, _tree_add(g, _tree_add(vd, vg)), gts), None

    n = ts.shape[0] - 1
    zero_g = jax.tree.map(jnp.zeros_like, diff)
    init = (x_n, x_before, ct, jnp.zeros_like(ct), zero_g, jnp.zeros_like(ts))
    (_, _, a1, a0, g, gts), _ = jax.lax.scan(step, init, jnp.arange(n - 1, 0, -1))
    # Step 0 is DDIM: x_1 = forward(x_0).
    _, pull = jax.vjp(lambda x, d, t0, t1: parts(x, d, t0, t1, t1)[0], x_T, diff, ts[0], ts[1])
    vx, vd, v0, v1 = pull(a1)
    g = _tree_add(g, vd)
    gts = gts.at[0].add(v0).at[1].add(v1)
    g_denoiser, g_cond, g_solver = g
    return a0 + vx, g_denoiser, g_cond, g_solver, (gts if p_ts else None)

"""Training diffusion and flow networks: EDM denoising and flow matching, optax, EMA, one jitted step.

Objectives (each knows its process and prediction type, so a trained network becomes a
:class:`~fastsample.Denoiser` in one call):

- :class:`EDMObjective`: denoising score matching with EDM's preconditioning and log-normal noise
  levels (Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, 2022).
  ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` predicts ``x0`` under :class:`~fastsample.EDM`.
- :class:`FlowMatchingObjective`: conditional flow matching on the straight path
  ``x_t = (1 - t) x0 + t eps`` with velocity target ``eps - x0`` (Lipman et al., Flow Matching for
  Generative Modeling; Liu et al., Flow Straight and Fast: Rectified Flow; 2023). The network
  predicts ``velocity`` under :class:`~fastsample.FlowMatching`.

Losses are means over samples and elements (per-dimension numbers). Training runs ``lax.scan``
chunks of the jitted step; the state (parameters, EMA, optimizer state, step, PRNG key) is a pytree
that :mod:`fastsample.models.checkpoints` saves and restores, and chunk boundaries depend only on
the step count, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..denoisers import Denoiser
from ..distributed import batch_sharding, gather, replicate, resolve_mesh
from ..processes import EDM, AbstractProcess, FlowMatching
from .networks import NetworkFn, make_network

__all__ = [
    "EDMObjective",
    "FlowMatchingObjective",
    "OBJECTIVES",
    "TrainedNetwork",
    "TrainState",
    "make_objective",
    "make_optimizer",
    "init_train_state",
    "train_steps",
    "training_data",
    "train",
    "evaluate",
]


# ---------------------------------------------------------------------------- objectives


def _mean_per_sample(err):
    return jnp.mean(err.reshape(err.shape[0], -1) ** 2, axis=1)


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


class _Objective(eqx.Module):
    """A training objective: a noise level per sample (:meth:`sample_level`) and the loss of one
    sample at it (:meth:`per_sample_loss`); :meth:`loss` averages it over a batch."""

    def loss(self, net, x0, key, cond=None):
        k_level, k_noise = jax.random.split(key)
        level = self.sample_level(k_level, x0.shape[0], x0.dtype)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        return jnp.mean(self.per_sample_loss(net, x0, level, noise, cond))


class EDMObjective(_Objective):
    """EDM's preconditioned denoising objective (Karras et al., 2022, Table 1).

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``, loss weight
    ``lambda(s) = (s^2 + sd^2) / (s sd)^2``, noise levels ``log s ~ N(p_mean, p_std^2)``; ``sd`` is
    ``sigma_data``. The loss per sample is ``lambda(s) mean((D(x0 + s n; s) - x0)^2)``, which equals
    ``mean((F - (x0 - c_skip x) / c_out)^2)``: a unit-weight regression of the raw network ``F``.
    """

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    name = "edm"
    prediction = "x0"

    def __check_init__(self):
        if not (self.sigma_data > 0 and self.p_std > 0 and 0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                "EDMObjective needs sigma_data > 0, p_std > 0 and 0 < sigma_min < sigma_max; got "
                f"{self.sigma_data}, {self.p_std}, {self.sigma_min}, {self.sigma_max}."
            )

    def process(self) -> AbstractProcess:
        return EDM(self.sigma_min, self.sigma_max)

    def coefficients(self, sigma):
        """``(c_skip, c_out, c_in, c_noise)`` at noise level ``sigma``."""
        sd2 = self.sigma_data**2
        r = jnp.sqrt(sigma**2 + sd2)
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / r, 1.0 / r, jnp.log(sigma) / 4.0

    def weight(self, sigma):
        """Loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def output(self, net, x, sigma, cond=None):
        """The preconditioned denoiser ``D(x; sigma)`` (the ``x0`` prediction) of raw network ``net``."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * net(_bcast(c_in, x) * x, c_noise, cond)

    def sample_level(self, key, n: int, dtype):
        """Noise levels ``sigma = exp(p_mean + p_std z)``, ``z ~ N(0, 1)``."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (n,), dtype))

    def per_sample_loss(self, net, x0, sigma, noise, cond=None):
        """``lambda(sigma) mean((D(x0 + sigma noise; sigma) - x0)^2)`` per sample."""
        d = self.output(net, x0 + _bcast(sigma, x0) * noise, sigma, cond)
        return self.weight(sigma) * _mean_per_sample(d - x0)

    def model(self, net):
        """``(x, t, cond) -> x0`` under :meth:`process` (``t`` is ``sigma``)."""
        return _PreconditionedModel(net, self)


class FlowMatchingObjective(_Objective):
    """Flow matching / rectified flow: ``x_t = (1 - t) x0 + t eps``, the network regresses the
    velocity ``eps - x0``; ``t ~ U(0, 1)`` or logit-normal ``t = sigmoid(m + s z)`` (Esser et al.,
    Scaling Rectified Flow Transformers, 2024). Loss per sample: ``mean((F(x_t, t) - (eps - x0))^2)``."""

    time_distribution: str = eqx.field(static=True, default="uniform")
    logit_mean: float = 0.0
    logit_std: float = 1.0

    name = "flow_matching"
    prediction = "velocity"

    def __check_init__(self):
        if self.time_distribution not in ("uniform", "logit_normal"):
            raise ValueError(
                f"time_distribution must be 'uniform' or 'logit_normal'; got {self.time_distribution!r}."
            )

    def process(self) -> AbstractProcess:
        return FlowMatching()

    def output(self, net, x, t, cond=None):
        """The velocity prediction (the raw network)."""
        return net(x, jnp.broadcast_to(jnp.asarray(t, x.dtype).reshape(-1), (x.shape[0],)), cond)

    def sample_level(self, key, n: int, dtype):
        if self.time_distribution == "uniform":
            return jax.random.uniform(key, (n,), dtype)
        return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (n,), dtype))

    def per_sample_loss(self, net, x0, t, noise, cond=None):
        tb = _bcast(t, x0)
        return _mean_per_sample(self.output(net, (1.0 - tb) * x0 + tb * noise, t, cond) - (noise - x0))

    def model(self, net):
        """``(x, t, cond) -> velocity`` under :meth:`process`."""
        return _FlowModel(net, self)


#: Objective kinds by name.
OBJECTIVES = {"edm": EDMObjective, "flow_matching": FlowMatchingObjective}


def make_objective(kind: str, **options):
    """The objective ``kind`` (``"edm"`` or ``"flow_matching"``) with its options."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {kind!r}; allowed: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[kind](**options)


def _objective_options(objective) -> dict:
    return {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)}


class _PreconditionedModel(eqx.Module):
    net: Any
    objective: EDMObjective

    def __call__(self, x, t, cond=None):
        return self.objective.output(self.net, x, t, cond)


class _FlowModel(eqx.Module):
    net: Any
    objective: FlowMatchingObjective

    def __call__(self, x, t, cond=None):
        return self.objective.output(self.net, x, t, cond)


# ---------------------------------------------------------------------------- trained network


class TrainedNetwork(eqx.Module):
    """A trained network with its objective: ``denoiser()`` gives the :class:`~fastsample.Denoiser`.

    Attributes:
        net: the network (:class:`~fastsample.models.networks.NetworkFn`).
        objective: the :class:`EDMObjective` or :class:`FlowMatchingObjective` it was trained with.
        dim: the data dimension (flat).
        num_classes: number of classes of a class-conditional network (``0``: unconditional); the
            null class (for guidance) is ``num_classes``.
    """

    net: NetworkFn
    objective: Any
    dim: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True, default=0)

    @property
    def process(self) -> AbstractProcess:
        """The process the network was trained under (EDM or flow matching)."""
        return self.objective.process()

    def denoiser(self, process: AbstractProcess | None = None, **denoiser_options) -> Denoiser:
        """The :class:`~fastsample.Denoiser` of this network.

        Under its own kind of process (``EDM`` for the EDM objective, ``FlowMatching`` for flow
        matching; ``None`` means the training process) the raw model output is used with the
        objective's prediction type (``x0`` resp. ``velocity``). Any other process sees the model
        through :meth:`~fastsample.Denoiser.with_process` (same log-SNR, rescaled input).
        ``denoiser_options`` (``guidance_scale``, ``thresholding``) go to the Denoiser; with a
        ``guidance_scale`` the null class is filled in as ``uncond``.
        """
        if self.num_classes and "guidance_scale" in denoiser_options:
            denoiser_options.setdefault("uncond", jnp.asarray(self.num_classes, jnp.int32))
        native = self.objective.process()
        if process is None or isinstance(process, type(native)):
            return Denoiser(self.objective.model(self.net), process or native, self.objective.prediction,
                            **denoiser_options)
        return Denoiser(self.objective.model(self.net), native, self.objective.prediction,
                        **denoiser_options).with_process(process)


# ---------------------------------------------------------------------------- optimizer and state


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree of arrays)."""

    params: dict
    ema: dict
    opt_state: Any
    step: jax.Array
    key: jax.Array


@functools.lru_cache(maxsize=32)
def make_optimizer(learning_rate: float, steps: int, warmup_steps: int = 0, schedule: str = "constant",
                   grad_clip: float = 0.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up, then a constant or cosine-decayed learning rate, and optional
    global-norm gradient clipping (optax).

    Equal arguments return the same object, so the jitted training step (for which the optimizer
    is static) compiles once per configuration, not once per call of :func:`train`."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {schedule!r}.")
    warm = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        after = optax.cosine_decay_schedule(learning_rate, max(steps - warmup_steps, 1))
    lr = optax.join_schedules([warm, after], [warmup_steps]) if warmup_steps > 0 else after
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(lr, weight_decay=weight_decay))
    return optax.chain(*parts)


def init_train_state(net: NetworkFn, optimizer, seed: int) -> TrainState:
    """The state at step 0: EMA equal to the parameters, a fresh optimizer state."""
    params = net.params
    return TrainState(params, jax.tree.map(jnp.copy, params), optimizer.init(params),
                      jnp.asarray(0, jnp.int32), jax.random.PRNGKey(seed))


@eqx.filter_jit
def train_steps(state: TrainState, net: NetworkFn, objective, optimizer, x_data, labels, n_steps: int,
                batch_size: int, ema_decay: float, label_dropout: float, null_class: int, dequantize: float = 0.0,
                batch_sharding=None):
    """``n_steps`` training steps (one ``lax.scan``); returns ``(state, losses)``.

    Each step draws a batch of ``batch_size`` indices with replacement, adds uniform noise of width
    ``dequantize`` (dequantisation of discrete data, e.g. ``1/8`` for the digits' 17 levels; ``0``:
    none), drops class labels to the
    null class with probability ``label_dropout`` (classifier-free guidance training), takes an
    optimizer step on the objective's loss and updates the EMA of the weights with decay
    ``min(ema_decay, (1 + step) / (10 + step))``. ``labels`` is ``None`` for unconditional training.
    ``batch_sharding`` (a ``NamedSharding`` over a ``"data"`` axis) splits each batch over devices
    (data parallelism; the same numbers up to reduction order).
    """

    def one(state, _):
        key, k_batch, k_loss, k_drop, k_deq = jax.random.split(state.key, 5)
        idx = jax.random.randint(k_batch, (batch_size,), 0, x_data.shape[0])
        x0 = x_data[idx]
        if dequantize > 0:
            x0 = x0 + jax.random.uniform(k_deq, x0.shape, x0.dtype, -dequantize / 2, dequantize / 2)
        cond = None
        if labels is not None:
            drop = jax.random.bernoulli(k_drop, label_dropout, (batch_size,))
            cond = jnp.where(drop, null_class, labels[idx])
        if batch_sharding is not None:
            x0 = jax.lax.with_sharding_constraint(x0, batch_sharding)
            cond = None if cond is None else jax.lax.with_sharding_constraint(cond, batch_sharding)

        def loss_fn(params):
            return objective.loss(net.replace(params), x0, k_loss, cond)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step)).astype(x_data.dtype)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        return TrainState(params, ema, opt_state, step, key), loss

    return jax.lax.scan(one, state, None, length=n_steps)


# ---------------------------------------------------------------------------- driver


def training_data(cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, labels)`` for a training config: the digits train split (labels when the network is
    class-conditional) or ``toy_samples`` points of a 2-D toy, as float32."""
    from .. import data

    if cfg.data == "digits":
        x, y = data.digits("train", seed=cfg.data_seed)
        labels = y.astype(np.int32) if cfg.network.num_classes > 0 else None
        return x.astype(np.float32), labels
    return np.asarray(data.load(cfg.data, cfg.toy_samples, seed=cfg.data_seed), np.float32), None


def network_spec(cfg, dim: int) -> dict:
    """The JSON-able description of a config's network and objective (stored in checkpoints)."""
    net = cfg.network
    if net.kind == "mlp":
        options = {"hidden": net.hidden, "depth": net.depth}
    else:
        side = math.isqrt(dim)
        if side * side != dim:
            raise ValueError(f"network.kind='unet' needs square images; the data has dimension {dim}.")
        options = {"image_shape": [side, side, 1], "channels": list(net.channels)}
    options.update(emb_dim=net.emb_dim, num_classes=net.num_classes)
    if cfg.objective == "edm":
        objective = {"sigma_data": cfg.sigma_data}
    else:
        objective = {"time_distribution": cfg.time_distribution}
    return {"kind": net.kind, "dim": dim, "seed": cfg.seed, "options": options,
            "objective": {"kind": cfg.objective, **objective}}


def build_from_spec(spec: dict) -> TrainedNetwork:
    """A freshly initialised :class:`TrainedNetwork` with the structure ``spec`` describes."""
    module = make_network(spec["kind"], spec["dim"], seed=spec["seed"], **spec["options"])
    objective = dict(spec["objective"])
    objective = make_objective(objective.pop("kind"), **objective)
    return TrainedNetwork(NetworkFn.from_module(module), objective, spec["dim"], spec["options"]["num_classes"])


def _next_boundary(step: int, total: int, chunk: int, save_every: int) -> int:
    """The next chunk end after ``step``: the next multiple of ``chunk`` or ``save_every``, or ``total``.
    It depends on the step count only, so a resumed run runs the same chunks as an uninterrupted one."""
    return min((step // chunk + 1) * chunk, (step // save_every + 1) * save_every, total)


def train(cfg, *, progress: bool = True, stop_at: int | None = None, run_dir=None, mesh=None):
    """Train the network a :class:`fastsample.config.TrainConfig` describes, with checkpoints.

    The run lives in ``run_dir`` (default ``cfg.output_dir / cfg.name``). If it holds a checkpoint
    of the same configuration, training resumes from the latest one (a finished run returns at
    once). Checkpoints are written every ``save_every`` steps and at the end; ``stop_at`` stops
    (after a checkpoint) at that step, as an interrupted run would, and an interrupt (Ctrl-C) also
    saves the last completed chunk before it propagates.

    ``mesh`` (a ``Mesh`` with a ``"data"`` axis, or ``"all"``; in a multi-process job ``None``
    means ``"all"``) replicates the state and splits each batch over ``"data"`` when the batch size
    divides evenly; every process then trains the same state and all of them save checkpoints
    together (orbax writes once).

    Returns:
        ``(trained, state, losses)``: the :class:`TrainedNetwork` with EMA weights, the final
        :class:`TrainState` and the mean loss of each chunk run in this call.
    """
    from pathlib import Path

    from ..optimization import run_steps
    from .checkpoints import NetworkCheckpoints

    x_np, labels_np = training_data(cfg)
    spec = network_spec(cfg, x_np.shape[1])
    fresh = build_from_spec(spec)
    optimizer = make_optimizer(cfg.learning_rate, cfg.steps if cfg.lr_schedule == "cosine" else 0,
                               cfg.warmup_steps, cfg.lr_schedule, cfg.grad_clip, cfg.weight_decay)
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
    store = NetworkCheckpoints(run_dir, keep=cfg.keep_checkpoints)
    config_dict = dataclasses.asdict(cfg)
    template = init_train_state(fresh.net, optimizer, cfg.seed)
    state = store.restore_latest(template, spec, config_dict)
    if state is None:
        state = template
    x_data = jnp.asarray(x_np)
    labels = None if labels_np is None else jnp.asarray(labels_np)
    mesh = resolve_mesh("all" if mesh is None and jax.process_count() > 1 else mesh)
    sharding = None
    if mesh is not None:
        state, x_data, labels = replicate((state, x_np, labels_np), mesh)
        if cfg.batch_size % mesh.shape["data"] == 0:
            sharding = batch_sharding(mesh)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    losses = []

    def advance(state, step, stop):
        return train_steps(state, fresh.net, fresh.objective, optimizer, x_data, labels, stop - step, cfg.batch_size,
                           cfg.ema_decay, cfg.label_dropout, cfg.network.num_classes, cfg.dequantize, sharding)

    def after(state, stop, chunk_losses):
        loss = float(jnp.mean(chunk_losses))
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is not finite at step {stop}; lower learning_rate.")
        losses.append(loss)
        return state, False, {"loss": f"{loss:.4f}"}

    state, _, _ = run_steps(advance, state, int(state.step), end, after=after,
                            boundary=lambda step: _next_boundary(step, cfg.steps, cfg.steps_per_call, cfg.save_every),
                            save=lambda state, step: store.save(state, spec, config_dict),
                            save_due=lambda step: step % cfg.save_every == 0, desc=f"train {cfg.name}",
                            total=cfg.steps, progress=progress)
    if jax.process_count() > 1:  # replicated global arrays -> this process's own copies
        state = jax.tree.map(lambda a: jnp.asarray(gather(a)), state)
    trained = TrainedNetwork(fresh.net.replace(state.ema), fresh.objective, spec["dim"],
                             spec["options"]["num_classes"])
    return trained, state, losses


def evaluate(trained: TrainedNetwork, cfg, num_samples: int | None = None, seed: int = 0) -> tuple[dict, Any]:
    """Sample a trained network and compare with held-out data: ``(metrics, samples)``.

    Draws ``num_samples`` (default ``cfg.eval_samples``) samples with ``cfg.eval_solver`` at
    ``cfg.eval_nfe`` under the network's own process, and a Gaussian with the training data's mean
    and covariance (the moment-matched baseline) of the same size. Digits: Frechet distance to
    the held-out split in raw pixels (``fd_pixels``) and in classifier features
    (``fd_features``, :func:`fastsample.metrics.digits_features`). 2-D toys: Frechet distance
    and sliced Wasserstein distance to fresh toy samples. ``gaussian_*`` are the baseline's values.
    """
    from .. import data, metrics
    from ..sampling import prior, sample

    n = cfg.eval_samples if num_samples is None else num_samples
    key_prior, key_gauss, key_sw = jax.random.split(jax.random.PRNGKey(seed), 3)
    d = trained.denoiser()
    x_T = prior(d.process, key_prior, (n, trained.dim), jnp.float32)
    x = np.asarray(sample(d, x_T, cfg.eval_solver, nfe=cfg.eval_nfe), np.float64)
    x_train, _ = training_data(cfg)
    x_train = np.asarray(x_train, np.float64)
    if cfg.data == "digits":
        held_out = data.digits("test", seed=cfg.data_seed)[0]
    else:
        held_out = np.asarray(data.load(cfg.data, max(n, 2000), seed=cfg.data_seed + 1), np.float64)
    mean, cov = x_train.mean(0), np.cov(x_train.T)
    gauss = mean + np.asarray(jax.random.normal(key_gauss, (n, trained.dim), jnp.float32), np.float64) @ \
        np.linalg.cholesky(cov + 1e-9 * np.eye(trained.dim)).T
    out = {"solver": cfg.eval_solver, "nfe": cfg.eval_nfe, "num_samples": n}
    for prefix, z in (("", x), ("gaussian_", gauss)):
        out[prefix + "fd_pixels"] = float(metrics.frechet_distance(z, held_out))
        if cfg.data == "digits":
            out[prefix + "fd_features"] = float(metrics.frechet_distance(
                metrics.digits_features(z, cfg.data_seed), metrics.digits_features(held_out, cfg.data_seed)))
        else:
            out[prefix + "sliced_wasserstein"] = float(metrics.sliced_wasserstein(z, held_out, key_sw))
    return out, x

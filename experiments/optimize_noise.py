"""Optimise the initial noise of 2-D mixture samples toward a target region, and fine-tune the
mixture's means with a reward through the last K sampling steps (DRaFT-K).

    fastsample run configs/optimize_noise.yaml [key=value ...]

Part 1 (noise optimisation): ``x_T`` is a batch of prior draws; ``x_0 = sample(x_T)`` is
differentiated with ``fastsample.sample(..., gradient=cfg.gradient)`` and optax Adam minimises

    mean_b relu(|x_0,b - target| - radius)^2 + prior_weight * mean_b |x_T,b|^2 / (2 sigma_T^2 D),

the squared distance outside the target disc plus the prior's negative log-density, which keeps
the noise plausible. Part 2 (DRaFT-K; Clark et al., Directly Fine-Tuning Diffusion Models on
Differentiable Rewards, 2024): the "model weights" are the mixture's means; each step draws fresh
noise, samples with DDIM without gradient up to the last ``draft_k`` steps and with gradient
through them, and minimises the same region loss plus ``draft_anchor * |means - means_0|^2``.
(A trained Flax network can take the means' place: any Denoiser pytree works the same way.)

Writes ``metrics.json/.csv`` (loss and fraction of samples inside the target per iteration),
``table.md`` and ``optimize_noise.png`` (sample trajectories over the optimisation).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import fastsample as fs
from fastsample import results
from fastsample.config import (
    ConfigError,
    ModelConfig,
    ProcessConfig,
    build_model,
    build_process,
)


@dataclass(frozen=True)
class OptimizeNoiseConfig:
    """The experiment's config (``configs/optimize_noise.yaml``)."""

    name: str = "optimize_noise"
    experiment: str = "optimize_noise"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(kind="gmm_ring", n_components=8))
    process: ProcessConfig = field(default_factory=lambda: ProcessConfig(kind="vp_linear"))
    solver: str = "dpmpp_2m"
    nfe: int = 10
    schedule: str = "logsnr_uniform"
    gradient: str = field(default="adjoint", metadata={"choices": tuple(fs.available_gradients())})
    num_samples: int = 64
    target: list[float] = field(default_factory=lambda: [4.0, 0.0])
    radius: float = 1.0
    prior_weight: float = 0.05
    steps: int = 150
    learning_rate: float = 0.05
    snapshot_every: int = 10
    draft_k: int = 5
    draft_steps: int = 200
    draft_learning_rate: float = 0.1
    draft_anchor: float = 0.01
    seed: int = 0
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float64")})
    output_dir: str = "results"
    plots: bool = True

    def __post_init__(self):
        if self.model.kind not in ("gmm_ring", "gmm_grid"):
            raise ConfigError(f"model.kind must be a 2-D mixture (gmm_ring, gmm_grid); got {self.model.kind!r}.")
        if len(self.target) != 2:
            raise ConfigError(f"target must be a 2-D point [x, y]; got {self.target}.")
        for key in ("nfe", "num_samples", "steps", "snapshot_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1; got {getattr(self, key)}.")
        if not self.radius > 0 or not self.learning_rate > 0 or self.prior_weight < 0:
            raise ConfigError("radius and learning_rate must be > 0 and prior_weight >= 0; "
                              f"got {self.radius}, {self.learning_rate}, {self.prior_weight}.")
        if not 0 <= self.draft_k <= self.nfe:
            raise ConfigError(f"draft_k must be in [0, nfe={self.nfe}] (0 skips DRaFT-K); got {self.draft_k}.")


def region_loss(x, target, radius):
    """Mean squared distance outside the target disc, and the fraction of samples inside it."""
    dist = jnp.linalg.norm(x - target, axis=-1)
    return jnp.mean(jax.nn.relu(dist - radius) ** 2), jnp.mean(dist <= radius)


def optimize_noise(cfg, process, mixture, dtype, progress=True):
    """Part 1: Adam on ``x_T``. Returns per-iteration rows and ``(iteration, x_0)`` snapshots."""
    denoiser = mixture.denoiser(process)
    target = jnp.asarray(cfg.target, dtype)
    sigma_T = process.sigma(jnp.asarray(process.t_max, dtype))
    x_T = fs.prior(process, jax.random.PRNGKey(cfg.seed), (cfg.num_samples, 2), dtype)

    def loss_fn(x_T):
        x0 = fs.sample(denoiser, x_T, cfg.solver, nfe=cfg.nfe, schedule=cfg.schedule, gradient=cfg.gradient)
        region, inside = region_loss(x0, target, cfg.radius)
        prior = jnp.mean(jnp.sum(x_T**2, axis=-1)) / (2 * sigma_T**2 * 2)
        return region + cfg.prior_weight * prior, (x0, region, inside)

    opt = optax.adam(cfg.learning_rate)

    @jax.jit
    def step(x_T, opt_state):
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(x_T)
        updates, opt_state = opt.update(grad, opt_state, x_T)
        return optax.apply_updates(x_T, updates), opt_state, loss, aux

    opt_state = opt.init(x_T)
    rows, snapshots = [], []
    for it in tqdm(range(cfg.steps + 1), desc="noise", disable=not progress):
        new_x_T, new_state, loss, (x0, region, inside) = step(x_T, opt_state)
        rows.append({"part": "noise", "iteration": it, "loss": float(loss), "region_loss": float(region),
                     "inside": float(inside)})
        if it % cfg.snapshot_every == 0 or it == cfg.steps:
            snapshots.append((it, np.asarray(x0)))
        x_T, opt_state = new_x_T, new_state  # the last update is not applied past `steps`
    return rows, snapshots


def draft_k(cfg, process, mixture, dtype, progress=True):
    """Part 2: DRaFT-K on the mixture means with DDIM (single-step, so splitting the grid at the
    last K steps leaves the sampler unchanged). Returns rows and the fine-tuned mixture."""
    target = jnp.asarray(cfg.target, dtype)
    ts = fs.get_timesteps(process, cfg.nfe, cfg.schedule).astype(dtype)
    split = cfg.nfe - cfg.draft_k
    means0 = mixture.means
    gradient = "full" if cfg.gradient == "reversible" else cfg.gradient  # reversible needs BDIA-DDIM

    def loss_fn(means, key):
        model = eqx.tree_at(lambda m: m.means, mixture, means)
        denoiser = model.denoiser(process)
        x_T = fs.prior(process, key, (cfg.num_samples, 2), dtype)
        x = x_T
        if split > 0:  # no gradient through the first nfe - K steps (the means still enter there)
            x = jax.lax.stop_gradient(fs.sample(denoiser, x_T, "ddim", nfe=None, timesteps=ts[: split + 1]))
        x0 = fs.sample(denoiser, x, "ddim", nfe=None, timesteps=ts[split:], gradient=gradient)
        region, inside = region_loss(x0, target, cfg.radius)
        return region + cfg.draft_anchor * jnp.sum((means - means0) ** 2), (region, inside)

    opt = optax.adam(cfg.draft_learning_rate)

    @jax.jit
    def step(means, opt_state, key):
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(means, key)
        updates, opt_state = opt.update(grad, opt_state, means)
        return optax.apply_updates(means, updates), opt_state, loss, aux

    means, opt_state = means0, opt.init(means0)
    rows = []
    base = jax.random.PRNGKey(cfg.seed + 1)
    for it in tqdm(range(cfg.draft_steps + 1), desc=f"DRaFT-{cfg.draft_k}", disable=not progress):
        new_means, new_state, loss, (region, inside) = step(means, opt_state, jax.random.fold_in(base, it))
        rows.append({"part": f"draft_{cfg.draft_k}", "iteration": it, "loss": float(loss),
                     "region_loss": float(region), "inside": float(inside)})
        means, opt_state = new_means, new_state
    return rows, eqx.tree_at(lambda m: m.means, mixture, means)


def run(cfg: OptimizeNoiseConfig, out: Path, progress: bool = True) -> list[dict]:
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    process = build_process(cfg.process)
    mixture = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, build_model(cfg.model))
    rows, snapshots = optimize_noise(cfg, process, mixture, dtype, progress)
    tuned = None
    if cfg.draft_k > 0 and cfg.draft_steps > 0:
        draft_rows, tuned = draft_k(cfg, process, mixture, dtype, progress)
        rows += draft_rows
    results.write_rows(out, "metrics", rows)
    last = {"noise": cfg.steps, f"draft_{cfg.draft_k}": cfg.draft_steps}
    summary = [r for r in rows if r["iteration"] in (0, last[r["part"]])]
    (out / "table.md").write_text(results.markdown_table(summary, ["part", "iteration", "loss", "region_loss",
                                                                   "inside"]))
    if cfg.plots:
        _plot(cfg, process, mixture, tuned, snapshots, rows, out / "optimize_noise.png", dtype)
    return summary


def _plot(cfg, process, mixture, tuned, snapshots, rows, path, dtype):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if tuned is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.6))
    lim = float(np.max(np.abs(np.asarray(mixture.means)))) + 2.0
    grid = np.linspace(-lim, lim, 200)
    gx, gy = np.meshgrid(grid, grid)
    pts = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype)

    def background(ax, model):
        density = np.exp(np.asarray(model.log_prob(pts))).reshape(gx.shape)
        ax.contourf(gx, gy, density, levels=20, cmap="Greys", alpha=0.6)
        ax.add_patch(plt.Circle(cfg.target, cfg.radius, fill=False, color="tab:red", lw=2, label="target"))
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")

    ax = axes[0]
    background(ax, mixture)
    path_xy = np.stack([x for _, x in snapshots])  # (snapshots, batch, 2)
    for b in range(path_xy.shape[1]):
        ax.plot(path_xy[:, b, 0], path_xy[:, b, 1], color="tab:blue", alpha=0.35, lw=0.8)
    colors = plt.cm.viridis(np.linspace(0, 1, len(snapshots)))
    for (it, x), c in zip(snapshots, colors, strict=True):
        if it in (snapshots[0][0], snapshots[-1][0]):
            ax.scatter(x[:, 0], x[:, 1], s=10, color=c, label=f"iteration {it}", zorder=3)
    ax.set_title(f"x_0 while optimising x_T ({cfg.solver}, NFE {cfg.nfe}, gradient={cfg.gradient})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")

    ax = axes[1]
    for part in dict.fromkeys(r["part"] for r in rows):
        its = [r["iteration"] for r in rows if r["part"] == part]
        ax.plot(its, [r["inside"] for r in rows if r["part"] == part], label=f"{part}: fraction inside")
        ax.plot(its, [r["region_loss"] for r in rows if r["part"] == part], ls="--", label=f"{part}: region loss")
    ax.set_xlabel("optimizer step")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("objective", fontsize=9)

    if tuned is not None:
        ax = axes[2]
        background(ax, tuned)
        before = np.asarray(mixture.sample(jax.random.PRNGKey(7), 400))
        x_T = fs.prior(process, jax.random.PRNGKey(8), (400, 2), dtype)
        after = np.asarray(fs.sample(tuned.denoiser(process), x_T, "ddim", nfe=cfg.nfe, schedule=cfg.schedule))
        ax.scatter(before[:, 0], before[:, 1], s=4, color="tab:gray", alpha=0.5, label="before (data)")
        ax.scatter(after[:, 0], after[:, 1], s=4, color="tab:orange", alpha=0.7, label="after DRaFT (samples)")
        m0, m1 = np.asarray(mixture.means), np.asarray(tuned.means)
        for a, b in zip(m0, m1, strict=True):
            ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="->", color="tab:green"))
        ax.set_title(f"DRaFT-{cfg.draft_k}: means fine-tuned ({cfg.draft_steps} steps)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: ``fastsample run`` validates this experiment's configs with its own class
CONFIG = OptimizeNoiseConfig


if __name__ == "__main__":  # the same as `fastsample run CONFIG [key=value ...]`
    from fastsample.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))

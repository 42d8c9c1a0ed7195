"""DRaFT-K: fine-tune a trained digits network on a differentiable reward through the last K steps.

    fastsample run configs/draft_digits.yaml [key=value ...]

Clark, Vicol, Swersky, Fleet: Directly Fine-Tuning Diffusion Models on Differentiable Rewards
(2024). A sample is drawn with DDIM on ``nfe`` steps; the first ``nfe - k`` steps run under
``stop_gradient`` and only the last ``k`` are differentiated (DRaFT-K; ``k = nfe`` is full DRaFT),
so the reward's gradient reaches the network weights through the model calls of those ``k`` steps.
The reward is the log-probability of ``target_class`` under a digit classifier: the scikit-learn
``MLPClassifier`` of :func:`fastsample.metrics.digits_features` (one hidden ReLU layer, trained on
the digits train split), its forward pass re-implemented in JAX with its fitted weights. Adam on
all network weights (no LoRA) minimises

    -mean_b log p(target_class | x_0,b) + anchor * |theta - theta_0|^2,

with fresh prior noise at every step. The network is ``checkpoint`` (a ``fastsample train-model``
run folder) or, when that is empty, a small MLP trained here with the ``train`` section.

Writes ``metrics.json/.csv`` (per step: reward, loss, fraction of samples the classifier assigns
to the target; and the held-out evaluation before and after), ``table.md`` and ``draft.png``
(samples before / after on the same noise, the reward curve).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import fastsample as fs
from fastsample import results
from fastsample.config import ConfigError, NetworkConfig, TrainConfig


def _default_train() -> TrainConfig:
    return TrainConfig(name="draft_base", data="digits", dequantize=0.125, network=NetworkConfig(hidden=128, depth=2),
                       steps=4000, batch_size=256, learning_rate=2e-3, warmup_steps=50, ema_decay=0.99,
                       steps_per_call=250, save_every=4000, eval_samples=0)


@dataclass(frozen=True)
class DraftConfig:
    """The experiment's config (``configs/draft_digits.yaml``)."""

    name: str = "draft_digits"
    experiment: str = "draft"
    checkpoint: str = ""
    train: TrainConfig = field(default_factory=_default_train)
    nfe: int = 10
    k: int = 2
    schedule: str = "karras"
    target_class: int = 3
    classifier_seed: int = 0
    steps: int = 40
    batch_size: int = 32
    learning_rate: float = 3e-4
    anchor: float = 0.0
    eval_samples: int = 256
    seed: int = 0
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float64")})
    output_dir: str = "results"
    plots: bool = True

    def __post_init__(self):
        for key in ("nfe", "steps", "batch_size", "eval_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1; got {getattr(self, key)}.")
        if not 1 <= self.k <= self.nfe:
            raise ConfigError(f"k must be in [1, nfe={self.nfe}] (the steps differentiated); got {self.k}.")
        if not 0 <= self.target_class <= 9:
            raise ConfigError(f"target_class must be a digit 0..9; got {self.target_class}.")
        if not self.learning_rate > 0 or self.anchor < 0:
            raise ConfigError(f"learning_rate must be > 0 and anchor >= 0; got {self.learning_rate}, {self.anchor}.")


# ------------------------------------------------------------------------------ the pieces


def truncated_sample(denoiser, x_T, ts, k: int, solver="ddim"):
    """DRaFT-K sampling: ``solver`` over the grid ``ts`` with gradients only through the last ``k``
    steps (the state entering them is under ``stop_gradient``; ``k = len(ts) - 1``: the whole
    graph). Single-step solvers only (splitting the grid leaves them unchanged)."""
    n = ts.shape[0] - 1
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of steps); got {k}.")
    x = x_T
    if k < n:
        x = jax.lax.stop_gradient(fs.sample(denoiser, x_T, solver, nfe=None, timesteps=ts[: n - k + 1]))
    return fs.sample(denoiser, x, solver, nfe=None, timesteps=ts[n - k:])


class DigitClassifier:
    """The scikit-learn digits classifier of ``fastsample.metrics`` as a JAX function: ``logits(x)``
    ``= relu(x W0 + b0) W1 + b1`` with its fitted weights (so rewards built on it are differentiable)."""

    def __init__(self, seed: int = 0, dtype=jnp.float32):
        from fastsample.metrics import digits_classifier

        clf = digits_classifier(int(seed))
        self.weights = [jnp.asarray(w, dtype) for w in (*clf.coefs_, *clf.intercepts_)]
        self.sklearn = clf

    def logits(self, x):
        w0, w1, b0, b1 = self.weights
        return jax.nn.relu(x @ w0 + b0) @ w1 + b1

    def log_prob(self, x, label: int):
        return jax.nn.log_softmax(self.logits(x))[..., label]


def trained_network(cfg: DraftConfig, out: Path, progress: bool = True):
    """The network to fine-tune: ``cfg.checkpoint`` restored, or one trained with ``cfg.train``."""
    from fastsample.models import load_network, train

    if cfg.checkpoint:
        return load_network(cfg.checkpoint)
    trained, _, _ = train(cfg.train, progress=progress, run_dir=out / "base_network")
    return trained


def with_params(trained, params):
    return type(trained)(trained.net.replace(params), trained.objective, trained.dim, trained.num_classes)


def draft(cfg: DraftConfig, trained, classifier: DigitClassifier, dtype, progress: bool = True):
    """Adam on the network weights with the DRaFT-K reward. Returns per-step rows and the tuned weights."""
    process = trained.process
    ts = fs.get_timesteps(process, cfg.nfe, cfg.schedule).astype(dtype)
    params0 = trained.net.params

    def loss_fn(params, key):
        den = with_params(trained, params).denoiser()
        x_T = fs.prior(process, key, (cfg.batch_size, trained.dim), dtype)
        x0 = truncated_sample(den, x_T, ts, cfg.k)
        logp = classifier.log_prob(x0, cfg.target_class)
        drift = sum(jnp.sum((p - q) ** 2) for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(params0),
                                                          strict=True))
        hit = jnp.mean(jnp.argmax(classifier.logits(x0), -1) == cfg.target_class)
        return -jnp.mean(logp) + cfg.anchor * drift, (jnp.mean(logp), hit)

    opt = optax.adam(cfg.learning_rate)

    @jax.jit
    def step(params, opt_state, key):
        (loss, (reward, hit)), grad = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
        updates, opt_state = opt.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, reward, hit

    params, opt_state = params0, opt.init(params0)
    base, rows = jax.random.PRNGKey(cfg.seed + 1), []
    for it in tqdm(range(cfg.steps), desc=f"DRaFT-{cfg.k}", disable=not progress):
        params, opt_state, loss, reward, hit = step(params, opt_state, jax.random.fold_in(base, it))
        rows.append({"part": "train", "step": it, "loss": float(loss), "reward": float(reward),
                     "target_frac": float(hit)})
    return rows, params


def evaluate(cfg: DraftConfig, trained, params, classifier, dtype, x_T):
    """Mean reward and target fraction of DDIM samples (all ``nfe`` steps) from the fixed noise ``x_T``."""
    den = with_params(trained, params).denoiser()
    x0 = fs.sample(den, x_T, "ddim", nfe=cfg.nfe, schedule=cfg.schedule)
    logp = classifier.log_prob(x0, cfg.target_class)
    hit = jnp.argmax(classifier.logits(x0), -1) == cfg.target_class
    return float(jnp.mean(logp)), float(jnp.mean(hit)), np.asarray(x0)


def run(cfg: DraftConfig, out: Path, progress: bool = True) -> list[dict]:
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    trained = trained_network(cfg, out, progress)
    trained = jax.tree.map(lambda a: a.astype(dtype) if isinstance(a, jax.Array) and
                           jnp.issubdtype(a.dtype, jnp.floating) else a, trained)
    classifier = DigitClassifier(cfg.classifier_seed, dtype)
    x_eval = fs.prior(trained.process, jax.random.PRNGKey(cfg.seed + 2), (cfg.eval_samples, trained.dim), dtype)
    before = evaluate(cfg, trained, trained.net.params, classifier, dtype, x_eval)
    rows, params = draft(cfg, trained, classifier, dtype, progress)
    after = evaluate(cfg, trained, params, classifier, dtype, x_eval)
    summary = [{"part": "eval", "step": s, "reward": r, "target_frac": f}
               for s, (r, f, _) in ((0, before), (cfg.steps, after))]
    results.write_rows(out, "metrics", rows + summary)
    (out / "table.md").write_text(
        f"DRaFT-{cfg.k} (DDIM, {cfg.nfe} steps, gradient through the last {cfg.k}), reward = log p(digit "
        f"{cfg.target_class}); held-out noise ({cfg.eval_samples} samples) before and after {cfg.steps} steps.\n\n"
        + results.markdown_table(summary, ["part", "step", "reward", "target_frac"]))
    if cfg.plots:
        _plot(cfg, rows, before[2], after[2], out / "draft.png")
    return summary


def _plot(cfg, rows, before, after, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(x, n=8):
        x = np.clip(x[: n * n].reshape(-1, 8, 8), -1, 1)
        x = np.concatenate([x, np.zeros((n * n - len(x), 8, 8))]) if len(x) < n * n else x
        return x.reshape(n, n, 8, 8).transpose(0, 2, 1, 3).reshape(n * 8, n * 8)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    for ax, x, title in ((axes[0], before, "before"), (axes[1], after, f"after {cfg.steps} DRaFT-{cfg.k} steps")):
        ax.imshow(grid(x), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"{title} (same noise)", fontsize=9)
        ax.axis("off")
    ax = axes[2]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reward"] for r in rows], label=f"mean log p(digit {cfg.target_class})")
    ax.plot(steps, [r["target_frac"] for r in rows], label="fraction classified as target")
    ax.set_xlabel("fine-tuning step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training batch reward", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: ``fastsample run`` validates this experiment's configs with its own class
CONFIG = DraftConfig


if __name__ == "__main__":  # the same as `fastsample run CONFIG [key=value ...]`
    from fastsample.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))

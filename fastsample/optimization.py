"""Optimisation: the one training loop (:func:`run_steps`) and the optax fit of solver parameters
on top of it (:func:`fit`): one jitted step, data sharded over a mesh axis ``"data"`` with
parameters replicated, held-out validation with early stopping, JSON-lines metrics, and
checkpoints (:class:`fastsample.checkpoints.CheckpointStore`) from which a stopped fit resumes to
the same result. Network training (:func:`fastsample.models.train`) runs on the same loop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from .distributed import gather, is_main_process, replicate, resolve_mesh, shard_batch

__all__ = ["FitResult", "fit", "run_steps", "FIT_FORMAT"]

#: Format tag of a solver fit's checkpoints.
FIT_FORMAT = "fastsample-fit/1"


class FitResult(NamedTuple):
    """``params``: the best parameters on the validation set (the last ones without one);
    ``history``: one dict per evaluation (step, train_loss, val_loss, seconds)."""

    params: Any
    last_params: Any
    history: list
    steps: int
    best_val: float
    stopped_early: bool


def _num_examples(data) -> int:
    sizes = {a.shape[0] for a in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise ValueError(f"every array in the data must share the leading (example) axis; got sizes {sorted(sizes)}.")
    return sizes.pop()


def fit(
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    train,
    *,
    val=None,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    seed: int = 0,
    eval_every: int = 25,
    patience: int | None = None,
    mesh: Mesh | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> FitResult:
    """Minimise ``loss_fn(params, batch)`` (a mean over the batch) with ``optimizer``.

    Arguments:
        train, val: pytrees of arrays sharing a leading example axis (``val`` is held out and
            decides the returned parameters, the starting ones included, and early stopping).
        batch_size: examples per step (default: all); batches are drawn from
            ``fold_in(PRNGKey(seed), step)``, so a resumed fit sees the same batches.
        patience: stop after this many evaluations without a better validation loss.
        mesh: shard the data over its ``"data"`` axis (parameters are replicated); the batch size
            must divide evenly. Results equal the 1-device fit up to reduction order. ``"all"``:
            every device; in a multi-process job (:func:`fastsample.distributed.initialize`) ``None``
            means ``"all"``. ``train`` and ``val`` are the *global* data, the same on every process
            (e.g. drawn from the same key), or global arrays already placed with
            :func:`fastsample.distributed.shard_batch`; every process gets the same result, and
            only process 0 writes the log (all processes take part in checkpoints).
        checkpoint_dir: save the fit state there every ``checkpoint_every`` steps and resume
            from the latest checkpoint found there.
        log_path: append one JSON line per evaluation.
    """
    optimizer = optimizer or optax.adam(1e-2)
    n = _num_examples(train)
    batch_size = n if batch_size is None else int(batch_size)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training examples); got {batch_size}.")
    if steps < 0 or eval_every < 1 or checkpoint_every < 1:
        raise ValueError(f"need steps >= 0, eval_every >= 1, checkpoint_every >= 1; got {steps}, {eval_every}, "
                         f"{checkpoint_every}.")
    mesh = resolve_mesh("all" if mesh is None and jax.process_count() > 1 else mesh)
    if mesh is not None:
        devices = mesh.shape["data"]
        if batch_size % devices or n % devices:
            raise ValueError(f"batch_size ({batch_size}) and the number of examples ({n}) must be multiples of the "
                             f"{devices} devices on the mesh's 'data' axis.")
        shard = NamedSharding(mesh, PartitionSpec("data"))
        train = shard_batch(train, mesh)
        if val is not None:  # a held-out set that does not split evenly is replicated
            val = shard_batch(val, mesh) if _num_examples(val) % devices == 0 else replicate(val, mesh)
        params = replicate(params, mesh)
    else:
        shard = None
    key = jax.random.PRNGKey(seed)

    @jax.jit
    def step_fn(params, opt_state, step, train):
        if batch_size == n:
            batch = train
        else:
            idx = jax.random.choice(jax.random.fold_in(key, step), n, (batch_size,), replace=False)
            batch = jax.tree.map(lambda a: a[idx], train)
            if shard is not None:
                batch = jax.lax.with_sharding_constraint(batch, shard)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    val_loss_fn = jax.jit(loss_fn)
    state = {
        "params": params, "opt_state": optimizer.init(params), "best_params": params,
        "step": jnp.asarray(0), "best_val": jnp.asarray(np.inf), "bad_evals": jnp.asarray(0),
    }
    if mesh is not None:  # checkpoints hold (and restore into) arrays replicated on the mesh
        state = replicate(state, mesh)
    store = None
    if checkpoint_dir is not None:
        from .checkpoints import CheckpointStore

        store = CheckpointStore(checkpoint_dir, keep=2, format=FIT_FORMAT)
        if store.latest_step() >= 0:
            state = store.restore({"state": state}, uncommitted=False)["state"]
    start = int(state["step"])
    history = _read_log(log_path, upto=start)
    if log_path is not None and not is_main_process():
        log_path = None  # one writer per job
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("".join(json.dumps(h) + "\n" for h in history))

    t0 = time.perf_counter()
    state = {**state, "best_val": float(state["best_val"]), "bad_evals": int(state["bad_evals"])}
    if val is not None and start == 0 and not np.isfinite(state["best_val"]):  # the start is a candidate too
        state["best_val"] = float(val_loss_fn(state["params"], val))
        history.append({"step": 0, "val_loss": state["best_val"], "seconds": 0.0})
        _append_log(log_path, history[-1])

    def advance(state, step, stop):
        params, opt_state, loss = step_fn(state["params"], state["opt_state"], step, train)
        return {**state, "params": params, "opt_state": opt_state}, loss

    def after(state, done, loss):
        if not (done % eval_every == 0 or done == steps):
            return state, False, None
        record = {"step": done, "train_loss": float(loss), "seconds": round(time.perf_counter() - t0, 3)}
        if val is not None:
            v = float(val_loss_fn(state["params"], val))
            record["val_loss"] = v
            if v < state["best_val"]:
                state = {**state, "best_val": v, "best_params": state["params"], "bad_evals": 0}
            else:
                state = {**state, "bad_evals": state["bad_evals"] + 1}
        history.append(record)
        _append_log(log_path, record)
        stop = patience is not None and state["bad_evals"] >= patience
        return state, stop, {"loss": f"{float(loss):.3g}", "val": f"{record.get('val_loss', float('nan')):.3g}"}

    def save(state, done):
        snapshot = {**state, "step": jnp.asarray(done), "best_val": jnp.asarray(state["best_val"]),
                    "bad_evals": jnp.asarray(state["bad_evals"])}
        store.save(done, {"state": snapshot if mesh is None else replicate(snapshot, mesh)})

    state, done, stopped = run_steps(advance, state, start, steps, after=after, save=None if store is None else save,
                                     save_due=lambda step: step % checkpoint_every == 0, desc="fit",
                                     progress=progress)
    best_val, params = state["best_val"], state["params"]
    final = state["best_params"] if val is not None and np.isfinite(best_val) else params
    if jax.process_count() > 1:  # replicated global arrays -> this process's own copies
        final, params = jax.tree.map(lambda a: jnp.asarray(gather(a)), (final, params))
    return FitResult(final, params, history, done, best_val, stopped)


def run_steps(advance, state, start: int, end: int, *, boundary=None, after=None, save=None, save_due=None,
              desc: str = "fit", total: int | None = None, progress: bool = True):
    """The training loop of every fit in fastsample (solver parameters and networks).

    From step ``start`` to ``end``: ``state, out = advance(state, step, stop)`` runs the steps
    ``[step, stop)`` with ``stop = boundary(step)`` (default ``step + 1``; it must depend on the
    step count only, so that a resumed run runs the same chunks); then ``state, stop_now, postfix =
    after(state, stop, out)`` evaluates, logs and decides on early stopping; ``save(state, step)``
    checkpoints when ``save_due(step)``, at the end, on early stopping, and on an interrupt
    (Ctrl-C) after the last completed chunk. Returns ``(state, step, stopped_early)``.
    """
    bar = tqdm(total=end if total is None else total, initial=start, desc=desc, disable=not progress)
    step = saved = start
    stopped = False
    try:
        while step < end:
            stop = min(step + 1 if boundary is None else boundary(step), end)
            state, out = advance(state, step, stop)
            postfix = None
            if after is not None:
                state, stopped, postfix = after(state, stop, out)
            bar.update(stop - step)
            if postfix:
                bar.set_postfix(postfix)
            step = stop
            if save is not None and (step == end or stopped or (save_due is not None and save_due(step))):
                save(state, step)
                saved = step
            if stopped:
                break
    except KeyboardInterrupt:
        if save is not None and step > saved:
            save(state, step)
        raise
    finally:
        bar.close()
    return state, step, stopped


def _read_log(path, upto: int) -> list:
    if path is None or not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _append_log(path, record) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

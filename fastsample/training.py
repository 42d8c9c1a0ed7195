"""The optax loop that fits solver parameters: one jitted step, data sharded over a mesh axis
``"data"`` with parameters replicated, held-out validation with early stopping, JSON-lines
metrics, and orbax checkpoints from which a stopped fit resumes to the same result."""

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

from .distributed import data_mesh, gather, is_main_process, replicate, resolve_mesh, shard_batch

__all__ = ["FitResult", "fit", "data_mesh"]


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
    manager = _manager(checkpoint_dir, checkpoint_every)
    if manager is not None and manager.latest_step() is not None:
        state = _restore(manager, state)
    start = int(state["step"])
    history = _read_log(log_path, upto=start)
    if log_path is not None and not is_main_process():
        log_path = None  # one writer per job
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("".join(json.dumps(h) + "\n" for h in history))

    params, opt_state = state["params"], state["opt_state"]
    best_params, best_val, bad = state["best_params"], float(state["best_val"]), int(state["bad_evals"])
    stopped, t0, done = False, time.perf_counter(), start
    if val is not None and start == 0 and not np.isfinite(best_val):  # the starting point is a candidate too
        best_val = float(val_loss_fn(params, val))
        history.append({"step": 0, "val_loss": best_val, "seconds": 0.0})
        _append_log(log_path, history[-1])
    bar = tqdm(range(start, steps), desc="fit", disable=not progress, initial=start, total=steps)
    loss = jnp.nan
    for step in bar:
        params, opt_state, loss = step_fn(params, opt_state, step, train)
        done = step + 1
        if done % eval_every == 0 or done == steps:
            record = {"step": done, "train_loss": float(loss), "seconds": round(time.perf_counter() - t0, 3)}
            if val is not None:
                v = float(val_loss_fn(params, val))
                record["val_loss"] = v
                if v < best_val:
                    best_val, best_params, bad = v, params, 0
                else:
                    bad += 1
            history.append(record)
            _append_log(log_path, record)
            bar.set_postfix(loss=f"{float(loss):.3g}", val=f"{record.get('val_loss', float('nan')):.3g}")
            stopped = patience is not None and bad >= patience
        if manager is not None and (done % checkpoint_every == 0 or done == steps or stopped):
            snapshot = {"params": params, "opt_state": opt_state, "best_params": best_params,
                        "step": jnp.asarray(done), "best_val": jnp.asarray(best_val), "bad_evals": jnp.asarray(bad)}
            _save(manager, done, snapshot if mesh is None else replicate(snapshot, mesh))
        if stopped:
            break
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
    final = best_params if val is not None and np.isfinite(best_val) else params
    if jax.process_count() > 1:  # replicated global arrays -> this process's own copies
        final, params = jax.tree.map(lambda a: jnp.asarray(gather(a)), (final, params))
    return FitResult(final, params, history, done, best_val, stopped)


def _manager(directory, every):
    if directory is None:
        return None
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def _save(manager, step, state):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _restore(manager, like):
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype,
                                                           sharding=getattr(a, "sharding", None)), like)
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    return restored


def _read_log(path, upto: int) -> list:
    if path is None or not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _append_log(path, record) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

"""orbax checkpoints of training runs: save, restore, resume, and load a network as a Denoiser.

A checkpoint folder is an ``orbax.checkpoint.CheckpointManager`` directory with one subfolder per
saved step. Each step holds the items ``params``, ``ema``, ``opt_state``, ``progress`` (step and
PRNG key) as orbax array trees, and ``meta`` as JSON: the network / objective description
(``spec``) and the training config. Restoring rebuilds the structure from ``spec`` and reads the
arrays into it: nothing is unpickled and no code is read from the folder.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .training import TrainState, build_from_spec

__all__ = ["CheckpointStore", "load_network", "read_meta", "FORMAT"]

#: Format tag stored in every checkpoint's metadata.
FORMAT = "fastsample-network/1"

#: Config keys that may change when a run is resumed (they do not change what is trained).
RESUMABLE_KEYS = ("steps", "save_every", "keep_checkpoints", "steps_per_call", "eval_samples", "eval_nfe",
                  "eval_solver", "output_dir", "name")


def _uncommitted(tree):
    """Restored arrays as fresh (uncommitted) device arrays with the same bits: orbax returns
    arrays committed to a device, which jit treats as a different input than the arrays of a
    fresh run, so a resumed run would compile its training step again."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)


class CheckpointStore:
    """The checkpoints of one training run in ``directory`` (created on first save).

    Arguments:
        directory: the run's folder.
        keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self._manager = None

    def _mgr(self, create: bool) -> ocp.CheckpointManager | None:
        if self._manager is None:
            if not create and not self.directory.is_dir():
                return None
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def steps(self) -> list[int]:
        mgr = self._mgr(create=False)
        return [] if mgr is None else sorted(mgr.all_steps())

    def latest_step(self) -> int:
        """The latest saved step, ``-1`` if there is none."""
        steps = self.steps()
        return steps[-1] if steps else -1

    def save(self, state: TrainState, spec: dict, config: dict | None = None) -> int:
        """Save ``state`` (at its own step) with the network ``spec`` and training ``config``."""
        step = int(state.step)
        meta = {"format": FORMAT, "step": step, "spec": spec, "config": config}
        mgr = self._mgr(create=True)
        mgr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            ema=ocp.args.StandardSave(state.ema),
            opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.StandardSave({"step": state.step, "key": state.key}),
            meta=ocp.args.JsonSave(meta),
        ), force=True)
        mgr.wait_until_finished()
        return step

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise ValueError(f"no checkpoint in {str(self.directory)!r} (expected an orbax checkpoint folder "
                             "written by `fastsample train-model`).")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {str(self.directory)!r}; saved steps: {steps}.")
        return step

    def meta(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default: the latest)."""
        step = self._step(step)
        meta = self._mgr(create=False).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{str(self.directory)!r} step {step} is not a fastsample network checkpoint "
                             f"(format {found!r}, expected {FORMAT!r}).")
        return meta

    def restore(self, template: TrainState, step: int | None = None) -> TrainState:
        """The full training state of ``step`` (default: the latest), read into ``template``'s structure."""
        step = self._step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        got = self._mgr(create=False).restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            ema=ocp.args.StandardRestore(abstract.ema),
            opt_state=ocp.args.StandardRestore(abstract.opt_state),
            progress=ocp.args.StandardRestore({"step": abstract.step, "key": abstract.key}),
        ))
        return _uncommitted(TrainState(got.params, got.ema, got.opt_state, got.progress["step"], got.progress["key"]))

    def restore_weights(self, template_params, step: int | None = None, ema: bool = True):
        """Only the EMA (``ema=True``) or raw parameters of ``step``."""
        step = self._step(step)
        item = "ema" if ema else "params"
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_params)
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
        got = self._mgr(create=False).restore(step, args=args)
        return _uncommitted(got[item])

    def restore_latest(self, template: TrainState, spec: dict, config: dict) -> TrainState | None:
        """Resume: the latest state if this run has checkpoints (``None`` otherwise), after checking
        that they were written for the same network and the same training configuration (keys in
        :data:`RESUMABLE_KEYS` may differ)."""
        if self.latest_step() < 0:
            return None
        meta = self.meta()
        old = meta.get("config") or {}
        changed = sorted(k for k in set(old) | set(config)
                         if k not in RESUMABLE_KEYS and old.get(k) != config.get(k))
        if meta["spec"] != spec or changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed) or "network structure"
            raise ValueError(f"{str(self.directory)!r} holds checkpoints of a different training run ({detail}); "
                             "choose another name or output_dir, or restore the original settings.")
        return self.restore(template)


def read_meta(directory, step: int | None = None) -> dict:
    """The metadata (network spec, training config, step) of a checkpoint folder."""
    return CheckpointStore(directory).meta(step)


def load_network(directory, step: int | None = None, ema: bool = True):
    """Restore a trained network from a checkpoint folder (default: its latest step, EMA weights).

    Returns a :class:`~fastsample.models.training.TrainedNetwork`: ``load_network(path).denoiser()``
    is the :class:`~fastsample.Denoiser` under the network's own process.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder {str(directory)!r} does not exist.")
    store = CheckpointStore(directory)
    meta = store.meta(step)
    fresh = build_from_spec(meta["spec"])
    params = store.restore_weights(fresh.net.params, meta["step"], ema=ema)
    return fresh.__class__(fresh.net.replace(params), fresh.objective, fresh.dim, fresh.num_classes)


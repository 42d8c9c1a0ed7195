"""Checkpoints of network training runs: save, restore, resume, and load a network as a Denoiser.

A run's folder is a :class:`fastsample.checkpoints.CheckpointStore` whose steps hold the items
``params``, ``ema``, ``opt_state``, ``progress`` (step and PRNG key) and, as JSON metadata, the
network / objective description (``spec``) and the training config. Restoring rebuilds the
structure from ``spec`` and reads the arrays into it: nothing is unpickled and no code is read
from the folder.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoints import CheckpointStore
from .training import TrainState, build_from_spec

__all__ = ["NetworkCheckpoints", "load_network", "read_meta", "FORMAT"]

#: Format tag stored in every checkpoint's metadata.
FORMAT = "fastsample-network/1"

#: Config keys that may change when a run is resumed (they do not change what is trained).
RESUMABLE_KEYS = ("steps", "save_every", "keep_checkpoints", "steps_per_call", "eval_samples", "eval_nfe",
                  "eval_solver", "output_dir", "name")


class NetworkCheckpoints:
    """The checkpoints of one training run in ``directory`` (created on first save): a
    :class:`fastsample.checkpoints.CheckpointStore` of :class:`TrainState` items and the network spec.

    Arguments:
        directory: the run's folder.
        keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory, keep: int = 2):
        self.store = CheckpointStore(directory, keep=keep, format=FORMAT)
        self.directory = self.store.directory

    def steps(self) -> list[int]:
        return self.store.steps()

    def latest_step(self) -> int:
        """The latest saved step, ``-1`` if there is none."""
        return self.store.latest_step()

    def save(self, state: TrainState, spec: dict, config: dict | None = None) -> int:
        """Save ``state`` (at its own step) with the network ``spec`` and training ``config``."""
        return self.store.save(int(state.step), {
            "params": state.params, "ema": state.ema, "opt_state": state.opt_state,
            "progress": {"step": state.step, "key": state.key}}, {"spec": spec, "config": config})

    def meta(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default: the latest)."""
        return self.store.meta(step)

    def restore(self, template: TrainState, step: int | None = None) -> TrainState:
        """The full training state of ``step`` (default: the latest), read into ``template``'s structure."""
        got = self.store.restore({"params": template.params, "ema": template.ema, "opt_state": template.opt_state,
                                  "progress": {"step": template.step, "key": template.key}}, step)
        return TrainState(got["params"], got["ema"], got["opt_state"], got["progress"]["step"],
                          got["progress"]["key"])

    def restore_weights(self, template_params, step: int | None = None, ema: bool = True):
        """Only the EMA (``ema=True``) or raw parameters of ``step``."""
        item = "ema" if ema else "params"
        return self.store.restore({item: template_params}, step)[item]

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
    return NetworkCheckpoints(directory).meta(step)


def load_network(directory, step: int | None = None, ema: bool = True):
    """Restore a trained network from a checkpoint folder (default: its latest step, EMA weights).

    Returns a :class:`~fastsample.models.training.TrainedNetwork`: ``load_network(path).denoiser()``
    is the :class:`~fastsample.Denoiser` under the network's own process.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder {str(directory)!r} does not exist.")
    store = NetworkCheckpoints(directory)
    meta = store.meta(step)
    fresh = build_from_spec(meta["spec"])
    params = store.restore_weights(fresh.net.params, meta["step"], ema=ema)
    return fresh.__class__(fresh.net.replace(params), fresh.objective, fresh.dim, fresh.num_classes)


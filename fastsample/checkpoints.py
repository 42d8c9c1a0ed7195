"""The one checkpoint store: numbered steps of named array trees plus JSON metadata, in orbax.

A store is an ``orbax.checkpoint.CheckpointManager`` folder with one subfolder per saved step.
Each step holds its items (pytrees of arrays, e.g. ``params``, ``opt_state``) as orbax array
trees and ``meta`` as JSON, whose ``format`` names what wrote it. Restoring reads the arrays into
the structure of a template: nothing is unpickled and no code is read from the folder. Solver fits
(:func:`fastsample.optimization.fit`) and network training (:func:`fastsample.models.train`) both
keep their state here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointStore"]


def _ocp():
    import orbax.checkpoint as ocp  # on first use: ``import fastsample`` does not import orbax

    return ocp


def _uncommitted(tree):
    """Restored arrays as fresh (uncommitted) device arrays with the same bits: orbax returns
    arrays committed to a device, which jit treats as a different input than the arrays of a
    fresh run, so a resumed run would compile its step again."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)


def _abstract(tree):
    """Shapes, dtypes and (for arrays placed on a mesh) shardings to restore into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype,
                                                       sharding=getattr(a, "sharding", None)), tree)


class CheckpointStore:
    """The checkpoints of one run in ``directory`` (created on the first save).

    Arguments:
        directory: the run's folder.
        keep: how many of the latest steps to keep.
        format: the tag every step's metadata carries; reading a step with another tag is an error
            (a fit's folder is not a network's).
    """

    def __init__(self, directory, keep: int = 2, format: str | None = None):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1; got {keep!r}.")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.format = format
        self._manager = None

    def _mgr(self, create: bool):
        ocp = _ocp()
        if self._manager is None:
            if not create and not self.directory.is_dir():
                return None
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        mgr = self._mgr(create=False)
        return [] if mgr is None else sorted(mgr.all_steps())

    def latest_step(self) -> int:
        """The latest saved step, ``-1`` if there is none."""
        steps = self.steps()
        return steps[-1] if steps else -1

    def save(self, step: int, items: dict[str, Any], meta: dict | None = None) -> int:
        """Save the array trees ``items`` and the JSON-able ``meta`` as ``step`` (waits until written)."""
        ocp = _ocp()
        meta = {"format": self.format, "step": int(step), **(meta or {})}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        mgr = self._mgr(create=True)
        mgr.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)
        mgr.wait_until_finished()
        return int(step)

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise ValueError(f"no checkpoint in {str(self.directory)!r} (expected an orbax checkpoint folder "
                             f"written by fastsample{f' ({self.format})' if self.format else ''}).")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {str(self.directory)!r}; saved steps: {steps}.")
        return step

    def meta(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default: the latest)."""
        ocp = _ocp()
        step = self._step(step)
        meta = self._mgr(create=False).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        found = meta.get("format") if isinstance(meta, dict) else None
        if self.format is not None and found != self.format:
            raise ValueError(f"{str(self.directory)!r} step {step} is not a {self.format} checkpoint "
                             f"(format {found!r}).")
        return meta

    def restore(self, like: dict[str, Any], step: int | None = None, *, uncommitted: bool = True) -> dict[str, Any]:
        """The items named in ``like`` at ``step`` (default: the latest), read into the structure,
        dtypes and shardings of ``like``'s trees. ``uncommitted``: as fresh host-placed arrays
        (``False`` keeps the shardings, e.g. arrays replicated over a multi-process mesh)."""
        step = self._step(step)
        self.meta(step)  # the format check
        ocp = _ocp()
        args = ocp.args.Composite(**{name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in like.items()})
        got = self._mgr(create=False).restore(step, args=args)
        out = {name: got[name] for name in like}
        return _uncommitted(out) if uncommitted else out

"""Saving and loading fitted solvers: ``solver.json`` (metadata) + ``arrays.npz`` (coefficients).

Nothing is read with pickle: the metadata is JSON and the arrays load with
``allow_pickle=False``. A folder is written under a temporary name and renamed when complete, so
a failed save never leaves a half-written solver, and an existing one is never overwritten
unless asked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .program import ProgramSolver

__all__ = ["save_solver", "load_solver", "model_fingerprint"]


def model_fingerprint(denoiser) -> str:
    """A short hash of the denoiser's arrays and process, stored with fitted solvers."""
    h = hashlib.sha256(type(denoiser.process).__name__.encode())
    for leaf in jax.tree.leaves(denoiser):
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]

FORMAT = "fastsample.program/1"


def save_solver(path: str | Path, solver: ProgramSolver, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``solver`` to the folder ``path`` (with optional JSON-able ``extra`` metadata)."""
    if not isinstance(solver, ProgramSolver):
        raise ValueError(f"only fitted (program) solvers are saved; got {type(solver).__name__}.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it.")
    meta = {
        "format": FORMAT, "method": solver.method, "base": solver.base, "process": solver.process,
        "nfe": solver.fitted_nfe, "final_zero": solver.final_zero, "fingerprint": solver.fingerprint,
        "step_of": list(solver.step_of), "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "solver.json").write_text(json.dumps(meta, indent=2))
    np.savez(tmp / "arrays.npz", times=np.asarray(solver.times), t_end=np.asarray(solver.t_end),
             a=np.asarray(solver.a), B=np.asarray(solver.B))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_solver(path: str | Path) -> ProgramSolver:
    """The fitted solver saved in ``path``; it samples through :func:`fastsample.sample`."""
    path = Path(path)
    meta_file, array_file = path / "solver.json", path / "arrays.npz"
    if not meta_file.is_file() or not array_file.is_file():
        raise ValueError(f"{path} is not a saved fastsample solver (needs solver.json and arrays.npz).")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r}; expected {FORMAT!r}.")
    with np.load(array_file, allow_pickle=False) as arrays:
        times, t_end, a, B = (jnp.asarray(arrays[k]) for k in ("times", "t_end", "a", "B"))
    if times.shape != (meta["nfe"],) or a.shape != (meta["nfe"] + 1,) or B.shape != (meta["nfe"] + 1, meta["nfe"]):
        raise ValueError(f"{path}: arrays do not match nfe={meta['nfe']}.")
    return ProgramSolver(times, t_end, a, B, tuple(meta["step_of"]), method=meta["method"], base=meta["base"],
                         process=meta["process"], final_zero=meta["final_zero"], fingerprint=meta["fingerprint"])

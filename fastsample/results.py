"""Results folders: a fresh folder per run holding the resolved config, the environment,
metrics as JSON and CSV, a markdown table and plots. A run never overwrites an earlier folder."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import yaml

__all__ = [
    "new_results_dir",
    "environment",
    "write_rows",
    "markdown_table",
    "finalize",
    "largest_reachable",
    "plot_error_vs_nfe",
    "plot_samples",
]


def new_results_dir(root: str | Path, name: str) -> Path:
    """Create and return ``root/name-YYYYmmdd-HHMMSS`` (with ``-2``, ``-3``... if it exists).

    The folder is first created with a ``.partial`` suffix; :func:`finalize` renames it, so a
    failed run never leaves something that looks like a finished result.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{name}-{stamp}"
    for i in range(1, 1000):
        candidate = root / (base if i == 1 else f"{base}-{i}")
        partial = candidate.with_name(candidate.name + ".partial")
        if candidate.exists() or partial.exists():
            continue
        try:
            partial.mkdir()
        except FileExistsError:
            continue
        return partial
    raise RuntimeError(f"could not create a fresh results folder under {root}")


def finalize(folder: Path) -> Path:
    """Rename a ``.partial`` results folder to its final name; returns the final path."""
    final = folder.with_name(folder.name.removesuffix(".partial"))
    os.rename(folder, final)
    return final


def environment() -> dict:
    """JAX version, devices, Python, platform and git commit (if any) of this run."""
    import jax

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "x64": bool(jax.config.jax_enable_x64),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def write_rows(folder: Path, stem: str, rows: list[dict]) -> None:
    """Write ``rows`` as ``stem.json`` and ``stem.csv``."""
    (folder / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    if rows:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with open(folder / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) with the given ``columns``."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----- sweep helpers and plots -------------------------------------------------------------------


def largest_reachable(solver, budget: int):
    """``(steps, nfe)`` for the largest NFE ``<= budget`` that ``solver`` can use exactly, or
    ``(None, None)`` if the budget is below its minimum."""
    for nfe in range(budget, 0, -1):
        try:
            return solver.steps_for_nfe(nfe), nfe
        except ValueError:
            continue
    return None, None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_vs_nfe(rows: list[dict], path: Path, title: str, key: str = "rmse", ylabel: str = "RMSE to reference"):
    """Log-log plot of ``row[key]`` against ``row["nfe"]``, one line per solver."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name in dict.fromkeys(r["solver"] for r in rows):
        pts = sorted((r["nfe"], r[key]) for r in rows
                     if r["solver"] == name and r.get("nfe") and r.get(key) is not None and r[key] > 0)
        if pts:
            ax.loglog(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(x, path: Path, title: str = "", reference=None, max_images: int = 64) -> bool:
    """A picture of samples: a grid of 8x8 digit images (``x`` of shape ``(n, 64)``, pixels in
    ``[-1, 1]``) or a 2-D scatter plot (``(n, 2)``, over ``reference`` points in grey if given).
    Returns ``False`` (and writes nothing) for other shapes."""
    import numpy as np

    x = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    if x.shape[1] not in (2, 64):
        return False
    plt = _pyplot()
    if x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        if reference is not None:
            ref = np.asarray(reference, np.float64)
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="C0", label="samples")
        ax.set_aspect("equal")
        ax.legend(fontsize="small", markerscale=4)
    else:
        n = min(max_images, x.shape[0])
        cols = int(np.ceil(np.sqrt(n)))
        rows_ = int(np.ceil(n / cols))
        canvas = np.full((rows_ * 9 + 1, cols * 9 + 1), -0.6)  # light grey 1-pixel gaps
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[1 + 9 * r: 9 + 9 * r, 1 + 9 * c: 9 + 9 * c] = np.clip(x[i].reshape(8, 8), -1.0, 1.0)
        fig, ax = plt.subplots(figsize=(cols * 0.45 + 0.4, rows_ * 0.45 + 0.6))
        ax.imshow(canvas, cmap="gray_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.axis("off")
    ax.set_title(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

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

__all__ = ["new_results_dir", "environment", "write_rows", "markdown_table", "finalize"]


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

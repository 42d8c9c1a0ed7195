"""Experiment configs: YAML -> frozen dataclasses with strict validation.

Unknown keys and invalid values raise :class:`ConfigError` naming the key, the value and what
is allowed. ``key=value`` overrides (dotted keys, YAML values) apply before validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "ModelConfig",
    "ProcessConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


def _choices(*allowed):
    return {"choices": allowed}


@dataclass(frozen=True)
class ModelConfig:
    """The model to sample. ``gmm_*`` are exact Gaussian mixtures (ground truth available)."""

    kind: str = field(default="gmm_digits", metadata=_choices("gmm_digits", "gmm_ring", "gmm_grid"))
    n_components: int = 10
    covariance: str = field(default="full", metadata=_choices("full", "diag", "spherical"))
    seed: int = 0


@dataclass(frozen=True)
class ProcessConfig:
    """The noise process: ``kind`` plus the constructor options of that process."""

    kind: str = field(
        default="vp_discrete",
        metadata=_choices("vp_linear", "vp_cosine", "vp_discrete", "ve", "edm", "flow_matching"),
    )
    preset: str = field(default="ddpm_linear", metadata=_choices("ddpm_linear", "scaled_linear"))
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: which model, process, solvers, budgets and metrics."""

    name: str = "experiment"
    experiment: str = "compare_solvers"
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    solvers: list[str] = field(default_factory=lambda: ["euler", "heun", "ddim"])
    nfe: list[int] = field(default_factory=lambda: [5, 10, 20])
    schedule: str = "auto"
    schedule_options: dict = field(default_factory=dict)
    num_samples: int = 512
    seed: int = 0
    dtype: str = field(default="float64", metadata=_choices("float32", "float64"))
    output_dir: str = "results"
    plots: bool = True

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1; got {self.num_samples}.")
        if not self.solvers:
            raise ConfigError("solvers must name at least one solver.")
        for n in self.nfe:
            if n < 1:
                raise ConfigError(f"nfe values must be >= 1; got {self.nfe}.")


def _check_type(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}.")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {tp}.")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key} must be null; got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, prefix=key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {tp.__name__}; got {value!r}.")
    return value


def config_from_dict(cls, data: dict | None, prefix: str = ""):
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys and bad values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping; got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        value = _check_type(value, hints[name], key)
        allowed = fields[name].metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}.")
        kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict (a copy)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. nfe=[5,10]).")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section.")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] = (), cls=ExperimentConfig):
    """Read a YAML config, apply ``key=value`` overrides, validate into ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    return config_from_dict(cls, apply_overrides(data, list(overrides)))


# ----- building objects from configs -----------------------------------------------------------

_PROCESS_KINDS = {
    "vp_linear": "VPLinear",
    "vp_cosine": "VPCosine",
    "ve": "VE",
    "edm": "EDM",
    "flow_matching": "FlowMatching",
}


def build_process(cfg: ProcessConfig):
    """The process a :class:`ProcessConfig` describes."""
    from . import processes

    try:
        if cfg.kind == "vp_discrete":
            return getattr(processes.VPDiscrete, cfg.preset)(**cfg.options)
        return getattr(processes, _PROCESS_KINDS[cfg.kind])(**cfg.options)
    except TypeError as e:
        raise ConfigError(f"process.options {cfg.options} do not fit process.kind={cfg.kind!r}: {e}") from None


def build_model(cfg: ModelConfig):
    """The (Gaussian-mixture) model a :class:`ModelConfig` describes."""
    from .models import GaussianMixture

    if cfg.kind == "gmm_digits":
        return GaussianMixture.digits(n_components=cfg.n_components, covariance=cfg.covariance, seed=cfg.seed)
    if cfg.kind == "gmm_ring":
        return GaussianMixture.ring(n=cfg.n_components)
    return GaussianMixture.grid()

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
    "FitConfig",
    "ModelConfig",
    "NetworkConfig",
    "ProcessConfig",
    "TrainConfig",
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
    """The model to sample. ``gmm_*`` are exact Gaussian mixtures (ground truth available);
    ``network`` is a trained network restored from the orbax ``checkpoint`` folder written by
    ``fastsample train-model`` (``ema``: its EMA weights, else the raw ones)."""

    kind: str = field(default="gmm_digits", metadata=_choices("gmm_digits", "gmm_ring", "gmm_grid", "network"))
    n_components: int = 10
    covariance: str = field(default="full", metadata=_choices("full", "diag", "spherical"))
    seed: int = 0
    checkpoint: str = ""
    ema: bool = True

    def __post_init__(self):
        if self.kind == "network" and not self.checkpoint:
            raise ConfigError("model.checkpoint must name a checkpoint folder when model.kind='network'.")
        if self.kind != "network" and self.checkpoint:
            raise ConfigError(f"model.checkpoint is only used with model.kind='network'; got kind={self.kind!r}.")


#: Training data choices (``fastsample.data``: the digits split and the 2-D toys).
TRAIN_DATA = ("digits", "moons", "eight_gaussians", "checkerboard", "swiss_roll", "rings")


@dataclass(frozen=True)
class NetworkConfig:
    """The network ``fastsample train-model`` trains (``fastsample.models.networks``): an ``mlp``
    (``hidden`` width, ``depth`` residual blocks) or a ``unet`` (``channels`` per level, digits
    only); ``num_classes > 0`` makes it class-conditional with a null class (digits: 10)."""

    kind: str = field(default="mlp", metadata=_choices("mlp", "unet"))
    hidden: int = 256
    depth: int = 3
    channels: list[int] = field(default_factory=lambda: [32, 64])
    emb_dim: int = 64
    num_classes: int = 0

    def __post_init__(self):
        for key in ("hidden", "depth", "emb_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"network.{key} must be >= 1; got {getattr(self, key)}.")
        if self.emb_dim % 2:
            raise ConfigError(f"network.emb_dim must be even (sin/cos pairs); got {self.emb_dim}.")
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"network.channels must be a non-empty list of positive integers; got {self.channels}.")
        if self.num_classes < 0:
            raise ConfigError(f"network.num_classes must be >= 0 (0: unconditional); got {self.num_classes}.")


@dataclass(frozen=True)
class TrainConfig:
    """A training run of ``fastsample train-model`` (``fastsample.models.training.train``).

    Checkpoints go to ``output_dir/name``; running the same config again resumes from there.
    ``dequantize``: width of uniform noise added to each training batch (``0.125`` makes the
    digits' 17 levels continuous, as a likelihood on dequantised data needs; ``0``: none).
    """

    name: str = "model"
    data: str = field(default="digits", metadata=_choices(*TRAIN_DATA))
    data_seed: int = 0
    toy_samples: int = 50_000
    dequantize: float = 0.0
    objective: str = field(default="edm", metadata=_choices("edm", "flow_matching"))
    sigma_data: float = 0.5
    time_distribution: str = field(default="uniform", metadata=_choices("uniform", "logit_normal"))
    network: NetworkConfig = field(default_factory=NetworkConfig)
    steps: int = 10_000
    batch_size: int = 256
    learning_rate: float = 1e-3
    lr_schedule: str = field(default="cosine", metadata=_choices("constant", "cosine"))
    warmup_steps: int = 200
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    steps_per_call: int = 100
    save_every: int = 2_000
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str = "checkpoints"
    eval_samples: int = 1_000
    eval_nfe: int = 20
    eval_solver: str = "heun"

    def __post_init__(self):
        for key in ("steps", "batch_size", "steps_per_call", "save_every", "keep_checkpoints", "toy_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1; got {getattr(self, key)}.")
        for key in ("warmup_steps", "eval_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0; got {getattr(self, key)}.")
        if self.dequantize < 0:
            raise ConfigError(f"dequantize must be >= 0 (0: none); got {self.dequantize}.")
        if not self.learning_rate > 0 or not self.sigma_data > 0:
            raise ConfigError(f"learning_rate and sigma_data must be > 0; got {self.learning_rate}, {self.sigma_data}.")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(
                f"ema_decay and label_dropout must be in [0, 1); got {self.ema_decay}, {self.label_dropout}.")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"grad_clip and weight_decay must be >= 0; got {self.grad_clip}, {self.weight_decay}.")
        if self.data != "digits" and self.network.num_classes:
            raise ConfigError(f"network.num_classes must be 0 for data={self.data!r} (2-D toys have no labels).")
        if self.data == "digits" and self.network.num_classes not in (0, 10):
            raise ConfigError(f"network.num_classes must be 0 or 10 for data='digits'; got {self.network.num_classes}.")
        if self.data != "digits" and self.network.kind == "unet":
            raise ConfigError(f"network.kind='unet' needs image data (data='digits'); got data={self.data!r}.")


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
class FitConfig:
    """Fitting learned solvers (``fastsample fit``): ``methods`` at every NFE of the experiment,
    ``base`` solver on the experiment's schedule, ``num_train`` / ``num_val`` reference pairs.
    Fits checkpoint to ``checkpoint_dir/<name>/<method>_<base>_nfe<k>`` and resume from there."""

    methods: list[str] = field(default_factory=lambda: ["learned_grid", "bns", "dode"])
    base: str = "dpmpp_2m"
    num_train: int = 512
    num_val: int = 128
    steps: int = 400
    batch_size: int = 128
    learning_rate: float = 1e-2
    eval_every: int = 50
    patience: int | None = None
    final_zero: bool = True
    loss: str = field(default="endpoint", metadata=_choices("endpoint", "local"))
    #: start bns / bespoke from the fitted learned grid of their base (``fit_solver(warm_start=True)``)
    warm_start: bool = False
    checkpoint_dir: str = "checkpoints/fits"

    def __post_init__(self):
        from .learned.methods import METHODS  # the registry, with any method a user registered

        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"fit.methods has unknown method(s) {bad or self.methods}; "
                              f"allowed: {', '.join(METHODS)}.")
        for key in ("num_train", "num_val", "steps", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"fit.{key} must be >= 1; got {getattr(self, key)}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"fit.learning_rate must be > 0; got {self.learning_rate}.")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: which model, process, solvers, budgets and metrics.

    ``sample_plots``: also a PNG of the samples per solver and NFE (digit grids, 2-D scatter
    plots). ``rtol``: tolerance of the adaptive solves (reference, likelihood ODE; ``null``: their
    defaults). ``exact_trace``: the likelihood experiment's divergence (``null``: exact up to 16-D).
    """

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
    fit: FitConfig = field(default_factory=FitConfig)
    sample_plots: bool = False
    rtol: float | None = None
    exact_trace: bool | None = None

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1; got {self.num_samples}.")
        if not self.solvers:
            raise ConfigError("solvers must name at least one solver.")
        for n in self.nfe:
            if n < 1:
                raise ConfigError(f"nfe values must be >= 1; got {self.nfe}.")
        if self.rtol is not None and not 0 < self.rtol < 1:
            raise ConfigError(f"rtol must be in (0, 1) or null; got {self.rtol}.")


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
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
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


def read_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """A YAML config (safe loader) with ``key=value`` overrides applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    return apply_overrides(data, list(overrides))


def load_config(path: str | Path, overrides: list[str] = (), cls=ExperimentConfig):
    """Read a YAML config, apply ``key=value`` overrides, validate into ``cls``."""
    return config_from_dict(cls, read_config(path, overrides))


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
    """The model a :class:`ModelConfig` describes: a Gaussian mixture or a restored trained network
    (both have ``.denoiser(process)`` and ``.dim``)."""
    from .models import GaussianMixture

    if cfg.kind == "network":
        from .models.checkpoints import load_network

        return load_network(cfg.checkpoint, ema=cfg.ema)
    if cfg.kind == "gmm_digits":
        return GaussianMixture.digits(n_components=cfg.n_components, covariance=cfg.covariance, seed=cfg.seed)
    if cfg.kind == "gmm_ring":
        return GaussianMixture.ring(n=cfg.n_components)
    return GaussianMixture.grid()

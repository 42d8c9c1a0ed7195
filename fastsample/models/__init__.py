"""Analytic and learned models.

``GaussianMixture`` and ``ClassConditionalMixture`` are imported eagerly; the Flax networks, their
training and checkpoints (``MLP``, ``UNet``, ``EDMObjective``, ``FlowMatchingObjective``, ``TrainedNetwork``, ``train``,
``load_network``, ...) load on first use, so ``import fastsample`` does not import Flax or orbax.
"""

import importlib

from .class_conditional import ClassConditionalMixture
from .gaussian_mixture import GaussianMixture

_LAZY = {
    "MLP": "networks",
    "UNet": "networks",
    "NetworkFn": "networks",
    "make_network": "networks",
    "EDMObjective": "training",
    "FlowMatchingObjective": "training",
    "TrainedNetwork": "training",
    "TrainState": "training",
    "train": "training",
    "evaluate": "training",
    "NetworkCheckpoints": "checkpoints",
    "load_network": "checkpoints",
}

__all__ = ["ClassConditionalMixture", "GaussianMixture", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

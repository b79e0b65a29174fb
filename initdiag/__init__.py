"""initdiag: what an initialisation does to a deep network at step 0.

Mean-field theory (:func:`analyze`) and Monte Carlo over random networks
(:func:`simulate`) read the same :class:`Network` and return the same
:class:`Profile`, so prediction and measurement compare in one call
(:func:`compare`).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import initializers
from .initializers import InitScheme, calculate_gain, fixup
from .network import (
    GELU,
    SELU,
    Activation,
    BatchNorm,
    Dense,
    Dropout,
    Erf,
    Identity,
    Layer,
    LayerNorm,
    LeakyReLU,
    Network,
    ReLU,
    Residual,
    Scale,
    Sigmoid,
    SiLU,
    Tanh,
    mlp,
    resnet_mlp,
)

__version__ = "0.1.0"

# Heavier parts load on first use, so `import initdiag` stays fast and a missing
# optional piece never breaks the light ones.
_LAZY = {
    "load_config": ("configfile", "load_config"),
    "save_config": ("configfile", "save_config"),
    "analyze": ("analytic", "analyze"),
    "simulate": ("empirical", "simulate"),
    "Profile": ("profile", "Profile"),
    "Monitor": ("monitor", "Monitor"),
    "compare": ("profile", "compare"),
    "available_backends": ("kernels", "available_backends"),
    "BackendUnavailableError": ("kernels", "BackendUnavailableError"),
    "diagnose": ("verdicts", "diagnose"),
    "Comparison": ("profile", "Comparison"),
    "Verdict": ("verdicts", "Verdict"),
    "network_parameters": ("analytic", "network_parameters"),
    "sweep": ("sweeps", "sweep"),
    "train": ("training", "train"),
    "TrainResult": ("training", "TrainResult"),
}
_SUBMODULES = {
    "meanfield",
    "kernels",
    "configfile",
    "analytic",
    "empirical",
    "profile",
    "verdicts",
    "report",
    "cli",
    "network",
    "layers",
    "mfstate",
    "training",
}

__all__ = [
    "__version__",
    "Layer",
    "Dense",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "GELU",
    "SiLU",
    "SELU",
    "Erf",
    "Identity",
    "BatchNorm",
    "LayerNorm",
    "Residual",
    "Scale",
    "Dropout",
    "Network",
    "mlp",
    "resnet_mlp",
    "InitScheme",
    "fixup",
    "calculate_gain",
    "initializers",
    *_LAZY,
    *sorted(_SUBMODULES),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'initdiag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

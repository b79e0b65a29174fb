"""Layer kinds, one module each: spec, analytic rule, empirical step.

See :mod:`initdiag.layers.base` for what a layer kind provides and
``docs/architecture.md`` for how to add one.
"""

from __future__ import annotations

from .activation import (
    ACTIVATIONS,
    GELU,
    SELU,
    Activation,
    Erf,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    SiLU,
    Tanh,
    activation,
)
from .affine import Affine
from .base import LAYER_TYPES, Layer, Slot, layer_from_dict, register
from .dense import Dense
from .dropout import Dropout
from .norm import BatchNorm, LayerNorm
from .residual import Residual, Scale

__all__ = [
    "ACTIVATIONS",
    "Affine",
    "LAYER_TYPES",
    "Activation",
    "BatchNorm",
    "Dense",
    "Dropout",
    "Erf",
    "GELU",
    "Identity",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "ReLU",
    "Residual",
    "SELU",
    "Scale",
    "Sigmoid",
    "SiLU",
    "Slot",
    "Tanh",
    "activation",
    "layer_from_dict",
    "register",
]

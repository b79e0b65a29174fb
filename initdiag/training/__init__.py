"""Training runs on initdiag's own kernels: does the step-0 picture matter after
step 0?  :func:`train` runs a network from several fresh initialisations on a
task (synthetic by default), with a learning-rate search, and returns a
:class:`TrainResult`."""

from __future__ import annotations

from .data import Dataset, digits, from_arrays, make_dataset, subspace_mixture
from .optim import DEFAULT_LR_GRIDS, Optimizer, make_optimizer
from .result import TrainResult
from .run import train, with_readout
from .trainer import Trainer

__all__ = [
    "train",
    "TrainResult",
    "Trainer",
    "Dataset",
    "make_dataset",
    "subspace_mixture",
    "digits",
    "from_arrays",
    "Optimizer",
    "make_optimizer",
    "DEFAULT_LR_GRIDS",
    "with_readout",
]

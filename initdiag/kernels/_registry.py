"""Which function implements which (op, backend): ``{(op, backend): "module:attr"}``.

CPU variants live in the op family's module as ``_<op>_<backend>``; CUDA host
launchers live in ``_cuda_<family>.py`` as ``<op>_cuda``.  Targets are imported
on first use and cached, so importing ``initdiag.kernels`` loads no kernel
module (and never touches numba.cuda).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

OPS = {
    "dense_forward": "dense",
    "dense_backward": "dense",
    "activation_forward": "activation",
    "activation_backward": "activation",
    "batchnorm_forward": "batchnorm",
    "batchnorm_backward": "batchnorm",
    "layernorm_forward": "layernorm",
    "layernorm_backward": "layernorm",
    "column_stats": "stats",
    "layer_summary": "stats",
    "row_correlation": "stats",
}
BACKENDS = ("numpy", "numba", "c", "cuda")
_PKG = "initdiag.kernels"


def _target(op: str, backend: str) -> str:
    family = OPS[op]
    if backend == "cuda":
        return f"{_PKG}._cuda_{family}:{op}_cuda"
    return f"{_PKG}.{family}:_{op}_{backend}"


REGISTRY: dict[tuple[str, str], str] = {
    (op, b): _target(op, b) for op in OPS for b in BACKENDS
}


@functools.cache
def resolve(op: str, backend: str) -> Callable:
    """Import and return the variant implementing ``op`` on ``backend``."""
    module, attr = REGISTRY[(op, backend)].split(":")
    return getattr(importlib.import_module(module), attr)

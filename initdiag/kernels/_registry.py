"""Which function implements which (op, backend): ``{(op, backend): "module:attr"}``.

CPU variants live in the op family's module as ``_<op>_<backend>``; CUDA host
launchers live in ``_cuda_<family>.py`` as ``<op>_cuda``.  Targets are imported
on first use and cached, so importing ``initdiag.kernels`` loads no kernel
module (and never touches numba.cuda).

The fused passes of ``simulate`` (family ``fused``: :data:`FUSED_OPS`) exist as a
NumPy reference and a Numba variant only (:data:`OP_BACKENDS`); there is no c or
cuda variant, and the dispatchers say so (BackendUnavailableError).

:func:`resolve` is also the fast entry of callers that run a kernel many times
on inputs they built themselves (the empirical engine, once per layer): it
returns the raw kernel, which validates nothing.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from ._threading import ensure_configured

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
    "residual_add": "residual",
    "masked_scale": "residual",
    "sgd_update": "optim",
    "adam_update": "optim",
    "mse_loss_grad": "loss",
    "softmax_xent_grad": "loss",
}
BACKENDS = ("numpy", "numba", "c", "cuda")
_PKG = "initdiag.kernels"

FUSED_OPS = (
    "layer_stats",
    "unit_forward",
    "unit_backward",
    "gram",
    "gram_dot",
    "residual_add_stats",
)
OPS.update(dict.fromkeys(FUSED_OPS, "fused"))
OP_BACKENDS = {op: ("numpy", "numba") if OPS[op] == "fused" else BACKENDS for op in OPS}


def _target(op: str, backend: str) -> str:
    family = OPS[op]
    if backend == "cuda":
        return f"{_PKG}._cuda_{family}:{op}_cuda"
    return f"{_PKG}.{family}:_{op}_{backend}"


REGISTRY: dict[tuple[str, str], str] = {
    (op, b): _target(op, b) for op in OPS for b in OP_BACKENDS[op]
}


@functools.cache
def resolve(op: str, backend: str) -> Callable:
    """Import and return the variant implementing ``op`` on ``backend`` (raw:
    no validation; the thread-pool policy is applied before the first numba or c
    kernel is imported, see ``_threading``)."""
    if backend in ("numba", "c"):
        ensure_configured()
    module, attr = REGISTRY[(op, backend)].split(":")
    return getattr(importlib.import_module(module), attr)

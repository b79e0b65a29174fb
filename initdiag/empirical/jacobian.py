"""Jacobian probes on what the main forward pass saved.

``m1 = E||J u||^2 / n_out`` and ``m2 = E||J^T J u||^2 / n_out`` of the input-output
Jacobian J of one example (batch statistics of BatchNorm held fixed), by one
Gaussian probe u per example (Hutchinson's estimator) through the layers'
linearisations (:meth:`initdiag.layers.Layer.jvp` / ``vjp``); for widths up to
``EXACT_JACOBIAN_MAX_WIDTH`` also the exact singular values of J for a few
examples.  Pennington, Schoenholz & Ganguli (2017) for the moments of J J^T.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _rng
from .memory import EXACT_JACOBIAN_MAX_WIDTH
from .sampling import PROBE_STREAM

__all__ = ["probe", "summary"]

_EXACT_JACOBIAN_EXAMPLES = 4


def probe(ex: Any, sc: Any, x: np.ndarray, jac: dict[str, list[Any]]) -> None:
    """Append one seed's m1, m2 (and exact spectra) to ``jac``; ``ex`` is a
    generic executor right after its forward pass (its ``saved`` intact)."""
    net = sc.net
    lin = _Linearisation(net, ex.ops, ex.saved)
    B = x.shape[0]

    t = _rng.fill_normal(
        np.empty((B, net.input_dim), dtype=sc.dt),
        _rng.derive_key(sc.entropy, sc.seed, PROBE_STREAM),
        0,
    )
    jv = lin.jvp(net.top, t)
    v = lin.vjp(net.top, np.ascontiguousarray(jv))
    n_out = net.output_dim
    jv64 = jv.astype(np.float64)
    v64 = v.astype(np.float64)
    jac["m1"].append(float(np.mean(np.sum(jv64 * jv64, axis=1))) / n_out)
    jac["m2"].append(float(np.mean(np.sum(v64 * v64, axis=1))) / n_out)
    widest = max([net.input_dim, *net.widths])
    if widest > EXACT_JACOBIAN_MAX_WIDTH:
        return
    for b in range(min(B, _EXACT_JACOBIAN_EXAMPLES)):
        # J^T for example b: push the identity through the linearisation of b
        t = lin.jvp(net.top, np.eye(net.input_dim, dtype=np.float64), example=b)
        sv = np.linalg.svd(t, compute_uv=False)
        lam = sv * sv
        jac["singular_values"].append(sv)
        jac["m1_exact"].append(float(lam.sum()) / n_out)
        jac["m2_exact"].append(float((lam * lam).sum()) / n_out)


class _Linearisation:
    """The network's Jacobian from what the forward pass saved: each layer's own
    ``jvp`` / ``vjp``; a residual block is ``J_shortcut + c J_branch``."""

    def __init__(self, net: Any, ops: Any, saved: list[Any]) -> None:
        self.infos, self.ops, self.saved = net.infos, ops, saved

    def jvp(self, rows: tuple[int, ...], t: np.ndarray, example: int | None = None):
        for i in rows:
            info = self.infos[i]
            if info.branch:
                tb = self.jvp(info.branch, t, example)
                ts = self.jvp(info.shortcut, t, example)
                t = ts + info.layer.multiplier * tb
            else:
                t = info.layer.jvp(self.ops, self.saved[i], t, example)
        return t

    def vjp(self, rows: tuple[int, ...], g: np.ndarray) -> np.ndarray:
        for i in reversed(rows):
            info = self.infos[i]
            if info.branch:
                gb = self.vjp(info.branch, info.layer.multiplier * g)
                g = self.vjp(info.shortcut, g) + gb
            else:
                g = info.layer.vjp(self.ops, self.saved[i], g)
        return g


def summary(jac: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": "hutchinson probes (one per example), BatchNorm statistics held fixed"
    }
    for k in ("m1", "m2", "m1_exact", "m2_exact"):
        v = np.asarray(jac[k], dtype=np.float64)
        if not v.size:
            continue
        out[k] = float(v.mean())
        out[f"{k}_se"] = (
            float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
        )
    if jac["singular_values"]:
        out["singular_values"] = np.stack(jac["singular_values"])
    return out

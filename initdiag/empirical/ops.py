"""The kernel dispatchers bound to one backend, as the layers' empirical steps call
them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Ops"]


class Ops:
    """Kernel dispatchers of :mod:`initdiag.kernels` with ``backend`` filled in."""

    def __init__(self, backend: str | None) -> None:
        from .. import kernels

        self.k = kernels
        self.backend = backend

    def dense(self, x, w, b, out):
        return self.k.dense_forward(x, w, b, None, backend=self.backend, out=out)

    def act(self, x, layer, out=None):
        return self.k.activation_forward(
            x, layer.name, negative_slope=layer.slope, backend=self.backend, out=out
        )

    def act_backward(self, dy, x, layer):
        return self.k.activation_backward(
            dy, x, layer.name, negative_slope=layer.slope, backend=self.backend
        )

    def bn(self, x, gamma, beta, eps):
        return self.k.batchnorm_forward(x, gamma, beta, eps, backend=self.backend)

    def bn_backward(self, dy, x, saved, gamma, beta):
        return self.k.batchnorm_backward(
            dy, x, saved, gamma, beta, backend=self.backend
        )

    def ln(self, x, gamma, beta, eps):
        return self.k.layernorm_forward(x, gamma, beta, eps, backend=self.backend)

    def ln_backward(self, dy, x, saved, gamma, beta):
        return self.k.layernorm_backward(
            dy, x, saved, gamma, beta, backend=self.backend
        )

    def residual_add(self, skip, x, scale, out=None):
        """``skip + scale * x`` (``scale * x`` without ``skip``)."""
        return self.k.residual_add(skip, x, scale, backend=self.backend, out=out)

    def masked_scale(self, x, mask, scale, out=None):
        """``x * mask * scale`` (inverted dropout and its backward)."""
        return self.k.masked_scale(x, mask, scale, backend=self.backend, out=out)

    def row_stats(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The 10 forward statistics of a layer output (the layout of the fused
        path, :func:`initdiag.empirical.fused`): the 8 of ``layer_summary``, the
        mean correlation between rows, and whether any entry is non-zero."""
        self.k.layer_summary_array(x, out[:8], backend=self.backend)
        out[8] = float(self.k.row_correlation(x, backend=self.backend))
        out[9] = 1.0 if out[6] < 1.0 else 0.0
        return out

    def resolved(self) -> str | None:
        if self.backend is not None:
            return self.backend
        try:
            return self.k.get_backend()
        except Exception:  # pragma: no cover - informative only
            return None


def sumsq64(g: Any) -> float:
    """sum(g^2) accumulated in float64."""
    if g.dtype == np.float64:
        return float(np.vdot(g, g))
    return float(np.einsum("ij,ij->", g, g, dtype=np.float64))

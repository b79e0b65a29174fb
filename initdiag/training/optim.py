"""Optimizers of a training run: torch.optim's SGD (momentum, Nesterov, weight
decay), Adam and AdamW, each step one fused update kernel per parameter tensor
(:func:`initdiag.kernels.sgd_update`, :func:`initdiag.kernels.adam_update`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Optimizer", "make_optimizer", "DEFAULT_LR_GRIDS"]

#: the learning rates tried per variant when none is given: log-spaced, one
#: decade around each optimizer's usual value
DEFAULT_LR_GRIDS = {
    "sgd": (0.01, 0.03, 0.1),
    "adam": (3e-4, 1e-3, 3e-3),
    "adamw": (3e-4, 1e-3, 3e-3),
}


def _check_float(v: Any, what: str, lo: float, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{what} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" + (f" and < {hi}" if hi is not None else "")
        raise ValueError(f"{what} must be finite and {rng}, got {v!r}")
    return v


@dataclass(frozen=True)
class Optimizer:
    """One optimizer's settings; :meth:`state` and :meth:`update` act per tensor."""

    name: str
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def state(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        """Zeros: SGD's velocity (none without momentum), Adam's two moments."""
        if self.name == "sgd":
            return (np.zeros_like(p),) if self.momentum else ()
        return np.zeros_like(p), np.zeros_like(p)

    def update(
        self,
        p: np.ndarray,
        g: np.ndarray,
        st: tuple,
        step: int,
        lr: float,
        backend: str | None,
    ) -> None:
        """One step on ``p`` in place (``step`` >= 1 counts the updates so far)."""
        from .. import kernels

        if self.name == "sgd":
            kernels.sgd_update(
                p,
                g,
                st[0] if st else None,
                lr=lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                nesterov=self.nesterov,
                backend=backend,
            )
        else:
            kernels.adam_update(
                p,
                g,
                st[0],
                st[1],
                step=step,
                lr=lr,
                beta1=self.betas[0],
                beta2=self.betas[1],
                eps=self.eps,
                weight_decay=self.weight_decay,
                decoupled=self.name == "adamw",
                backend=backend,
            )

    def describe(self) -> dict[str, Any]:
        if self.name == "sgd":
            return {
                "name": "sgd",
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "weight_decay": self.weight_decay,
            }
        return {
            "name": self.name,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }


def make_optimizer(
    optimizer: Any,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    """An :class:`Optimizer` from its name (``"sgd"``, ``"adam"``, ``"adamw"``)
    with torch's defaults (AdamW's weight decay 0.01, none otherwise)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    name = str(optimizer).strip().lower() if isinstance(optimizer, str) else None
    if name not in DEFAULT_LR_GRIDS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; use 'sgd', 'adam' or 'adamw'"
        )
    wd = (0.01 if name == "adamw" else 0.0) if weight_decay is None else weight_decay
    wd = _check_float(wd, "weight_decay", 0.0)
    if name == "sgd":
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        m = _check_float(momentum, "momentum", 0.0, 1.0)
        if nesterov and m == 0:
            raise ValueError("nesterov=True needs a momentum > 0")
        return Optimizer("sgd", momentum=m, nesterov=nesterov, weight_decay=wd)
    b1 = _check_float(betas[0], "betas[0]", 0.0, 1.0)
    b2 = _check_float(betas[1], "betas[1]", 0.0, 1.0)
    e = _check_float(eps, "eps", 0.0)
    return Optimizer(name, weight_decay=wd, betas=(b1, b2), eps=e)

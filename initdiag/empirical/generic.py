"""The generic executor: every layer's own empirical step through the kernel
dispatchers of one backend (numpy, numba, c, cuda), one unit per layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from .engine import SeedContext, StepContext
from .ops import Ops, sumsq64
from .sampling import layer_params, output_grad

__all__ = ["GenericExecutor"]


class GenericExecutor:
    """Runs :meth:`initdiag.layers.Layer.forward` / ``backward`` for each layer and
    keeps what they save (also the linearisation the Jacobian probes use)."""

    def __init__(self, net: Any, ops: Ops) -> None:
        self.net = net
        self.ops = ops
        self.units = range(len(net.infos))
        self.saved: list[Any] = [None] * len(net.infos)
        self.ctx: list[StepContext | None] = [None] * len(net.infos)
        self.output: np.ndarray | None = None

    def sample(self, i: int, sc: SeedContext) -> None:
        info = self.net.infos[i]
        params = layer_params(info, sc.inits[i], sc.dt, sc.entropy, sc.seed)
        self.ctx[i] = StepContext(info, params, sc.inits[i], self.ops, sc.B, sc.dt)

    def forward(self, i: int, x: np.ndarray, sc: SeedContext):
        ctx = self.ctx[i]
        y, self.saved[i] = ctx.info.layer.forward(ctx, x)
        return y, [(i, self.ops.row_stats(y, np.empty(10)))]

    def output_grad(self, y: np.ndarray, sc: SeedContext) -> np.ndarray:
        return output_grad(sc.g_spec, y, sc.dt, sc.entropy, sc.seed)

    def backward(self, i: int, g: np.ndarray, sc: SeedContext):
        ctx = self.ctx[i]
        ss = sumsq64(g)
        gin, sums = ctx.info.layer.backward(ctx, g, self.saved[i], i > 0)
        self.saved[i] = None
        return gin, [(i, ss, sums)]

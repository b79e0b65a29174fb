"""The generic executor: every layer's own empirical step through the kernel
dispatchers of one backend (numpy, numba, c, cuda), one unit per layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _rng
from .engine import Block, SeedContext, StepContext, plan
from .ops import Ops, sumsq64
from .sampling import layer_params, output_grad

__all__ = ["GenericExecutor"]


class GenericExecutor:
    """Runs :meth:`initdiag.layers.Layer.forward` / ``backward`` for each layer and
    keeps what they save (also the linearisation the Jacobian probes use)."""

    def __init__(self, net: Any, ops: Ops, given: list | None = None) -> None:
        self.net = net
        self.ops = ops
        #: per seed, per row, the user's parameter tensors by slot
        #: (``simulate(parameters=...)``) instead of draws
        self.given = given
        self.units = plan(net, net.top, list)
        self.saved: list[Any] = [None] * len(net.infos)
        self.ctx: list[StepContext | None] = [None] * len(net.infos)
        self.output: np.ndarray | None = None

    def sample(self, i: int, sc: SeedContext) -> None:
        info = self.net.infos[i]
        if self.given is not None:
            params = self.given[sc.seed][i]
        else:
            params = layer_params(info, sc.inits[i], sc.dt, sc.entropy, sc.seed)
        self.ctx[i] = step_context(info, params, sc, self.ops)

    def forward(self, i: int, x: np.ndarray, sc: SeedContext):
        ctx = self.ctx[i]
        y, self.saved[i] = ctx.info.layer.forward(ctx, x)
        return y, [(i, self.ops.row_stats(y, np.empty(10)))]

    def output_grad(self, y: np.ndarray, sc: SeedContext) -> np.ndarray:
        return output_grad(sc.g_spec, y, sc.dt, sc.entropy, sc.seed)

    def merge(self, b: Block, xb: np.ndarray, xs: np.ndarray, sc: SeedContext):
        y = self.net.infos[b.row].layer.merge(self.ops, xb, xs)
        return y, self._rows(b.row, y)

    def merge_backward(self, b: Block, g: np.ndarray, sc: SeedContext):
        gb, gs = self.net.infos[b.row].layer.merge_backward(self.ops, g)
        return gb, gs, self._grad_rows(b.row, g)

    def _rows(self, row: int, y: np.ndarray) -> list:
        """The Profile statistics of a row's output (a subclass may record none)."""
        return [(row, self.ops.row_stats(y, np.empty(10)))]

    def _grad_rows(self, row: int, g: np.ndarray) -> list:
        return [(row, sumsq64(g), {})]

    def keep_grad(self, b: Block, g: np.ndarray) -> np.ndarray:
        return g  # every step returns a fresh array

    def add_grads(self, b: Block, g1: Any, g2: Any) -> Any:
        if g1 is None or g2 is None:
            return None
        return self.ops.residual_add(g2, g1, 1.0)

    def backward(self, i: int, g: np.ndarray, sc: SeedContext):
        ctx = self.ctx[i]
        ss = sumsq64(g)
        gin, sums = ctx.info.layer.backward(ctx, g, self.saved[i], i > 0)
        self.saved[i] = None
        return gin, [(i, ss, sums)]


def step_context(info: Any, params: dict, sc: SeedContext, ops: Ops) -> StepContext:
    """What a layer's own step sees for seed ``sc``: its parameters and the key of
    its other random numbers (dropout masks)."""
    key = _rng.derive_key(sc.entropy, sc.seed, info.index)
    return StepContext(info, params, sc.inits[info.index], ops, sc.B, sc.dt, key=key)

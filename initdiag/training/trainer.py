"""One seed of a training run on initdiag's own kernels.

:class:`Trainer` holds one network's parameters (drawn exactly as ``simulate``
draws seed ``seed``: the trained networks are the random networks the step-0
Profile measures), their gradients and optimizer state, and BatchNorm's running
statistics.  A step runs the empirical engine's one interpreter
(:func:`~initdiag.empirical.engine.forward_pass` /
:func:`~initdiag.empirical.engine.propagate`) through :class:`TrainExecutor`,
whose units are the network's layers in training mode; evaluation runs the same
interpreter in evaluation mode (running statistics, no dropout), as torch's
``model.eval()``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _rng
from ..empirical.engine import SeedContext, StepContext, forward_pass, propagate
from ..empirical.generic import GenericExecutor
from ..empirical.ops import Ops
from ..empirical.sampling import layer_params
from .optim import Optimizer

__all__ = ["Trainer", "TrainExecutor", "loss_and_grad", "BN_MOMENTUM"]

#: key word of a training run's random numbers besides the parameters (dropout)
TRAIN_WORD = 0x7EA1
#: BatchNorm's running-statistics momentum (torch's default)
BN_MOMENTUM = 0.1


def loss_and_grad(
    loss: str, y: np.ndarray, target: np.ndarray, backend: str | None
) -> tuple[float, int, np.ndarray]:
    """(mean loss, correct predictions, dLoss/dy) through the fused loss kernels;
    ``target`` holds class labels for cross-entropy, targets for squared error
    (correct predictions: -1 there)."""
    from .. import kernels

    if loss == "cross_entropy":
        return kernels.softmax_xent_grad(y, target, backend=backend)
    value, g = kernels.mse_loss_grad(y, target, backend=backend)
    return value, -1, g


class TrainExecutor(GenericExecutor):
    """Executor (:mod:`initdiag.empirical.engine`) of training steps: the
    network's current parameters, each layer's training forward and
    :meth:`~initdiag.layers.Layer.param_grads`; ``mode = "eval"``: each layer's
    :meth:`~initdiag.layers.Layer.infer`.  No Profile rows are recorded; the
    residual adds are the generic executor's."""

    def __init__(self, net: Any, ops: Ops, ctx: list[StepContext]) -> None:
        super().__init__(net, ops)
        self.ctx = ctx
        self.mode = "train"
        self.step = 0

    def sample(self, i: int, sc: SeedContext) -> None:
        c = self.ctx[i]
        c.B, c.training, c.step = sc.B, self.mode == "train", self.step

    def forward(self, i: int, x: np.ndarray, sc: SeedContext):
        c = self.ctx[i]
        layer = c.info.layer
        if self.mode == "eval":
            return layer.infer(c, x), []
        y, self.saved[i] = layer.forward(c, x)
        if "running" in c.extra:
            layer.update_running(c, self.saved[i], BN_MOMENTUM)
        return y, []

    def _rows(self, row: int, y: np.ndarray) -> list:
        return []

    def _grad_rows(self, row: int, g: np.ndarray) -> list:
        return []

    def backward(self, i: int, g: np.ndarray, sc: SeedContext):
        c = self.ctx[i]
        gin, _ = c.info.layer.param_grads(c, g, self.saved[i], i > 0)
        self.saved[i] = None
        return gin, []


class Trainer:
    """One seed's network in training.

    Parameters
    ----------
    network : Network
        Its layers; parameters drawn from its InitScheme for ``(rng, seed)``.
    loss : {"cross_entropy", "mse"}
    optimizer : Optimizer
    lr : float
    dtype : numpy dtype
    backend : str or None
        Kernel backend of every op.
    entropy, seed : int
        The run's rng entropy (:func:`initdiag._rng.entropy_of`) and seed.
    """

    def __init__(
        self,
        network: Any,
        loss: str,
        optimizer: Optimizer,
        lr: float,
        dtype: np.dtype,
        backend: str | None,
        entropy: int,
        seed: int,
    ) -> None:
        self.net = network
        self.loss = loss
        self.opt = optimizer
        self.lr = float(lr)
        self.dt = np.dtype(dtype)
        # resolved once: every kernel call (the layers' through ``ops`` too) then
        # skips the default-backend lookup
        ops = Ops(Ops(backend).resolved())
        self.backend = ops.backend
        self.entropy, self.seed = entropy, seed
        self.inits = network.param_inits()
        drawn = [
            layer_params(info, self.inits[i], self.dt, entropy, seed)
            for i, info in enumerate(network.infos)
        ]
        # every tensor is a view of one flat buffer (and its gradient of another):
        # the optimizer updates the whole network in one kernel call, whose
        # element-wise arithmetic is torch's per-tensor update
        n = sum(v.size for p in drawn for v in p.values())
        self.flat = np.empty(n, self.dt)
        self.flat_grad = np.zeros(n, self.dt)
        self.params, self.grads = [], []
        off = 0
        for p in drawn:
            mine, grad = {}, {}
            for k, v in p.items():
                mine[k] = self.flat[off : off + v.size].reshape(v.shape)
                mine[k][...] = v
                grad[k] = self.flat_grad[off : off + v.size].reshape(v.shape)
                off += v.size
            self.params.append(mine)
            self.grads.append(grad)
        self.state = optimizer.state(self.flat)
        ctx = []
        for i, info in enumerate(network.infos):
            c = StepContext(
                info,
                self.params[i],
                self.inits[i],
                ops,
                0,
                self.dt,
                key=_rng.derive_key(entropy, seed, info.index, TRAIN_WORD),
                training=True,
                grads=self.grads[i],
            )
            running = info.layer.running_state(info.width)
            if running is not None:
                c.extra["running"] = running
            ctx.append(c)
        self.ex = TrainExecutor(network, ops, ctx)
        self.updates = 0
        self._timing = {"sample": 0.0, "forward": 0.0, "backward": 0.0}

    def _context(self, B: int) -> SeedContext:
        return SeedContext(
            self.net,
            self.inits,
            self.dt,
            self.entropy,
            self.seed,
            B,
            None,
            np.empty((0, 0)),
            [],
            self._timing,
        )

    def _forward(self, x: np.ndarray, mode: str) -> tuple[np.ndarray, SeedContext]:
        self.ex.mode = mode
        self.ex.step = self.updates
        sc = self._context(x.shape[0])
        return forward_pass(self.ex, sc, np.ascontiguousarray(x, dtype=self.dt)), sc

    def gradients(self, x: np.ndarray, target: np.ndarray) -> tuple[float, int]:
        """Forward and backward on the batch ``(x, target)`` in training mode: (its
        loss, its correct predictions); the parameter gradients are left in
        :attr:`grads` (not computed when the loss is not finite)."""
        with np.errstate(all="ignore"):
            y, sc = self._forward(x, "train")
            value, correct, g = loss_and_grad(self.loss, y, target, self.backend)
            if np.isfinite(value):
                propagate(self.ex, sc, g)
        return value, correct

    def step(self, x: np.ndarray, target: np.ndarray) -> tuple[float, int]:
        """One optimizer step on the batch ``(x, target)``: (the batch's loss
        before the update, its correct predictions).  A non-finite loss leaves
        the parameters as they were (the caller records the divergence)."""
        value, correct = self.gradients(x, target)
        if not np.isfinite(value):
            return value, correct
        with np.errstate(all="ignore"):
            self.updates += 1
            self.opt.update(
                self.flat,
                self.flat_grad,
                self.state,
                self.updates,
                self.lr,
                self.backend,
            )
        return value, correct

    def evaluate(
        self, X: np.ndarray, target: np.ndarray, chunk: int = 1024
    ) -> tuple[float, float]:
        """(mean loss, accuracy or NaN) on ``(X, target)`` in evaluation mode."""
        total, correct = 0.0, 0
        with np.errstate(all="ignore"):
            for a in range(0, X.shape[0], chunk):
                xb, tb = X[a : a + chunk], target[a : a + chunk]
                y, _ = self._forward(xb, "eval")
                value, c, _ = loss_and_grad(self.loss, y, tb, self.backend)
                total += value * xb.shape[0]
                correct += c
        n = X.shape[0]
        return total / n, (correct / n if correct >= 0 else float("nan"))

    def named_params(self) -> dict[str, dict[str, np.ndarray]]:
        """The current parameters by row name and slot (``weight``, ``bias``)."""
        return {
            info.name: p
            for info, p in zip(self.net.infos, self.params, strict=True)
            if p
        }

    def layer_stats(self, before: np.ndarray | None) -> list[dict]:
        """Per parameter tensor: the norm of its last gradient, of its value, and
        the update-to-weight ratio ``||w_after - w_before|| / ||w_before||``
        (``before``: a copy of :attr:`flat` taken before the update)."""
        rows = []
        off = 0
        for i, info in enumerate(self.net.infos):
            for k, v in self.params[i].items():
                g = self.grads[i][k]
                w = v.astype(np.float64)
                row = {
                    "layer": info.name,
                    "param": k,
                    "grad_norm": float(np.linalg.norm(g.astype(np.float64))),
                    "weight_norm": float(np.linalg.norm(w)),
                }
                if before is not None:
                    w0 = before[off : off + v.size].reshape(v.shape).astype(np.float64)
                    n0 = float(np.linalg.norm(w0))
                    du = float(np.linalg.norm(w - w0))
                    row["update_ratio"] = (
                        du / n0 if n0 > 0 else (math.inf if du > 0 else 0.0)
                    )
                off += v.size
                rows.append(row)
        return rows

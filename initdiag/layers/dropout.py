"""Dropout in training mode (inverted dropout, as at step 0 of a training loop):
spec, mean-field rule, empirical step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import integrate, special

from .. import mfstate
from .base import Layer, check_finite, register

__all__ = ["Dropout", "MASK_STREAM"]

#: the Philox stream of a dropout layer's mask under the layer's key
MASK_STREAM = 0


@register
@dataclass(frozen=True)
class Dropout(Layer):
    """``y = m x / (1 - p)`` with an independent mask ``m ~ Bernoulli(1 - p)`` per
    entry (example and unit), as ``torch.nn.Dropout`` in training mode; the masks
    come from the counter-based sampler (one key per seed and layer), so they do
    not depend on the thread count."""

    p: float = 0.5

    kind = "dropout"
    type_name = "dropout"
    prefix = "drop"

    def __post_init__(self) -> None:
        p = check_finite(self.p, "Dropout p")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p must be in [0, 1), got {self.p!r}")
        object.__setattr__(self, "p", p)

    def describe(self, fan_in: int, width: int) -> str:
        return f"Dropout({self.p:g})"

    def memory(self, batch: int, fan_in: int, width: int, item: int) -> tuple[int, int]:
        return batch * width, 0  # the uint8 mask

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """``E[m_a m_b] / (1 - p)^2`` is 1 for a != b (independent masks) and
        ``1/(1 - p)`` on the diagonal, so ``ex`` and the off-diagonal kernel are
        unchanged and ``K[a, a] -> K[a, a] / (1 - p)`` (Srivastava et al. 2014;
        Schoenholz et al. 2017 section 6).  The output is not Gaussian (a spike at
        0).  A unit is dead (zero on the whole batch) when every example is dropped
        or non-positive: for an exchangeable Gaussian ``h`` below (Cov >= 0),
        ``P = int phi(z) (p + (1 - p) Phi(-(mu + sqrt(o) z)/sqrt(d - o)))^B dz``;
        at a large batch the input's dead fraction."""
        keep = 1.0 - self.p
        K = state.K.copy()
        K[np.diag_indices_from(K)] /= keep
        g = _below(state)
        if g is not None:
            ctx.row["active_fraction"] = keep * mfstate.pfrac(g)
            ctx.row["dead_fraction"] = self._dead(g, ctx.batch)
        ctx.extra["keep"] = keep
        return mfstate.State(
            state.ex.copy(),
            K,
            None,
            f"{ctx.info.name} output is a Gaussian times a Bernoulli mask",
        )

    def _dead(self, g: mfstate.Gauss, batch: mfstate.Batch) -> float:
        if batch.B is None:
            return mfstate.orthant(g, batch)
        if not batch.equi or g.w.size != 1:
            return math.nan
        mu, d, o = float(g.m[0, 0]), float(g.S[0, 0, 0]), float(g.S[0, 0, 1])
        if o < 0 or not d > 0:
            return math.nan
        p, B = self.p, batch.B
        so, sv = math.sqrt(o), math.sqrt(max(d - o, 0.0))

        def f(z: float) -> float:
            if sv == 0.0:
                q = float(mu + so * z <= 0)
            else:
                q = float(special.ndtr(-(mu + so * z) / sv))
            return math.exp(B * math.log(p + (1 - p) * q) - 0.5 * z * z)

        val, _ = integrate.quad(f, -12, 12, limit=200, points=[0.0])
        return val / math.sqrt(2 * math.pi)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``g_in = m g / (1 - p)``: ``q~_in = q~_out / (1 - p)``, the gradient
        kernel's diagonal divided by ``1 - p`` and its off-diagonal unchanged."""
        keep = ctx.extra["keep"]
        kernel = None
        if grad.kernel is not None:
            kernel = _diag_scaled(grad.kernel, 1.0 / keep)
        return mfstate.GradState(
            np.array([grad.total(ctx.state) / keep]),
            centred=False,
            independent=grad.independent,
            kernel=kernel,
        )

    # -- empirical step -----------------------------------------------------------
    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        from .. import _rng

        mask = np.empty(x.shape, np.uint8)
        # one stream per training step (step 0 in simulate)
        _rng.fill_keep_mask(mask, ctx.key, MASK_STREAM + ctx.step, self.p)
        s = 1.0 / (1.0 - self.p)
        return ctx.ops.masked_scale(x, mask, s), (mask, s)

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        mask, s = saved
        return (ctx.ops.masked_scale(g, mask, s) if need_input_grad else None), {}

    def infer(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return x  # evaluation mode keeps every unit

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        mask, s = saved
        if example is None:
            return ops.masked_scale(np.ascontiguousarray(t), mask, s)
        return t * (mask[example].astype(np.float64) * s)

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        mask, s = saved
        return ops.masked_scale(np.ascontiguousarray(g), mask, s)


def _below(state: mfstate.State) -> mfstate.Gauss | None:
    """A Gaussian ``h`` with ``x <= 0`` exactly where ``h <= 0``: the state itself,
    or the pre-activation of an activation that keeps the sign (every one here
    but the positive ones, whose output is never <= 0)."""
    if state.gauss is not None:
        return state.gauss
    unit = state.unit
    if unit is not None and unit["kind"] == "act_of" and not unit["act"].positive:
        return unit["gauss"]
    return None


def _diag_scaled(G: Any, f: float) -> Any:
    if isinstance(G, np.ndarray):
        out = G.copy()
        out[np.diag_indices_from(out)] *= f
        return out
    from ..finite_batch import ExchKernel

    return ExchKernel.from_diag_off(G.B, G.diag * f, G.off)

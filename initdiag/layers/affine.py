"""A per-feature affine map ``y = gamma * x + beta`` (no normalisation): spec,
mean-field rule, empirical step.

It is what a BatchNorm in evaluation mode computes, ``gamma (x - running_mean) /
sqrt(running_var + eps) + beta`` = ``a x + b`` per channel with ``a = gamma /
sqrt(running_var + eps)`` and ``b = beta - a running_mean``, and what a frozen
normalisation or a learnable per-channel scale (LayerScale, Touvron et al. 2021)
is at initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import mfstate
from .base import Slot, register
from .norm import _Norm

__all__ = ["Affine"]


@dataclass(frozen=True)
class Affine(_Norm):
    """``y[:, j] = gamma[j] x[:, j] + beta[j]``, ``gamma`` (torch: ``weight``) and
    ``beta`` (``bias``) drawn per feature from the InitScheme's ``affine_weight``
    / ``affine_bias`` (defaults ones and zeros: the identity).

    Shares with the normalisations the gamma / beta slots, the quadrature over
    their laws and the zero-by-design rules (:class:`~initdiag.layers.norm._Norm`),
    without dividing by any statistic of its input.
    """

    kind = "affine"
    type_name = "affine"
    prefix = "affine"
    selector_aliases = ("affine",)
    slot_table = (
        Slot("weight", "affine_weight", "ones", aliases=("gamma", "scale")),
        Slot("bias", "affine_bias", "zeros", aliases=("beta", "shift")),
    )
    #: always has its two tensors (the base's ``affine=False`` does not apply)
    affine = True

    def describe(self, fan_in: int, width: int) -> str:
        return "affine"

    def mf_parameters(self, p: dict[str, Any], fan_in: int, width: int) -> dict:
        """The laws' moments (no ``"norm"`` key: it does not normalise)."""
        g, b = p["weight"], p["bias"]
        n = width
        return {
            "gamma_mean": g.mean(n, n),
            "gamma_var": g.variance(n, n),
            "beta_mean": b.mean(n, n),
            "beta_var": b.variance(n, n),
        }

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """Per feature ``y = gamma x + beta`` with ``gamma``, ``beta`` independent
        of ``x`` and of each other: ``ex_y = mu_g ex + mu_b`` and
        ``K_y = E[gamma^2] K + mu_g mu_b (ex 1^T + 1 ex^T) + E[beta^2] 11^T``
        (the moments of a product of independent variables).  A Gaussian
        (mixture) input becomes the mixture over the gamma / beta quadrature
        nodes, component ``(gamma m + beta, gamma^2 S)``, as after a
        normalisation (:meth:`_Norm._mixture`)."""
        mg, vg, mb, vb = self._laws(ctx)
        one = np.ones_like(state.ex)
        ex = mg * state.ex + mb
        K = (
            (vg + mg * mg) * state.K
            + mg * mb * (np.outer(state.ex, one) + np.outer(one, state.ex))
            + (vb + mb * mb) * np.outer(one, one)
        )
        ctx.extra["en2"] = float(np.mean(np.diag(state.K)))
        if state.gauss is None:
            why = (
                f"the input of {ctx.info.name} is not Gaussian ({state.why_not_gauss})"
            )
            return mfstate.State(ex, K, None, why)
        g = state.gauss
        try:
            out = self._mixture(ctx, list(zip(g.w, g.m, g.S, strict=True)))
        except NotImplementedError as exc:
            return mfstate.State(ex, K, None, str(exc))
        return mfstate.State(ex, K, out)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``dL/dx = gamma dL/dy`` per feature: ``q~_in = E[gamma^2 q~_out |
        gamma]`` (per quadrature node when the gradient came through an
        activation of this output, else ``E[gamma^2] q~_out``);
        ``||dL/dgamma||^2 = N E[g^2 x^2]``, ``||dL/dbeta||^2 = N q~_out``
        (independent examples, :meth:`_Norm._gamma_beta_norms` with ``n = x``).
        The batch centring of the gradient is kept (a per-feature map preserves a
        zero batch sum)."""
        self._gamma_beta_norms(ctx, grad, ctx.extra["en2"])
        gain = self._gain_numerator(ctx, grad)
        return mfstate.GradState(
            np.array([gain]), centred=grad.centred, independent=False
        )

    # -- empirical step -----------------------------------------------------------
    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        gamma, beta = ctx.params["weight"], ctx.params["bias"]
        y = (x * gamma + beta).astype(x.dtype, copy=False)
        return y, (x, gamma)

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        x, gamma = saved
        g64 = g.astype(np.float64)
        dgamma = np.einsum("bj,bj->j", g64, x.astype(np.float64))
        dbeta = g64.sum(axis=0)
        sums = {
            "gamma_grad_norm2": float(dgamma @ dgamma),
            "beta_grad_norm2": float(dbeta @ dbeta),
        }
        gin = (g * gamma).astype(g.dtype, copy=False) if need_input_grad else None
        return gin, sums

    def param_grads(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """``dgamma = sum_b g x``, ``dbeta = sum_b g``, ``dx = gamma g``."""
        x, gamma = saved
        dg, db = ctx.grads["weight"], ctx.grads["bias"]
        np.einsum("bj,bj->j", g, x, out=dg)
        np.sum(g, axis=0, out=db)
        gin = (g * gamma).astype(g.dtype, copy=False) if need_input_grad else None
        return gin, {"weight": dg, "bias": db}

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        gamma = saved[1]
        if example is not None:
            return t * gamma.astype(np.float64)
        return (t * gamma).astype(t.dtype, copy=False)

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        return (g * saved[1]).astype(g.dtype, copy=False)

    def fusion(self) -> tuple | None:
        return None


register(Affine, "per_feature_affine")

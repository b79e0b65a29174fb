"""Dense (fully connected) layers: spec, mean-field rule, empirical step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import meanfield as mf
from .. import mfstate
from .base import Layer, Slot, check_bool, check_positive_int, register

__all__ = ["Dense", "use_gram", "gram64", "is_zero_init"]


def use_gram(batch: int, n_in: int, n_out: int) -> bool:
    """Whether ``||G^T X||_F^2`` is cheaper from the two B x B Grams than from dW:
    syrk flops ``B^2 (n_in + n_out)`` against gemm flops ``2 B n_in n_out``."""
    return batch * (n_in + n_out) < 2 * n_in * n_out


def gram64(a: np.ndarray) -> np.ndarray:
    """``a a^T`` in float64: a float32 Gram overflows long before the signal does."""
    a64 = a.astype(np.float64, copy=False)
    return a64 @ a64.T


def is_zero_init(init: Any, fan_in: int, fan_out: int) -> bool:
    """An initializer that is exactly zero (or an absent parameter)."""
    if init is None:
        return True
    dist = init.distribution(fan_in, fan_out)
    return dist is not None and dist[0] == "constant" and dist[1] == 0.0


def _refuse_weight_mean(layer: str, init: Any, mw: float, fi: int) -> None:
    """A weight mean mu_w makes h_i = mu_w sum_j x_j + (zero-mean part) + b_i: every
    unit of the layer shares the scalar mu_w sum_j x_j per input.  Over random
    networks that sum fluctuates by mu_w sqrt(fan_in) std(x), the same order as the
    Gaussian part sqrt(fan_in Var[w] E[x^2]) at every width, so the law of large
    numbers the Gaussian state rests on does not remove it; the rules carry no such
    shared component, and refuse rather than answer wrongly."""
    raise NotImplementedError(
        f"{layer}: the weight initializer {init} has mean {mw:.4g} (not 0); a weight "
        f"mean gives every unit of {layer} one shared rank-one component of the "
        f"signal (fan_in * mean = {fi * mw:.4g} times the input's average over "
        "units), whose fluctuation over networks is as large as the Gaussian part "
        "at any width; the mean-field rules do not treat it: use simulate() for "
        "this network, or a zero-mean weight initializer"
    )


def _bias_law(init: Any, fi: int, fo: int, layer: str) -> tuple | None:
    """The law of a Dense bias when it is neither normal nor constant (those fold
    into the Gaussian state exactly): ``("uniform", lo, hi)`` or
    ``("truncated_normal", mean, std, a, b)``; None otherwise."""
    if init.variance(fi, fo) == 0:
        return None
    law = mfstate.param_law(init, fi, fo, f"{layer}: the bias")
    return law if law[0] in ("uniform", "truncated_normal") else None


@register
@dataclass(frozen=True)
class Dense(Layer):
    """Fully connected layer ``y = x W^T + b`` with ``W`` of shape (width, fan_in).

    Parameters
    ----------
    width : int
        Number of output units (fan_out).  fan_in is the width of the layer's input.
    bias : bool
        Whether the layer has a bias.
    """

    width: int
    bias: bool = True

    kind = "dense"
    type_name = "dense"
    prefix = "dense"
    starts_block = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", check_positive_int(self.width, "Dense width"))
        check_bool(self.bias, "Dense bias")

    # -- spec -------------------------------------------------------------------
    def output_width(self, input_width: int) -> int:
        return self.width

    slot_table = (
        Slot("weight", "weight", "kaiming_normal(nonlinearity='relu')", True),
        Slot("bias", "bias", "zeros"),
    )

    def slots(self) -> tuple[Slot, ...]:
        return self.slot_table if self.bias else self.slot_table[:1]

    def fans(self, fan_in: int, width: int) -> tuple[int, int]:
        return fan_in, width

    def describe(self, fan_in: int, width: int) -> str:
        return f"Dense({fan_in}->{width})"

    def memory(self, batch: int, fan_in: int, width: int, item: int) -> tuple[int, int]:
        """The B x B Gram of the input (and the Gram of the gradient, float64) or
        the input itself (and dW) when that is cheaper (:func:`use_gram`)."""
        if use_gram(batch, fan_in, width):
            return batch * batch * item, 2 * batch * batch * 8
        return batch * fan_in * item, fan_in * width * item

    def mf_parameters(self, p: dict[str, Any], fan_in: int, width: int) -> dict:
        """sigma_w2 = fan_in E[W^2], sigma_b2 = E[b^2] (docs/theory.md section 0)."""
        w, b = p["weight"], p.get("bias")
        return {
            "sigma_w2": fan_in * w.second_moment(fan_in, width),
            "weight_var": fan_in * w.variance(fan_in, width),
            "weight_mean": w.mean(fan_in, width),
            "sigma_b2": b.second_moment(fan_in, width) if b is not None else 0.0,
            "bias_var": b.variance(fan_in, width) if b is not None else 0.0,
            "bias_mean": b.mean(fan_in, width) if b is not None else 0.0,
        }

    def output_zero_by_design(
        self, inits: dict[str, Any], fan_in: int, width: int
    ) -> bool:
        return is_zero_init(inits["weight"], fan_in, width)

    input_grad_zero_by_design = output_zero_by_design

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """Weights of mean ``mu_w`` and variance ``v_w``, bias ``mu_b, v_b``:
        ``m[a] = fan_in mu_w ex_x[a] + mu_b``, ``S = fan_in v_w K_x + v_b``,
        ``K = S + m m^T`` (Poole et al. 2016 eqs. 3-5 with means; the first layer
        gives ``sigma_w2 <x_a, x_b>/d_in + sigma_b2`` as in neural-tangents).  The
        weight mean enters through the law of large numbers; orthogonal weights are
        treated as Gaussian of the same variance (exact for these second moments).
        A weight mean is refused (:func:`_refuse_weight_mean`); a uniform or
        truncated-normal bias enters through its law.  docs/theory.md, section 1."""
        fi, fo = ctx.info.fan_in, ctx.info.width
        w, b = ctx.params["weight"], ctx.params.get("bias")
        mw, vw = w.mean(fi, fo), w.variance(fi, fo)
        if mw != 0.0:
            _refuse_weight_mean(ctx.info.name, w, mw, fi)
        mb, vb = (b.mean(fi, fo), b.variance(fi, fo)) if b is not None else (0.0, 0.0)
        # a uniform or truncated-normal bias is one draw per unit shared by the whole
        # batch, so it enters as a mixture over its nodes (meanfield.law_nodes), not
        # as a Gaussian of its variance; normal and constant biases fold in exactly
        law = _bias_law(b, fi, fo, ctx.info.name) if b is not None else None
        if law is None:
            g = mfstate.single(fi * mw * state.ex + mb, fi * vw * state.K + vb)
        else:
            S = fi * vw * state.K
            sd = math.sqrt(max(float(np.min(np.diag(S))), 0.0))
            nodes, wts = mf.law_nodes(law, sd)
            k = nodes.size
            g = mfstate.Gauss(
                wts,
                (fi * mw * state.ex)[None, :] + nodes[:, None],
                np.broadcast_to(S, (k, *S.shape)).copy(),
                np.ones(k),
                np.zeros(k),
            )
        ex, K = mfstate.moments(g)
        ctx.extra.update(w2=vw + mw * mw, has_bias=b is not None)
        return mfstate.State(ex, K, g)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``q~_in = fan_out E[W^2] q~_out`` (gradient independence, Schoenholz et al.
        2017 section 5; cross-unit gradient correlations neglected, exact for
        zero-mean weights).  ``||dW||^2 = fan_out fan_in q~ E[x^2]`` and
        ``||db||^2 = fan_out q~``; a gradient centred over the batch by a
        normalisation above sees the input's per-unit batch variance instead of
        E[x^2] and gives ``db = 0`` exactly."""
        fi, fo = ctx.info.fan_in, ctx.info.width
        qt = grad.total(ctx.state)
        if grad.kernel is not None:
            # the batch kernel of gradients (docs/theory.md, "Finite-batch
            # BatchNorm"): ||dW||^2 = fan_in fan_out (1/B) sum_ab G_ab K_x[a, b],
            # ||db||^2 = fan_out (1/B) sum_ab G_ab (exactly 0 below a BatchNorm),
            # G_in = fan_out E[W^2] G
            sgk, sg = mfstate.kernel_sums(grad.kernel, ctx.input_state.K, ctx.batch.B)
            ctx.row["weight_grad_norm2"] = fi * fo * sgk
            if ctx.extra["has_bias"]:
                # a BatchNorm above annihilates the batch sum exactly; a sampled
                # kernel would leave rounding there
                ctx.row["bias_grad_norm2"] = 0.0 if grad.centred else fo * sg
            f = fo * ctx.extra["w2"]
            return mfstate.GradState(
                np.array([f * qt]), kernel=mfstate.kernel_scaled(grad.kernel, f)
            )
        xin = ctx.batch.stats(ctx.input_state.ex, ctx.input_state.K)
        x2 = xin["variance"] if grad.centred else xin["second_moment"]
        ctx.row["weight_grad_norm2"] = fi * fo * qt * x2
        if ctx.extra["has_bias"]:
            ctx.row["bias_grad_norm2"] = 0.0 if grad.centred else fo * qt
        return mfstate.GradState(np.array([fo * ctx.extra["w2"] * qt]))

    # -- empirical step -----------------------------------------------------------
    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        w, b = ctx.params["weight"], ctx.params.get("bias")
        # a training step needs the input itself (dW), not only its Gram
        gram = not ctx.training and use_gram(ctx.B, ctx.info.fan_in, ctx.info.width)
        saved = (w, b, gram64(x) if gram else x, gram)
        out = ctx.ops.dense(x, w, b, np.empty((ctx.B, ctx.info.width), dtype=ctx.dt))
        return out, saved

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        """``||dW||_F^2`` from ``sum_ab (G G^T)_ab (X X^T)_ab`` when cheaper
        (:func:`use_gram`), else from ``dW = G^T X``; dW is never needed otherwise."""
        w, b, xs, gram = saved
        if gram:
            wn = float(np.vdot(gram64(g), xs))
        else:
            dw = g.T @ xs
            wn = float(np.einsum("ij,ij->", dw, dw, dtype=np.float64))
        sums = {"weight_grad_norm2": wn}
        if b is not None:
            db = g.sum(axis=0, dtype=np.float64)
            sums["bias_grad_norm2"] = float(db @ db)
        return (g @ w if need_input_grad else None), sums

    def param_grads(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """``dW = G^T X``, ``db = sum_b G`` (the batch sum of the output gradient),
        ``dX = G W``, as ``torch.nn.Linear``'s backward."""
        w, b, x, _ = saved
        grads = {"weight": np.matmul(g.T, x, out=ctx.grads["weight"])}
        if b is not None:
            grads["bias"] = np.sum(g, axis=0, out=ctx.grads["bias"])
        return (g @ w if need_input_grad else None), grads

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        w = saved[0]
        return t @ (w.T if example is None else w.T.astype(np.float64))

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        return g @ saved[0]

    def fusion(self) -> tuple:
        return ("gemm",)

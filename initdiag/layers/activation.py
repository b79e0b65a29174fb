"""Element-wise nonlinearities: spec, mean-field rule, empirical step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import mfstate
from .base import Layer, check_finite, register

__all__ = [
    "Activation",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "GELU",
    "SiLU",
    "SELU",
    "Erf",
    "Identity",
    "ACTIVATIONS",
    "activation",
]


class Activation(Layer):
    """Base class of element-wise nonlinearities ``y = phi(x)``."""

    kind = "activation"
    may_zero_output = True
    name: ClassVar[str] = "activation"
    #: phi > 0 everywhere (no unit can be dead)
    positive: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # an activation's row prefix and table type are its name ("relu3")
        cls.prefix = cls.type_name = cls.name

    @property
    def params(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items()}

    @property
    def slope(self) -> float:
        """The negative slope the kernels take (leaky ReLU; ignored by others)."""
        return float(getattr(self, "negative_slope", 0.01))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.params}

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """``ex[a] = E[phi(h_a)]``, ``K[a, b] = E[phi(h_a) phi(h_b)]`` under the
        Gaussian (mixture) input state (Poole et al. 2016; :mod:`initdiag.meanfield`).
        An input that is not Gaussian (after another activation, or a normalisation of a
        non-Gaussian input) has no rule: NotImplementedError names why."""
        why = f"{ctx.info.name} output is not Gaussian"
        if state.unit is not None and state.unit["kind"] == "bn_pre":
            return self._after_batchnorm(ctx, state.unit, why)
        if state.gauss is None:
            raise NotImplementedError(
                f"layer {ctx.info.name} ({self.name}): no mean-field rule, "
                f"{state.why_not_gauss}"
            )
        ex, K, d2, ppos = mfstate.act_expect(self, state.gauss, ctx.batch)
        ctx.extra.update(dphi2=d2)
        if ctx.batch.B is not None:
            ctx.extra["dphi_kernel"] = mfstate.dphi_kernel(self, state.gauss)
        if self.positive:
            ctx.row["active_fraction"], ctx.row["dead_fraction"] = 1.0, 0.0
        else:
            ctx.row["active_fraction"] = ppos
            ctx.row["dead_fraction"] = mfstate.orthant(state.gauss, ctx.batch)
        unit = {"kind": "act_of", "act": self, "gauss": state.gauss}
        return mfstate.State(ex, K, None, why, unit=unit)

    def _after_batchnorm(self, ctx: Any, unit: dict, why: str) -> mfstate.State:
        """phi of a finite-batch BatchNorm output (docs/theory.md, "Finite-batch
        BatchNorm"): the sphere quadrature for an exchangeable batch, the Monte
        Carlo unit over the Gaussian input with ``inputs``."""
        from .. import finite_batch as fb

        if ctx.batch.equi:
            st = fb.bn_pre_exchangeable(
                self, ctx.batch.B, unit["gamma"], unit["beta"], unit["a"], unit["eps"]
            )
            ex = np.full(2, st.y_mean)
            K = np.array([[st.y_kd, st.y_ko], [st.y_ko, st.y_kd]])
            active, dead = st.y_active, st.dead
            err = max(st.error, st.dead_se)
        else:
            mc = unit["mc"](self)
            st = mc
            r = mc.rows["act"]
            ex, K, active, dead = r.mean, r.K, r.active, r.dead
            err = r.K_se / max(float(np.mean(np.diag(K))), 1e-300)
        ctx.extra.update(unit=st, dphi2=np.ones(1), integration_error=err)
        ctx.row["active_fraction"] = 1.0 if self.positive else active
        ctx.row["dead_fraction"] = 0.0 if self.positive else dead
        return mfstate.State(ex, K, None, why, unit={"kind": "act_of_bn"})

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``q~_in = E[phi'(h)^2] q~_out`` per mixture component of the input
        (gradient independence, Schoenholz et al. 2017 section 5)."""
        qt = grad.total(ctx.state)
        if grad.below is not None:
            # a BatchNorm after this activation already integrated phi' jointly
            # with its projection
            G = grad.below
            return mfstate.GradState(
                np.array([mfstate.kernel_diag(G)]), kernel=G, independent=False
            )
        if ctx.batch.B is not None:
            G = grad.kernel
            if G is None:
                G = mfstate.kernel_from_scalar(qt, ctx.batch, grad.centred)
            st = ctx.extra.get("unit")
            comp = None
            if st is not None:
                # a BatchNorm below: E[D G D], D = diag phi'(gamma n + beta)
                Gin = st.backward(G)[0] if ctx.batch.equi else st.mid_kernel(G)
            else:
                # per mixture component too (a LayerNorm's gamma / beta nodes)
                comp = ctx.extra["dphi2"] * qt
                # G_in[a, b] = E[phi'(h_a) phi'(h_b)] G[a, b]
                E = ctx.extra["dphi_kernel"]
                if ctx.batch.equi:
                    from ..finite_batch import ExchKernel

                    Gin = ExchKernel.from_diag_off(
                        ctx.batch.B, E[0, 0] * G.diag, E[0, 1] * G.off
                    )
                else:
                    Gin = E * G
            return mfstate.GradState(
                np.array([mfstate.kernel_diag(Gin)]) if comp is None else comp,
                independent=False,
                through=(self, qt),
                kernel=Gin,
                through_kernel=G,
            )
        return mfstate.GradState(
            ctx.extra["dphi2"] * qt, independent=False, through=(self, qt)
        )

    # -- empirical step -----------------------------------------------------------
    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        return ctx.ops.act(x, self), x

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        return (ctx.ops.act_backward(g, saved, self) if need_input_grad else None), {}

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        if example is None:
            return ops.act_backward(np.ascontiguousarray(t), saved, self)
        h = np.ascontiguousarray(saved[example : example + 1])
        d = ops.act_backward(np.ones((1, h.shape[1]), dtype=h.dtype), h, self)
        return t * d.astype(np.float64)

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        return ops.act_backward(np.ascontiguousarray(g), saved, self)

    def fusion(self) -> tuple | None:
        from ..kernels.activation import ACT_CODES

        code = ACT_CODES.get(self.name)
        return None if code is None else ("elementwise", code, self.slope)


class _Linear(Activation):
    """An activation with phi' = 1: the gradient passes through unchanged."""

    may_zero_output = False

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        qt = grad.total(ctx.state)
        if grad.kernel is not None or grad.below is not None:
            G = grad.below if grad.below is not None else grad.kernel
            return mfstate.GradState(
                np.array([mfstate.kernel_diag(G)]),
                centred=grad.centred,
                independent=grad.independent,
                kernel=G,
            )
        return mfstate.GradState(
            ctx.extra["dphi2"] * qt, centred=grad.centred, independent=grad.independent
        )


@dataclass(frozen=True)
class ReLU(Activation):
    """``max(x, 0)``."""

    name = "relu"


@dataclass(frozen=True)
class LeakyReLU(Activation):
    """``x if x > 0 else negative_slope * x``."""

    negative_slope: float = 0.01
    name = "leaky_relu"

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "negative_slope",
            check_finite(self.negative_slope, "LeakyReLU negative_slope"),
        )


@dataclass(frozen=True)
class Tanh(Activation):
    """``tanh(x)``."""

    name = "tanh"


@dataclass(frozen=True)
class Sigmoid(Activation):
    """``1 / (1 + exp(-x))``."""

    name = "sigmoid"
    positive = True


@dataclass(frozen=True)
class GELU(Activation):
    """``x * Phi(x)`` with the exact (erf) Gaussian CDF, as ``torch.nn.GELU()``."""

    name = "gelu"


@dataclass(frozen=True)
class SiLU(Activation):
    """``x * sigmoid(x)`` (Swish)."""

    name = "silu"


@dataclass(frozen=True)
class SELU(Activation):
    """``scale * (x if x > 0 else alpha * (exp(x) - 1))`` with the constants of
    Klambauer et al. (2017), as ``torch.nn.SELU``."""

    name = "selu"
    alpha = 1.6732632423543772848170429916717
    scale = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Erf(Activation):
    """``erf(x)``."""

    name = "erf"


@dataclass(frozen=True)
class Identity(_Linear):
    """``x`` (a linear network)."""

    name = "identity"


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls
    for cls in (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU, SELU, Erf, Identity)
}
_ALIASES = {"linear": "identity", "swish": "silu", "leakyrelu": "leaky_relu"}
for _name, _cls in ACTIVATIONS.items():
    register(_cls)
for _alias, _name in _ALIASES.items():
    register(ACTIVATIONS[_name], _alias)


def activation(spec: str | Activation | dict[str, Any], **params: Any) -> Activation:
    """Build an activation from a name (``"relu"``, ``"leaky_relu"``, ...), a table
    ``{"type": name, **params}`` or an Activation (returned as is).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    if isinstance(spec, Activation):
        if params:
            raise TypeError("parameters given together with an Activation instance")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("type", None) or spec.pop("name", None)
        if name is None:
            raise ValueError(f"activation table needs a 'type' key, got {spec!r}")
        return activation(name, **spec, **params)
    if not isinstance(spec, str):
        raise TypeError(
            f"activation must be a name or an Activation, got {type(spec).__name__}"
        )
    key = spec.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {spec!r}; valid names: "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    try:
        return ACTIVATIONS[key](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for activation {key!r}: {exc}") from None

"""Residual blocks and branch scales: spec, mean-field rule, empirical step.

:class:`Residual` is a composite layer: it holds a branch (a sequence of layers,
nestable) and an optional shortcut, and its rules fold over them the way
neural-tangents' ``stax.parallel`` + ``FanInSum`` compose their children's kernel
functions: the engines run the children's own rules (writing their Profile rows)
and the block combines the results.  Its own row is the stream after the add
(``block3.out``).  :class:`Scale` is SkipInit's / ReZero's learnable scalar
(De & Smith 2020; Bachlechner et al. 2020).

docs/theory.md, "Residual networks", collects the formulas and the closed forms
the tests check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import mfstate
from .base import Layer, Slot, check_finite, layer_from_dict, register
from .dense import is_zero_init

__all__ = ["Residual", "Scale", "MAX_STREAM_COMPONENTS"]

#: mixture components the Gaussian state of a residual stream keeps; beyond, the
#: sum of two mixtures is moment-matched to one Gaussian (and the row says so)
MAX_STREAM_COMPONENTS = 400


def _layers(value: Any, what: str) -> tuple[Layer, ...]:
    if isinstance(value, Layer):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a Layer or a sequence of Layer, got {value!r}")
    out = tuple(value)
    for i, la in enumerate(out):
        if isinstance(la, dict):
            la = layer_from_dict(la)
        if not isinstance(la, Layer):
            raise TypeError(
                f"{what}[{i}] must be a Layer (Dense, BatchNorm, ReLU, ...), got "
                f"{type(la).__name__}"
            )
        out = (*out[:i], la, *out[i + 1 :])
    if not out:
        raise ValueError(f"{what} needs at least one layer")
    return out


@register
@dataclass(frozen=True)
class Scale(Layer):
    """``y = alpha x`` with one learnable scalar ``alpha`` per layer (SkipInit's and
    ReZero's branch multiplier), initialised by ``init`` when given, else by the
    InitScheme key ``scale`` (default ``ones``); InitScheme overrides of the row
    (``block3.scale``, ``scale[0]``) win over both.

    Its gradient ``dL/dalpha = sum_{a, i} g_ai x_ai`` goes in the Profile's
    ``gamma_grad_norm2`` column (the gain column).
    """

    init: Any = None

    kind = "scale"
    type_name = "scale"
    prefix = "scale"
    slot_table = (Slot("weight", "scale", "ones", aliases=("alpha",)),)

    def __post_init__(self) -> None:
        if self.init is not None:
            from ..initializers import parse

            try:
                spec = parse(self.init)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"Scale init: {exc}") from None
            object.__setattr__(self, "init", str(spec))

    # -- spec -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name} | (
            {} if self.init is None else {"init": self.init}
        )

    def own_inits(self) -> dict[str, Any]:
        return {} if self.init is None else {"weight": self.init}

    def fans(self, fan_in: int, width: int) -> tuple[int, int]:
        return 1, 1

    def param_shape(self, slot: Slot, fan_in: int, width: int) -> tuple[int, ...]:
        return (1,)

    def describe(self, fan_in: int, width: int) -> str:
        return "Scale" if self.init is None else f"Scale({self.init})"

    def memory(self, batch: int, fan_in: int, width: int, item: int) -> tuple[int, int]:
        return batch * fan_in * item, 0

    def output_zero_by_design(
        self, inits: dict[str, Any], fan_in: int, width: int
    ) -> bool:
        return is_zero_init(inits["weight"], 1, 1)

    input_grad_zero_by_design = output_zero_by_design

    def mf_parameters(self, p: dict[str, Any], fan_in: int, width: int) -> dict:
        return {"scale": p["weight"].mean(1, 1)}

    def alpha(self, ctx: Any) -> float:
        """The value of alpha, which the rules need to be one number: a random alpha
        is one draw per network, shared by every unit, so the profile would be a
        mixture over networks that the per-unit state does not carry."""
        init = ctx.params["weight"]
        if init.variance(1, 1) != 0.0:
            raise NotImplementedError(
                f"{ctx.info.name}: alpha initialised by {init} is random (one draw per "
                "network, shared by every unit); the mean-field rules need a constant "
                "alpha: use simulate() for this network, or a constant init"
            )
        return float(init.mean(1, 1))

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """``ex -> alpha ex``, ``K -> alpha^2 K``; a Gaussian (mixture) stays one."""
        a = self.alpha(ctx)
        ctx.extra["alpha"] = a
        g = state.gauss
        if g is not None:
            g = mfstate.Gauss(g.w, a * g.m, a * a * g.S, np.ones(g.w.size), g.beta * 0)
        return mfstate.State(a * state.ex, a * a * state.K, g, state.why_not_gauss)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``q~_in = alpha^2 q~_out``; ``(dL/dalpha)^2 = (sum_{a,i} g_ai x_ai)^2``
        has mean ``N sum_ab G_ab K_x[a, b]`` under gradient independence (units
        independent, the cross-unit terms average to zero): per example (the
        Profile's normalisation) ``N q~ E[x^2]`` for independent examples, the
        batch variance in place of E[x^2] below a normalisation (as for a Dense
        weight)."""
        a = ctx.extra["alpha"]
        N = ctx.info.width
        if grad.kernel is not None:
            sgk, _ = mfstate.kernel_sums(grad.kernel, ctx.input_state.K, ctx.batch.B)
            ctx.row["gamma_grad_norm2"] = N * sgk
            kernel = mfstate.kernel_scaled(grad.kernel, a * a)
        else:
            xin = ctx.batch.stats(ctx.input_state.ex, ctx.input_state.K)
            x2 = xin["variance"] if grad.centred else xin["second_moment"]
            ctx.row["gamma_grad_norm2"] = N * grad.total(ctx.state) * x2
            kernel = None
        return mfstate.GradState(
            np.array([a * a * grad.total(ctx.state)]),
            centred=grad.centred,
            independent=grad.independent,
            kernel=kernel,
        )

    # -- empirical step -----------------------------------------------------------
    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        a = float(ctx.params["weight"][0])
        return ctx.ops.residual_add(None, x, a), (x, a)

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        x, a = saved
        d = float(np.vdot(g.astype(np.float64), x.astype(np.float64)))
        gin = ctx.ops.residual_add(None, g, a) if need_input_grad else None
        return gin, {"gamma_grad_norm2": d * d}

    def param_grads(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """``dL/dalpha = sum_{a,i} g_ai x_ai``, ``dx = alpha g``."""
        x, a = saved
        d = ctx.grads["weight"]
        d[0] = np.vdot(g.astype(np.float64), x.astype(np.float64))
        gin = ctx.ops.residual_add(None, g, a) if need_input_grad else None
        return gin, {"weight": d}

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        return t * saved[1]

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        return g * saved[1]


@register
@dataclass(frozen=True)
class Residual(Layer):
    """A residual block ``y = shortcut(x) + scale * branch(x)``.

    Parameters
    ----------
    branch : sequence of Layer
        The residual branch (nestable: a Residual may sit inside it).
    shortcut : Layer or sequence of Layer, optional
        None: the identity; else a projection (a Dense, optionally followed by a
        normalisation) for a branch that changes the width.
    scale : float or Scale, optional
        A fixed multiplier of the branch (``1/sqrt(L)``), or a learnable
        :class:`Scale` (SkipInit / ReZero), which becomes the branch's last row
        (``block3.scale``).

    Rows: the branch's layers as ``block3.dense1``, ``block3.bn1``, ... (named like
    a network's), the shortcut's as ``block3.shortcut.dense1``, then the stream
    after the add, ``block3.out``.
    """

    branch: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] | None = None
    scale: Any = None

    kind = "residual"
    type_name = "residual"
    prefix = "block"
    selector_aliases = ("residual",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "branch", _layers(self.branch, "Residual branch"))
        if self.shortcut is not None:
            object.__setattr__(
                self, "shortcut", _layers(self.shortcut, "Residual shortcut")
            )
        s = self.scale
        if isinstance(s, dict):
            s = layer_from_dict(s)
        if s is not None and not isinstance(s, Scale):
            s = check_finite(s, "Residual scale")
        object.__setattr__(self, "scale", s)

    # -- spec -------------------------------------------------------------------
    def children(self) -> tuple[tuple[Layer, ...], tuple[Layer, ...]]:
        """(branch rows, shortcut rows): a learnable scale is the branch's last."""
        branch = self.branch + ((self.scale,) if isinstance(self.scale, Scale) else ())
        return branch, self.shortcut or ()

    @property
    def multiplier(self) -> float:
        """The fixed multiplier applied in the add (1 unless ``scale`` is a number)."""
        return (
            1.0 if self.scale is None or isinstance(self.scale, Scale) else self.scale
        )

    def output_width(self, input_width: int) -> int:
        branch, short = self.children()
        wb = _width(branch, input_width)
        ws = _width(short, input_width)
        if wb != ws:
            fix = (
                f"shortcut=Dense({wb})"
                if not short
                else f"a shortcut ending at width {wb}"
            )
            raise ValueError(
                f"Residual: the branch ends at width {wb} but the shortcut gives "
                f"{ws} (input width {input_width}); use {fix}"
            )
        return wb

    def describe(self, fan_in: int, width: int) -> str:
        inner = []
        w = fan_in
        for la in self.children()[0]:
            inner.append(la.describe(w, la.output_width(w)))
            w = la.output_width(w)
        s = "" if self.multiplier == 1.0 else f" x{self.multiplier:g}"
        return f"Residual[{' '.join(inner)}]{s}"

    def memory(self, batch: int, fan_in: int, width: int, item: int) -> tuple[int, int]:
        """The block input is kept while the branch runs (and its gradient while
        the branch's backward runs)."""
        return batch * fan_in * item, batch * width * item

    def to_dict(self) -> dict[str, Any]:
        """Nested tables; absent parts are left out (TOML has no null)."""
        d: dict[str, Any] = {
            "type": self.type_name,
            "branch": [la.to_dict() for la in self.branch],
        }
        if self.shortcut is not None:
            d["shortcut"] = [la.to_dict() for la in self.shortcut]
        s = self.scale
        if s is not None:
            d["scale"] = s.to_dict() if isinstance(s, Scale) else s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layer:
        d = dict(d)
        for key in ("branch", "shortcut"):
            v = d.get(key)
            if isinstance(v, (list, tuple)):
                d[key] = tuple(
                    layer_from_dict(x) if isinstance(x, dict) else x for x in v
                )
            elif isinstance(v, dict):
                d[key] = (layer_from_dict(v),)
        return super().from_dict(d)

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: mfstate.State) -> mfstate.State:
        """With ``f`` the branch output, ``s`` the shortcut output (the input for an
        identity) and ``c`` the fixed multiplier: ``ex = ex_s + c ex_f`` and
        ``K = K_s + c^2 K_f + c (ex_s ex_f^T + ex_f ex_s^T)``.  The cross terms are
        those of the means only: a unit of the branch output is a fresh Gaussian
        combination of the layer below (the branch's Dense has zero-mean weights
        independent of the stream), so per unit it is independent of the stream's
        value (Yang & Schoenholz 2017, "Mean field residual networks"; the
        neural-tangents ``FanInSum`` of independent branches).  The stream stays a
        Gaussian (mixture) when both parts are (components multiply, beyond
        :data:`MAX_STREAM_COMPONENTS` moment-matched)."""
        _check_mixing(ctx, self.branch)
        f = ctx.fold(ctx.info.branch, state)
        s = ctx.fold(ctx.info.shortcut, state) if ctx.info.shortcut else state
        c = self.multiplier
        ex = s.ex + c * f.ex
        cross = np.outer(s.ex, f.ex)
        K = s.K + c * c * f.K + c * (cross + cross.T)
        ctx.extra["multiplier"] = c
        if s.gauss is None or f.gauss is None:
            why = s.why_not_gauss if s.gauss is None else f.why_not_gauss
            return mfstate.State(
                ex,
                K,
                None,
                f"the stream of {ctx.info.name} adds a non-Gaussian ({why})",
            )
        g, approx = _sum_mixture(s.gauss, f.gauss, c)
        if approx:
            ctx.extra["approximation"] = (
                f"{ctx.info.name}: the stream's mixture of {s.gauss.w.size} x "
                f"{f.gauss.w.size} Gaussians was moment-matched to one"
            )
        return mfstate.State(ex, K, g)

    def mf_backward(self, ctx: Any, grad: mfstate.GradState) -> mfstate.GradState:
        """``dL/dx = dL/dy + c J_f^T dL/dy`` (plus the shortcut's Jacobian for a
        projection): under gradient independence the branch's Dense weights make
        the cross term vanish, so second moments (and batch kernels) add:
        ``q~_in = q~_skip + c^2 q~_branch``, each obtained by folding the output's
        gradient down its path.  This is what lets a BatchNorm inside the branch,
        whose gain divides by the stream's growing variance, give the
        ``q~_in = q~_out (1 + O(1/l))`` law of De & Smith (2020)."""
        c = ctx.extra["multiplier"]
        q = grad.total(ctx.state)
        top = mfstate.GradState(
            np.array([q]),
            centred=grad.centred,
            independent=grad.independent,
            kernel=grad.kernel,
        )
        gb = ctx.fold_back(ctx.info.branch, _scaled(top, c * c))
        gs = ctx.fold_back(ctx.info.shortcut, top) if ctx.info.shortcut else top
        kernel = None
        if gb.kernel is not None or gs.kernel is not None:
            kernel = mfstate.kernel_add(_kernel(gs, ctx), _kernel(gb, ctx))
        return mfstate.GradState(
            np.array([_total(gs) + _total(gb)]),
            centred=gs.centred and gb.centred,
            independent=gs.independent and gb.independent,
            kernel=kernel,
        )

    # -- empirical step (the engines run the children; the block adds) ------------
    def merge(self, ops: Any, branch: np.ndarray, skip: np.ndarray) -> np.ndarray:
        """The stream after the add: ``skip + c * branch``."""
        return ops.residual_add(skip, branch, self.multiplier)

    def merge_backward(self, ops: Any, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gradient at the branch output, gradient at the shortcut output)."""
        c = self.multiplier
        return (g if c == 1.0 else ops.residual_add(None, g, c)), g

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        raise NotImplementedError("a Residual's linearisation is its children's")

    vjp = jvp


def _width(layers: tuple[Layer, ...], w: int) -> int:
    for la in layers:
        w = la.output_width(w)
    return w


def _check_mixing(ctx: Any, branch: tuple[Layer, ...]) -> None:
    if not any(la.kind == "dense" for la in branch):
        raise NotImplementedError(
            f"{ctx.info.name}: the branch has no Dense layer, so its output is a "
            "function of the stream's own unit and the mean-field sum needs their "
            "joint law; use simulate() for this network, or a branch with a Dense"
        )


def _scaled(g: mfstate.GradState, f: float) -> mfstate.GradState:
    return mfstate.GradState(
        g.comp * f,
        centred=g.centred,
        independent=g.independent,
        kernel=None if g.kernel is None else mfstate.kernel_scaled(g.kernel, f),
    )


def _total(g: mfstate.GradState) -> float:
    return mfstate.kernel_diag(g.kernel) if g.kernel is not None else float(g.comp[0])


def _kernel(g: mfstate.GradState, ctx: Any) -> Any:
    if g.kernel is not None:
        return g.kernel
    return mfstate.kernel_from_scalar(_total(g), ctx.batch, g.centred)


def _sum_mixture(
    a: mfstate.Gauss, b: mfstate.Gauss, c: float
) -> tuple[mfstate.Gauss, bool]:
    """The law of ``x + c y`` for independent mixtures (every pair of components),
    or its moment-matched Gaussian when the pairs exceed the cap."""
    ka, kb = a.w.size, b.w.size
    if ka * kb > MAX_STREAM_COMPONENTS:
        ma, Ka = mfstate.moments(a)
        mb, Kb = mfstate.moments(b)
        m = ma + c * mb
        S = (Ka - np.outer(ma, ma)) + c * c * (Kb - np.outer(mb, mb))
        return mfstate.single(m, S), True
    w = np.outer(a.w, b.w).ravel()
    m = (a.m[:, None, :] + c * b.m[None, :, :]).reshape(ka * kb, -1)
    S = (a.S[:, None] + c * c * b.S[None, :]).reshape(ka * kb, *a.S.shape[1:])
    return mfstate.Gauss(w, m, S, np.ones(w.size), np.zeros(w.size)), False

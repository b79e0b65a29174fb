"""From a model's graph (:mod:`._torch_graph`) to initdiag layers, residual blocks
and the coverage table (private to :mod:`initdiag.integrations.torch`).

Each node is classified once (:func:`classify`): a layer it maps to, a structural
op passed through (flatten, pooling, a view), a residual add, or unsupported
(passed through, and named in the coverage table and a warning).  The graph is
then folded backwards from the output (:func:`sequence`): a unary node appends its
layer to the sequence that leads to its input; an add of two tensors is a
:class:`~initdiag.Residual` whose fork is the latest node both operands depend on,
its branch the longer of the two paths from the fork, its shortcut the other
(empty: the identity).  A graph that is not series-parallel raises
:class:`GraphError`, and the caller falls back to the leaf modules in execution
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import layers as L
from ._torch_graph import Node

__all__ = [
    "Mapped",
    "GraphError",
    "classify",
    "sequence",
    "flatten_keys",
    "eval_affine",
]


class GraphError(ValueError):
    """The graph is not a chain of layers and residual blocks."""


@dataclass(frozen=True)
class Mapped:
    """What a node is: ``status`` ``"mapped"`` (``layer`` set), ``"passed
    through"``, ``"unsupported"`` (passed through, flagged), ``"add"``; ``note`` a
    remark for the coverage table (an approximation, why it is unsupported)."""

    status: str
    layer: Any = None
    note: str = ""
    approx: bool = False


_PASS_FN = {
    "flatten",
    "view",
    "reshape",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "clone",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "avg_pool1d",
    "avg_pool2d",
    "max_pool1d",
    "max_pool2d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "mean",
    "float",
    "to",
    "detach",
}
_PASS_MODULES = (
    nn.Flatten,
    nn.Identity,
    nn.Unflatten,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_ACT_MODULES = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.SELU: "selu",
}
_ACT_FN = {"relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "selu"}
#: functional ops that change the statistics and have no initdiag layer kind
_KNOWN_UNSUPPORTED_FN = {
    "elu",
    "relu6",
    "hardtanh",
    "softplus",
    "mish",
    "hardswish",
    "hardsigmoid",
    "softmax",
    "log_softmax",
    "mul",
    "sub",
    "div",
    "matmul",
    "cat",
    "linear",
    "conv2d",
}

_POOL_MODULES = _PASS_MODULES[3:]
POOL_NOTE = (
    "pooling is not modelled: averaging k positions divides the gradient per "
    "position by k, so the rows below it are on another gradient scale than the "
    "analytic column's"
)
CONV_NOTE = (
    "approximation: a Dense on channels, fan_in = C_in k / groups; every spatial "
    "position counts as an example, so the correlation of neighbouring pixels "
    "and the border effect of zero padding (border outputs see fewer than fan_in "
    "inputs, so their variance is lower) are not modelled"
)


def _linear(m: nn.Module) -> Mapped:
    return Mapped("mapped", L.Dense(m.out_features, bias=m.bias is not None))


def _conv(m: nn.Module) -> Mapped:
    layer = L.Dense(m.out_channels, bias=m.bias is not None)
    return Mapped("mapped", layer, CONV_NOTE, approx=True)


def eval_affine(m: nn.Module) -> dict[str, Any] | None:
    """An eval-mode BatchNorm's map ``a x + b`` per channel: ``{"weight": a,
    "bias": b}`` with ``a = gamma / sqrt(running_var + eps)``, ``b = beta - a
    running_mean`` (None for a BatchNorm that normalises by the batch: training
    mode, or no running statistics)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.training:
        return None
    if m.running_var is None:
        return None
    with torch.no_grad():
        a = (m.running_var.double() + m.eps).rsqrt()
        if m.weight is not None:
            a = a * m.weight.double()
        b = -a * m.running_mean.double()
        if m.bias is not None:
            b = b + m.bias.double()
    return {"weight": a, "bias": b}


def _batchnorm(m: nn.Module) -> Mapped:
    if m.training or m.running_var is None:
        return Mapped("mapped", L.BatchNorm(eps=m.eps, affine=m.affine))
    ab = eval_affine(m)
    exact = all(bool((t == t.flatten()[0]).all()) for t in ab.values())
    note = EVAL_BN_NOTE + ("" if exact else EVAL_BN_APPROX)
    return Mapped("mapped", L.Affine(), note, approx=not exact)


EVAL_BN_NOTE = (
    "eval mode: the per-channel affine map a x + b of the running statistics, "
    "a = gamma / sqrt(running_var + eps), b = beta - a running_mean"
)
EVAL_BN_APPROX = (
    "; approximation: a and b differ between channels and are read as independent "
    "laws of their measured moments (their correlation across channels is not "
    "modelled)"
)


def _groupnorm(m: nn.Module) -> Mapped:
    layer = L.LayerNorm(eps=m.eps, affine=m.affine)
    if m.num_groups == 1:
        return Mapped(
            "mapped",
            layer,
            "GroupNorm(1, C) is LayerNorm over the channels (exact on a (B, C) "
            "input; a spatial input is read per position, as the convolutions are)",
        )
    return Mapped(
        "mapped",
        layer,
        f"approximation: GroupNorm({m.num_groups}, {m.num_channels}) normalises "
        "each group of channels per example; at infinite width each group has "
        "the law of a LayerNorm of its own channels, read as one LayerNorm",
        approx=True,
    )


def _layernorm(m: nn.Module) -> Mapped:
    if len(m.normalized_shape) != 1:
        return Mapped("unsupported", note="LayerNorm over more than one dim")
    return Mapped("mapped", L.LayerNorm(eps=m.eps, affine=m.elementwise_affine))


def _dropout(m: nn.Module) -> Mapped:
    if not m.training or m.p == 0:
        return Mapped("passed through", note="dropout off (eval mode or p=0)")
    return Mapped("mapped", L.Dropout(m.p))


def _act(m: nn.Module) -> Mapped:
    name = next(_ACT_MODULES[t] for t in type(m).__mro__ if t in _ACT_MODULES)
    if getattr(m, "approximate", "none") != "none":
        return Mapped(
            "mapped",
            L.GELU(),
            "approximation: tanh-GELU read as the exact (erf) GELU",
            approx=True,
        )
    kw = {"negative_slope": m.negative_slope} if name == "leaky_relu" else {}
    return Mapped("mapped", L.activation(name, **kw))


#: torch module type -> how it maps (looked up along the module's MRO, so a
#: subclass of nn.Linear maps as one)
_HANDLERS: dict[type, Any] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.LayerNorm: _layernorm,
    nn.GroupNorm: _groupnorm,
    nn.Dropout: _dropout,
    **{t: _act for t in _ACT_MODULES},
    **{t: lambda m: Mapped("passed through", note=POOL_NOTE) for t in _POOL_MODULES},
    **{t: lambda m: Mapped("passed through") for t in _PASS_MODULES[:3]},
}


def _module(m: nn.Module) -> Mapped:
    for t in type(m).__mro__:
        if t in _HANDLERS:
            return _HANDLERS[t](m)
    return Mapped("unsupported", note="no initdiag layer kind")


def classify(node: Node) -> Mapped:
    """What ``node`` maps to (see :class:`Mapped`)."""
    if node.op == "module":
        return _module(node.target)
    name = node.target
    if name == "add":
        if len(node.inputs) == 2:
            return Mapped("add")
        return Mapped("unsupported", note="add of a constant (shifts the mean)")
    if name in _ACT_FN:
        return Mapped("mapped", L.activation(name, **dict(node.params)))
    if name == "dropout":
        return Mapped("unsupported", note="functional dropout: use nn.Dropout")
    if name in _PASS_FN:
        return Mapped("passed through")
    why = "no initdiag layer kind" if name in _KNOWN_UNSUPPORTED_FN else "unknown op"
    return Mapped("unsupported", note=why)


@dataclass
class _Fold:
    nodes: dict[str, Node]
    kinds: dict[str, Mapped]
    order: dict[str, int] = field(default_factory=dict)
    anc: dict[str, frozenset] = field(default_factory=dict)
    visited: set[str] = field(default_factory=set)

    def ancestors(self, key: str) -> frozenset:
        if key not in self.anc:
            s = {key}
            for i in self.nodes[key].inputs:
                s |= self.ancestors(i)
            self.anc[key] = frozenset(s)
        return self.anc[key]

    def seq(self, start: str, end: str) -> list:
        """The items (``(layer, key)`` or ``("residual", branch, shortcut,
        key)``) from the tensor of ``start`` to that of ``end``."""
        out: list = []
        key = end
        while key != start:
            self.visited.add(key)
            node, kind = self.nodes[key], self.kinds[key]
            if not node.inputs:
                raise GraphError(f"the path to {end} does not pass through {start}")
            if kind.status == "add":
                a, b = node.inputs
                common = self.ancestors(a) & self.ancestors(b)
                fork = max(common, key=self.order.__getitem__)
                pa, pb = self.seq(fork, a), self.seq(fork, b)
                branch, short = (pa, pb) if _n(pa) >= _n(pb) else (pb, pa)
                if not branch:
                    raise GraphError(f"{key} adds a tensor to itself")
                out.append(("residual", branch, short, key))
                key = fork
                continue
            if len(node.inputs) != 1:
                raise GraphError(f"{key} ({node.target}) joins several tensors")
            if kind.layer is not None:
                out.append((kind.layer, key))
            key = node.inputs[0]
        return out[::-1]


def _n(items: list) -> int:
    return sum(1 + (_n(it[1]) if it[0] == "residual" else 0) for it in items)


def sequence(nodes: list[Node], kinds: dict[str, Mapped]) -> tuple[list, set[str]]:
    """Fold the graph into items (see :meth:`_Fold.seq`) from the input to the
    last node; also the keys of the nodes on the data path (a side computation,
    such as the ``x.mean() > 0`` of a branch, is on none)."""
    fold = _Fold({n.key: n for n in nodes}, kinds)
    fold.order = {n.key: i for i, n in enumerate(nodes)}
    inputs = [n.key for n in nodes if n.op == "input"]
    if len(inputs) != 1:
        raise GraphError(f"the model takes {len(inputs)} inputs; initdiag reads one")
    items = fold.seq(inputs[0], nodes[-1].key)
    return items, fold.visited


def to_layers(items: list) -> tuple:
    """The initdiag layers of ``items``."""
    out = []
    for it in items:
        if it[0] == "residual":
            out.append(L.Residual(to_layers(it[1]), to_layers(it[2]) or None))
        else:
            out.append(it[0])
    return tuple(out)


def flatten_keys(items: list) -> list[str]:
    """Node keys in the order of the network's rows (a block's branch, its
    shortcut, then the block's own row: :func:`initdiag.network._name_rows`)."""
    out: list[str] = []
    for it in items:
        if it[0] == "residual":
            out += flatten_keys(it[1]) + flatten_keys(it[2]) + [it[3]]
        else:
            out.append(it[1])
    return out

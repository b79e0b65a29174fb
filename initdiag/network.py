"""The network description: :class:`Network` (a sequence of layer specs) and
:func:`mlp`.  Composition and naming only: what a layer *is* lives in its module
of :mod:`initdiag.layers`.

Widths come from the spec; the fans of every layer are derived from it (the
width of whatever feeds the layer), never from an array's layout.

Layer outputs are named after the block they belong to, as in the Profile table:
a layer with ``starts_block`` (a Dense) opens block ``k``, so ``dense3`` is the
third dense layer and ``bn3`` / ``relu3`` the BatchNorm and activation after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from . import _limits
from .layers import (
    ACTIVATIONS,
    GELU,
    SELU,
    Activation,
    BatchNorm,
    Dense,
    Dropout,
    Erf,
    Identity,
    Layer,
    LayerNorm,
    LeakyReLU,
    ReLU,
    Residual,
    Scale,
    Sigmoid,
    SiLU,
    Tanh,
    activation,
    layer_from_dict,
)
from .layers.base import check_bool, check_positive_int

__all__ = [
    "Layer",
    "Dense",
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
    "BatchNorm",
    "LayerNorm",
    "Residual",
    "Scale",
    "Dropout",
    "Network",
    "LayerInfo",
    "mlp",
    "resnet_mlp",
    "activation",
    "layer_from_dict",
    "ACTIVATIONS",
]


@dataclass(frozen=True)
class LayerInfo:
    """A layer in context: its name, position (its Profile row), block and fans;
    for a composite layer (a Residual) the rows of its branch and shortcut."""

    index: int
    name: str
    layer: Layer
    block: int
    fan_in: int
    width: int
    branch: tuple[int, ...] = ()
    shortcut: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) the layer's initializers see."""
        return self.layer.fans(self.fan_in, self.width)


@dataclass(frozen=True)
class Network:
    """A feed-forward network of layers (Dense, BatchNorm, LayerNorm, activations).

    Parameters
    ----------
    input_dim : int
        Number of input features.
    layers : sequence of Layer
        The layers in order.
    init : InitScheme, str, dict or None
        How every parameter is initialised; ``None`` gives the default scheme
        (Kaiming-normal weights for ReLU, zero biases, gamma = 1, beta = 0).
    name : str
        A label used in reports and comparisons.
    """

    input_dim: int
    layers: tuple[Layer, ...]
    init: Any = None
    name: str = "network"
    infos: tuple[LayerInfo, ...] = field(init=False, repr=False, compare=False)
    #: the rows of the top-level sequence (the engines fold over these; a
    #: composite's children are reached through its LayerInfo)
    top: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .initializers import InitScheme

        object.__setattr__(
            self, "input_dim", check_positive_int(self.input_dim, "input_dim")
        )
        if isinstance(self.layers, Layer) or not isinstance(self.layers, Iterable):
            raise TypeError("layers must be a sequence of Layer objects")
        layers = tuple(self.layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{i}] must be a Layer (Dense, BatchNorm, ReLU, ...), got "
                    f"{type(layer).__name__}"
                )
        if not layers:
            raise ValueError("a Network needs at least one layer")
        _limits.check_layers(self.input_dim, layers)
        object.__setattr__(self, "layers", layers)
        init = self.init
        if init is None:
            init = InitScheme()
        elif not isinstance(init, InitScheme):
            init = InitScheme.from_spec(init)
        object.__setattr__(self, "init", init)
        object.__setattr__(self, "infos", self._build_infos())
        init.check_overrides(self)

    def _build_infos(self) -> tuple[LayerInfo, ...]:
        """Rows in execution order: a composite layer's children (branch, then
        shortcut) before its own row (the stream after the add)."""
        infos: list[LayerInfo] = []
        rows, _ = _name_rows(self.layers, self.input_dim, "", None, infos)
        object.__setattr__(self, "top", rows)
        return tuple(infos)

    # -- views -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [info.name for info in self.infos]

    @property
    def widths(self) -> list[int]:
        """Output width of every layer."""
        return [info.width for info in self.infos]

    @property
    def output_dim(self) -> int:
        return self.infos[-1].width

    @property
    def depth(self) -> int:
        """Number of top-level blocks (dense layers and residual blocks)."""
        return sum(la.starts_block or bool(la.children()) for la in self.layers)

    @property
    def activations(self) -> list[Activation]:
        return [i.layer for i in self.infos if i.kind == "activation"]

    def param_inits(self) -> list[dict[str, Any]]:
        """Resolved initializers per layer, by slot name: ``{"weight": ..., "bias":
        ...}`` for a Dense (no ``bias`` without one), ``{"weight": gamma, "bias":
        beta}`` for an affine normalisation, ``{}`` for a layer without parameters."""
        return self.init.resolve(self)

    def with_init(self, init: Any) -> Network:
        return replace(self, init=init)

    def with_name(self, name: str) -> Network:
        return replace(self, name=name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_dim": self.input_dim,
            "layers": [layer.to_dict() for layer in self.layers],
            "init": self.init.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Network:
        from .initializers import InitScheme

        return cls(
            input_dim=d["input_dim"],
            layers=tuple(layer_from_dict(x) for x in d["layers"]),
            init=InitScheme.from_spec(d.get("init")),
            name=d.get("name", "network"),
        )

    def describe(self) -> str:
        parts = [
            self.infos[r].layer.describe(self.infos[r].fan_in, self.infos[r].width)
            for r in self.top
        ]
        return f"{self.name}: in={self.input_dim} " + " ".join(parts)


def require_network(obj: Any, who: str) -> Network:
    """``obj`` when it is a :class:`Network`; TypeError naming ``who`` otherwise."""
    if not isinstance(obj, Network):
        raise TypeError(
            f"{who} needs an initdiag.Network (e.g. initdiag.mlp(...)), got "
            f"{type(obj).__name__}"
        )
    return obj


def _name_rows(
    layers: tuple[Layer, ...],
    width: int,
    scope: str,
    block: int | None,
    infos: list[LayerInfo],
) -> tuple[tuple[int, ...], int]:
    """Append the rows of one sequence to ``infos``; returns (its rows, its output
    width).  Within a sequence a Dense or a composite layer opens block ``k``
    (``dense3``, then ``bn3``, ``relu3`` after it; ``block4`` for a residual block,
    its rows ``block4.dense1``, ...; layers before the first opener get 0); the
    Profile's ``block`` column is ``k`` of the top-level sequence, inherited by
    the rows inside a block."""
    rows: list[int] = []
    k = 0
    top = block is None
    used: set[str] = set()
    for layer in layers:
        kids = layer.children()
        if layer.starts_block or kids:
            k += 1
        blk = k if top else block
        local = f"{layer.prefix}{k}"
        n = 2
        base = local
        while local in used:
            local = f"{base}_{n}"
            n += 1
        used.add(local)
        name = f"{scope}.{local}" if scope else local
        if kids:
            branch, short = kids
            b_rows, wb = _name_rows(branch, width, name, blk, infos)
            s_rows, _ = (
                _name_rows(short, width, f"{name}.shortcut", blk, infos)
                if short
                else ((), width)
            )
            out = layer.output_width(width)  # checks the two paths agree
            info = LayerInfo(
                len(infos), f"{name}.out", layer, blk, width, out, b_rows, s_rows
            )
        else:
            info = LayerInfo(
                len(infos), name, layer, blk, width, layer.output_width(width)
            )
        infos.append(info)
        rows.append(info.index)
        width = info.width
    return tuple(rows), width


_NORMS: dict[str, type[Layer]] = {"batchnorm": BatchNorm, "layernorm": LayerNorm}
_NORM_TAGS = {"batchnorm": "-bn", "layernorm": "-ln"}


def _check_norm(norm: Any) -> str | None:
    """A preset's ``norm``: a key of :data:`_NORMS`, None, or ``"none"`` (a TOML
    file has no null)."""
    if norm == "none":
        return None
    if norm is not None and norm not in _NORMS:
        raise ValueError(
            f"norm must be one of {', '.join(map(repr, _NORMS))}, 'none' or None, "
            f"got {norm!r}"
        )
    return norm


def mlp(
    depth: int,
    width: int,
    activation: str | Activation = "relu",
    batchnorm: bool = False,
    bn_position: Literal["before_activation", "after_activation"] = "before_activation",
    input_dim: int | None = None,
    output_dim: int | None = None,
    init: Any = None,
    bias: bool = True,
    name: str | None = None,
    norm: Literal["batchnorm", "layernorm"] | None = None,
) -> Network:
    """A multi-layer perceptron: ``depth`` hidden blocks ``Dense(width)[, norm], act``.

    Parameters
    ----------
    depth : int
        Number of hidden blocks (the "depth L" of docs/theory.md section 0).
    width : int
        Units per hidden layer.
    activation : str or Activation
        Nonlinearity of every block.
    batchnorm : bool
        Insert a BatchNorm in every block (same as ``norm="batchnorm"``).
    bn_position : {"before_activation", "after_activation"}
        ``Dense -> norm -> act`` (the usual one) or ``Dense -> act -> norm``.
    input_dim : int, optional
        Input features; defaults to ``width``.
    output_dim : int, optional
        When given, a readout ``Dense(output_dim)`` without activation is appended.
    init : InitScheme, optional
        Parameter initialisation; defaults to :class:`InitScheme()`.
    norm : {"batchnorm", "layernorm"}, optional
        The normalisation layer of every block.
    """
    from .layers import activation as make_activation

    depth = check_positive_int(depth, "depth")
    width = check_positive_int(width, "width")
    if bn_position not in ("before_activation", "after_activation"):
        raise ValueError(
            f"bn_position must be 'before_activation' or 'after_activation', "
            f"got {bn_position!r}"
        )
    # a TOML string such as "no" is truthy: only real booleans are accepted
    check_bool(batchnorm, "batchnorm")
    check_bool(bias, "bias")
    if batchnorm and norm not in (None, "batchnorm"):
        raise ValueError(f"batchnorm=True contradicts norm={norm!r}")
    norm = "batchnorm" if batchnorm else norm
    norm = _check_norm(norm)
    _limits.check_mlp(depth, width, input_dim, 3 if norm else 2, output_dim)
    act = make_activation(activation)
    layers: list[Layer] = []
    for _ in range(depth):
        layers.append(Dense(width, bias=bias))
        if norm is None:
            layers.append(act)
        elif bn_position == "before_activation":
            layers += [_NORMS[norm](), act]
        else:
            layers += [act, _NORMS[norm]()]
    if output_dim is not None:
        layers.append(Dense(check_positive_int(output_dim, "output_dim"), bias=bias))
    if name is None:
        tag = _NORM_TAGS.get(norm or "", "")
        name = f"mlp{depth}x{width}-{act.name}{tag}"
    return Network(
        input_dim=width if input_dim is None else input_dim,
        layers=tuple(layers),
        init=init,
        name=name,
    )


def resnet_mlp(
    blocks: int,
    width: int,
    branch_depth: int = 2,
    norm: Literal["batchnorm", "layernorm"] | None = "batchnorm",
    norm_position: Literal["pre", "post"] = "pre",
    activation: str | Activation = "relu",
    zero_init_residual: bool = False,
    skipinit: bool = False,
    input_dim: int | None = None,
    output_dim: int | None = None,
    init: Any = None,
    bias: bool = True,
    name: str | None = None,
) -> Network:
    """A residual MLP: a stem ``Dense(width)``, ``blocks`` residual blocks of
    ``branch_depth`` dense layers each, an optional readout ``Dense(output_dim)``.

    ``norm_position="pre"`` (He et al. 2016b, pre-activation):
    ``x + W_m phi(N(... W_1 phi(N(x))))``, and a final ``N, phi`` before the
    readout.  ``"post"``: the normalisation after each Dense,
    ``x + N(W_m phi(N(... W_1 x)))`` (the branch of He et al. 2016a; the stream
    stays linear, without their ReLU after the add, as in the pre-activation
    network and the bench workload).  Without a norm the same orders without N.

    Parameters
    ----------
    blocks, width, branch_depth : int
        L, the stream width, m.
    norm : {"batchnorm", "layernorm", "none"} or None
    norm_position : {"pre", "post"}
    activation : str or Activation
    zero_init_residual : bool
        gamma = 0 on the last normalisation of every branch (Goyal et al. 2017;
        torchvision's ``zero_init_residual``): every block starts as the identity.
    skipinit : bool
        A :class:`Scale` with alpha = 0 at the end of every branch (De & Smith 2020).
    init : InitScheme, spec, or "fixup"
        ``"fixup"``: :func:`initdiag.initializers.fixup` for these L and m.
    """
    from .initializers import InitScheme, fixup
    from .layers import activation as make_activation

    blocks = check_positive_int(blocks, "blocks")
    width = check_positive_int(width, "width")
    m = check_positive_int(branch_depth, "branch_depth")
    check_bool(zero_init_residual, "zero_init_residual")
    check_bool(skipinit, "skipinit")
    check_bool(bias, "bias")
    norm = _check_norm(norm)
    if norm_position not in ("pre", "post"):
        raise ValueError(
            f"norm_position must be 'pre' or 'post', got {norm_position!r}"
        )
    if zero_init_residual and norm is None:
        raise ValueError(
            "zero_init_residual zeroes the gamma of each branch's last "
            "normalisation, and norm=None has none; use skipinit=True or "
            "init='fixup' for a normalisation-free network"
        )
    _limits.check_mlp(blocks * m, width, input_dim, 3 if norm else 2, output_dim)
    act = make_activation(activation)

    def nrm() -> list[Layer]:
        return [_NORMS[norm]()] if norm else []

    pre = norm_position == "pre"
    layers: list[Layer] = [Dense(width, bias=bias)]
    for _ in range(blocks):
        branch: list[Layer] = []
        for j in range(m):
            if pre:
                branch += [*nrm(), act, Dense(width, bias=bias)]
            else:
                branch += [Dense(width, bias=bias), *nrm()]
                if j < m - 1:
                    branch.append(act)
        layers.append(
            Residual(tuple(branch), scale=Scale("zeros") if skipinit else None)
        )
    if pre:
        layers += [*nrm(), act]
    if output_dim is not None:
        layers.append(Dense(check_positive_int(output_dim, "output_dim"), bias=bias))
    if isinstance(init, str) and init.strip().lower() == "fixup":
        init = fixup(blocks, m)
    scheme = InitScheme.from_spec(init)
    if zero_init_residual:
        family = _NORMS[norm].prefix
        scheme = scheme.with_overrides({f"block*.{family}[-1]": {"weight": "zeros"}})
    if name is None:
        tag = _NORM_TAGS.get(norm or "", "")
        extra = "-zero" if zero_init_residual else "-skipinit" if skipinit else ""
        name = f"resnet{blocks}x{m}x{width}-{act.name}{tag}-{norm_position}{extra}"
    return Network(
        input_dim=width if input_dim is None else input_dim,
        layers=tuple(layers),
        init=scheme,
        name=name,
    )

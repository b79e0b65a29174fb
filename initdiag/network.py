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

from .layers import (
    ACTIVATIONS,
    GELU,
    SELU,
    Activation,
    BatchNorm,
    Dense,
    Erf,
    Identity,
    Layer,
    LayerNorm,
    LeakyReLU,
    ReLU,
    Sigmoid,
    SiLU,
    Tanh,
    activation,
    layer_from_dict,
)
from .layers.base import check_positive_int

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
    "Network",
    "LayerInfo",
    "mlp",
    "activation",
    "layer_from_dict",
    "ACTIVATIONS",
]


@dataclass(frozen=True)
class LayerInfo:
    """A layer in context: its name, position, block and fans."""

    index: int
    name: str
    layer: Layer
    block: int
    fan_in: int
    width: int

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
        infos = []
        width = self.input_dim
        block = 0
        used: set[str] = set()
        for i, layer in enumerate(self.layers):
            if layer.starts_block:
                block += 1
            name = f"{layer.prefix}{block}"
            k = 2
            while name in used:
                name = f"{layer.prefix}{block}_{k}"
                k += 1
            used.add(name)
            out = layer.output_width(width)
            infos.append(LayerInfo(i, name, layer, block, width, out))
            width = out
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
        """Number of blocks (dense layers)."""
        return sum(layer.starts_block for layer in self.layers)

    @property
    def activations(self) -> list[Activation]:
        return [la for la in self.layers if la.kind == "activation"]

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
        parts = [i.layer.describe(i.fan_in, i.width) for i in self.infos]
        return f"{self.name}: in={self.input_dim} " + " ".join(parts)


_NORMS: dict[str, type[Layer]] = {"batchnorm": BatchNorm, "layernorm": LayerNorm}


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
    """A multi-layer perceptron of ``depth`` hidden blocks ``Dense(width)[, norm], act``.

    Parameters
    ----------
    depth : int
        Number of hidden blocks (the "depth L" of docs/theory.md).
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
    if not isinstance(batchnorm, bool):
        raise TypeError(f"batchnorm must be true or false, got {batchnorm!r}")
    if batchnorm and norm not in (None, "batchnorm"):
        raise ValueError(f"batchnorm=True contradicts norm={norm!r}")
    norm = "batchnorm" if batchnorm else norm
    if norm is not None and norm not in _NORMS:
        raise ValueError(
            f"norm must be one of {', '.join(map(repr, _NORMS))} or None, got {norm!r}"
        )
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
        tag = {"batchnorm": "-bn", "layernorm": "-ln"}.get(norm or "", "")
        name = f"mlp{depth}x{width}-{act.name}{tag}"
    return Network(
        input_dim=width if input_dim is None else input_dim,
        layers=tuple(layers),
        init=init,
        name=name,
    )

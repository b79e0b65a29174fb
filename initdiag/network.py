"""The network description: frozen layer specs, :class:`Network` and :func:`mlp`.

A network is a sequence of layers acting on feature vectors (batch x features).
Widths come from the spec; the fans of every dense layer are derived from it (the
width of whatever feeds the layer), never from an array's layout.

Layer outputs are named after the dense block they belong to, as in the Profile
table: ``dense3`` is the third dense layer, ``bn3`` and ``relu3`` the BatchNorm and
activation that follow it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

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
    "Network",
    "mlp",
    "activation",
    "ACTIVATIONS",
]


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    value = int(value.__index__())
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return value


def _check_finite(value: Any, what: str, *, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return v


class Layer:
    """Base class of every layer spec."""

    kind: str = "layer"

    def output_width(self, input_width: int) -> int:
        return input_width

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.kind}
        for k, v in self.__dict__.items():
            d[k] = v
        return d


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

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "width", _check_positive_int(self.width, "Dense width")
        )
        if not isinstance(self.bias, bool):
            raise TypeError(f"Dense bias must be True or False, got {self.bias!r}")

    def output_width(self, input_width: int) -> int:
        return self.width


@dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalisation in training mode (biased batch statistics, as at step 0).

    ``y = gamma * (x - mean_B(x)) / sqrt(var_B(x) + eps) + beta`` per feature, with
    ``gamma`` (torch: ``weight``) and ``beta`` (torch: ``bias``) initialised by the
    network's :class:`~initdiag.initializers.InitScheme`.
    """

    eps: float = 1e-5
    affine: bool = True
    kind = "batchnorm"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "eps", _check_finite(self.eps, "BatchNorm eps", positive=True)
        )


class Activation(Layer):
    """Base class of elementwise nonlinearities."""

    kind = "activation"
    name: str = "activation"

    @property
    def params(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.params}


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
            _check_finite(self.negative_slope, "LeakyReLU negative_slope"),
        )


@dataclass(frozen=True)
class Tanh(Activation):
    """``tanh(x)``."""

    name = "tanh"


@dataclass(frozen=True)
class Sigmoid(Activation):
    """``1 / (1 + exp(-x))``."""

    name = "sigmoid"


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
class Identity(Activation):
    """``x`` (a linear network)."""

    name = "identity"


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls
    for cls in (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU, SELU, Erf, Identity)
}
_ALIASES = {"linear": "identity", "swish": "silu", "leakyrelu": "leaky_relu"}


def activation(spec: str | Activation | dict[str, Any], **params: Any) -> Activation:
    """Build an activation from a name (``"relu"``, ``"leaky_relu"``, ...).

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


def layer_from_dict(d: dict[str, Any]) -> Layer:
    """Inverse of ``Layer.to_dict``."""
    d = dict(d)
    typ = d.pop("type", None)
    if typ is None:
        raise ValueError(f"layer table needs a 'type' key, got {d!r}")
    typ = str(typ).lower()
    if typ == "dense":
        return Dense(**d)
    if typ in ("batchnorm", "bn", "batch_norm"):
        return BatchNorm(**d)
    return activation(typ, **d)


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


@dataclass(frozen=True)
class Network:
    """A feed-forward network of dense, BatchNorm and activation layers.

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
            self, "input_dim", _check_positive_int(self.input_dim, "input_dim")
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
            if isinstance(layer, Dense):
                block += 1
                base = "dense"
            elif isinstance(layer, BatchNorm):
                base = "bn"
            elif isinstance(layer, Activation):
                base = layer.name
            else:  # pragma: no cover - guarded in __post_init__
                raise TypeError(type(layer).__name__)
            name = f"{base}{block}"
            k = 2
            while name in used:
                name = f"{base}{block}_{k}"
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
        """Number of dense layers."""
        return sum(isinstance(layer, Dense) for layer in self.layers)

    @property
    def activations(self) -> list[Activation]:
        return [la for la in self.layers if isinstance(la, Activation)]

    def param_inits(self) -> list[dict[str, Any]]:
        """Resolved initializers per layer: ``{"weight": ..., "bias": ...}`` for a
        Dense (bias None when it has none), ``{"weight": gamma, "bias": beta}`` for a
        BatchNorm, ``{}`` for an activation."""
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
        parts = []
        for info in self.infos:
            layer = info.layer
            if isinstance(layer, Dense):
                parts.append(f"Dense({info.fan_in}->{info.width})")
            elif isinstance(layer, BatchNorm):
                parts.append("BN")
            else:
                parts.append(layer.name)
        return f"{self.name}: in={self.input_dim} " + " ".join(parts)


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
) -> Network:
    """A multi-layer perceptron of ``depth`` hidden blocks ``Dense(width)[, BN], act``.

    Parameters
    ----------
    depth : int
        Number of hidden blocks (the "depth L" of docs/theory.md section 0).
    width : int
        Units per hidden layer.
    activation : str or Activation
        Nonlinearity of every block.
    batchnorm : bool
        Insert a BatchNorm in every block.
    bn_position : {"before_activation", "after_activation"}
        ``Dense -> BN -> act`` (the usual one) or ``Dense -> act -> BN``.
    input_dim : int, optional
        Input features; defaults to ``width``.
    output_dim : int, optional
        When given, a readout ``Dense(output_dim)`` without activation is appended.
    init : InitScheme, optional
        Parameter initialisation; defaults to :class:`InitScheme()`.
    """
    from . import network as _n

    depth = _check_positive_int(depth, "depth")
    width = _check_positive_int(width, "width")
    if bn_position not in ("before_activation", "after_activation"):
        raise ValueError(
            f"bn_position must be 'before_activation' or 'after_activation', "
            f"got {bn_position!r}"
        )
    act = _n.activation(activation)
    layers: list[Layer] = []
    for _ in range(depth):
        layers.append(Dense(width, bias=bias))
        if batchnorm and bn_position == "before_activation":
            layers += [BatchNorm(), act]
        elif batchnorm:
            layers += [act, BatchNorm()]
        else:
            layers.append(act)
    if output_dim is not None:
        layers.append(Dense(_check_positive_int(output_dim, "output_dim"), bias=bias))
    if name is None:
        name = f"mlp{depth}x{width}-{act.name}{'-bn' if batchnorm else ''}"
    return Network(
        input_dim=width if input_dim is None else input_dim,
        layers=tuple(layers),
        init=init,
        name=name,
    )


def as_layers(layers: Sequence[Layer]) -> tuple[Layer, ...]:
    return tuple(layers)

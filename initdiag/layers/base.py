"""What every layer kind is made of, and the table the engines find them in.

A layer kind is one class (one module of :mod:`initdiag.layers`) that carries

- its **spec**: constructor arguments (frozen dataclass fields), ``output_width``,
  the parameter :class:`Slot` s the :class:`~initdiag.initializers.InitScheme`
  fills, the fans its initializers see, its row name and ``kind``;
- its **analytic rule** (:meth:`Layer.mf_forward` / :meth:`Layer.mf_backward`):
  a pure map of the mean-field state (:mod:`initdiag.mfstate`), forward and
  backward, with the formula and its citation in the docstring;
- its **empirical step** (:meth:`Layer.forward` / :meth:`Layer.backward`):
  one random network's forward / backward through the kernel dispatchers
  (:class:`initdiag.empirical.ops.Ops`), plus its linearisation for Jacobian
  probes (:meth:`Layer.jvp`, :meth:`Layer.vjp`) and, optionally, the fused
  primitive it maps to on the fast path (:meth:`Layer.fusion`).

:func:`register` puts a class in :data:`LAYER_TYPES` under its ``type_name`` (and
aliases); :func:`layer_from_dict` and the TOML loader read that table, so a new
kind is one module plus its registration (see ``docs/architecture.md``).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, ClassVar, NamedTuple

import numpy as np

__all__ = [
    "Layer",
    "Slot",
    "LAYER_TYPES",
    "register",
    "layer_from_dict",
    "check_positive_int",
    "check_finite",
]


def check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    value = int(value.__index__())
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return value


def check_finite(value: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{what} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return v


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be true or false, got {value!r}")
    return value


class Slot(NamedTuple):
    """One parameter tensor of a layer.

    ``name`` is the key in the layer's resolved initializers (``"weight"``,
    ``"bias"``); ``scheme`` the :class:`~initdiag.initializers.InitScheme` key that
    initialises it (``"weight"``, ``"bn_weight"``, ...), ``default`` the spec used
    when the scheme has no such key; ``matrix`` whether its shape is
    ``(width, fan_in)`` (else ``(width,)``); ``aliases`` other override keys
    (BatchNorm's ``gamma`` for ``weight``).
    """

    name: str
    scheme: str
    default: str
    matrix: bool = False
    aliases: tuple[str, ...] = ()


LAYER_TYPES: dict[str, type[Layer]] = {}


def register(cls: type[Layer], *aliases: str) -> type[Layer]:
    """Make a layer class known to :func:`layer_from_dict` (and so to TOML files)
    under ``cls.type_name`` and ``aliases``."""
    for key in (cls.type_name, *aliases):
        k = key.lower()
        if k in LAYER_TYPES and LAYER_TYPES[k] is not cls:
            raise ValueError(f"layer type name {key!r} is already registered")
        LAYER_TYPES[k] = cls
    return cls


def layer_from_dict(d: dict[str, Any]) -> Layer:
    """Inverse of :meth:`Layer.to_dict` (``{"type": name, **arguments}``)."""
    if not isinstance(d, dict):
        raise TypeError(f"a layer table must be a mapping, got {d!r}")
    d = dict(d)
    typ = d.pop("type", None)
    if typ is None:
        raise ValueError(f"layer table needs a 'type' key, got {d!r}")
    cls = LAYER_TYPES.get(str(typ).strip().lower())
    if cls is None:
        raise ValueError(
            f"unknown layer type {typ!r}; valid types: {', '.join(sorted(LAYER_TYPES))}"
        )
    return cls.from_dict(d)


class Layer:
    """Base class of every layer kind (see the module docstring)."""

    #: Profile ``kind`` column and InitScheme selector family
    kind: ClassVar[str] = "layer"
    #: the ``type`` key of the layer's table in dicts and TOML files
    type_name: ClassVar[str] = "layer"
    #: row names are ``<prefix><block>``; selectors ``"<prefix>[k]"`` also accept
    #: ``selector_aliases``
    prefix: ClassVar[str] = "layer"
    selector_aliases: ClassVar[tuple[str, ...]] = ()
    #: a new block number starts at this layer (dense layers)
    starts_block: ClassVar[bool] = False
    #: the layer can make every output zero by itself (an activation)
    may_zero_output: ClassVar[bool] = False

    # -- spec -------------------------------------------------------------------
    def output_width(self, input_width: int) -> int:
        return input_width

    #: every parameter slot the kind can have (the InitScheme and TOML keys)
    slot_table: ClassVar[tuple[Slot, ...]] = ()

    def slots(self) -> tuple[Slot, ...]:
        """The parameter tensors this layer has (all of ``slot_table`` by default)."""
        return self.slot_table

    def children(self) -> tuple[tuple[Layer, ...], ...]:
        """The sub-sequences of a composite layer (a Residual's branch and
        shortcut), whose rows the network names and the engines run; () for a
        plain layer."""
        return ()

    def own_inits(self) -> dict[str, Any]:
        """Initializer specs the layer itself carries, by slot name (``Scale(init=
        "zeros")``): they win over the InitScheme's keys, overrides win over them."""
        return {}

    def fans(self, fan_in: int, width: int) -> tuple[int, int]:
        """(fan_in, fan_out) its initializers see: a dense layer's own; a vector
        parameter of width ``n`` sees ``(n, n)``."""
        return width, width

    def param_shape(self, slot: Slot, fan_in: int, width: int) -> tuple[int, ...]:
        return (width, fan_in) if slot.matrix else (width,)

    def describe(self, fan_in: int, width: int) -> str:
        return self.prefix

    def memory(self, batch: int, fan_in: int, width: int, item: int) -> tuple[int, int]:
        """(bytes the empirical backward keeps for this layer, transient workspace
        bytes of its backward); by default its input, plus two vectors of batch
        statistics for a layer with parameters."""
        return (batch * fan_in + (2 * width if self.slots() else 0)) * item, 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type_name}
        for f in fields(self):  # type: ignore[arg-type]
            d[f.name] = getattr(self, f.name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layer:
        try:
            return cls(**d)
        except TypeError as exc:
            raise ValueError(
                f"bad parameters for {cls.kind} {cls.type_name!r}: {exc}"
            ) from None

    # -- analytic rule ------------------------------------------------------------
    def mf_forward(self, ctx: Any, state: Any) -> Any:
        """Mean-field state of the output from the input's (:mod:`initdiag.mfstate`)."""
        raise NotImplementedError(f"{type(self).__name__} has no mean-field rule")

    def mf_backward(self, ctx: Any, grad: Any) -> Any:
        """Gradient state at the input from the output's; writes the row's
        parameter-gradient columns into ``ctx.row``."""
        raise NotImplementedError(f"{type(self).__name__} has no mean-field rule")

    # -- empirical step -----------------------------------------------------------
    def forward(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """(output, saved) for one random network; ``ctx.params`` holds the sampled
        parameters by slot name, ``ctx.ops`` the kernel dispatchers."""
        raise NotImplementedError(f"{type(self).__name__} has no empirical step")

    def backward(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        """(input gradient or None, parameter-gradient sums of squares by Profile
        column, unnormalised)."""
        raise NotImplementedError(f"{type(self).__name__} has no empirical step")

    def jvp(
        self, ops: Any, saved: Any, t: np.ndarray, example: int | None = None
    ) -> np.ndarray:
        """The layer's Jacobian applied to tangents ``t`` (batch statistics held
        fixed); with ``example`` every row of ``t`` is a tangent of that example."""
        raise NotImplementedError(f"{type(self).__name__} has no linearisation")

    def vjp(self, ops: Any, saved: Any, g: np.ndarray) -> np.ndarray:
        """The transposed Jacobian applied to cotangents ``g``."""
        raise NotImplementedError(f"{type(self).__name__} has no linearisation")

    # -- training step (initdiag.training) ------------------------------------------
    def param_grads(
        self, ctx: Any, g: np.ndarray, saved: Any, need_input_grad: bool
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(input gradient or None, the gradient of every parameter tensor by slot
        name, written into ``ctx.grads``) for a training step; ``saved`` comes from
        :meth:`forward` under ``ctx.training``.  A kind without parameters returns
        its backward's input gradient."""
        if self.slots():
            raise NotImplementedError(
                f"{type(self).__name__} has no parameter gradients: it cannot be "
                "trained yet"
            )
        return self.backward(ctx, g, saved, need_input_grad)[0], {}

    def infer(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        """The output in evaluation mode (torch's ``model.eval()``): the training
        forward unless the kind differs (BatchNorm: its running statistics;
        Dropout: the identity)."""
        return self.forward(ctx, x)[0]

    def running_state(self, width: int) -> Any:
        """What the kind keeps across training steps besides its parameters
        (BatchNorm: the running mean and variance), None for most kinds; the
        trainer hands it back as ``ctx.extra["running"]``."""
        return None

    def update_running(self, ctx: Any, saved: Any, momentum: float) -> None:
        """Fold one training step's batch statistics into ``ctx.extra["running"]``."""

    def fusion(self) -> tuple | None:
        """The fused primitive this layer maps to on the numba fast path
        (:mod:`initdiag.empirical.fused`), or None: its generic step runs."""
        return None

    def output_zero_by_design(
        self, inits: dict[str, Any], fan_in: int, width: int
    ) -> bool:
        """True when an all-zero output is what the initialisation asks for (a zero
        weight, gamma = beta = 0) or the layer may produce one, not an underflow."""
        return self.may_zero_output

    def input_grad_zero_by_design(
        self, inits: dict[str, Any], fan_in: int, width: int
    ) -> bool:
        """The same for the gradient at the layer's input."""
        return self.may_zero_output

    def mf_parameters(self, p: dict[str, Any], fan_in: int, width: int) -> dict:
        """The mean-field parameters this layer contributes to
        :func:`initdiag.analytic.network_parameters` (none by default)."""
        return {}

"""The data-flow graph of a PyTorch model, from ``torch.fx`` or from one real
forward pass (private to :mod:`initdiag.integrations.torch`).

A graph is a list of :class:`Node` in execution order: the input, leaf-module calls
and tensor functions (``relu``, ``add``, ``flatten``, ...), each naming the nodes
whose tensors it reads.  Two builders fill it:

- :func:`trace_fx`: ``torch.fx`` symbolic tracing with every module that has no
  children kept as a leaf (tracing into BatchNorm breaks on its buffers, and a leaf
  is what the coverage table names);
- :func:`record_forward`: one real forward pass under a ``TorchFunctionMode`` (which
  sees ``add`` / ``add_`` / ``__iadd__`` and the functional activations) with hooks
  on the leaf modules; a node's inputs are found by the identity of the tensor
  objects it receives, so ``out += identity`` and ``nn.ReLU(inplace=True)``
  (whose output *is* its input object) keep their data flow.

:func:`record_forward` is also how ``diagnose`` measures: the same nodes, with a
callback that sees every node's output tensor as it is produced (before a later
in-place op overwrites it).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Node", "fn_name", "leaf_modules", "trace_fx", "record_forward"]


@dataclass(frozen=True)
class Node:
    """One operation: ``op`` is ``"input"``, ``"module"`` (``target`` the module,
    ``qualname`` its name in the model) or ``"function"`` (``target`` the canonical
    function name, e.g. ``"relu"``, ``"add"``); ``inputs`` the keys of the nodes
    whose tensors it reads, in argument order; ``params`` the non-tensor arguments
    that matter (a leaky ReLU's slope)."""

    key: str
    op: str
    target: Any
    inputs: tuple[str, ...]
    qualname: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    def signature(self) -> tuple[str, Any]:
        """What identifies the node across the two builders."""
        return (self.op, self.qualname if self.op == "module" else self.target)


def fn_name(target: Any) -> str:
    """``operator.iadd`` -> ``"add"``, ``torch.relu_`` -> ``"relu"``,
    ``Tensor.__iadd__`` -> ``"add"``, ``"relu_"`` (an fx method name) ->
    ``"relu"``: in-place and operator spellings collapse to one name."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    name = name.strip("_")
    if name in ("iadd", "radd"):
        return "add"
    return name[:-1] if name.endswith("_") else name


def leaf_modules(model: nn.Module) -> dict[nn.Module, str]:
    """Every module without children, by object, with its qualified name."""
    return {m: q for q, m in model.named_modules() if q and not any(m.children())} or (
        {model: type(model).__name__} if not any(model.children()) else {}
    )


_PARAM_KW = {"leaky_relu": ("negative_slope", 1, 0.01)}


def _params(name: str, args: tuple, kwargs: dict) -> tuple[tuple[str, Any], ...]:
    if name not in _PARAM_KW:
        return ()
    kw, pos, default = _PARAM_KW[name]
    v = kwargs.get(kw, args[pos] if len(args) > pos else default)
    return ((kw, float(v)),)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: dict[nn.Module, str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, qualname)


def trace_fx(model: nn.Module) -> list[Node]:
    """The graph by ``torch.fx`` symbolic tracing (raises what fx raises for
    data-dependent control flow)."""
    leaves = leaf_modules(model)
    graph = _Tracer(leaves).trace(model)
    mods = dict(model.named_modules())
    nodes: list[Node] = []
    for n in graph.nodes:
        ins = tuple(a.name for a in n.all_input_nodes)
        if n.op == "placeholder":
            nodes.append(Node(n.name, "input", None, ()))
        elif n.op == "call_module":
            nodes.append(Node(n.name, "module", mods[n.target], ins, n.target))
        elif n.op in ("call_function", "call_method"):
            if n.target is operator.getitem or n.target == "size":
                nodes.append(Node(n.name, "meta", fn_name(n.target), ins))
                continue
            name = fn_name(n.target)
            params = _params(name, tuple(n.args), dict(n.kwargs))
            nodes.append(Node(n.name, "function", name, ins, params=params))
        elif n.op == "get_attr":
            nodes.append(Node(n.name, "meta", "get_attr", ()))
    return _drop_meta(nodes)


def _drop_meta(nodes: list[Node]) -> list[Node]:
    """Remove nodes that produce no tensor of the data path (``x.size(0)``, an
    attribute) and their keys from the inputs of the others."""
    meta = {n.key for n in nodes if n.op == "meta"}
    return [
        Node(
            n.key,
            n.op,
            n.target,
            tuple(i for i in n.inputs if i not in meta),
            n.qualname,
            n.params,
        )
        for n in nodes
        if n.op != "meta"
    ]


OnOutput = Callable[[Node, torch.Tensor], None]


class _Recorder(TorchFunctionMode):
    """Sees every tensor function called outside the leaf modules, and (through
    the hooks :func:`record_forward` installs) every leaf-module call."""

    def __init__(self, on_output: OnOutput | None):
        super().__init__()
        self.nodes: list[Node] = []
        self.owner: dict[int, str] = {}
        # keeps every tensor seen alive, so that no id() is reused during the pass
        self.keep: list[torch.Tensor] = []
        self.depth = 0
        self.on_output = on_output

    def keys(self, args: Any) -> tuple[str, ...]:
        flat = []
        for a in args:
            flat.extend(a if isinstance(a, (list, tuple)) else [a])
        return tuple(
            self.owner[id(a)]
            for a in flat
            if isinstance(a, torch.Tensor) and id(a) in self.owner
        )

    def add(self, op: str, target: Any, ins: tuple, out: Any, q=None, params=()):
        if not isinstance(out, torch.Tensor):
            return
        node = Node(f"n{len(self.nodes)}", op, target, ins, q, params)
        self.nodes.append(node)
        self.owner[id(out)] = node.key
        self.keep.append(out)
        if self.on_output is not None:
            self.on_output(node, out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            ins = self.keys(args)
            if ins and isinstance(out, torch.Tensor):
                name = fn_name(func)
                self.add("function", name, ins, out, params=_params(name, args, kwargs))
        return out


def record_forward(
    model: nn.Module, x: torch.Tensor, on_output: OnOutput | None = None
) -> tuple[list[Node], Any]:
    """Run ``model(x)`` once and return (its graph, its output); every hook is
    removed afterwards, also when the forward raises."""
    rec = _Recorder(on_output)
    pending: dict[int, list[tuple[str, ...]]] = {}
    leaves = leaf_modules(model)

    def pre(m, args):
        if rec.depth == 0:
            pending.setdefault(id(m), []).append(rec.keys(args))
        rec.depth += 1

    def post(m, args, out):
        rec.depth -= 1
        if rec.depth == 0:
            rec.add("module", m, pending[id(m)].pop(), out, leaves[m])

    handles = []
    try:
        for m in leaves:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        rec.owner[id(x)] = "input"
        rec.keep.append(x)
        with rec:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [Node("input", "input", None, ()), *rec.nodes], out

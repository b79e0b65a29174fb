"""``fix``'s data-dependent route: measured rescaling in execution order, for what
the mean-field rules cannot map (private to :mod:`initdiag.integrations.torch`).

The idea is LSUV's (Mishkin & Matas 2016, "All you need is a good init": scale
each layer until a statistic measured on a batch hits its target), without its
three known faults:

- **order.**  Layers are visited in the order the forward pass runs them (the
  recorded graph of :func:`._torch_graph.record_forward`, not module
  registration order), and each is measured on the model with every layer before
  it already rescaled.
- **the target.**  Unit pre-activation variance is not the edge of chaos for a
  tanh-like activation (LSUV's q = 1 gives chi1 = E[phi'(z)^2] / E[phi(z)^2] =
  1.18 for tanh: chaotic).  ``"edge_of_chaos"`` scales a layer until its measured
  Jacobian gain is one,

      chi1 = (fan_in / fan_out) E_u ||J^T u||^2 / ||u||^2,   u: E[u u^T] = I,

  ``J`` the Jacobian of the path from the layer's input to the output of the
  nonlinearity it feeds (an activation, or a module initdiag cannot model,
  measured as it is), ``E_u`` estimated with :data:`PROBES` Gaussian probes per
  example.  ``E_u ||J^T u||^2 = ||J||_F^2``, so for a Dense of weights ``W`` and
  an elementwise ``phi`` it is ``mean_i |w_i|^2 phi'(h_i)^2`` per unit,
  ``fan_in E[W^2] E[phi'(h)^2]`` at large width: the definition of chi1 (Poole
  et al. 2016, eq. 7) on the measured pre-activations.  ``"unit_variance"`` is
  LSUV's own target (E[h^2] = 1 at the nonlinearity's input), offered for
  comparison.
- **residual branches.**  Normalising every branch to unit variance makes the
  stream's variance grow linearly with depth and the gradient with it.  Instead
  the branch's last scale (its last Linear / Conv, or the gamma and beta of its
  last normalisation) is set so that the block adds a fraction ``1 / L`` of
  what its shortcut carries, ``E[out^2] = (1 + 1/L) E[shortcut^2]``, solved
  from the measured ``E[s^2]``, ``E[s b]``, ``E[b^2]`` of the add's operands
  (exact when the scale is the branch's last op; otherwise iterated), so that
  the stream grows by at most ``(1 + 1/L)^L < e`` over ``L`` blocks (the bound of
  Zhang, Dauphin & Ma 2019, Fixup; De & Smith 2020).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _torch_graph as G
from . import _torch_map as M

__all__ = ["Unit", "Block", "find_units", "plan_data", "unit_gain", "PROBES"]

#: Gaussian probes per example in the Jacobian-gain estimate
PROBES = 16
#: relative tolerance on a unit's target, and the iterations allowed
RTOL = 1e-4
MAX_ITER = 10

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Unit:
    """A weight layer feeding a nonlinearity: ``module`` (qualified name), the
    occurrence of its call, ``end`` (signature, occurrence) of the node whose
    output ends the path, ``what`` the nonlinearity's description."""

    module: str
    occurrence: int
    end: tuple[Any, int]
    what: str
    order: int


@dataclass(frozen=True)
class Block:
    """A residual add: ``add`` (signature, occurrence), its branch operand's
    signature / occurrence and the knob (qualified name of the module whose
    weight and bias scale the branch), and the node order of the add."""

    add: tuple[Any, int]
    branch_out: tuple[Any, int]
    knob: str
    order: int


def _occ(nodes: list[G.Node]) -> dict[str, tuple[Any, int]]:
    seen: Counter = Counter()
    out = {}
    for n in nodes:
        out[n.key] = (n.signature(), seen[n.signature()])
        seen[n.signature()] += 1
    return out


def _is_norm(m: Any) -> bool:
    return isinstance(m, _NORMS) and M.eval_affine(m) is None


def find_units(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[Unit], list[Block], dict[str, str], list[G.Node]]:
    """The units and residual blocks of ``model`` in execution order, and for
    every other weight layer why it is not a unit ("a normalisation follows",
    "a readout")."""
    with torch.no_grad():
        nodes, _ = G.record_forward(model, x)
    kinds = {n.key: M.classify(n) for n in nodes}
    occ = _occ(nodes)
    order = {n.key: i for i, n in enumerate(nodes)}
    users: dict[str, list[G.Node]] = {}
    for n in nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    units, skipped = [], {}
    for n in nodes:
        if n.op != "module" or not isinstance(n.target, _WEIGHTED):
            continue
        key, why, via = n.key, "", None
        while True:
            nxt = users.get(key, [])
            u = nxt[0] if len(nxt) == 1 else None
            k = kinds[u.key] if u is not None else None
            stop = ""
            if u is None:
                stop = "a readout" if not nxt else "its output forks"
            elif u.op == "module" and _is_norm(u.target):
                stop = "a normalisation follows (it divides the scale out)"
            elif u.op == "module" and isinstance(u.target, _WEIGHTED):
                stop = "a weight layer follows directly (linear)"
            elif k.status == "add":
                stop = "the last layer of a residual branch"
            if stop and via is None:
                why = stop
                break
            act = k is not None and k.layer is not None and k.layer.kind == "activation"
            if stop or act:
                # the path ends at the activation, or at the last module initdiag
                # cannot model (measured as it is) before the stop
                end = u if act else via
                what = k.layer.name if act else ""
                if via is not None:
                    what = (what + " after " if what else "") + (
                        f"{via.qualname or via.target} (unsupported, measured)"
                    )
                units.append(
                    Unit(n.qualname, occ[n.key][1], occ[end.key], what, order[n.key])
                )
                break
            if k.status == "unsupported":
                via = u
            key = u.key
        if why:
            skipped.setdefault(n.qualname, why)
    blocks = _blocks(nodes, kinds, occ, order)
    return units, blocks, skipped, nodes


def _blocks(nodes, kinds, occ, order) -> list[Block]:
    try:
        items, _ = M.sequence(nodes, kinds)
    except M.GraphError:
        return []
    by_key = {n.key: n for n in nodes}
    out: list[Block] = []

    def walk(its: list) -> None:
        for it in its:
            if it[0] != "residual":
                continue
            _, branch, short, key = it
            walk(branch)
            walk(short)
            knob = None
            for sub in reversed(branch):
                if sub[0] == "residual":
                    break
                nd = by_key[sub[1]]
                if nd.op == "module" and (
                    isinstance(nd.target, _WEIGHTED)
                    or (
                        isinstance(nd.target, _NORMS)
                        and getattr(nd.target, "weight", None) is not None
                    )
                ):
                    knob = nd.qualname
                    break
            add = by_key[key]
            fork_side = _branch_operand(add, branch, by_key)
            if knob is not None and fork_side is not None:
                out.append(Block(occ[key], occ[fork_side], knob, order[key]))

    walk(items)
    return sorted(out, key=lambda b: b.order)


def _branch_operand(add: G.Node, branch: list, by_key: dict) -> str | None:
    """The add's input that is the branch's output (the last branch item's key,
    or a pass-through node after it)."""
    last = branch[-1][-1] if branch[-1][0] == "residual" else branch[-1][1]
    for i in add.inputs:
        k = i
        while True:
            if k == last:
                return i
            nd = by_key[k]
            if len(nd.inputs) != 1:
                break
            k = nd.inputs[0]
    return None


# -- measurement ---------------------------------------------------------------------
def _capture(
    model: nn.Module, x: torch.Tensor, wants: dict[tuple[Any, int], str]
) -> dict[str, Any]:
    """Run the model once; for each wanted (signature, occurrence) ``name``: the
    output tensor (live, in the autograd graph), ``name:val`` its value when it
    was produced (a float64 copy: a later in-place op such as ``out +=
    identity`` or ``ReLU(inplace=True)`` overwrites the tensor) and
    ``name:in_m2`` the second moments of its inputs when they were produced."""
    got: dict[str, Any] = {}
    seen: Counter = Counter()
    m2 = {"input": float(x.detach().double().pow(2).mean())}

    def on_output(node: G.Node, out: torch.Tensor) -> None:
        sig = node.signature()
        name = wants.get((sig, seen[sig]))
        seen[sig] += 1
        m2[node.key] = float(out.detach().double().pow(2).mean())
        if name is None:
            return
        got[name] = out
        got[name + ":val"] = out.detach().double().clone()
        got[name + ":in_m2"] = [m2.get(i, math.nan) for i in node.inputs]

    G.record_forward(model, x, on_output)
    return got


def unit_gain(
    model: nn.Module, x: torch.Tensor, unit: Unit, seed: int
) -> tuple[float, float, float]:
    """(chi1, its standard error over the probes, E[h^2] at the nonlinearity's
    input) of ``unit`` in the model as it is now (see the module docstring).
    The probes come from ``seed``: the same probes at every scale tried, so the
    solve converges on a deterministic function of the scale and the probes'
    Monte Carlo error stays in the standard error."""
    gen = torch.Generator().manual_seed(seed)
    mod = dict(model.named_modules())[unit.module]
    held: list[torch.Tensor] = []
    count = [0]

    def pre(m, args):
        if count[0] == unit.occurrence:
            a = args[0]
            if not a.requires_grad:
                a = a.detach().requires_grad_(True)
                held.append(a)
                count[0] += 1
                return (a, *args[1:])
            held.append(a)
        count[0] += 1
        return None

    h = mod.register_forward_pre_hook(pre)
    try:
        with torch.enable_grad():
            got = _capture(model, x, {unit.end: "end"})
            end, a = got["end"], held[0]
            pre_m2 = got["end:in_m2"][0] if got["end:in_m2"] else math.nan
            fi, fo = nn.init._calculate_fan_in_and_fan_out(mod.weight)
            # Rademacher probes: E[u u^T] = I as for Gaussian ones (Hutchinson
            # 1989); all of them in one batched backward
            u = torch.randint(0, 2, (PROBES, *end.shape), generator=gen)
            u = u.to(end.dtype) * 2 - 1
            (g,) = torch.autograd.grad(end, a, u, is_grads_batched=True)
            vals = (fi / fo) * g.double().pow(2).flatten(1).mean(1)
    finally:
        h.remove()
    v = vals
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())), pre_m2


def block_terms(
    model: nn.Module, x: torch.Tensor, blk: Block
) -> tuple[float, float, float]:
    """(E[s^2], E[s b], E[b^2]) of the add's shortcut ``s`` and branch ``b``."""
    with torch.no_grad():
        got = _capture(model, x, {blk.add: "add", blk.branch_out: "branch"})
    b = got["branch:val"]
    s = got["add:val"] - b  # the add is s + b
    return float(s.pow(2).mean()), float((s * b).mean()), float(b.pow(2).mean())


# -- the plan ------------------------------------------------------------------------
def _scale_module(m: nn.Module, s: float, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for pn in names:
            p = getattr(m, pn, None)
            if p is not None:
                p.mul_(s)


def plan_data(
    work: nn.Module,
    x: torch.Tensor,
    target: str,
    residual_fraction: float | None,
    rng: int,
) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, float]]]:
    """Rescale ``work`` in place, in execution order.

    Returns the scale of every tensor changed (``qualified.weight`` ->
    ``s``), the reason per tensor, and per unit its measured gain before and after
    (``{"chi1_before", "chi1_after", "chi1_se", "q_pre"}``);
    ``residual_fraction``: the branch share per block (None: the blocks are left
    alone); ``rng`` seeds the probes.
    """
    units, blocks, _, _ = find_units(work, x)
    mods = dict(work.named_modules())
    events = [("unit", u.order, u) for u in units]
    if residual_fraction is not None:
        events += [("block", b.order, b) for b in blocks]
    events.sort(key=lambda e: e[1])
    scales: dict[str, float] = {}
    reasons: dict[str, str] = {}
    gains: dict[str, dict[str, float]] = {}
    done: set[str] = set()
    for kind, _, ev in events:
        if kind == "unit":
            if ev.module in done:
                continue  # a module called twice is scaled at its first call
            s, info = _solve_unit(work, x, ev, target, rng + ev.order)
            done.add(ev.module)
            gains[ev.module] = info
            names = ("weight",)
            if target == "edge_of_chaos":
                why = f"data: measured Jacobian gain chi1 = 1 through {ev.what}"
            else:
                why = f"data: measured E[h^2] = 1 at the input of {ev.what} (LSUV)"
        else:
            if ev.knob in done:
                continue
            s = _solve_block(work, x, ev, residual_fraction)
            done.add(ev.knob)
            names = ("weight", "bias")
            why = (
                f"data: the branch adds {residual_fraction:.3g} of its shortcut's "
                "second moment (bounded stream growth)"
            )
        owner = ev.module if kind == "unit" else ev.knob
        for pn in names:
            if getattr(mods[owner], pn, None) is None:
                continue
            k = f"{owner}.{pn}"
            scales[k] = scales.get(k, 1.0) * s
            reasons[k] = why
    return scales, reasons, gains


def _solve_unit(work, x, unit: Unit, target: str, seed: int) -> tuple[float, dict]:
    """Scale the unit's weight until its target holds (secant in log s on log
    chi1, or on log E[h^2]); returns the total scale and the gains."""
    m = dict(work.named_modules())[unit.module]
    chi0, se0, q0 = unit_gain(work, x, unit, seed)
    stat = chi0 if target == "edge_of_chaos" else q0
    total = 1.0
    slope = 2.0  # chi1 and E[h^2] of a linear or ReLU path grow as s^2
    chi, se, q = chi0, se0, q0
    for _ in range(MAX_ITER):
        if not (stat > 0 and math.isfinite(stat)):
            raise ValueError(
                f"{unit.module}: the measured statistic is {stat!r}, so no scale "
                "reaches the target"
            )
        if abs(stat - 1.0) <= RTOL:
            break
        step = math.exp(-math.log(stat) / max(slope, 0.2))
        _scale_module(m, step, ("weight",))
        total *= step
        chi, se, q = unit_gain(work, x, unit, seed)
        new = chi if target == "edge_of_chaos" else q
        if new > 0 and stat > 0 and abs(math.log(step)) > 1e-12:
            slope = (math.log(new) - math.log(stat)) / math.log(step)
            slope = min(max(slope, 0.2), 4.0)
        stat = new
    return total, {"chi1_before": chi0, "chi1_after": chi, "chi1_se": se, "q_pre": q}


def _solve_block(work, x, blk: Block, rho: float) -> float:
    """The knob scale t with ``E[(s + t b)^2] = (1 + rho) E[s^2]``: the positive
    root of ``D t^2 + 2 C t - rho A = 0`` for the measured A = E[s^2],
    C = E[s b], D = E[b^2], iterated while the branch is not linear in its knob."""
    m = dict(work.named_modules())[blk.knob]
    total = 1.0
    for _ in range(MAX_ITER):
        A, C, D = block_terms(work, x, blk)
        if D <= 0 or A <= 0:
            return total
        gain = (A + 2 * C + D) / A
        if abs(gain - (1 + rho)) <= RTOL * (1 + rho):
            break
        t = (-C + math.sqrt(C * C + rho * A * D)) / D
        _scale_module(m, t, ("weight", "bias"))
        total *= t
    return total

"""``fix``: per-layer rescaling of a model's parameters computed analytically on
its mapped network (private to :mod:`initdiag.integrations.torch`).

Targets, for a Dense row (Linear / Conv) followed directly by an activation phi
(a Dense followed by a normalisation is left alone: the normalisation divides its
scale out; so is a readout):

- ``"edge_of_chaos"``: the point of the edge (chi1 = 1) whose fixed point is
  ``q* = 1``, so that the signal sits at the fixed point from the first layer
  (a chi1 measured at finite depth is then the fixed point's):
  ``sigma_w2 = 1 / E[phi'(z)^2]``, ``sigma_b2 = 1 - sigma_w2 E[phi(z)^2]``,
  z ~ N(0, 1) (the edge curve of Schoenholz et al. 2017, parametrised by q*;
  :func:`initdiag.meanfield.critical_sigma_w2`'s notes).  The first layer takes
  ``sigma_w2 = (1 - sigma_b2) / E[x^2]`` of its input.  ReLU-like activations
  (and a layer without a bias) have their edge at ``sigma_b2 = 0``:
  ``sigma_w2 = critical_sigma_w2(phi, 0)`` (2 for ReLU, Kaiming), the bias zeroed.
- ``"unit_variance"``: the weight scaled so that the row's pre-activation has
  second moment 1 under ``analyze`` (LSUV's target, computed in execution order
  on the mapped graph, residual branches included; it is not the edge of chaos
  for tanh).

Residual blocks (``residual=``): ``"zero_gamma"`` zeroes the gamma of the last
normalisation of every branch (Goyal et al. 2017; torchvision's
``zero_init_residual``) or, without one, the weight and bias of the branch's last
Dense; ``"fixup"`` zeroes that last Dense and scales the other Dense layers of the
branch by ``L^(-1/(2m-2))`` (Zhang, Dauphin & Ma 2019).

Every scale is applied to the model's current tensor (``W -> s W``), with ``s``
computed from the tensor's measured second moment, so the patched tensor has the
target ``fan_in E[W^2]`` exactly; the network's laws are scaled to the target
second moment (their own, not the sample's), so the fixed network is the
ensemble the target describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from .. import initializers as I
from .. import meanfield as mf
from ..analytic import analyze

__all__ = ["FixRow", "plan_fix", "scaled_law", "data_rows"]


@dataclass(frozen=True)
class FixRow:
    """One tensor's rescaling: ``tensor`` (state_dict key), ``row`` (initdiag row),
    ``scale`` (``s`` in ``W -> s W``), ``before`` / ``after`` (``fan_in E[W^2]``
    for a weight, ``E[x^2]`` otherwise), ``reason``, ``route`` (``"analytic"``:
    from the mapped network's mean-field rules; ``"data"``: measured,
    :mod:`._torch_lsuv`)."""

    tensor: str
    row: str
    scale: float
    before: float
    after: float
    reason: str
    route: str = "analytic"


def scaled_law(law: Any, s: float) -> Any:
    """The law of ``s X`` for ``X ~ law`` (Normal, Uniform, Constant)."""
    if s == 0.0:
        return I.Constant(0.0)
    if isinstance(law, I.Normal):
        return I.Normal(law.mean_ * s, law.std * abs(s))
    if isinstance(law, I.Uniform):
        lo, hi = sorted((law.a * s, law.b * s))
        return I.Uniform(lo, hi)
    if isinstance(law, I.Constant):
        return I.Constant(law.val * s)
    raise TypeError(f"cannot scale the law {law}")


def _m2(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean())


def _scope(info: Any) -> str:
    """The sequence a row belongs to (a block's own row, ``block3.out``, belongs
    to the sequence holding the block)."""
    name = info.name[: -len(".out")] if info.branch else info.name
    return name.rpartition(".")[0]


def _next_kind(net: Any, i: int) -> Any:
    """The layer directly after row ``i`` in its own sequence (None at its end)."""
    scope = _scope(net.infos[i])
    for other in net.infos[i + 1 :]:
        s = _scope(other)
        if s == scope:
            return other.layer
        if scope and not s.startswith(scope + "."):
            return None
    return None


def _edge(act: Any, has_bias: bool) -> tuple[float, float]:
    """(sigma_w2, sigma_b2) on the edge of chaos with q* = 1 (or at sigma_b2 = 0)."""
    if act.name in ("relu", "leaky_relu", "identity") or not has_bias:
        return float(mf.critical_sigma_w2(act, 0.0)), 0.0
    w2 = 1.0 / float(mf.expect_dphi2(act, 0.0, 1.0))
    b2 = 1.0 - w2 * float(mf.expect_phi2(act, 0.0, 1.0))
    if b2 < 0:
        return float(mf.critical_sigma_w2(act, 0.0)), 0.0
    return w2, b2


def plan_fix(
    net: Any,
    rows: dict[str, tuple[str, Any]],
    target: str,
    residual: str | None,
    q_input: float,
) -> tuple[list[FixRow], Any]:
    """The per-tensor scales and the network with its laws scaled.

    ``rows`` maps a row name to (the module's qualified name, the module);
    ``target="none"`` applies the residual rules alone (the data route measures
    the rest).
    """
    fixes: list[FixRow] = []
    over = {k: dict(v) for k, v in net.init.overrides.items()}

    def scale(row: str, pname: str, s: float, why: str, fan: int = 1) -> None:
        q, m = rows[row]
        t = getattr(m, pname)
        before = fan * _m2(t)
        fixes.append(
            FixRow(f"{q}.{pname}" if q else pname, row, s, before, before * s * s, why)
        )
        # the law is scaled to the target itself (its own second moment, not the
        # sample's), so the fixed network describes tensors of the target scale
        law = over[row][pname]
        m2_law = float(law.second_moment(1, 1))
        s_law = s * math.sqrt(_m2(t) / m2_law) if m2_law > 0 and s else s
        over[row][pname] = scaled_law(law, s_law)

    if residual is not None:
        _residual_plan(net, rows, residual, scale)
    if target == "none":  # the residual rules alone (fix's data route)
        return fixes, net.with_init(replace(net.init, overrides=over))
    done = {(f.row, f.tensor.rpartition(".")[2]) for f in fixes}
    for i, info in enumerate(net.infos):
        if info.kind != "dense" or (info.name, "weight") in done:
            continue
        nxt = _next_kind(net, i)
        if nxt is None or nxt.kind != "activation":
            continue
        q, m = rows[info.name]
        fi = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)[0]
        w2_now = fi * _m2(m.weight)
        has_b = m.bias is not None and _m2(m.bias) > 0
        if target == "edge_of_chaos":
            w2, b2 = _edge(nxt, has_b)
            if _input_row(net, i) is None and b2 > 0:
                # the first layer puts the pre-activation at q* = 1
                w2 = (1.0 - b2) / q_input
            why = f"edge of chaos for {nxt.name}" + (
                " (q* = 1)" if b2 else " at sigma_b2 = 0"
            )
            if m.bias is not None:
                b_now = _m2(m.bias)
                sb = math.sqrt(b2 / b_now) if b_now > 0 else 0.0
                scale(info.name, "bias", sb, why)
        else:
            net_now = net.with_init(replace(net.init, overrides=over))
            q_in = _q_in(net_now, i, q_input)
            # the law's E[b^2], as the analysis of the fixed network sees it
            b2 = (
                0.0
                if m.bias is None
                else float(over[info.name]["bias"].second_moment(1, 1))
            )
            if b2 >= 1:
                raise ValueError(
                    f"{q}: its bias has E[b^2] = {b2:.3g} >= 1, so no weight scale "
                    "gives a unit-variance pre-activation"
                )
            w2 = (1.0 - b2) / q_in
            why = "unit second moment of the pre-activation"
        scale(info.name, "weight", math.sqrt(w2 / w2_now), why, fan=fi)
    fixed = net.with_init(replace(net.init, overrides=over))
    return fixes, fixed


def _input_row(net: Any, i: int) -> int | None:
    """The row whose output feeds row ``i`` (None: the network input)."""
    if i == 0:
        return None
    scope = net.infos[i].name.rpartition(".")[0]
    if net.infos[i - 1].name.rpartition(".")[0] == scope or not scope:
        return i - 1
    if scope.endswith(".shortcut"):
        block = scope[: -len(".shortcut")] + "."
        first = min(k for k, o in enumerate(net.infos) if o.name.startswith(block))
        return first - 1 if first > 0 else None
    return i - 1


def _q_in(net: Any, i: int, q_input: float) -> float:
    """E[x^2] of row i's input under ``analyze``."""
    j = _input_row(net, i)
    if j is None:
        return q_input
    prof = analyze(net, input_second_moment=q_input)
    return float(prof.columns["second_moment"][j])


def _residual_plan(net: Any, rows: dict, how: str, scale: Any) -> None:
    blocks = [info for info in net.infos if info.branch]
    L = len(blocks)
    for blk in blocks:
        br = [net.infos[k] for k in blk.branch]
        dense = [b for b in br if b.kind == "dense"]
        last = br[-1]
        if how == "zero_gamma" and last.kind in ("batchnorm", "layernorm"):
            scale(
                last.name,
                "weight",
                0.0,
                "zero-gamma: the block starts as its shortcut (Goyal et al. 2017)",
            )
            continue
        if not dense:
            continue
        scale(dense[-1].name, "weight", 0.0, f"{how}: the branch's last Dense zeroed")
        if rows[dense[-1].name][1].bias is not None:
            scale(dense[-1].name, "bias", 0.0, f"{how}: the branch's last Dense zeroed")
        m = len(dense)
        if how == "fixup" and m > 1:
            s = L ** (-1.0 / (2 * m - 2))
            for d in dense[:-1]:
                scale(
                    d.name, "weight", s, f"fixup: L^(-1/(2m-2)) with L = {L}, m = {m}"
                )


def data_rows(
    net: Any,
    model: Any,
    row_of: dict[str, str],
    scales: dict[str, float],
    reasons: dict[str, str],
) -> tuple[list[FixRow], Any]:
    """The :class:`FixRow` of every tensor the data route scaled (``scales``:
    state_dict key -> ``s``, measured on ``model``'s current tensors) and ``net``
    with those rows' laws scaled by the same ``s``."""
    state = model.state_dict()
    over = {k: dict(v) for k, v in net.init.overrides.items()}
    fixes = []
    for key, s in scales.items():
        q, _, pname = key.rpartition(".")
        t = state[key]
        fan = torch.nn.init._calculate_fan_in_and_fan_out(t)[0] if t.dim() >= 2 else 1
        before = fan * _m2(t)
        row = row_of.get(q, "")
        fixes.append(FixRow(key, row, s, before, before * s * s, reasons[key], "data"))
        if row in over and pname in over[row]:
            over[row][pname] = scaled_law(over[row][pname], s)
    return fixes, net.with_init(replace(net.init, overrides=over))

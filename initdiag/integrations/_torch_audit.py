"""``audit(model)``: every parameter tensor against the law its fan and its
apparent initializer imply, with a verdict per layer computed by
:mod:`initdiag.meanfield` (private to :mod:`initdiag.integrations.torch`).

The activation a weight feeds is read off the model's graph (``torch.fx``, which
needs no input) or, when tracing fails, off the registration order of the
modules: the first activation after the layer and before the next Linear /
Conv.  A verdict is a sentence made of the numbers: ``sigma_w2 = fan_in E[W^2]``,
``sigma_b2 = E[b^2]`` and ``chi1 = sigma_w2 E[phi'(h)^2]`` at the fixed point
``q*`` (Poole et al. 2016, eq. 7; :func:`initdiag.meanfield.chi1`), beside the
edge of chaos ``chi1 = 1`` (:func:`initdiag.meanfield.critical_sigma_w2`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import meanfield as mf
from . import _torch_graph as G
from . import _torch_map as M
from ._torch_laws import TensorLaw, module_fans, tensor_law

__all__ = ["AuditRow", "Audit", "audit"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class AuditRow:
    """One parameter tensor: its :class:`~._torch_laws.TensorLaw`, the module's
    type, ``sigma2`` (``fan_in E[W^2]`` for a weight, ``E[x^2]`` otherwise) and the
    verdict sentence of its layer (on the weight's row; "" on the others)."""

    module: str
    type: str
    law: TensorLaw
    sigma2: float
    verdict: str

    @property
    def name(self) -> str:
        return self.law.name


@dataclass
class Audit:
    """The table :func:`audit` returns: ``rows`` and ``str(audit)``."""

    rows: list[AuditRow]

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [9])
        head = (
            f"{'parameter':<{w}}  {'shape':<14} {'mean':>10} {'variance':>10} "
            f"{'implied':>10} {'fan_in':>6} {'fan_out':>7}  apparent initializer"
        )
        lines = [head]
        for r in self.rows:
            a = r.law
            lines.append(
                f"{r.name:<{w}}  {str(a.shape):<14} {a.mean:>10.3g} {a.var:>10.3g} "
                f"{a.implied_var:>10.3g} {a.fan_in:>6} {a.fan_out:>7}  "
                f"{a.source or 'unrecognised: ' + str(a.law)}"
            )
        lines.append("")
        lines += [f"- {r.verdict}" for r in self.rows if r.verdict]
        return "\n".join(lines)


def _followers(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """For each Linear / Conv (by qualified name): what comes next, ``("act",
    Activation)``, ``("norm", type name)`` or ``("none", None)``."""
    try:
        nodes = G.trace_fx(model)
        order = [(n, M.classify(n)) for n in nodes if n.op != "input"]
    except Exception:  # fx raises many types; the registration order remains
        leaves = G.leaf_modules(model)
        order = [
            (G.Node(q, "module", m, (), q), M.classify(G.Node(q, "module", m, ())))
            for m, q in leaves.items()
        ]
    out: dict[str, tuple[str, Any]] = {}
    for i, (node, _) in enumerate(order):
        if node.op != "module" or not isinstance(node.target, _WEIGHTED):
            continue
        nxt: tuple[str, Any] = ("none", None)
        for later, k in order[i + 1 :]:
            if later.op == "module" and isinstance(later.target, _WEIGHTED):
                break
            if k.layer is not None and k.layer.kind == "activation":
                nxt = ("act", k.layer)
                break
            if k.layer is not None and k.layer.kind in ("batchnorm", "layernorm"):
                nxt = ("norm", type(later.target).__name__)
                break
        out[node.qualname] = nxt
    return out


def _g(x: float) -> str:
    return f"{x:.3g}"


def _weight_verdict(
    q: str, m: nn.Module, w: TensorLaw, b: TensorLaw | None, nxt: tuple
) -> str:
    # the law's moments (the measured ones when no law matched): the verdict is
    # about the initializer, the table beside it shows the sample
    s_w2 = w.fan_in * w.law_second_moment
    s_b2 = 0.0 if b is None else b.law_second_moment
    src = f" of {w.source}" if w.source else ""
    head = (
        f"{q} ({type(m).__name__}, fan_in {w.fan_in}) has sigma_w2 = fan_in E[W^2] "
        f"= {_g(s_w2)}{src}, sigma_b2 = {_g(s_b2)}"
    )
    kind, what = nxt
    if kind == "norm":
        return (
            f"{head}; a {what} follows, which divides the weight scale out of the "
            "forward pass"
            + (" and cancels the bias by its centring" if b is not None else "")
        )
    if kind == "none":
        return (
            f"{head}; no activation follows (a readout): it scales the output's "
            f"second moment by sigma_w2 = {_g(s_w2)}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chi = float(mf.chi1(what, s_w2, s_b2))
        edge = float(mf.critical_sigma_w2(what, s_b2))
        edge0 = float(mf.critical_sigma_w2(what, 0.0))
    reg = mf.regime(chi).label if math.isfinite(chi) else "undefined"
    if math.isfinite(edge):
        tail = (
            f"; the edge of chaos for {what.name} at this sigma_b2 is sigma_w2 = "
            f"{_g(edge)}"
        )
    else:
        tail = (
            f"; {what.name} has no edge of chaos at sigma_b2 = {_g(s_b2)} (at "
            f"sigma_b2 = 0: sigma_w2 = {_g(edge0)})"
        )
    return f"{head}: chi1 = {_g(chi)} for {what.name} ({reg}){tail}"


def _norm_verdict(q: str, m: nn.Module, laws: dict[str, TensorLaw]) -> str:
    g, b = laws.get("weight"), laws.get("bias")
    if g is None:
        return ""
    parts = [f"gamma {g.source or 'unrecognised ' + str(g.law)}"]
    if b is not None:
        parts.append(f"beta {b.source or 'unrecognised ' + str(b.law)}")
    note = ""
    if g.var == 0.0 and g.mean == 0.0:
        note = ": the output is beta, so a residual branch ending here starts as 0 "
        note += "(zero-gamma, Goyal et al. 2017)"
    return f"{q} ({type(m).__name__}): " + ", ".join(parts) + note


def audit(model: nn.Module) -> Audit:
    """See :func:`initdiag.integrations.torch.audit`."""
    follow = _followers(model)
    rows: list[AuditRow] = []
    for q, m in model.named_modules():
        params = dict(m.named_parameters(recurse=False))
        if not params:
            continue
        fans = module_fans(m)
        laws = {
            k: tensor_law(f"{q}.{k}" if q else k, p, fans) for k, p in params.items()
        }
        for k, law in laws.items():
            verdict = ""
            if k == "weight" and isinstance(m, _WEIGHTED):
                verdict = _weight_verdict(
                    q, m, law, laws.get("bias"), follow.get(q, ("none", None))
                )
            elif k == "weight":
                verdict = _norm_verdict(q, m, laws)
            sig = law.var + law.mean**2
            if law.shape and len(law.shape) >= 2:
                sig *= law.fan_in
            rows.append(AuditRow(q, type(m).__name__, law, sig, verdict))
    return Audit(rows)

"""The measured column of ``diagnose``: the user's model itself, run forward and
backward in PyTorch, its rows' statistics computed by initdiag's kernels as the
Profile defines them (private to :mod:`initdiag.integrations.torch`).

One seed: (optionally) re-initialise the model, run ``model(x)`` under the
recorder of :mod:`._torch_graph`, which hands every node's output to a callback
as it is produced (a copy for the forward statistics, taken before a later
in-place op such as ``nn.ReLU(inplace=True)`` or ``out += identity`` overwrites
it, and a tensor hook ``out.register_hook`` for its gradient; never full backward
hooks, which break on those in-place ops), then ``torch.autograd.grad`` of
``L = sum_b <g_out[b], y[b]>`` with a standard Gaussian ``g_out`` (the loss
``simulate`` uses), which leaves every ``.grad`` of the model alone.

Rows are matched to the recorded nodes by signature and occurrence (the k-th call
of module ``layer1.0.relu``, the k-th ``add``): fx tracing and a real forward run
the same Python code.  An output of shape (B, C, *spatial) is viewed as
(B * prod(spatial), C): channels are the units and every position an example
(the dense-on-channels view of :mod:`._torch_map`).  Normalisation as
:mod:`initdiag.empirical.engine`: ``grad_second_moment = E[g^2] / E[g_out^2]``,
``||dL/dtheta||^2 / (B E[g_out^2])`` for the parameter columns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import kernels as K

# the forward columns the engine records, in its order (one home)
from ..empirical.engine import _FWD, COL
from . import _torch_graph as G

__all__ = ["rows_2d", "row_statistics", "measure_seed", "occurrences"]

_PARAM_COLS = {
    "dense": {"weight": "weight_grad_norm2", "bias": "bias_grad_norm2"},
    "batchnorm": {"weight": "gamma_grad_norm2", "bias": "beta_grad_norm2"},
    "layernorm": {"weight": "gamma_grad_norm2", "bias": "beta_grad_norm2"},
}


def rows_2d(t: torch.Tensor) -> np.ndarray:
    """(B, C, *spatial) -> (B * prod(spatial), C) float64, C-contiguous."""
    t = t.detach()
    if t.dim() > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])
    return np.ascontiguousarray(t.double().numpy())


def row_statistics(h: np.ndarray) -> dict[str, float]:
    """The forward columns of one row output (B, N), by initdiag's kernels."""
    s = K.layer_summary(h, backend="numpy")
    out = {c: s[c] for c in _FWD}
    out["correlation"] = float(K.row_correlation(h, backend="numpy"))
    return out


def occurrences(nodes: list[G.Node], keys: list[str]) -> list[tuple[Any, int]]:
    """(signature, occurrence index) of each of ``keys`` among ``nodes``."""
    seen: Counter = Counter()
    idx: dict[str, tuple[Any, int]] = {}
    for n in nodes:
        sig = n.signature()
        idx[n.key] = (sig, seen[sig])
        seen[sig] += 1
    return [idx[k] for k in keys]


def measure_seed(
    model: nn.Module,
    x: torch.Tensor,
    network: Any,
    targets: list[tuple[Any, int]],
    modules: list[nn.Module | None],
    gen: torch.Generator,
    capture: dict | None = None,
) -> np.ndarray:
    """One seed's statistics, (rows, len(COL)), NaN where a column does not apply;
    ``capture`` (a dict) receives what initdiag's kernels need to run the very same
    network: ``params`` (row name -> {slot: array}), ``x`` and ``g_out``."""
    stats = np.full((len(targets), len(COL)), np.nan)
    want = {t: r for r, t in enumerate(targets)}
    seen: Counter = Counter()
    grads: dict[int, torch.Tensor] = {}
    found: set[int] = set()

    def on_output(node: G.Node, out: torch.Tensor) -> None:
        sig = node.signature()
        r = want.get((sig, seen[sig]))
        seen[sig] += 1
        if r is None:
            return
        found.add(r)
        for c, v in row_statistics(rows_2d(out)).items():
            stats[r, COL[c]] = v
        if out.requires_grad:
            out.register_hook(_store(grads, r))

    _, y = G.record_forward(model, x, on_output)
    missing = [network.infos[r].name for r in range(len(targets)) if r not in found]
    if missing:
        raise RuntimeError(
            f"the forward pass did not produce rows {missing}: the model's forward "
            "differs from the graph read (data-dependent control flow taking "
            "another path?)"
        )
    g_out = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    if capture is not None:
        capture.update(
            x=x.detach().numpy().copy(),
            g_out=g_out.numpy().copy(),
            params={
                network.infos[r].name: {
                    k: p.detach().numpy().copy()
                    for k, p in m.named_parameters(recurse=False)
                }
                for r, m in enumerate(modules)
                if m is not None and network.infos[r].layer.slots()
            },
        )
    params = [p for m in modules if m is not None for p in m.parameters(False)]
    pgrads = torch.autograd.grad(y, params, g_out, allow_unused=True)
    m_out = float(g_out.double().pow(2).mean())
    B = rows_2d(y).shape[0]
    by_param = dict(zip(map(id, params), pgrads, strict=True))
    for r, info in enumerate(network.infos):
        if r in grads:
            stats[r, COL["grad_second_moment"]] = (
                float(grads[r].double().pow(2).mean()) / m_out
            )
        m = modules[r]
        cols = _PARAM_COLS.get(info.kind, {})
        if m is None:
            continue
        for pname, p in m.named_parameters(recurse=False):
            g = by_param[id(p)]
            if pname in cols and g is not None:
                n2 = float(g.double().pow(2).sum())
                stats[r, COL[cols[pname]]] = n2 / (B * m_out)
    return stats


def _store(grads: dict, r: int) -> Callable[[torch.Tensor], None]:
    def hook(g: torch.Tensor) -> None:
        grads[r] = g.detach().clone()

    return hook

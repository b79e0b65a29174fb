"""The one interpreter of ``simulate``: one random network, forward and backward.

:func:`run_seed` walks an executor's units (a unit is one layer, or a few layers
an executor runs as one fused pass), records every Profile statistic of every row,
checks each row for overflow / underflow, runs the Jacobian probes on what the
forward saved, and pushes the output gradient back.  Executors
(:class:`initdiag.empirical.generic.GenericExecutor`: each layer's own empirical
step through the kernel dispatchers; :class:`initdiag.empirical.fused.FusedExecutor`:
the fused numba passes) only compute; what a statistic means, when a row is an
underflow and how the gradient is normalised is decided here, once.

Executor protocol
-----------------
``units``: the :func:`plan` of the network's top-level rows (executor units
and :class:`Block` s); ``sample(unit, sc)`` draws the unit's parameters;
``forward(unit, x, sc) -> (y, [(row, stats10), ...])`` with the 10 statistics of
:meth:`initdiag.empirical.ops.Ops.row_stats` per row the unit outputs;
``merge(block, branch_out, shortcut_out, sc) -> (y, rows)`` the add;
``output_grad(y, sc)``; ``backward(unit, g, sc) -> (g_in or None,
[(row, sum g^2, {column: unnormalised sum}), ...])`` rows from the top down, g_in
None when the unit starts the network (a column's sum may be a zero-argument
callable instead: the executor computes it on another lane while the pass goes
on, and it is called and recorded when the pass ends); ``merge_backward(block,
g, sc) -> (g_branch, g_shortcut, rows)``; ``add_grads(block, g_from_branch,
g_from_shortcut)`` the gradient at the block's input (None when either is).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _interrupt
from ..profile import STAT_COLUMNS

__all__ = [
    "SeedContext",
    "StepContext",
    "Block",
    "plan",
    "run_seed",
    "forward_pass",
    "propagate",
    "COL",
]

COL = {c: i for i, c in enumerate(STAT_COLUMNS)}
_FWD = (
    "mean",
    "second_moment",
    "variance",
    "squared_mean",
    "active_fraction",
    "dead_fraction",
)


@dataclass
class SeedContext:
    """One seed of one ``simulate`` call: where its numbers go."""

    net: Any
    inits: list[dict[str, Any]]
    dt: np.dtype
    entropy: int
    seed: int
    B: int
    g_spec: Any
    stats: np.ndarray  # (rows, len(STAT_COLUMNS))
    findings: list[dict[str, Any]]
    timing: dict[str, float]
    #: (stats row, column, callable, factor) of the sums an executor deferred
    deferred: list[tuple] = field(default_factory=list)


@dataclass
class StepContext:
    """What a layer's empirical step sees (:meth:`initdiag.layers.Layer.forward`)."""

    info: Any
    params: dict[str, np.ndarray]
    inits: dict[str, Any]
    ops: Any
    B: int
    dt: np.dtype
    extra: dict[str, Any] = field(default_factory=dict)
    #: the Philox key of this layer and seed (a dropout layer's masks)
    key: tuple[int, int] | None = None
    #: a training step (:mod:`initdiag.training`): ``forward`` saves what
    #: :meth:`~initdiag.layers.Layer.param_grads` needs, ``grads`` holds the buffers
    #: the parameter gradients go to (by slot name), ``step`` numbers the step (a
    #: dropout layer's masks: one stream per step)
    training: bool = False
    grads: dict[str, np.ndarray] | None = None
    step: int = 0


def finding(info: Any, seed: int, pas: str, kind: str, what: str) -> dict[str, Any]:
    sig = "signal" if pas == "forward" else "gradient"
    return {
        "kind": kind,
        "layer": info.name,
        "index": int(info.index),
        "block": int(info.block),
        "pass": pas,
        "seed": seed,
        "message": f"the {sig} {what} at layer {info.index + 1} ({info.name}), "
        f"seed {seed}",
    }


def _record_fwd(row: np.ndarray, st: np.ndarray) -> None:
    for k, c in enumerate(_FWD):
        row[COL[c]] = st[k]
    row[COL["correlation"]] = st[8]


@dataclass(frozen=True)
class Block:
    """A composite row's unit: ``row`` (the stream after the add) and the units of
    its branch and shortcut (``()``: the identity)."""

    row: int
    branch: tuple
    shortcut: tuple


def plan(net: Any, rows: tuple[int, ...], group: Any) -> tuple:
    """Units of a sequence of rows: ``group(run)`` turns each run of plain rows into
    an executor's units (one per layer, or fused passes), and every composite row
    becomes a :class:`Block` over the plans of its branch and shortcut."""
    units: list[Any] = []
    run: list[int] = []
    for r in rows:
        info = net.infos[r]
        if info.branch:
            units += group(run)
            run = []
            units.append(
                Block(r, plan(net, info.branch, group), plan(net, info.shortcut, group))
            )
        else:
            run.append(r)
    units += group(run)
    return tuple(units)


@dataclass
class _Flow:
    """What the checks of the next row need to know about the signal (forward:
    whether the input was non-zero) or the gradient (backward: whether the row
    above zeroes its input gradient by design, and whether it was non-zero)."""

    nonzero: bool = True
    design: bool = True


def run_seed(ex: Any, sc: SeedContext, x: np.ndarray, jac: dict | None = None) -> None:
    """Forward, Jacobian probes (``jac`` given) and backward of one random network
    through executor ``ex``; fills ``sc.stats`` and ``sc.findings``."""
    if forward_pass(ex, sc, x) is None:
        return
    if jac is not None:
        from .jacobian import probe

        t0 = time.perf_counter()
        probe(ex, sc, x, jac)
        sc.timing["jacobian"] += time.perf_counter() - t0
    _backward(ex, sc)


def forward_pass(ex: Any, sc: SeedContext, x: np.ndarray) -> np.ndarray | None:
    """Run every unit of ``ex`` on ``x``: the network output (also ``ex.output``),
    None when a row's check failed (its finding is recorded)."""
    t = {"sample": 0.0, "forward": 0.0}
    y = _forward_units(ex, sc, ex.units, x, _Flow(bool(np.any(x))), t)
    sc.timing["sample"] += t["sample"]
    sc.timing["forward"] += t["forward"]
    ex.output = y
    return y


def _forward_units(
    ex: Any, sc: SeedContext, units: tuple, x: np.ndarray, flow: _Flow, t: dict
) -> np.ndarray | None:
    """Run ``units`` on ``x`` (a block: its branch, its shortcut, the add); None
    when a row overflowed or underflowed (the finding is recorded)."""
    for unit in units:
        _interrupt.poll()  # Ctrl-C: stop within one unit's kernels
        if isinstance(unit, Block):
            nz_in = flow.nonzero
            xb = _forward_units(ex, sc, unit.branch, x, flow, t)
            if xb is None:
                return None
            nz_b, flow.nonzero = flow.nonzero, nz_in
            xs = _forward_units(ex, sc, unit.shortcut, x, flow, t)
            if xs is None:
                return None
            flow.nonzero = flow.nonzero or nz_b
            t0 = time.perf_counter()
            y, rows = ex.merge(unit, xb, xs, sc)
            t["forward"] += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            ex.sample(unit, sc)
            t1 = time.perf_counter()
            y, rows = ex.forward(unit, x, sc)
            t["sample"] += t1 - t0
            t["forward"] += time.perf_counter() - t1
        if not _record_rows(sc, rows, flow):
            return None
        x = y
    return x


def _record_rows(sc: SeedContext, rows: list, flow: _Flow) -> bool:
    for row, st in rows:
        info = sc.net.infos[row]
        if st[7] > 0:
            sc.findings.append(
                finding(info, sc.seed, "forward", "overflow", "overflowed (inf/NaN)")
            )
            return False
        if (
            st[6] == 1.0
            and flow.nonzero
            and not info.layer.output_zero_by_design(
                sc.inits[row], info.fan_in, info.width
            )
        ):
            sc.findings.append(
                finding(
                    info, sc.seed, "forward", "underflow", "underflowed to all zeros"
                )
            )
            return False
        _record_fwd(sc.stats[row], st)
        flow.nonzero = st[9] > 0
    return True


def _grad_ok(ss: float, info: Any, sc: SeedContext, flow: _Flow) -> bool:
    """A gradient from its sum of squares: inf/NaN -> overflow; all zeros from a
    non-zero gradient through a layer that should not zero it -> underflow."""
    if not math.isfinite(ss):
        sc.findings.append(
            finding(info, sc.seed, "backward", "overflow", "overflowed (inf/NaN)")
        )
        return False
    if ss == 0.0 and flow.nonzero and not flow.design:
        sc.findings.append(
            finding(info, sc.seed, "backward", "underflow", "underflowed to all zeros")
        )
        return False
    return True


class _Stop(Exception):
    """A gradient row failed its check (the finding is recorded)."""


def _backward(ex: Any, sc: SeedContext) -> None:
    t0 = time.perf_counter()
    g = ex.output_grad(ex.output, sc)
    m_out = float(np.einsum("ij,ij->", g, g, dtype=np.float64)) / g.size
    if not m_out > 0:
        raise ValueError("the output gradient is all zeros; nothing to propagate")
    # the output gradient was checked: the first row sees a non-zero one
    propagate(ex, sc, g, 1.0 / (sc.B * m_out))
    sc.timing["backward"] += time.perf_counter() - t0


def propagate(ex: Any, sc: SeedContext, g: np.ndarray, norm: float = 1.0) -> None:
    """Push the output gradient ``g`` down every unit of ``ex``; the rows' gradient
    statistics are recorded times ``norm``; stops at a row whose check fails."""
    try:
        _backward_units(ex, sc, ex.units, g, _Flow(True, True), norm)
    except _Stop:
        pass
    finally:
        for out, col, value, factor in sc.deferred:
            out[col] = value() * factor
        sc.deferred.clear()


def _backward_units(
    ex: Any, sc: SeedContext, units: tuple, g: Any, flow: _Flow, norm: float
) -> Any:
    """Push ``g`` down ``units`` (a block: the add, its shortcut and branch, the sum
    of the two input gradients); returns the gradient at their input."""
    for unit in reversed(units):
        _interrupt.poll()
        if isinstance(unit, Block):
            gb, gs, rows = ex.merge_backward(unit, g, sc)
            _record_grads(sc, rows, flow, norm)
            layer = sc.net.infos[unit.row].layer
            fb = _Flow(flow.nonzero, layer.multiplier == 0.0)
            g1 = _backward_units(ex, sc, unit.branch, gb, fb, norm)
            if unit.shortcut and g1 is not None:
                g1 = ex.keep_grad(unit, g1)
            fs = _Flow(flow.nonzero, False)
            g2 = _backward_units(ex, sc, unit.shortcut, gs, fs, norm)
            g = ex.add_grads(unit, g1, g2)
            flow.design = fb.design and fs.design
            flow.nonzero = fb.nonzero or fs.nonzero
        else:
            g, rows = ex.backward(unit, g, sc)
            _record_grads(sc, rows, flow, norm)
    return g


def _record_grads(sc: SeedContext, rows: list, flow: _Flow, norm: float) -> None:
    for row, ss, sums in rows:
        info = sc.net.infos[row]
        if not _grad_ok(ss, info, sc, flow):
            raise _Stop
        out = sc.stats[row]
        out[COL["grad_second_moment"]] = ss * norm / info.width
        for col, v in sums.items():
            if callable(v):  # computed on another lane: recorded when the pass ends
                sc.deferred.append((out, COL[col], v, norm))
            else:
                out[COL[col]] = v * norm
        if info.branch:
            flow.design = False  # the shortcut passes the gradient (the branch
            # path's own flag is set by the caller)
        else:
            flow.design = info.layer.input_grad_zero_by_design(
                sc.inits[row], info.fan_in, info.width
            )
        flow.nonzero = ss > 0

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
``units``: a sequence; ``sample(unit, sc)`` draws the unit's parameters;
``forward(unit, x, sc) -> (y, [(row, stats10), ...])`` with the 10 statistics of
:meth:`initdiag.empirical.ops.Ops.row_stats` per row the unit outputs;
``output_grad(y, sc)``; ``backward(unit, g, sc) -> (g_in or None,
[(row, sum g^2, {column: unnormalised sum}), ...])`` rows from the top down, g_in
None when the unit starts the network.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..profile import STAT_COLUMNS

__all__ = ["SeedContext", "StepContext", "run_seed", "COL"]

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


def run_seed(ex: Any, sc: SeedContext, x: np.ndarray, jac: dict | None = None) -> None:
    """Forward, Jacobian probes (``jac`` given) and backward of one random network
    through executor ``ex``; fills ``sc.stats`` and ``sc.findings``."""
    if not _forward(ex, sc, x):
        return
    if jac is not None:
        from .jacobian import probe

        t0 = time.perf_counter()
        probe(ex, sc, x, jac)
        sc.timing["jacobian"] += time.perf_counter() - t0
    _backward(ex, sc)


def _forward(ex: Any, sc: SeedContext, x: np.ndarray) -> bool:
    infos = sc.net.infos
    prev_nonzero = bool(np.any(x))
    cur = x
    t_sample = t_fwd = 0.0
    ok = True
    for unit in ex.units:
        t0 = time.perf_counter()
        ex.sample(unit, sc)
        t1 = time.perf_counter()
        cur, rows = ex.forward(unit, cur, sc)
        t_sample += t1 - t0
        t_fwd += time.perf_counter() - t1
        for row, st in rows:
            info = infos[row]
            if st[7] > 0:
                sc.findings.append(
                    finding(
                        info, sc.seed, "forward", "overflow", "overflowed (inf/NaN)"
                    )
                )
                ok = False
                break
            if (
                st[6] == 1.0
                and prev_nonzero
                and not info.layer.output_zero_by_design(
                    sc.inits[row], info.fan_in, info.width
                )
            ):
                sc.findings.append(
                    finding(
                        info,
                        sc.seed,
                        "forward",
                        "underflow",
                        "underflowed to all zeros",
                    )
                )
                ok = False
                break
            _record_fwd(sc.stats[row], st)
            prev_nonzero = st[9] > 0
        if not ok:
            break
    sc.timing["sample"] += t_sample
    sc.timing["forward"] += t_fwd
    ex.output = cur
    return ok


def _grad_ok(
    ss: float, info: Any, sc: SeedContext, prod_design: bool, prod_nonzero: bool
) -> bool:
    """A gradient from its sum of squares: inf/NaN -> overflow; all zeros from a
    non-zero gradient through a layer that should not zero it -> underflow."""
    if not math.isfinite(ss):
        sc.findings.append(
            finding(info, sc.seed, "backward", "overflow", "overflowed (inf/NaN)")
        )
        return False
    if ss == 0.0 and prod_nonzero and not prod_design:
        sc.findings.append(
            finding(info, sc.seed, "backward", "underflow", "underflowed to all zeros")
        )
        return False
    return True


def _backward(ex: Any, sc: SeedContext) -> None:
    t0 = time.perf_counter()
    infos = sc.net.infos
    g = ex.output_grad(ex.output, sc)
    m_out = float(np.einsum("ij,ij->", g, g, dtype=np.float64)) / g.size
    if not m_out > 0:
        raise ValueError("the output gradient is all zeros; nothing to propagate")
    norm = 1.0 / (sc.B * m_out)
    prod_design, prod_nonzero = True, True  # the output gradient was checked
    for unit in reversed(ex.units):
        g, rows = ex.backward(unit, g, sc)
        for row, ss, sums in rows:
            info = infos[row]
            if not _grad_ok(ss, info, sc, prod_design, prod_nonzero):
                sc.timing["backward"] += time.perf_counter() - t0
                return
            out = sc.stats[row]
            out[COL["grad_second_moment"]] = ss / (sc.B * info.width * m_out)
            for col, v in sums.items():
                out[COL[col]] = v * norm
            prod_design = info.layer.input_grad_zero_by_design(
                sc.inits[row], info.fan_in, info.width
            )
            prod_nonzero = ss > 0
    sc.timing["backward"] += time.perf_counter() - t0

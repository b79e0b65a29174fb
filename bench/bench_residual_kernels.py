"""Does the fused residual add + statistics pass pay?  float32, 512 x 1024.

Command (repository root; results go to bench/KERNELS.md by hand)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_residual_kernels.py

For 1 and then 2 Numba threads, interleaved round after round (``_interleaved``
of bench_kernels.py, so the load of a shared machine hits every function alike),
medians of ``--rounds`` rounds, raw kernels on preallocated buffers (what the
empirical engine's hot path runs):

``numpy``
    ``np.add(skip, scale * x, out=y)`` then ``layer_stats`` (numba) of y: the
    unfused pair the issue names (the product allocates a temporary);
``pair``
    ``residual_add`` (numba) then ``layer_stats`` (numba): the unfused pair
    through our kernels, no temporary;
``fused``
    ``residual_add_stats`` (numba): one pass;
``layer_stats``
    the statistics alone, and ``copy`` (``np.copyto`` of one array, the memory
    floor's unit: the add moves 3 arrays, so its floor is 1.5 copies).

A second table times the element-wise ops alone (``residual_add``,
``masked_scale``: numba and c against the plain NumPy expression, and the copy),
one interleaved group per op.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
# this checkout's initdiag (not an installed one), and bench_kernels next to us
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from bench_kernels import _interleaved  # noqa: E402

from initdiag.kernels import fused, residual  # noqa: E402

B, N = 512, 1024
DT = np.float32
SCALE = 0.7


def thunks() -> dict:
    rng = np.random.default_rng(0)
    skip = rng.standard_normal((B, N)).astype(DT)
    x = rng.standard_normal((B, N)).astype(DT)
    y = np.empty((B, N), DT)
    acc = np.empty((fused.row_chunks(B), 4, N))
    sc = np.empty((fused.row_chunks(B), 4))
    st = np.empty(10)
    e = np.empty(0)
    s32 = DT(SCALE)

    def numpy_pair():
        np.add(skip, s32 * x, out=y)
        fused._layer_stats_numba(y, acc, sc, st, e, e)

    def kernel_pair():
        residual._residual_add_numba(skip, x, SCALE, y)
        fused._layer_stats_numba(y, acc, sc, st, e, e)

    def fused_pass():
        fused._residual_add_stats_numba(skip, x, SCALE, y, acc, sc, st, e, e)

    def stats_only():
        fused._layer_stats_numba(y, acc, sc, st, e, e)

    def copy():
        np.copyto(y, x)

    return {
        "numpy": numpy_pair,
        "pair": kernel_pair,
        "fused": fused_pass,
        "layer_stats": stats_only,
        "copy": copy,
    }


def elementwise_groups() -> dict:
    """op -> {label: thunk}, "numpy" the plain expression (its temporaries are
    why ``_interleaved`` runs the others once untimed after it)."""
    from initdiag.kernels import available_backends

    rng = np.random.default_rng(1)
    skip = rng.standard_normal((B, N)).astype(DT)
    x = rng.standard_normal((B, N)).astype(DT)
    mask = (rng.random((B, N)) >= 0.1).astype(np.uint8)
    y = np.empty((B, N), DT)
    s32, k32 = DT(SCALE), DT(1 / 0.9)
    groups = {
        "residual_add": {
            "numpy": lambda: np.add(skip, s32 * x, out=y),
            "numba": lambda: residual._residual_add_numba(skip, x, SCALE, y),
            "c": lambda: residual._residual_add_c(skip, x, SCALE, y),
        },
        "masked_scale": {
            "numpy": lambda: np.multiply(x, mask * k32, out=y),
            "numba": lambda: residual._masked_scale_numba(x, mask, 1 / 0.9, y),
            "c": lambda: residual._masked_scale_c(x, mask, 1 / 0.9, y),
        },
    }
    have_c = available_backends()["c"]["available"]
    for g in groups.values():
        g["copy"] = lambda: np.copyto(y, x)
        if not have_c:
            del g["c"]
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    import numba

    fns = thunks()
    print(f"float32 {B} x {N}, scale {SCALE}, {args.rounds} rounds, medians in us")
    print(
        "| threads | np.add + layer_stats | residual_add + layer_stats | fused "
        "| layer_stats alone | copy | numpy pair / fused | kernel pair / fused "
        "| fused / floor (1.5 copies) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    old = numba.get_num_threads()
    try:
        for nt in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(nt)
            m = {k: 1e6 * v for k, v in _interleaved(fns, args.rounds).items()}
            print(
                f"| {nt} | {m['numpy']:.0f} | {m['pair']:.0f} | {m['fused']:.0f} "
                f"| {m['layer_stats']:.0f} | {m['copy']:.0f} "
                f"| {m['numpy'] / m['fused']:.2f} | {m['pair'] / m['fused']:.2f} "
                f"| {m['fused'] / (1.5 * m['copy']):.2f} |"
            )
    finally:
        numba.set_num_threads(old)
    # the element-wise ops alone (their thread count: residual.elementwise_threads)
    threads = residual.elementwise_threads(B * N)
    print(f"\nelement-wise ops ({threads} thread(s) at this size), medians in us")
    print("| op | numpy | numba | c | copy | numpy / numba | c / numba |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for op, fns in elementwise_groups().items():
        m = {k: 1e6 * v for k, v in _interleaved(fns, args.rounds).items()}
        c = m.get("c", float("nan"))
        print(
            f"| {op} | {m['numpy']:.0f} | {m['numba']:.0f} | {c:.0f} "
            f"| {m['copy']:.0f} | {m['numpy'] / m['numba']:.2f} "
            f"| {c / m['numba']:.2f} |"
        )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Benchmark of the mean-field phase diagram: a 200 x 200 grid must take < 2 s.

Run: ``pytest bench/bench_phase.py --benchmark-only`` (pytest-benchmark).  The
per-activation tables (splines in log q) are built once and cached; the first
call pays for them (~0.1-0.5 s), so they are built before timing and reported
separately by ``test_phase_table_build``.
"""

from __future__ import annotations

import numpy as np
import pytest

from initdiag import meanfield as mf

W = np.linspace(0.1, 4.0, 200)
B = np.linspace(0.0, 1.0, 200)


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh", "gelu"])
def test_phase_diagram_200x200(benchmark, activation):
    mf.phase_diagram(activation, W[:2], B[:2], depth=1)  # build the cached table
    pd = benchmark(mf.phase_diagram, activation, W, B, 50)
    assert pd.chi1.shape == (200, 200)


def test_phase_table_build(benchmark):
    act = mf._act("silu")

    def build():
        mf._fast.cache_clear()
        return mf._fast(act)

    benchmark.pedantic(build, rounds=3, iterations=1)

"""Benchmark of ``analyze(batch_size=B)`` on the 30-block default BatchNorm network
``mlp(30, 512, "relu", batchnorm=True)``: the first call (every finite-batch cache
cold: sphere rules, chi-square moments, unit integrals) must stay under 1 s for
B <= 256; warm calls reuse the per-(activation, B, gamma law, beta law) unit.

Run: ``python bench/bench_analyze.py`` (prints cold and warm medians), or
``pytest bench/bench_analyze.py --benchmark-only`` (pytest-benchmark, warm).
"""

from __future__ import annotations

import statistics
import sys
import time

import pytest

import initdiag as idg
from initdiag import finite_batch as fb

NET = idg.mlp(30, 512, "relu", batchnorm=True)
BATCHES = (8, 32, 256)


def _cold(B: int) -> float:
    fb.clear_caches()
    t = time.perf_counter()
    idg.analyze(NET, batch_size=B)
    return time.perf_counter() - t


def _warm(B: int) -> float:
    idg.analyze(NET, batch_size=B)
    t = time.perf_counter()
    idg.analyze(NET, batch_size=B)
    return time.perf_counter() - t


@pytest.mark.parametrize("B", BATCHES)
def test_analyze_finite_batch_warm(benchmark, B):
    idg.analyze(NET, batch_size=B)
    prof = benchmark(idg.analyze, NET, batch_size=B)
    assert prof.summary["chi1_source"] == f"batchnorm gradient gain at batch size {B}"


@pytest.mark.parametrize("B", BATCHES)
def test_analyze_finite_batch_cold(benchmark, B):
    benchmark.pedantic(_cold, args=(B,), rounds=3, iterations=1)


def main(rounds: int = 5) -> None:
    idg.analyze(NET)  # imports and the large-batch tables, not part of the timing
    print(f"analyze(mlp(30, 512, relu, batchnorm=True), batch_size=B), {rounds} rounds")
    for B in BATCHES:
        cold = statistics.median(_cold(B) for _ in range(rounds))
        warm = statistics.median(_warm(B) for _ in range(rounds))
        print(f"  B = {B:4d}: first call {cold:.3f} s, warm {warm:.3f} s")
    large = []
    for _ in range(rounds):
        t = time.perf_counter()
        idg.analyze(NET)
        large.append(time.perf_counter() - t)
    print(f"  large-batch limit (batch_size=None): {statistics.median(large):.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)

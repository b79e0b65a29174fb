"""Shared fixtures of the benchmark suites (pytest-benchmark).

Run from the repository root, e.g.::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python -m pytest bench/bench_kernels.py -q -p no:cacheprovider \\
        --benchmark-columns=median,iqr,rounds

The ``blas_report`` fixture records which BLAS library and kernel (OpenBLAS core
type) run, how many threads each pool has, and the thread-pool policy of the
kernels (OMP_WAIT_POLICY, Numba threading layer); it is printed once per session.
"""

from __future__ import annotations

import os

import pytest

_REPORTED: dict = {}


def _blas_report() -> dict:
    import numpy as np

    from initdiag.kernels import _threading

    _threading.configure_threads()
    info = _threading.report()
    pools = [
        {
            k: p.get(k)
            for k in (
                "internal_api",
                "version",
                "architecture",
                "num_threads",
                "threading_layer",
                "filepath",
            )
        }
        for p in info.pop("threadpools", [])
    ]
    env = {
        k: os.environ.get(k)
        for k in (
            "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE",
            "OMP_NUM_THREADS",
            "NUMBA_NUM_THREADS",
        )
    }
    return {"numpy": np.__version__, "pools": pools, "env": env, **info}


@pytest.fixture(scope="session")
def blas_report() -> dict:
    """Which BLAS kernel runs (threadpoolctl) and the thread-pool policy."""
    if not _REPORTED:
        _REPORTED.update(_blas_report())
    return _REPORTED


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORTED:
        terminalreporter.section("BLAS / thread pools")
        for k, v in _REPORTED.items():
            terminalreporter.write_line(f"{k}: {v}")

"""The worker side of a sweep: compute one chunk of points, return plain data.

This module is what a local pool process or a Dask worker imports; it never writes
anywhere (the client alone writes the database).  Every point runs single-threaded
(one BLAS thread, one Numba thread), so that its numbers are the same bits on any
executor with any number of workers: ``simulate`` is reproducible for a given thread
count, and a sweep gets its parallelism from running points side by side.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["compute_chunk", "summarize"]

_pinned = False


def _pin_threads() -> None:
    """One BLAS thread for this process (threadpoolctl, when installed) and one Numba
    thread for the calling thread; kept for the life of the process, because a
    worker that runs two chunks at once in two threads must not restore the old
    limit under the other one."""
    global _pinned
    if not _pinned:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
        except ImportError:  # pragma: no cover - the env variables below still apply
            pass
        _pinned = True
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:  # pragma: no cover - numba is a dependency
        pass


def init_local_worker() -> None:
    """Initializer of a local pool process: Ctrl-C is the client's to handle (it
    stops the sweep and terminates the pool), so a worker ignores SIGINT instead of
    dying with a traceback in the middle of a point."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summarize(profile: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The per-point numbers of a Profile (see :mod:`initdiag.sweeps.store`) and its
    per-layer rows, as plain floats / strings."""
    import numpy as np

    from ..profile import SUMMARY_KEYS

    s: dict[str, Any] = {}
    for k in SUMMARY_KEYS:
        v = profile.summary.get(k)
        s[k] = v if k == "regime" else _num(v)
    last = len(profile) - 1
    g = np.asarray(profile["grad_second_moment"], dtype=float)
    finite = np.flatnonzero(np.isfinite(g))
    first_g = int(finite[0]) if finite.size else 0
    picks = {
        "q_last": ("second_moment", last),
        "correlation_last": ("correlation", last),
        "dead_last": ("dead_fraction", last),
        "grad_first": ("grad_second_moment", first_g),
    }
    for name, (col, i) in picks.items():
        s[name] = _num(profile[col][i])
        se = profile.se(col)
        if se is not None:
            s[f"{name}_se"] = _num(se[i])
    return s, profile.records()


def _one_point(
    payload: Mapping[str, Any], point: Mapping[str, Any], engines: Sequence[str]
) -> dict[str, Any]:
    from .. import analyze, simulate
    from .grid import build_network, point_settings

    params = point["params"]
    out: dict[str, Any] = {
        "key": point["key"],
        "params": params,
        "seed": point["seed"],
        "engines": list(engines),
        "layers": {},
        "findings": [],
    }
    errors = []
    try:
        net = build_network(payload["base"], payload["mlp"], params)
    except Exception as exc:  # noqa: BLE001 - stored with the point
        out["error"] = f"building the network: {type(exc).__name__}: {exc}"
        return out
    sim_kw, ana_kw = point_settings(payload["simulate"], payload["analyze"], params)
    if "analytic" in engines:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # inf / NaN in the maps are findings in the numbers, not news
                warnings.simplefilter("ignore", RuntimeWarning)
                prof = analyze(net, **ana_kw)
            out["analytic"], out["layers"]["analytic"] = summarize(prof)
        except Exception as exc:  # noqa: BLE001 - stored with the point
            errors.append(f"analytic: {type(exc).__name__}: {exc}")
        out["a_seconds"] = time.perf_counter() - t0
    if "empirical" in engines:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                prof = simulate(
                    net, seeds=payload["seeds"], rng=point["seed"], **sim_kw
                )
            out["empirical"], out["layers"]["empirical"] = summarize(prof)
            out["findings"] = list(prof.findings)
        except Exception as exc:  # noqa: BLE001 - stored with the point
            errors.append(f"empirical: {type(exc).__name__}: {exc}")
        out["e_seconds"] = time.perf_counter() - t0
    if errors:
        out["error"] = "; ".join(errors)
    return out


def compute_chunk(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compute the points of one chunk.

    Parameters
    ----------
    task : dict
        ``payload`` (:meth:`SweepPlan.payload`), ``points`` (dicts with ``key``,
        ``params``, ``seed``), ``engines`` (``analytic`` and/or ``empirical``),
        ``version`` (the client's initdiag version).

    Returns
    -------
    list of dict
        One result per point, in order; a point that raised carries ``error``
        (``"empirical: ValueError: ..."``) instead of failing the chunk.

    Raises
    ------
    RuntimeError
        When this worker's initdiag version differs from the client's (its numbers
        would not be the ones the point keys promise).
    """
    from .. import __version__

    if task["version"] != __version__:
        raise RuntimeError(
            f"this worker runs initdiag {__version__}, the client {task['version']}; "
            "install the same version on every worker"
        )
    _pin_threads()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    results = []
    for point in task["points"]:
        try:
            r = _one_point(task["payload"], point, task["engines"])
        except Exception as exc:  # noqa: BLE001 - a bug: still one point's failure
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            r = {
                "key": point["key"],
                "params": point["params"],
                "seed": point["seed"],
                "engines": list(task["engines"]),
                "error": f"internal error: {tb}",
            }
        r["worker"] = worker
        r["finished"] = time.time()
        results.append(r)
    return results

"""Sweep throughput: points/s on 1 and 2 local workers and a 2-worker LocalCluster,
analytic only and analytic + empirical.

    python bench/bench_sweep.py [--points 48] [--depth 20] [--width 256]
                                [--batch 64] [--seeds 4] [--activation tanh]

Each configuration sweeps a fresh (sigma_w2, sigma_b2) grid into a fresh database.
Two rates per run: ``wall`` = points / wall time of the sweep() call (worker start,
imports and Numba cache loading included), and ``steady`` = points finished after
the first one / the time between the first and the last commit (the rate once the
workers are warm), from the ``finished`` times stored in the database.  The
LocalCluster starts before its timings (its start is not a sweep's cost when a
cluster is already running).  Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import initdiag as idg  # noqa: E402
from initdiag.sweeps import read_points  # noqa: E402


def grid(n: int) -> dict:
    """~n points of the (sigma_w2, sigma_b2) plane."""
    nb = 4
    nw = max(1, math.ceil(n / nb))
    return {
        "sigma_w2": [0.5 + 2.5 * i / max(nw - 1, 1) for i in range(nw)],
        "sigma_b2": [0.02 * j for j in range(nb)],
    }


def one(base, n, k, executor, workers, engines, args, tmp) -> dict:
    # a fresh database per configuration: nothing is resumed
    db = os.path.join(tmp, f"b{k}.sqlite")
    t0 = time.perf_counter()
    res = idg.sweep(
        base,
        grid(n),
        seeds=args.seeds,
        batch_size=args.batch,
        analytic=True,
        empirical="empirical" in engines,
        executor=executor,
        workers=workers,
        db=db,
        progress=False,
    )
    wall = time.perf_counter() - t0
    fin = sorted(r["finished"] for r in read_points(db))
    steady = (len(fin) - 1) / (fin[-1] - fin[0]) if fin[-1] > fin[0] else math.nan
    return {
        "points": res.computed,
        "wall": res.computed / wall,
        "steady": steady,
        "seconds": wall,
        "failed": res.failed,
        "chunk": res.chunk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=48)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--no-dask", action="store_true")
    args = ap.parse_args()
    base = idg.mlp(args.depth, args.width, args.activation)
    print(
        f"# {args.points} points of mlp({args.depth}, {args.width}, "
        f"{args.activation}), batch {args.batch}, {args.seeds} seeds; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    configs = [("local", 1), ("local", 2)]
    client = cluster = None
    if not args.no_dask:
        try:
            import distributed

            cluster = distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            )
            client = distributed.Client(cluster)
            configs.append(("dask", 2))
        except ImportError:
            print("# dask.distributed not installed: no LocalCluster row")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engines in (("analytic",), ("analytic", "empirical")):
            for kind, w in configs:
                ex = client if kind == "dask" else "local"
                r = one(base, args.points, len(rows), ex, w, engines, args, tmp)
                label = (
                    "LocalCluster, 2 workers"
                    if kind == "dask"
                    else (f"local pool, {w} worker{'s' * (w > 1)}")
                )
                rows.append((" + ".join(engines), label, r))
                print(
                    f"# {rows[-1][0]:<20} {label:<26} {r['points']} points in "
                    f"{r['seconds']:.1f} s (chunk {r['chunk']})",
                    file=sys.stderr,
                )
    if client is not None:
        client.close()
        cluster.close()
    print()
    print("| engines | executor | points/s (wall) | points/s (steady) | s |")
    print("|---|---|---:|---:|---:|")
    for eng, label, r in rows:
        print(
            f"| {eng} | {label} | {r['wall']:.3g} | {r['steady']:.3g} | "
            f"{r['seconds']:.1f} |"
        )
    print(f"\n# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Sweeps on a real ``dask.distributed.LocalCluster`` (2 worker processes): the same
numbers as the local pool, and a worker killed mid-sweep loses and duplicates
nothing.  One cluster serves the module (starting one costs seconds)."""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (pip install '.[dask]')"
)

import initdiag as idg  # noqa: E402
from initdiag.sweeps import read_points  # noqa: E402

BASE = idg.mlp(6, 16, "relu")
GRID = {"sigma_w2": [0.8, 1.6, 2.4], "sigma_b2": [0.0, 0.1]}
KW = {"seeds": 2, "batch_size": 8, "progress": False}


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    db = tmp_path_factory.mktemp("dask") / "local.sqlite"
    idg.sweep(BASE, GRID, workers=2, db=db, **KW)
    return _numbers(db)


def _numbers(db):
    """Every stored number of every point and layer, keyed by point key."""
    out = {}
    for r in read_points(db):
        drop = {"run", "worker", "finished", "a_seconds", "e_seconds"}
        out[r["key"]] = {k: v for k, v in r.items() if k not in drop}
    con = sqlite3.connect(db)
    try:
        for row in con.execute("SELECT * FROM layers ORDER BY key, engine, row"):
            out[row[0]].setdefault("layers", []).append(row)
    finally:
        con.close()
    return out


def test_dask_numbers_identical_to_local(client, local_rows, tmp_path):
    db = tmp_path / "dask.sqlite"
    res = idg.sweep(BASE, GRID, executor=client, db=db, chunk=2, **KW)
    assert res.executor.startswith("dask") and res.computed == 6
    assert res.chunk == 2
    assert _numbers(db) == local_rows


def test_dask_killed_worker(client, local_rows, tmp_path):
    db = tmp_path / "killed.sqlite"
    pids = client.run(os.getpid)
    killed = []

    def kill_one(done, total):
        if not killed:
            pid = next(iter(pids.values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    res = idg.sweep(
        BASE,
        GRID,
        executor=client,
        db=db,
        chunk=1,
        progress=kill_one,
        **{k: v for k, v in KW.items() if k != "progress"},
    )
    assert killed
    rows = read_points(db)
    assert res.computed == 6 and res.failed == 0
    assert len(rows) == 6 and {r["key"] for r in rows} == set(res.keys)
    # every point exactly once, with the numbers of the local pool
    assert _numbers(db) == local_rows
    client.wait_for_workers(2, timeout=60)


def test_dask_address_string(client, tmp_path):
    db = tmp_path / "addr.sqlite"
    res = idg.sweep(
        BASE,
        {"sigma_w2": [1.0]},
        executor="dask",
        address=client.scheduler.address,
        db=db,
        analytic=True,
        empirical=False,
        **KW,
    )
    assert res.computed == 1
    with pytest.raises(ValueError, match="needs address"):
        idg.sweep(BASE, {"sigma_w2": [1.0]}, executor="dask", db=db, **KW)

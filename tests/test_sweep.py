"""Sweeps: grid expansion and validation, the SQLite store, the local process pool
(numbers identical to direct analyze / simulate calls, resume, failures, overflow,
a killed worker), Ctrl-C and resume through the command line, exports, reports."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import initdiag as idg
from initdiag.profile import STAT_COLUMNS
from initdiag.sweeps import GridError, export_csv, read_points, to_frame
from initdiag.sweeps.grid import (
    build_network,
    count_points,
    expand,
    mlp_parameters,
    point_key,
)
from initdiag.sweeps.run import _todo
from initdiag.sweeps.store import Store

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def single_thread():
    """What a sweep worker does: one BLAS thread, one Numba thread."""
    import numba
    from threadpoolctl import threadpool_limits

    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(old)


def layer_rows(db, key, engine):
    con = sqlite3.connect(db)
    try:
        cur = con.execute(
            "SELECT * FROM layers WHERE key = ? AND engine = ? ORDER BY row",
            (key, engine),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]
    finally:
        con.close()


def same(a, b):
    """Equal as stored: NULL for NaN, exact floats otherwise."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b


# -- grids --------------------------------------------------------------------------

BASE = idg.mlp(10, 16, "relu")


def test_expand_product_zip_and_linspace():
    grid = {
        "sigma_w2": "1:2:3",
        "zip": {"depth": [4, 8], "width": [16, 32]},
        "batch_size": [8],
    }
    assert count_points(grid) == 6
    plan = expand(BASE, grid, seeds=2)
    pts = [p.params for p in plan.points]
    assert len(pts) == 6
    assert [p["sigma_w2"] for p in pts[::2]] == [1.0, 1.5, 2.0]
    # linked axes walk together: never depth 4 with width 32
    assert {(p["depth"], p["width"]) for p in pts} == {(4, 16), (8, 32)}
    assert len({p.key for p in plan.points}) == 6


def test_keys_seeds_canonical_and_versioned():
    a = expand(BASE, {"depth": [2, 3]}, seeds=2)
    b = expand(BASE, {"depth": [2.0, 3.0]}, seeds=2)
    assert [p.key for p in a.points] == [p.key for p in b.points]
    # the seed is the key's first 63 bits
    for p in a.points:
        assert p.seed == int(p.key[:16], 16) >> 1 and 0 <= p.seed < 2**63
    # every input of the hash changes the key: values, seeds, settings, version
    assert point_key({"depth": 2}, a.base_hash) == (a.points[0].key, a.points[0].seed)
    c = expand(BASE, {"depth": [2, 3]}, seeds=3)
    d = expand(BASE, {"depth": [2, 3]}, seeds=2, simulate={"dtype": "float64"})
    e = expand(BASE, {"depth": [2, 3]}, seeds=2, version="0.0.0")
    keys = {p.points[0].key for p in (a, c, d, e)}
    assert len(keys) == 4
    # the base's name labels reports only
    f = expand(BASE.with_name("other"), {"depth": [2, 3]}, seeds=2)
    assert f.points[0].key == a.points[0].key


def test_sigma_axes_set_the_variances():
    net = build_network(
        BASE.to_dict(),
        mlp_parameters(BASE.to_dict()),
        {
            "sigma_w2": 1.7,
            "sigma_b2": 0.09,
        },
    )
    for info, p in zip(net.infos, net.param_inits(), strict=True):
        if info.kind == "dense":
            assert p["weight"].mean(info.fan_in, info.width) == 0
            assert math.isclose(
                p["weight"].variance(info.fan_in, info.width), 1.7 / info.fan_in
            )
            assert math.isclose(p["bias"].variance(info.fan_in, info.width), 0.09)


def test_initializer_parameter_paths():
    base = idg.mlp(3, 8, "tanh", init=idg.InitScheme(weight="normal(0, 1)"))
    d = base.to_dict()
    net = build_network(d, mlp_parameters(d), {"init.weight.std": 0.25})
    w = net.param_inits()[0]["weight"]
    assert math.isclose(w.variance(8, 8), 0.0625)
    net = build_network(
        d, mlp_parameters(d), {"init.bias": "uniform(-1, 1)", "init.bias.b": 3}
    )
    assert math.isclose(net.param_inits()[0]["bias"].mean(8, 8), 1.0)
    with pytest.raises(GridError, match=r"init\.weight\.gain.*parameters: mean, std"):
        expand(base, {"init.weight.gain": [1.0]}, seeds=2)


def test_structural_axes_rebuild_the_mlp():
    d = BASE.to_dict()
    kw = mlp_parameters(d)
    assert kw["depth"] == 10 and kw["width"] == 16
    net = build_network(d, kw, {"depth": 3, "width": 24, "batchnorm": True})
    assert net.depth == 3 and net.input_dim == 24
    assert [i.kind for i in net.infos][:3] == ["dense", "batchnorm", "activation"]
    # an input_dim the base chose itself stays
    e = idg.mlp(2, 16, "tanh", input_dim=5).to_dict()
    assert build_network(e, mlp_parameters(e), {"width": 32}).input_dim == 5
    # a readout and leaky_relu's parameter round-trip
    f = idg.mlp(2, 16, idg.LeakyReLU(0.2), output_dim=3).to_dict()
    assert mlp_parameters(f)["output_dim"] == 3
    assert build_network(f, mlp_parameters(f), {"depth": 4}).depth == 5


def test_non_mlp_base_names_the_unavailable_keys():
    net = idg.Network(8, [idg.Dense(8), idg.ReLU(), idg.Dense(4), idg.Tanh()])
    assert mlp_parameters(net.to_dict()) is None
    with pytest.raises(GridError, match=r"'depth'.*not an mlp.*sigma_w2"):
        expand(net, {"depth": [2, 3]}, seeds=2)
    # what needs no mlp works on any network
    plan = expand(net, {"sigma_w2": [1.0, 2.0], "init.bias": ["zeros"]}, seeds=2)
    assert len(plan.points) == 2


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"depht": [1]}, r"unknown grid key 'depht'.*valid keys"),
        ({"depth": []}, r"'depth'.*empty"),
        ({"depth": 3}, r"'depth'.*list of values"),
        ({"depth": [2, 2]}, r"'depth'.*listed twice"),
        ({"width": [0]}, r"'width'.*>= 1"),
        ({"activation": ["tanh", "swishy"]}, r"'activation'.*rejects.*swishy"),
        ({"init.weight": ["normal(0, 1)", "bogus(1)"]}, r"'init.weight'.*bogus"),
        ({"zip": {"depth": [1, 2], "width": [3]}}, r"zip.*one length"),
        ({"sigma_w2": [1.0], "init.weight": ["zeros"]}, r"'sigma_w2'.*'init.weight'"),
        ({"sigma_w2": [-1.0]}, r"'sigma_w2'.*>= 0"),
        ({}, r"grid is empty"),
    ],
)
def test_bad_grids_fail_before_any_work(tmp_path, grid, match):
    db = tmp_path / "x.sqlite"
    with pytest.raises(GridError, match=match):
        idg.sweep(BASE, grid, db=db, progress=False)
    assert not db.exists()


def test_combination_the_network_rejects():
    # an override that exists at depth 10 but not at depth 3
    base = idg.mlp(
        10, 8, init=idg.InitScheme(overrides={"dense10": {"weight": "zeros"}})
    )
    with pytest.raises(GridError, match=r"'depth'.*depth = 3.*dense10"):
        expand(base, {"depth": [10, 3]}, seeds=2)
    # an initializer and a parameter it lacks, only together
    with pytest.raises(
        GridError, match=r"init.weight.std.*no parameter 'std'.*init.weight = 'zeros'"
    ):
        expand(
            base,
            {"init.weight": ["normal(0, 1)", "zeros"], "init.weight.std": [0.5]},
            seeds=2,
        )


def test_max_points(tmp_path):
    grid = {"sigma_w2": "0.5:3:50", "sigma_b2": "0:0.5:50"}
    with pytest.raises(GridError, match=r"2500 points.*limit of 1000.*--yes"):
        idg.sweep(BASE, grid, db=tmp_path / "x.sqlite", max_points=1000)
    assert not (tmp_path / "x.sqlite").exists()


def test_study_base_with_variants_is_refused(tmp_path):
    with pytest.raises(GridError, match=r"12 networks.*one base network"):
        idg.sweep(
            ROOT / "examples/bias_question.toml", {"depth": [2]}, db=tmp_path / "x"
        )


def test_shipped_grid_file():
    from initdiag.sweeps.grid import base_from, load_grid_file

    spec = load_grid_file(ROOT / "examples/sweeps/tanh_phase.toml")
    net, sim, _ = base_from(spec["base"])
    plan = expand(net, spec["grid"], seeds=spec["seeds"], simulate=sim)
    assert len(plan.points) == 44 and plan.axes == ["sigma_w2", "sigma_b2"]
    assert plan.simulate["batch_size"] == 64 and plan.mlp["activation"] == "tanh"


def test_grid_file_errors(tmp_path):
    from initdiag.sweeps.grid import load_grid_file

    f = tmp_path / "g.toml"
    f.write_text("[network]\ndepth = 2\nwidth = 4\n")
    with pytest.raises(GridError, match=r"needs a \[grid\] table"):
        load_grid_file(f)
    f.write_text("[sweep]\nseed = 2\n[grid]\ndepth = [1]\n")
    with pytest.raises(GridError, match=r"unknown keys \['seed'\]"):
        load_grid_file(f)
    f.write_text("[grid]\ndepth = [1]\n")
    with pytest.raises(GridError, match=r"no base network"):
        load_grid_file(f)


def test_resume_set_engines_and_failures(tmp_path):
    plan = expand(BASE, {"depth": [1, 2, 3, 4]}, seeds=2)
    with Store(tmp_path / "s.sqlite") as st:
        p = plan.points
        st.write_chunk(
            1,
            plan.base_hash,
            [
                {
                    "key": p[0].key,
                    "params": p[0].params,
                    "seed": 1,
                    "engines": ["analytic", "empirical"],
                },
                {
                    "key": p[1].key,
                    "params": p[1].params,
                    "seed": 1,
                    "engines": ["analytic"],
                },
                {
                    "key": p[2].key,
                    "params": p[2].params,
                    "seed": 1,
                    "engines": ["analytic", "empirical"],
                    "error": "boom",
                },
            ],
        )
        both = ["analytic", "empirical"]
        todo, skipped = _todo(st, plan, both, True, False)
        assert [t.key for t in todo] == [p[1].key, p[3].key] and skipped == 2
        todo, _ = _todo(st, plan, both, True, True)
        assert [t.key for t in todo] == [p[1].key, p[2].key, p[3].key]
        todo, skipped = _todo(st, plan, ["analytic"], True, False)
        assert [t.key for t in todo] == [p[3].key] and skipped == 3
        todo, skipped = _todo(st, plan, both, False, False)
        assert len(todo) == 4 and skipped == 0


def test_store_refuses_other_files(tmp_path):
    f = tmp_path / "other.sqlite"
    con = sqlite3.connect(f)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="not a sweep database"):
        Store(f)
    g = tmp_path / "v.sqlite"
    Store(g).close()
    con = sqlite3.connect(g)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="schema version 99"):
        Store(g)


# -- the local pool -----------------------------------------------------------------

GRID = {
    "sigma_w2": [1.0, 2.0, 1e12],
    # width 3e6 is fine for theory; simulate refuses it (memory estimate): a point
    # that fails at run time, past validation
    "zip": {"width": [16, 3_000_000], "sigma_b2": [0.05, 0.0]},
}


@pytest.fixture(scope="module")
def local_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("sweep") / "local.sqlite"
    res = idg.sweep(BASE, GRID, seeds=2, batch_size=8, workers=2, db=db, progress=False)
    return db, res


def test_local_counts_failures_and_overflow(local_db):
    db, res = local_db
    assert (res.total, res.computed, res.skipped, res.failed) == (6, 6, 0, 3)
    assert res.overflowed == 1
    rows = read_points(db)
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["params"]["width"] for r in failed} == {3_000_000}
    for r in failed:
        # refused before anything is allocated: the size limits (a ValueError)
        assert re.match(
            r"empirical: (ValueError|LimitError): simulate\(\) would need", r["error"]
        )
        assert r["a_chi1"] is not None  # the theory half is kept
    over = [r for r in rows if r["overflow"]]
    assert len(over) == 1 and over[0]["params"]["sigma_w2"] == 1e12
    assert over[0]["status"] == "done"
    f = json.loads(over[0]["findings"])
    assert f and f[0]["kind"] == "overflow" and "overflowed" in f[0]["message"]
    run = Store(db).runs()[-1]
    assert (run["status"], run["computed"], run["failed"]) == ("complete", 6, 3)


def test_local_numbers_equal_direct_calls(local_db):
    """Each stored number is what analyze / simulate return for the point's network
    built independently, with the point's seed, bit for bit."""
    db, _ = local_db
    rows = [r for r in read_points(db) if r["status"] == "done" and not r["overflow"]]
    assert len(rows) == 2
    for r in rows:
        p = r["params"]
        net = idg.mlp(
            10,
            p["width"],
            "relu",
            init=idg.InitScheme(
                weight=idg.initializers.variance_scaling(
                    p["sigma_w2"], "fan_in", "normal"
                ),
                bias=idg.initializers.normal(0.0, math.sqrt(p["sigma_b2"])),
            ),
        )
        a = idg.analyze(net, batch_size=8)
        with single_thread():
            e = idg.simulate(net, batch_size=8, seeds=2, rng=r["seed"])
        assert r["seed"] == int(r["key"][:16], 16) >> 1
        assert same(r["a_chi1"], a.summary["chi1"])
        assert same(r["a_xi_c"], a.summary["xi_c"])
        assert same(r["e_gradient_ratio"], e.summary["gradient_ratio"])
        assert same(r["e_q_last"], float(e["second_moment"][-1]))
        assert same(r["e_q_last_se"], float(e.se("second_moment")[-1]))
        for engine, prof in (("analytic", a), ("empirical", e)):
            lays = layer_rows(db, r["key"], engine)
            assert [x["name"] for x in lays] == prof.name
            for c in STAT_COLUMNS:
                for x, v in zip(lays, prof[c], strict=True):
                    assert same(x[c], float(v)), (engine, c, x["name"])


def test_resume_and_retry_failed(local_db):
    db, first = local_db
    again = idg.sweep(BASE, GRID, seeds=2, batch_size=8, db=db, progress=False)
    assert (again.computed, again.skipped) == (0, 6)
    before = {r["key"]: r["finished"] for r in read_points(db)}
    retry = idg.sweep(
        BASE,
        GRID,
        seeds=2,
        batch_size=8,
        workers=1,
        db=db,
        progress=False,
        retry_failed=True,
    )
    assert (retry.computed, retry.skipped, retry.failed) == (3, 3, 3)
    after = read_points(db)
    assert len(after) == 6
    for r in after:
        # exactly the failed points were recomputed, by the third run
        redone = r["params"]["width"] == 3_000_000
        assert (r["finished"] != before[r["key"]]) == redone
        assert r["run"] == (retry.run if redone else first.run)


def test_exports(local_db, tmp_path):
    db, res = local_db
    out = export_csv(db, tmp_path / "p.csv")
    lines = Path(out).read_text().splitlines()
    assert lines[0].startswith("sigma_w2,width,sigma_b2,key,")
    assert len(lines) == 7
    lay = export_csv(db, tmp_path / "l.csv", table="layers")
    n_layers = len(BASE.infos)
    # 3 points with both engines, 3 (width 3e6) with the analytic one only
    assert len(Path(lay).read_text().splitlines()) == 1 + 9 * n_layers
    pd = pytest.importorskip("pandas")
    df = to_frame(db)
    assert isinstance(df, pd.DataFrame) and len(df) == 6


@pytest.mark.slow
def test_local_killed_worker_loses_and_duplicates_nothing(tmp_path):
    db = tmp_path / "kill.sqlite"
    killed = []

    def kill_one(done, total):
        if not killed:
            child = multiprocessing.active_children()[0]
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    grid = {"sigma_w2": [1.0, 1.5, 2.0, 2.5], "sigma_b2": [0.0, 0.1]}
    res = idg.sweep(
        BASE,
        grid,
        seeds=2,
        batch_size=8,
        workers=2,
        db=db,
        chunk=1,
        progress=kill_one,
        analytic=False,
    )
    assert killed
    rows = read_points(db)
    assert res.computed == 8 and res.failed == 0
    assert len(rows) == 8 and {r["key"] for r in rows} == set(res.keys)
    assert all(r["status"] == "done" for r in rows)
    assert Store(db).runs()[-1]["status"] == "complete"


def test_workers_that_die_at_start_stop_the_sweep(tmp_path):
    """A script on stdin: spawned workers cannot re-import the main module and die
    at once; the sweep stops with the reason instead of failing point by point."""
    script = (
        "import initdiag as idg\n"
        f"idg.sweep(idg.mlp(3, 8), {{'depth': list(range(1, 21))}}, empirical=False,"
        f" workers=1, db={str(tmp_path / 'x.sqlite')!r}, progress=False)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-"],
        input=script,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1
    assert "RuntimeError: 5 worker processes died in a row" in r.stderr
    assert "__main__" in r.stderr.splitlines()[-1]
    assert read_points(tmp_path / "x.sqlite") == []


# -- the command line ---------------------------------------------------------------


def cli(*args, timeout=300, **kw):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run(
        [sys.executable, "-m", "initdiag.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        **kw,
    )


GRID_TOML = """\
[sweep]
seeds = 2

[network]
depth = 12
width = 32
activation = "relu"

[simulate]
batch_size = 16

[grid]
sigma_w2 = "1.0:3.0:8"
sigma_b2 = [0.0, 0.05, 0.1]
"""


@pytest.mark.parametrize(
    "grid, extra, match",
    [
        ("[grid]\ndepht = [1]\n", [], "unknown grid key 'depht'"),
        ("[grid]\nwidth = []\n", [], "'width': the list of values is empty"),
        ('[grid]\nactivation = ["relu", "nope"]\n', [], "'activation'"),
        (
            '[grid]\nsigma_w2 = "0:1:200"\nsigma_b2 = "0:1:100"\n',
            [],
            "20000 points.*--yes",
        ),
        ('[grid]\nsigma_w2 = "0:1:20"\n', ["--max-points", "10"], "20 points"),
    ],
)
def test_cli_bad_grid_exits_2(tmp_path, grid, extra, match):
    import re

    f = tmp_path / "g.toml"
    f.write_text("[network]\ndepth = 3\nwidth = 8\n\n" + grid)
    r = cli("sweep", f, "--db", tmp_path / "g.sqlite", *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert re.search(match, r.stderr), r.stderr
    assert not (tmp_path / "g.sqlite").exists()


def _count(db):
    if not Path(db).exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT count(*) FROM points").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


@pytest.mark.slow
def test_cli_ctrl_c_then_resume_and_report(tmp_path):
    grid = tmp_path / "phase.toml"
    grid.write_text(GRID_TOML)
    db = tmp_path / "phase.sqlite"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    # a session of its own, so that SIGINT goes to the whole process group as a
    # terminal's Ctrl-C does (the pool workers included)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "initdiag.cli",
            "sweep",
            str(grid),
            "--db",
            str(db),
            "--workers",
            "2",
            "--chunk",
            "1",
            "-q",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while _count(db) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    done1 = {r["key"]: r["finished"] for r in read_points(db)}
    assert 3 <= len(done1) < 24
    assert Store(db).runs()[0]["status"] == "interrupted"

    r = cli(
        "sweep", grid, "--db", db, "--workers", "2", "-q", "--csv", tmp_path / "p.csv"
    )
    assert r.returncode == 0, r.stderr
    rows = read_points(db)
    assert len(rows) == 24 and all(r["status"] == "done" for r in rows)
    runs = Store(db).runs()
    # the second run computed exactly the points the first did not finish
    assert runs[1]["computed"] == 24 - len(done1)
    assert runs[1]["skipped"] == len(done1)
    assert f"24 points: {24 - len(done1)} computed, {len(done1)} already" in r.stdout
    for row in rows:
        if row["key"] in done1:
            assert row["run"] == 1 and row["finished"] == done1[row["key"]]
        else:
            assert row["run"] == 2
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 25

    out_dir = tmp_path / "rep"
    r = cli(
        "sweep-report",
        db,
        "--x",
        "sigma_w2",
        "--y",
        "sigma_b2",
        "--metric",
        "correlation_last",
        "--out",
        out_dir,
    )
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in out_dir.iterdir())
    assert pngs == [
        "correlation_last_sigma_w2_sigma_b2_heatmap.png",
        "correlation_last_sigma_w2_sigma_b2_lines.png",
    ]
    r = cli("sweep-report", db, "--x", "depth", "--out", out_dir)
    assert r.returncode == 2 and "not an axis of this sweep" in r.stderr
    assert "Traceback" not in r.stderr


def test_report_select_arranges_the_grid(local_db):
    from initdiag.sweeps.report import select

    db, _ = local_db
    sel = select(db, x="sigma_w2", metric="chi1", where={"width": 16})
    assert sel["x_values"] == [1.0, 2.0, 1e12]
    ((fixed, engines),) = sel["groups"]
    assert fixed == {"sigma_b2": 0.05}
    # chi1 is theory: simulate does not measure it, so there is no measured panel
    assert list(engines) == ["analytic"]
    vals = engines["analytic"][0][0]
    # ReLU: chi1 = sigma_w2 / 2 (THEORY.md)
    np.testing.assert_allclose(vals, [0.5, 1.0, 5e11], rtol=1e-12)
    with pytest.raises(ValueError, match="valid: chi1"):
        select(db, x="sigma_w2", metric="nope")

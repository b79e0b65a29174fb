"""The results database of a sweep: SQLite (stdlib ``sqlite3``), WAL mode.

Only the client process writes (workers return results), and every finished chunk is
committed at once, so a crash, a killed worker or Ctrl-C loses at most the chunks in
flight.  Schema version 1 (``meta.schema_version``); a database written by another
schema version is refused with the reason.  Tables:

``meta(key TEXT PRIMARY KEY, value TEXT)``
    ``schema_version``, ``created`` (UTC ISO time), ``initdiag_version`` (of the
    first writer).

``runs`` -- one row per invocation of :func:`initdiag.sweep`
    ``id`` (INTEGER PRIMARY KEY), ``started`` / ``finished`` (Unix seconds),
    ``status`` (``running``, ``complete``, ``interrupted``, ``error``),
    ``initdiag_version``, ``base_hash`` (SHA-256 of the base network's dict, the
    shared settings and the version; see :mod:`initdiag.sweeps.grid`), ``base``
    (JSON: ``Network.to_dict()``), ``grid`` (JSON, as given), ``settings`` (JSON:
    seeds, simulate / analyze settings, engines), ``executor``, ``workers``,
    ``total`` (points of the grid), ``computed`` (points computed by this run),
    ``skipped`` (found finished), ``failed`` (points of this run that raised).

``points`` -- one row per grid point
    ``key`` (TEXT PRIMARY KEY: the point's SHA-256), ``base_hash``, ``run`` (the
    ``runs.id`` that computed it), ``params`` (JSON: path -> value), ``seed`` (the
    simulate ``rng``), ``engines`` (``analytic``, ``empirical`` or
    ``analytic,empirical``), ``status`` (``done`` or ``failed``), ``error``
    (``Type: message`` of what raised, with the engine), ``overflow`` (1 when
    simulate reported an overflow), ``findings`` (JSON: simulate's findings),
    ``a_seconds`` / ``e_seconds`` (wall time of each engine), ``worker`` (host:pid),
    ``finished`` (Unix seconds), ``initdiag_version``; then, from ``analyze``
    (prefix ``a_``), the summary (``chi1``, ``regime``, ``q_star``, ``c_star``,
    ``xi_q``, ``xi_c``, ``correlation_depth``, ``gradient_ratio``) and the last
    layer's ``q_last`` (second moment), ``correlation_last``, ``dead_last`` (dead
    fraction) and ``grad_first`` (gradient second moment at the first layer); from
    ``simulate`` (prefix ``e_``) what it measures: ``correlation_depth``,
    ``gradient_ratio``, ``q_last``, ``correlation_last``, ``dead_last``,
    ``grad_first``, with ``e_<x>_se`` standard errors for the last four.  NULL
    where a number does not exist (``correlation_depth`` never reached, an engine
    not run).

``layers`` -- one row per point, engine and layer output
    ``key``, ``engine`` (``analytic`` / ``empirical``), ``row`` (0-based row of the
    Profile), ``name``, ``kind``, ``block``, ``width``, then every Profile statistic
    column (:data:`initdiag.profile.STAT_COLUMNS`) and its ``<column>_se``
    (empirical); primary key (key, engine, row).

Columns added to the Profile later are added to an existing database with
``ALTER TABLE ... ADD COLUMN`` when it is opened (old rows read NULL).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "SUMMARY_COLUMNS",
    "Store",
    "export_csv",
    "export_parquet",
    "read_points",
    "to_frame",
]

SCHEMA_VERSION = 1


#: per-point numbers, each as a_<name> (analyze) and e_<name> (simulate)
def _summary_keys() -> tuple[str, ...]:
    from ..profile import SUMMARY_KEYS

    return tuple(k for k in SUMMARY_KEYS if k != "regime")


_SUMMARY_NUM = _summary_keys()
_LAST = ("q_last", "correlation_last", "dead_last", "grad_first")
SUMMARY_COLUMNS = (*_SUMMARY_NUM, "regime", *_LAST)
#: what simulate measures (its chi1, regime, fixed points and depth scales come
#: from theory, so only the a_ columns hold those)
MEASURED_COLUMNS = ("correlation_depth", "gradient_ratio", *_LAST)


def _stat_columns() -> tuple[str, ...]:
    from ..profile import STAT_COLUMNS

    return tuple(STAT_COLUMNS)


def _point_columns() -> list[tuple[str, str]]:
    cols = [
        ("key", "TEXT PRIMARY KEY"),
        ("base_hash", "TEXT NOT NULL"),
        ("run", "INTEGER"),
        ("params", "TEXT NOT NULL"),
        ("seed", "INTEGER"),
        ("engines", "TEXT NOT NULL"),
        ("status", "TEXT NOT NULL CHECK (status IN ('done', 'failed'))"),
        ("error", "TEXT"),
        ("overflow", "INTEGER NOT NULL DEFAULT 0"),
        ("findings", "TEXT"),
        ("a_seconds", "REAL"),
        ("e_seconds", "REAL"),
        ("worker", "TEXT"),
        ("finished", "REAL"),
        ("initdiag_version", "TEXT"),
    ]
    cols += [("a_" + c, "REAL") for c in _SUMMARY_NUM]
    cols.append(("a_regime", "TEXT"))
    cols += [("a_" + c, "REAL") for c in _LAST]
    cols += [("e_" + c, "REAL") for c in MEASURED_COLUMNS]
    cols += [(f"e_{c}_se", "REAL") for c in _LAST]
    return cols


def _layer_columns() -> list[tuple[str, str]]:
    cols = [
        ("key", "TEXT NOT NULL"),
        ("engine", "TEXT NOT NULL"),
        ("row", "INTEGER NOT NULL"),
        ("name", "TEXT"),
        ("kind", "TEXT"),
        ("block", "INTEGER"),
        ("width", "INTEGER"),
    ]
    stats = _stat_columns()
    cols += [(c, "REAL") for c in stats]
    cols += [(f"{c}_se", "REAL") for c in stats]
    return cols


_RUN_COLUMNS = [
    ("id", "INTEGER PRIMARY KEY"),
    ("started", "REAL"),
    ("finished", "REAL"),
    ("status", "TEXT"),
    ("initdiag_version", "TEXT"),
    ("base_hash", "TEXT"),
    ("base", "TEXT"),
    ("grid", "TEXT"),
    ("settings", "TEXT"),
    ("executor", "TEXT"),
    ("workers", "INTEGER"),
    ("total", "INTEGER"),
    ("computed", "INTEGER DEFAULT 0"),
    ("skipped", "INTEGER DEFAULT 0"),
    ("failed", "INTEGER DEFAULT 0"),
]


def _create(name: str, cols: Sequence[tuple[str, str]], extra: str = "") -> str:
    body = ", ".join(f'"{c}" {t}' for c, t in cols)
    return f'CREATE TABLE IF NOT EXISTS "{name}" ({body}{extra})'


def _sql_number(v: Any) -> float | None:
    """NaN and None are NULL; infinities are kept (SQLite stores them)."""
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _json(obj: Any, sort_keys: bool = True) -> str:
    from ..profile import _jsonable

    return json.dumps(_jsonable(obj), sort_keys=sort_keys)


class Store:
    """A sweep database; the only writer (the client process).

    Parameters
    ----------
    path : str or PathLike
        The SQLite file (created with its directory's permissions when missing).

    Raises
    ------
    ValueError
        The file is not a sweep database, or was written by another schema version.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ValueError(f"db {self.path}: the directory {parent} does not exist")
        try:
            self.con = sqlite3.connect(self.path, timeout=30.0)
            self.con.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a crash of the process (not of
            # the machine's power), at a fraction of FULL's fsyncs
            self.con.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            raise ValueError(
                f"db {self.path}: not a usable SQLite database: {exc}"
            ) from None
        self._init_schema()

    # -- schema ---------------------------------------------------------------------
    def _init_schema(self) -> None:
        con = self.con
        try:
            tables = {
                r[0]
                for r in con.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'"
                )
            }
        except sqlite3.DatabaseError as exc:
            raise ValueError(
                f"db {self.path}: not a usable SQLite database: {exc}"
            ) from None
        if tables and "meta" not in tables:
            raise ValueError(
                f"db {self.path}: an SQLite file that is not a sweep database "
                f"(tables: {', '.join(sorted(tables))}); pass another --db"
            )
        with con:
            con.execute(
                _create("meta", [("key", "TEXT PRIMARY KEY"), ("value", "TEXT")])
            )
            row = con.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
            if row is not None and int(row[0]) != SCHEMA_VERSION:
                raise ValueError(
                    f"db {self.path}: schema version {row[0]}, this initdiag writes "
                    f"version {SCHEMA_VERSION}; use another --db (or export the old "
                    "one with the initdiag that wrote it)"
                )
            if row is None:
                from .. import __version__

                now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
                con.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("created", now),
                        ("initdiag_version", __version__),
                    ],
                )
            con.execute(_create("runs", _RUN_COLUMNS))
            con.execute(_create("points", _point_columns()))
            con.execute(
                _create("layers", _layer_columns(), ", PRIMARY KEY (key, engine, row)")
            )
            con.execute(
                "CREATE INDEX IF NOT EXISTS points_base ON points (base_hash, status)"
            )
            for table, cols in (
                ("points", _point_columns()),
                ("layers", _layer_columns()),
            ):
                have = {r[1] for r in con.execute(f'PRAGMA table_info("{table}")')}
                for c, t in cols:
                    if c not in have:
                        t = t.replace("PRIMARY KEY", "").replace("NOT NULL", "")
                        con.execute(f'ALTER TABLE "{table}" ADD COLUMN "{c}" {t}')
        self._point_cols = [c for c, _ in _point_columns()]
        self._layer_cols = [c for c, _ in _layer_columns()]

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- runs -----------------------------------------------------------------------
    def start_run(
        self,
        *,
        base_hash: str,
        base: Mapping[str, Any],
        grid: Any,
        settings: Mapping[str, Any],
        executor: str,
        workers: int | None,
        total: int,
    ) -> int:
        from .. import __version__

        with self.con:
            cur = self.con.execute(
                "INSERT INTO runs (started, status, initdiag_version, base_hash, base, "
                "grid, settings, executor, workers, total) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    __version__,
                    base_hash,
                    _json(base),
                    _json(grid),
                    _json(settings),
                    executor,
                    workers,
                    total,
                ),
            )
        return int(cur.lastrowid)

    def finish_run(self, run: int, status: str, **counts: int) -> None:
        sets = ", ".join(f"{k} = ?" for k in counts)
        with self.con:
            self.con.execute(
                f"UPDATE runs SET finished = ?, status = ?{', ' if sets else ''}{sets} "
                "WHERE id = ?",
                (time.time(), status, *counts.values(), run),
            )

    def runs(self) -> list[dict[str, Any]]:
        cur = self.con.execute("SELECT * FROM runs ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    # -- points ---------------------------------------------------------------------
    def status_of(self, keys: Iterable[str]) -> dict[str, tuple[str, str]]:
        """``{key: (status, engines)}`` for the keys already in the database."""
        out: dict[str, tuple[str, str]] = {}
        keys = list(keys)
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = ",".join("?" * len(part))
            for k, st, eng in self.con.execute(
                f"SELECT key, status, engines FROM points WHERE key IN ({q})", part
            ):
                out[k] = (st, eng)
        return out

    def write_chunk(self, run: int, base_hash: str, results: Sequence[dict]) -> None:
        """Insert (or replace) the points of one finished chunk in one transaction."""
        from .. import __version__

        prow = []
        lrows = []
        for r in results:
            row = dict.fromkeys(self._point_cols)
            row.update(
                key=r["key"],
                base_hash=base_hash,
                run=run,
                params=_json(r["params"], sort_keys=False),
                seed=r["seed"],
                engines=",".join(r["engines"]),
                status="failed" if r.get("error") else "done",
                error=r.get("error"),
                overflow=int(
                    any(f.get("kind") == "overflow" for f in r.get("findings", []))
                ),
                findings=_json(r.get("findings", [])),
                a_seconds=r.get("a_seconds"),
                e_seconds=r.get("e_seconds"),
                worker=r.get("worker"),
                finished=r.get("finished", time.time()),
                initdiag_version=__version__,
            )
            for prefix, summ in (("a_", r.get("analytic")), ("e_", r.get("empirical"))):
                if not summ:
                    continue
                for k, v in summ.items():
                    col = prefix + k
                    if col in row:
                        row[col] = v if k == "regime" else _sql_number(v)
            prow.append([row[c] for c in self._point_cols])
            for engine, layers in (r.get("layers") or {}).items():
                for i, lay in enumerate(layers):
                    lr = dict.fromkeys(self._layer_cols)
                    lr.update({k: v for k, v in lay.items() if k in lr})
                    for c in self._layer_cols[7:]:
                        lr[c] = _sql_number(lr[c])
                    lr.update(key=r["key"], engine=engine, row=i)
                    lrows.append([lr[c] for c in self._layer_cols])
        pq = ",".join("?" * len(self._point_cols))
        lq = ",".join("?" * len(self._layer_cols))
        pnames = ",".join(f'"{c}"' for c in self._point_cols)
        lnames = ",".join(f'"{c}"' for c in self._layer_cols)
        with self.con:
            keys = [(r["key"],) for r in results]
            self.con.executemany("DELETE FROM layers WHERE key = ?", keys)
            self.con.executemany(
                f"INSERT OR REPLACE INTO points ({pnames}) VALUES ({pq})", prow
            )
            self.con.executemany(f"INSERT INTO layers ({lnames}) VALUES ({lq})", lrows)

    def count(self, base_hash: str | None = None, status: str | None = None) -> int:
        q, args = "SELECT count(*) FROM points WHERE 1", []
        if base_hash is not None:
            q, args = q + " AND base_hash = ?", [*args, base_hash]
        if status is not None:
            q, args = q + " AND status = ?", [*args, status]
        return int(self.con.execute(q, args).fetchone()[0])


# -- reading and exporting ----------------------------------------------------------


def _connect_ro(path: str | os.PathLike) -> sqlite3.Connection:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such sweep database")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        tables = {
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path}: not an SQLite database: {exc}") from None
    if not {"meta", "points", "runs"} <= tables:
        raise ValueError(f"{path}: not a sweep database (no points / runs tables)")
    return con


def read_points(
    path: str | os.PathLike,
    *,
    run: int | None = None,
    status: str | None = None,
) -> list[dict[str, Any]]:
    """The points of a database as dicts, ``params`` decoded and flattened in.

    Parameters
    ----------
    run : int, optional
        Only the points of that run's base (same base network and settings; the
        grid of the run may be a part of them).  Default: every point.
    status : {"done", "failed"}, optional
    """
    con = _connect_ro(path)
    try:
        q, args = "SELECT * FROM points WHERE 1", []
        if run is not None:
            row = con.execute(
                "SELECT base_hash FROM runs WHERE id = ?", (run,)
            ).fetchone()
            if row is None:
                ids = [r[0] for r in con.execute("SELECT id FROM runs ORDER BY id")]
                raise ValueError(f"{path}: no run {run}; runs: {ids}")
            q, args = q + " AND base_hash = ?", [*args, row[0]]
        if status is not None:
            q, args = q + " AND status = ?", [*args, status]
        cur = con.execute(q + " ORDER BY finished, key", args)
        names = [d[0] for d in cur.description]
        out = []
        for r in cur:
            d = dict(zip(names, r, strict=True))
            params = json.loads(d["params"])
            d["params"] = params
            out.append(d)
        return out
    finally:
        con.close()


def last_run(path: str | os.PathLike) -> dict[str, Any] | None:
    con = _connect_ro(path)
    try:
        cur = con.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1")
        r = cur.fetchone()
        if r is None:
            return None
        return dict(zip([d[0] for d in cur.description], r, strict=True))
    finally:
        con.close()


def _flat(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    axes: list[str] = []
    for r in rows:
        for k in r["params"]:
            if k not in axes:
                axes.append(k)
    skip = {"params"}
    cols = [c for c in (rows[0].keys() if rows else []) if c not in skip]
    header = [*axes, *(c for c in cols if c not in axes)]
    out = []
    for r in rows:
        p = r["params"]
        vals = [
            json.dumps(p[a]) if isinstance(p.get(a), (dict, list)) else p.get(a)
            for a in axes
        ]
        vals += [r[c] for c in cols if c not in axes]
        out.append(vals)
    return header, out


def _table(
    path: str | os.PathLike, table: str, run: int | None
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the points table (one column per grid axis, then every
    stored number) or of the layers table (the points' axes, then the layer row)."""
    if table not in ("points", "layers"):
        raise ValueError(f"table must be 'points' or 'layers', got {table!r}")
    rows = read_points(path, run=run)
    header, body = _flat(rows)
    if table == "points":
        return header, body
    axes: list[str] = []
    for r in rows:
        axes += [k for k in r["params"] if k not in axes]
    by_key = {r["key"]: r["params"] for r in rows}
    con = _connect_ro(path)
    try:
        cur = con.execute("SELECT * FROM layers ORDER BY key, engine, row")
        lnames = [d[0] for d in cur.description]
        body = []
        for lr in cur:
            p = by_key.get(lr[0])
            if p is not None:
                body.append([p.get(a) for a in axes] + list(lr))
    finally:
        con.close()
    # a grid axis named like a layer column (width) is the grid's: say so
    names = [f"grid.{a}" if a in lnames else a for a in axes]
    return [*names, *lnames], body


def export_csv(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    table: str = "points",
    run: int | None = None,
) -> str:
    """Write the ``points`` or ``layers`` table as CSV (one column per grid axis
    first); ``run`` keeps the points of that run's base.  Returns the output path."""
    header, body = _table(path, table, run)
    out = os.fspath(out)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(body)
    return out


def to_frame(path: str | os.PathLike, *, table: str = "points", run: int | None = None):
    """The points (or layers) table as a pandas DataFrame.

    Raises
    ------
    ImportError
        Without pandas, saying how to get it (:func:`export_csv` needs nothing).
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            "to_frame needs pandas (pip install pandas); export_csv works without it"
        ) from None
    header, body = _table(path, table, run)
    return pd.DataFrame(body, columns=header)


def export_parquet(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    table: str = "points",
    run: int | None = None,
) -> str:
    """Write a table as Parquet (needs pandas and pyarrow or fastparquet)."""
    df = to_frame(path, table=table, run=run)
    try:
        df.to_parquet(os.fspath(out))
    except ImportError as exc:
        raise ImportError(
            f"Parquet export needs pyarrow or fastparquet (pip install pyarrow): {exc}"
        ) from None
    return os.fspath(out)

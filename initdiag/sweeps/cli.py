"""``initdiag sweep`` and ``initdiag sweep-report``.

::

    initdiag sweep GRID.toml [--dask tcp://HOST:8786] [--workers N] [--db FILE]
                   [--no-resume] [--retry-failed] [--yes] [--max-points N]
                   [--seeds N] [--chunk N] [--no-analytic | --no-empirical]
                   [--csv FILE] [--parquet FILE] [-q]
    initdiag sweep-report FILE --x sigma_w2 [--y sigma_b2] [--metric NAME]
                   [--where KEY=VALUE ...] [--run ID] [--out DIR] [--csv FILE]

Bad input (a bad grid, a missing file, an unreachable scheduler) exits 2 with one
line before any work; Ctrl-C stops the sweep with every finished chunk saved (exit
130) and running the same command again resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["register", "cmd_sweep", "cmd_sweep_report"]


class _Bad(Exception):
    """Bad input: one line on stderr, exit code 2."""


def _bad(msg: str) -> Exception:
    return _Bad(msg)


def _one_line_errors(cmd):
    """Bad input -> one line on stderr and exit 2, handled here rather than by
    ``initdiag.cli``'s BadInput, which under ``python -m initdiag.cli`` is the class
    of ``__main__``, not of the ``initdiag.cli`` this module would import."""

    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except _Bad as exc:
            sys.stderr.write(f"initdiag {args.command}: error: {exc}\n")
            return 2

    run.__name__ = cmd.__name__
    run.__doc__ = cmd.__doc__
    return run


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def register(subparsers: Any) -> None:
    """Add ``sweep`` and ``sweep-report`` to the ``initdiag`` subcommands."""
    from .run import DEFAULT_MAX_POINTS

    s = subparsers.add_parser(
        "sweep",
        help="profile a grid of variants (local pool or Dask), results in SQLite",
        description="Analytic and empirical profiles of every point of a grid "
        "(GRID.toml: a [grid] table of parameter paths and values, a base network, "
        "optional [sweep] settings), on a local process pool or a Dask cluster. "
        "Each finished chunk is committed to the database at once; running again "
        "resumes.",
    )
    s.add_argument("grid", metavar="GRID.toml")
    s.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run on the Dask scheduler at ADDRESS (tcp://host:8786)",
    )
    s.add_argument(
        "--workers", type=_positive, help="local processes (default: one per CPU)"
    )
    s.add_argument(
        "--db", metavar="FILE", help="results database (default: GRID's name .sqlite)"
    )
    s.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="recompute every point, replacing stored results",
    )
    s.add_argument(
        "--retry-failed", action="store_true", help="rerun points stored as failed"
    )
    s.add_argument(
        "--yes",
        action="store_true",
        help="run a grid of more than --max-points points "
        f"(default {DEFAULT_MAX_POINTS})",
    )
    s.add_argument("--max-points", type=_positive, default=None)
    s.add_argument("--seeds", type=_positive, help="random networks per point")
    s.add_argument("--chunk", type=_positive, help="points per task (default: auto)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--no-analytic", dest="analytic", action="store_false", default=None)
    g.add_argument(
        "--no-empirical", dest="empirical", action="store_false", default=None
    )
    s.add_argument("--csv", metavar="FILE", help="also export the points as CSV")
    s.add_argument(
        "--parquet", metavar="FILE", help="also export as Parquet (pandas + pyarrow)"
    )
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_one_line_errors(cmd_sweep))

    r = subparsers.add_parser(
        "sweep-report",
        help="heatmaps and line plots of a sweep database",
        description="Heatmaps of METRIC over (--x, --y), analytic next to measured, "
        "and line plots over --x; one pair per combination of the other axes.",
    )
    r.add_argument("db", metavar="FILE")
    r.add_argument("--x", required=True, help="axis on x (e.g. sigma_w2)")
    r.add_argument("--y", help="axis on y (e.g. sigma_b2): also draw heatmaps")
    r.add_argument(
        "--metric", default="chi1", help="e.g. correlation_depth, q_last (default chi1)"
    )
    r.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix another axis (repeatable)",
    )
    r.add_argument("--run", type=_positive, help="the run's points (default: last)")
    r.add_argument("--out", metavar="DIR", default=None, help="default: FILE_report/")
    r.add_argument("--csv", metavar="FILE", help="also export the points as CSV")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=_one_line_errors(cmd_sweep_report))


def cmd_sweep(args: argparse.Namespace) -> int:
    from .grid import GridError, load_grid_file
    from .run import DEFAULT_MAX_POINTS, sweep

    try:
        spec = load_grid_file(args.grid)
    except GridError as exc:
        raise _bad(str(exc)) from None
    db = args.db or os.path.splitext(os.path.basename(args.grid))[0] + ".sqlite"
    max_points = args.max_points or spec.get("max_points", DEFAULT_MAX_POINTS)
    if args.yes:
        max_points = None
    kw: dict[str, Any] = {
        "seeds": args.seeds or spec.get("seeds"),
        "analytic": spec.get("analytic", True) if args.analytic is None else False,
        "empirical": spec.get("empirical", True) if args.empirical is None else False,
        "executor": "dask" if args.dask else "local",
        "address": args.dask,
        "workers": args.workers,
        "db": db,
        "resume": args.resume,
        "retry_failed": args.retry_failed,
        "progress": not args.quiet,
        "chunk": args.chunk or spec.get("chunk"),
        "max_points": max_points,
    }
    try:
        res = sweep(spec["base"], spec["grid"], **kw)
    except KeyboardInterrupt:
        _interrupted(db, args.quiet)
        return 130
    except ImportError as exc:
        raise _bad(f"--dask: {exc}" if args.dask else str(exc)) from None
    except (ValueError, TypeError) as exc:
        # GridError, ConfigError, a bad database, an unreachable scheduler: all
        # raised before any work starts
        raise _bad(f"{args.grid}: {exc}") from None
    except RuntimeError as exc:
        # the executor could not run a chunk (e.g. workers with another initdiag);
        # what finished is saved
        sys.stderr.write(f"initdiag sweep: {exc}; finished points are in {db}\n")
        return 1
    sys.stdout.write(str(res) + "\n")
    _exports(args, db, res.run)
    return 0


def _interrupted(db: str, quiet: bool) -> None:
    from .store import read_points

    try:
        n = len(read_points(db))
    except (ValueError, OSError):
        n = 0
    sys.stderr.write(
        f"initdiag sweep: interrupted; {n} points saved in {db}; run the same "
        "command again to resume\n"
    )


def _exports(args: argparse.Namespace, db: str, run: int | None) -> None:
    from .store import export_csv, export_parquet

    files = []
    if getattr(args, "csv", None):
        files.append(export_csv(db, args.csv, run=run))
    if getattr(args, "parquet", None):
        try:
            files.append(export_parquet(db, args.parquet, run=run))
        except ImportError as exc:
            raise _bad(f"--parquet: {exc}") from None
    if files:
        sys.stdout.write("wrote " + ", ".join(files) + "\n")


def _parse_where(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise _bad(f"--where expects KEY=VALUE (e.g. depth=20), got {it!r}")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from .report import sweep_report

    where = _parse_where(args.where)
    out = args.out or os.path.splitext(os.path.basename(args.db))[0] + "_report"
    try:
        paths = sweep_report(
            args.db,
            x=args.x,
            y=args.y,
            metric=args.metric,
            where=where,
            run=args.run,
            out=out,
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None
    except OSError as exc:
        raise _bad(f"--out {out}: {exc.strerror or exc}") from None
    _exports(args, args.db, args.run)
    sys.stdout.write("wrote " + ", ".join(paths) + "\n")
    return 0

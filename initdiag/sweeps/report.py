"""Pictures of a sweep database: heatmaps over two axes and line plots over one.

The heatmap puts the analytic prediction and the measurement side by side (the
phase diagram of theory next to the one measured from points); over
``(sigma_w2, sigma_b2)`` both panels carry the edge of chaos (chi1 = 1) from
:func:`initdiag.meanfield.critical_sigma_w2`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .store import MEASURED_COLUMNS, SUMMARY_COLUMNS, last_run, read_points

__all__ = ["METRICS", "select", "sweep_report"]

#: metrics a report can show (each stored as a_<metric> and e_<metric>)
METRICS = SUMMARY_COLUMNS
_REGIME = {"ordered": -1.0, "critical": 0.0, "chaotic": 1.0}
_ENGINES = {"analytic": "a_", "empirical": "e_"}
#: more figures than this need --where to pick a slice
MAX_FIGURES = 12


def _value(row: Mapping[str, Any], col: str) -> float:
    v = row.get(col)
    if col.endswith("regime"):
        return _REGIME.get(v, math.nan)
    return math.nan if v is None else float(v)


def select(
    db: str | os.PathLike,
    *,
    x: str,
    y: str | None = None,
    metric: str = "chi1",
    where: Mapping[str, Any] | None = None,
    run: int | None = None,
) -> dict[str, Any]:
    """The finished points of a database arranged for plotting.

    Parameters
    ----------
    db : path
    x, y : str
        Grid axes (parameter paths of the sweep); ``y`` optional.
    metric : str
        One of :data:`METRICS`.
    where : mapping, optional
        Fix other axes (``{"depth": 20}``).
    run : int, optional
        Points of that run's base (default: the last run's).

    Returns
    -------
    dict
        ``x_values``, ``y_values`` (sorted), ``groups``: a list of
        ``(fixed, {engine: (values, se)})`` with ``values`` of shape
        (len(y_values), len(x_values)) (one row when ``y`` is None) and ``fixed``
        the values of the remaining axes of that group.

    Raises
    ------
    ValueError
        An unknown axis or metric (the valid ones are listed), or no points.
    """
    import numpy as np

    if metric not in METRICS:
        raise ValueError(
            f"--metric {metric!r} is not stored; valid: {', '.join(METRICS)}"
        )
    if run is None:
        lr = last_run(db)
        if lr is None:
            raise ValueError(f"{db}: no sweep has run into this database")
        run = int(lr["id"])
    rows = read_points(db, run=run, status="done")
    if not rows:
        raise ValueError(f"{db}: no finished points for run {run}")
    axes: list[str] = []
    for r in rows:
        axes += [k for k in r["params"] if k not in axes]
    for name, ax in (("--x", x), ("--y", y)):
        if ax is not None and ax not in axes:
            raise ValueError(
                f"{name} {ax!r} is not an axis of this sweep; axes: {', '.join(axes)}"
            )
    if y is not None and y == x:
        raise ValueError(f"--x and --y are both {x!r}; pick two different axes")
    where = dict(where or {})
    for k in where:
        if k not in axes:
            raise ValueError(
                f"--where {k!r} is not an axis of this sweep; axes: {', '.join(axes)}"
            )

    def matches(r: Mapping[str, Any]) -> bool:
        return all(_same(r["params"].get(k), v) for k, v in where.items())

    rows = [r for r in rows if matches(r) and x in r["params"]]
    if y is not None:
        rows = [r for r in rows if y in r["params"]]
    if not rows:
        raise ValueError(f"no finished points match --where {where}")
    rest = [a for a in axes if a not in (x, y) and a not in where]
    key = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731 - a sort/group key
    xs = sorted({key(r["params"][x]) for r in rows}, key=lambda s: _order(s))
    ys = (
        sorted({key(r["params"][y]) for r in rows}, key=lambda s: _order(s))
        if y
        else ["null"]
    )
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        fixed = {a: r["params"].get(a) for a in rest}
        groups.setdefault(key(fixed), []).append(r)
    if len(groups) > MAX_FIGURES:
        raise ValueError(
            f"{len(groups)} combinations of the other axes ({', '.join(rest)}); fix "
            f"some with --where KEY=VALUE (at most {MAX_FIGURES} figures)"
        )
    out_groups = []
    for gk, grows in groups.items():
        engines: dict[str, tuple[Any, Any]] = {}
        for engine, prefix in _ENGINES.items():
            if engine == "empirical" and metric not in MEASURED_COLUMNS:
                continue
            vals = np.full((len(ys), len(xs)), np.nan)
            ses = np.full((len(ys), len(xs)), np.nan)
            seen = False
            for r in grows:
                if engine not in (r.get("engines") or "").split(","):
                    continue
                i = ys.index(key(r["params"][y])) if y else 0
                j = xs.index(key(r["params"][x]))
                vals[i, j] = _value(r, prefix + metric)
                if prefix == "e_" and f"e_{metric}_se" in r:
                    ses[i, j] = _value(r, f"e_{metric}_se")
                seen = True
            if seen:
                engines[engine] = (vals, ses)
        out_groups.append((json.loads(gk), engines))
    return {
        "x": x,
        "y": y,
        "metric": metric,
        "run": run,
        "x_values": [json.loads(s) for s in xs],
        "y_values": [json.loads(s) for s in ys] if y else [],
        "groups": out_groups,
        "n_points": len(rows),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def _order(s: str) -> tuple[int, Any]:
    v = json.loads(s)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v))
    return (1, s)


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _critical(sel: Mapping[str, Any], fixed: Mapping[str, Any], base_act: str | None):
    """The edge of chaos over the y axis when the axes are (sigma_w2, sigma_b2)."""
    import warnings

    import numpy as np

    if (sel["x"], sel["y"]) != ("sigma_w2", "sigma_b2"):
        return None
    act = fixed.get("activation", base_act)
    if not isinstance(act, str):
        return None
    from .. import meanfield

    b = np.asarray(sel["y_values"], dtype=float)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            w = np.asarray(meanfield.critical_sigma_w2(act, b), dtype=float)
    except (ValueError, NotImplementedError, ArithmeticError):
        return None
    return w, b


def _base_activation(db: str | os.PathLike, run: int) -> str | None:
    from ..network import Network
    from ..verdicts import network_parameters
    from .store import _connect_ro

    con = _connect_ro(db)
    try:
        row = con.execute("SELECT base FROM runs WHERE id = ?", (run,)).fetchone()
    finally:
        con.close()
    try:
        return network_parameters(Network.from_dict(json.loads(row[0])))["activation"]
    except (TypeError, ValueError, KeyError):
        return None


def _label(fixed: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fixed.items())


def _slug(fixed: Mapping[str, Any]) -> str:
    if not fixed:
        return ""
    s = "_".join(f"{k}-{v}" for k, v in fixed.items())
    return "_" + "".join(c if c.isalnum() or c in "-_." else "-" for c in s)[:80]


def _heatmap(sel, fixed, engines, crit, title):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    xs, ys = sel["x_values"], sel["y_values"]
    num_x, num_y = _numeric(xs), _numeric(ys)
    xv = np.asarray(xs, dtype=float) if num_x else np.arange(len(xs))
    yv = np.asarray(ys, dtype=float) if num_y else np.arange(len(ys))
    names = list(engines)
    fig, axs = plt.subplots(
        1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False, sharey=True
    )
    allv = np.concatenate([engines[n][0].ravel() for n in names])
    fin = allv[np.isfinite(allv)]
    vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    for ax, name in zip(axs[0], names, strict=True):
        v = engines[name][0]
        mesh = ax.pcolormesh(
            xv, yv, np.ma.masked_invalid(v), shading="auto", vmin=vmin, vmax=vmax
        )
        if crit is not None:
            cw, cb = crit
            ok = np.isfinite(cw)
            if ok.sum() >= 2:
                ax.plot(cw[ok], cb[ok], "k-", lw=2, label="edge of chaos (chi1 = 1)")
                ax.set_xlim(float(xv.min()), float(xv.max()))
                ax.legend(fontsize=8, loc="upper left")
        ax.set_title(f"{name}: {sel['metric']}", fontsize=10)
        ax.set_xlabel(sel["x"])
        if not num_x:
            ax.set_xticks(xv, [str(s) for s in xs], rotation=30)
        if not num_y:
            ax.set_yticks(yv, [str(s) for s in ys])
        fig.colorbar(mesh, ax=ax)
    axs[0][0].set_ylabel(sel["y"])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _lines(sel, fixed, engines, title):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    xs = sel["x_values"]
    num_x = _numeric(xs)
    xv = np.asarray(xs, dtype=float) if num_x else np.arange(len(xs))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ys = sel["y_values"] or [None]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, yval in enumerate(ys):
        c = colors[i % len(colors)]
        lab = "" if yval is None else f"{sel['y']}={yval}"
        if "analytic" in engines:
            ax.plot(
                xv,
                engines["analytic"][0][i],
                "--",
                color=c,
                marker="o",
                ms=3,
                label=f"analytic {lab}".strip(),
            )
        if "empirical" in engines:
            v, se = engines["empirical"]
            ax.errorbar(
                xv,
                v[i],
                yerr=np.where(np.isfinite(se[i]), se[i], 0.0),
                fmt="-",
                color=c,
                marker="s",
                ms=3,
                capsize=2,
                label=f"measured {lab}".strip(),
            )
    ax.set_xlabel(sel["x"])
    ax.set_ylabel(sel["metric"])
    if not num_x:
        ax.set_xticks(xv, [str(s) for s in xs], rotation=30)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def sweep_report(
    db: str | os.PathLike,
    *,
    x: str,
    y: str | None = None,
    metric: str = "chi1",
    where: Mapping[str, Any] | None = None,
    run: int | None = None,
    out: str | os.PathLike = ".",
) -> list[str]:
    """Write heatmaps (with ``y``) and line plots of ``metric`` over the sweep's
    axes; one pair per combination of the other axes.  Returns the paths.

    See :func:`select` for the arguments and errors.
    """
    import matplotlib.pyplot as plt

    sel = select(db, x=x, y=y, metric=metric, where=where, run=run)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    act = _base_activation(db, sel["run"])
    paths = []
    for fixed, engines in sel["groups"]:
        if not engines:
            continue
        title = f"{metric}" + (f" ({_label(fixed)})" if fixed else "")
        stem = f"{metric}_{x}" + (f"_{y}" if y else "") + _slug(fixed)
        if y is not None:
            fig = _heatmap(sel, fixed, engines, _critical(sel, fixed, act), title)
            p = os.path.join(out, f"{stem}_heatmap.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
        fig = _lines(sel, fixed, engines, title)
        p = os.path.join(out, f"{stem}_lines.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths

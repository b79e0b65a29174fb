"""The result type of both engines: :class:`Profile`, and :func:`compare`.

A Profile has one row per layer output of the network (rows follow
``network.infos``: ``dense1, relu1, dense2, ...``; there is no row for the input) and
a summary.  ``analyze`` fills it from theory, ``simulate`` from Monte Carlo, in which
case every column ``c`` has a twin ``c_se``: the standard error over seeds.

Column definitions (``h`` is the output of the row's layer for a batch of ``B``
inputs, ``B x N``; an expectation ``E`` is over random networks and inputs):

========================  ==============================================================
``index``                 position of the layer in ``network.layers``
``name``                  ``dense3``, ``bn3``, ``relu3``, ... (see network.py)
``kind``                  ``dense``, ``batchnorm`` or ``activation``
``block``                 number of the dense layer the row belongs to (1-based)
``width``                 units N
``mean``                  E[h] over units and examples
``second_moment``         q = E[h^2]
``variance``              average over units of the per-unit (biased) variance over the
                          batch: mean_j Var_b h[b, j]
``squared_mean``          average over units of the squared per-unit batch mean:
                          mean_j (mean_b h[b, j])^2.  (second_moment = variance +
                          squared_mean for every batch.)
``correlation``           mean uncentered cosine similarity <h_a, h_b>/(|h_a||h_b|)
                          between the output vectors of distinct inputs a != b
``active_fraction``       fraction of entries h > 0
``dead_fraction``         fraction of units j with h[b, j] <= 0 for every b of the batch
                          (for a ReLU row: units that are 0 for the whole batch; for a
                          dense row: units whose pre-activation is negative for the
                          whole batch, i.e. the units the next ReLU kills)
``grad_second_moment``    E[g^2], g = dL/dh, for the loss L = sum_b <g_out[b], y[b]>
                          whose gradient w.r.t. the network output y is ``g_out``
                          (standard Gaussian by default); normalised by the output
                          gradient's second moment, so the last row is 1
``weight_grad_norm2``     ||dL/dW||_F^2 / (B E[g_out^2]) for a dense row, NaN otherwise.
                          With independent examples this is E = fan_out * fan_in *
                          q~ * E[x^2]  (q~ = the row's grad_second_moment, x = the
                          layer's input)
``bias_grad_norm2``       ||dL/db||^2 / (B E[g_out^2]) (dense rows with a bias)
``gamma_grad_norm2``      ||dL/dgamma||^2 / (B E[g_out^2]) (batchnorm rows)
``beta_grad_norm2``       ||dL/dbeta||^2 / (B E[g_out^2]) (batchnorm rows)
========================  ==============================================================

Columns that do not apply to a row are NaN.  Summary keys (``Profile.summary``):

- ``chi1``: the order/chaos parameter sigma_w2 E[phi'(h)^2] at the fixed point
  (Poole et al. 2016), for the network's dominant activation;
- ``regime``: ``"ordered"`` (chi1 < 1 - tol), ``"critical"``, ``"chaotic"``;
- ``q_star``, ``c_star``, ``xi_q``, ``xi_c``: fixed points and depth scales
  (Schoenholz et al. 2017); NaN / inf where they do not exist;
- ``correlation_depth``: the ``block`` of the first row whose correlation >= 0.99
  (``None`` if none);
- ``gradient_ratio``: grad_second_moment of the first dense row over that of the last
  dense row (like for like: 1 for a network on the edge of chaos).

``findings`` is a list of dicts for numerical events (``{"kind": "overflow", "layer":
name, "index": i, "block": k, "pass": "forward" | "backward", "seed": s or None,
"message": "the signal overflowed at layer 37 (dense37)"}``); ``kernels`` an optional
list (one per row) of B x B second-moment matrices (analytic NNGP); ``extra`` a dict
for anything else (e.g. Jacobian spectrum: ``extra["jacobian"]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Profile",
    "Comparison",
    "compare",
    "ID_COLUMNS",
    "STAT_COLUMNS",
    "SUMMARY_KEYS",
    "CORRELATION_THRESHOLD",
]

ID_COLUMNS = ("index", "name", "kind", "block", "width")
STAT_COLUMNS = (
    "mean",
    "second_moment",
    "variance",
    "squared_mean",
    "correlation",
    "active_fraction",
    "dead_fraction",
    "grad_second_moment",
    "weight_grad_norm2",
    "bias_grad_norm2",
    "gamma_grad_norm2",
    "beta_grad_norm2",
)
SUMMARY_KEYS = (
    "chi1",
    "regime",
    "q_star",
    "c_star",
    "xi_q",
    "xi_c",
    "correlation_depth",
    "gradient_ratio",
)
#: correlation at which two unrelated inputs count as "collapsed" onto each other
CORRELATION_THRESHOLD = 0.99


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _from_json_number(v: Any) -> float:
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return float(v)


@dataclass
class Profile:
    """Per-layer statistics of a network at initialisation, and a summary.

    Parameters
    ----------
    rows : sequence of LayerInfo-like
        Objects with ``index, name, kind, block, width`` (``network.infos``).
    columns : mapping column -> array (n_rows,)
        Statistics; missing ones are NaN.  Empirical profiles add ``<col>_se``.
    summary : dict
        See the module docstring.
    source : {"analytic", "empirical"}
    network : Network, optional
    meta : dict
        How the profile was made (batch size, seeds, backend, dtype, timings...).
    """

    index: np.ndarray
    name: list[str]
    kind: list[str]
    block: np.ndarray
    width: np.ndarray
    columns: dict[str, np.ndarray]
    summary: dict[str, Any] = field(default_factory=dict)
    source: str = "analytic"
    network: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[np.ndarray] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------
    @classmethod
    def empty(cls, network: Any, source: str, *, with_se: bool = False) -> Profile:
        """A profile with one all-NaN row per layer of ``network``."""
        infos = network.infos
        n = len(infos)
        cols = {c: np.full(n, np.nan) for c in STAT_COLUMNS}
        if with_se:
            cols.update({f"{c}_se": np.full(n, np.nan) for c in STAT_COLUMNS})
        return cls(
            index=np.array([i.index for i in infos], dtype=np.int64),
            name=[i.name for i in infos],
            kind=[i.kind for i in infos],
            block=np.array([i.block for i in infos], dtype=np.int64),
            width=np.array([i.width for i in infos], dtype=np.int64),
            columns=cols,
            source=source,
            network=network,
        )

    def __post_init__(self) -> None:
        n = len(self.name)
        for k, v in list(self.columns.items()):
            arr = np.asarray(v, dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"column {k!r} has shape {arr.shape}, expected ({n},)")
            self.columns[k] = arr
        for c in STAT_COLUMNS:
            self.columns.setdefault(c, np.full(n, np.nan))

    # -- access -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.name)

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self.columns:
            return self.columns[key]
        if key in ("index", "block", "width"):
            return getattr(self, key)
        if key in ("name", "kind"):
            return np.array(getattr(self, key), dtype=object)
        raise KeyError(
            f"no column {key!r}; columns: {', '.join((*ID_COLUMNS, *self.columns))}"
        )

    def __contains__(self, key: str) -> bool:
        return key in self.columns or key in ID_COLUMNS

    @property
    def is_empirical(self) -> bool:
        return self.source == "empirical"

    def se(self, column: str) -> np.ndarray | None:
        """Standard error of ``column`` (None for an analytic profile)."""
        return self.columns.get(f"{column}_se")

    def rows_of(self, kind: str) -> np.ndarray:
        """Row positions of layers of a kind (``dense``, ``batchnorm``,
        ``activation``) or with a name prefix (``relu``)."""
        return np.array(
            [
                i
                for i, (k, n) in enumerate(zip(self.kind, self.name, strict=False))
                if k == kind or n.rstrip("0123456789_").startswith(kind)
            ],
            dtype=np.int64,
        )

    def row(self, i: int) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": int(self.index[i]),
            "name": self.name[i],
            "kind": self.kind[i],
            "block": int(self.block[i]),
            "width": int(self.width[i]),
        }
        for k, v in self.columns.items():
            d[k] = float(v[i])
        return d

    def records(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(len(self))]

    @property
    def label(self) -> str:
        net = getattr(self.network, "name", None)
        return f"{net} ({self.source})" if net else self.source

    # -- summary helpers shared by the engines ------------------------------------
    def correlation_depth(self, threshold: float = CORRELATION_THRESHOLD) -> int | None:
        """Block of the first row whose correlation reaches ``threshold``."""
        c = self.columns["correlation"]
        hit = np.flatnonzero(np.nan_to_num(c, nan=-np.inf) >= threshold)
        return int(self.block[hit[0]]) if hit.size else None

    def gradient_ratio(self, rows: Sequence[int] | None = None) -> float:
        """Gradient second moment at the first row over that at the last row of
        ``rows`` (their finite entries): how much the gradient grows from the output
        back to the input.  By default the dense rows, like for like (rows of one
        kind, so a ReLU's factor 1/2 between its output and its input does not
        count); networks without two dense layers use the first and the last row.
        With explicit ``rows``, fewer than two finite entries give NaN."""
        g = self.columns["grad_second_moment"]
        need = 2
        if rows is None:
            need = 1
            dense = self.rows_of("dense")
            if dense.size >= 2:
                g = g[dense]
        else:
            g = g[np.asarray(rows, dtype=np.int64)]
        ok = np.flatnonzero(np.isfinite(g))
        if ok.size < need:
            return math.nan
        first, last = float(g[ok[0]]), float(g[ok[-1]])
        if last == 0:
            return math.inf if first > 0 else math.nan
        return first / last

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "network": self.network.to_dict()
            if hasattr(self.network, "to_dict")
            else None,
            "rows": {
                "index": self.index.tolist(),
                "name": list(self.name),
                "kind": list(self.kind),
                "block": self.block.tolist(),
                "width": self.width.tolist(),
            },
            "columns": {k: v for k, v in self.columns.items()},
            "summary": dict(self.summary),
            "meta": dict(self.meta),
            "findings": list(self.findings),
            "extra": dict(self.extra),
        }
        if self.kernels is not None:
            d["kernels"] = [None if k is None else np.asarray(k) for k in self.kernels]
        return _jsonable(d)

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        """JSON text (NaN -> null, inf -> "inf"); written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=kwargs.pop("indent", 1), **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        from .network import Network

        rows = d["rows"]
        net = d.get("network")
        p = cls(
            index=np.asarray(rows["index"], dtype=np.int64),
            name=list(rows["name"]),
            kind=list(rows["kind"]),
            block=np.asarray(rows["block"], dtype=np.int64),
            width=np.asarray(rows["width"], dtype=np.int64),
            columns={
                k: np.array([_from_json_number(x) for x in v], dtype=np.float64)
                for k, v in d["columns"].items()
            },
            summary={k: _summary_value(k, v) for k, v in d.get("summary", {}).items()},
            source=d.get("source", "analytic"),
            network=Network.from_dict(net) if net else None,
            meta=dict(d.get("meta", {})),
            findings=list(d.get("findings", [])),
            extra=dict(d.get("extra", {})),
        )
        if d.get("kernels") is not None:
            p.kernels = [
                None if k is None else np.asarray(k, dtype=float) for k in d["kernels"]
            ]
        return p

    @classmethod
    def from_json(cls, text_or_path: str) -> Profile:
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as fh:
                text = fh.read()
        return cls.from_dict(json.loads(text))

    def to_frame(self):
        """A pandas DataFrame, one row per layer (needs pandas: ``pip install
        'initdiag[frames]'``)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "to_frame() needs pandas: pip install 'initdiag[frames]' (or pip "
                "install pandas)"
            ) from exc
        data = {c: self[c] for c in ID_COLUMNS}
        data.update(self.columns)
        return pd.DataFrame(data)

    def to_csv(self, path: str | None = None) -> str:
        cols = [*ID_COLUMNS, *self.columns]
        lines = [",".join(cols)]
        for i in range(len(self)):
            r = self.row(i)
            lines.append(",".join(_csv_cell(r[c]) for c in cols))
        text = "\n".join(lines) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    def table(self, columns: Sequence[str] | None = None, max_rows: int = 24) -> str:
        """A plain-text table of some columns (middle rows elided when long)."""
        cols = list(
            columns
            or (
                "second_moment",
                "mean",
                "correlation",
                "dead_fraction",
                "grad_second_moment",
            )
        )
        rows = _elide(len(self), max_rows)
        head = ["layer"] + cols
        body = []
        for i in rows:
            if i is None:
                body.append(["..."] + [""] * len(cols))
                continue
            cells = [self.name[i]]
            for c in cols:
                v = self.columns[c][i]
                se = self.columns.get(f"{c}_se")
                s = _fmt(v)
                if se is not None and np.isfinite(se[i]):
                    s += f" +- {_fmt(se[i])}"
                cells.append(s)
            body.append(cells)
        widths = [max(len(r[k]) for r in [head, *body]) for k in range(len(head))]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False))]
        out += [
            "  ".join(
                c.rjust(w) if k else c.ljust(w)
                for k, (c, w) in enumerate(zip(r, widths, strict=False))
            )
            for r in body
        ]
        return "\n".join(out)

    def __str__(self) -> str:
        return f"Profile[{self.label}, {len(self)} rows]\n{self.table()}"

    def plot(
        self,
        *others: Profile,
        ax: Any = None,
        columns: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        """Plot this profile (and ``others``, overlaid), one panel per column; see
        :func:`initdiag.report.plots.plot_profiles` for the keywords.

        Returns the :class:`matplotlib.figure.Figure`.  A new figure is made through
        ``matplotlib.pyplot``, so in a script ``matplotlib.pyplot.show()`` opens it
        and in Jupyter it is displayed; ``fig.savefig("profile.png")`` writes it.
        """
        from .report.plots import plot_profiles

        kwargs.setdefault("pyplot", ax is None)
        return plot_profiles([self, *others], ax=ax, columns=columns, **kwargs)


def _summary_value(key: str, v: Any) -> Any:
    if key == "correlation_depth":
        return None if v is None else int(v)
    if v is None or v in ("inf", "-inf"):
        return _from_json_number(v)
    return v


def _csv_cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    s = str(v)
    return f'"{s}"' if "," in s else s


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}"


def _elide(n: int, max_rows: int) -> list[int | None]:
    if n <= max_rows:
        return list(range(n))
    head = max_rows // 2
    tail = max_rows - head - 1
    return [*range(head), None, *range(n - tail, n)]


# -- comparison -----------------------------------------------------------------------


@dataclass
class Comparison:
    """Per-layer deviation between two profiles of the same network layout.

    ``diff[c] = b[c] - a[c]``; ``z[c] = diff / sqrt(se_a^2 + se_b^2)`` where either
    profile carries standard errors (NaN otherwise); ``rel[c] = diff / |a[c]|``.
    """

    a: Profile
    b: Profile
    names: list[str]
    diff: dict[str, np.ndarray]
    z: dict[str, np.ndarray]
    rel: dict[str, np.ndarray]

    def max_abs_z(self, columns: Iterable[str] | None = None) -> float:
        cols = list(columns or self.z)
        vals = [
            np.nanmax(np.abs(self.z[c])) for c in cols if np.any(np.isfinite(self.z[c]))
        ]
        return float(max(vals)) if vals else math.nan

    def worst(self, column: str) -> tuple[str, float]:
        """The layer with the largest |z| (or |rel| without errors) in a column."""
        z = self.z[column]
        v = z if np.any(np.isfinite(z)) else self.rel[column]
        if not np.any(np.isfinite(v)):
            return "", math.nan
        i = int(np.nanargmax(np.abs(v)))
        return self.names[i], float(v[i])

    def table(
        self,
        columns: Sequence[str] = ("second_moment", "correlation", "grad_second_moment"),
        max_rows: int = 24,
    ) -> str:
        head = ["layer"]
        for c in columns:
            head += [f"{c}[{_short(self.a)}]", f"{c}[{_short(self.b)}]", "z"]
        body = []
        for i in _elide(len(self.names), max_rows):
            if i is None:
                body.append(["..."] + [""] * (len(head) - 1))
                continue
            cells = [self.names[i]]
            for c in columns:
                cells += [
                    _fmt(self.a.columns[c][i]),
                    _fmt(self.b.columns[c][i]),
                    _fmt(self.z[c][i]) if np.isfinite(self.z[c][i]) else "-",
                ]
            body.append(cells)
        widths = [max(len(r[k]) for r in [head, *body]) for k in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False))
            for r in [head, *body]
        )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {"layers": self.names, "diff": self.diff, "z": self.z, "rel": self.rel}
        )

    def __str__(self) -> str:
        return self.table()


def _short(p: Profile) -> str:
    return "emp" if p.is_empirical else "ana"


def compare(a: Profile, b: Profile, columns: Iterable[str] | None = None) -> Comparison:
    """Per-layer deviation between two profiles (e.g. ``analyze`` vs ``simulate``).

    Parameters
    ----------
    a, b : Profile
        Profiles with the same rows (same layer names).
    columns : iterable of str, optional
        Statistic columns to compare (default: all of STAT_COLUMNS).

    Returns
    -------
    Comparison
        ``diff`` (b - a), ``z`` (diff in standard errors, when either profile is
        empirical) and ``rel`` (diff relative to |a|).

    Raises
    ------
    ValueError
        When the profiles do not have the same layers.
    """
    if not isinstance(a, Profile) or not isinstance(b, Profile):
        raise TypeError(
            f"compare() takes two Profiles, got {type(a).__name__} and "
            f"{type(b).__name__}"
        )
    if list(a.name) != list(b.name):
        raise ValueError(
            f"profiles have different layers ({len(a)} rows: {a.name[:3]}... vs "
            f"{len(b)} rows: {b.name[:3]}...); compare profiles of the same network"
        )
    cols = list(columns or STAT_COLUMNS)
    diff, z, rel = {}, {}, {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in cols:
            va, vb = a.columns[c], b.columns[c]
            d = vb - va
            diff[c] = d
            sa = a.se(c)
            sb = b.se(c)
            if sa is None and sb is None:
                z[c] = np.full(len(a), np.nan)
            else:
                var = np.zeros(len(a))
                if sa is not None:
                    var = var + np.nan_to_num(sa) ** 2
                if sb is not None:
                    var = var + np.nan_to_num(sb) ** 2
                zz = d / np.sqrt(var)
                zz[(var == 0) & (d == 0)] = 0.0
                z[c] = zz
            rel[c] = d / np.abs(va)
    return Comparison(a, b, list(a.name), diff, z, rel)

"""Plots of profiles (matplotlib, no display needed).

Figures are built with :class:`matplotlib.figure.Figure` directly, never through
``pyplot``, so nothing here selects a backend or opens a window; ``savefig`` renders
through Agg.  Analytic profiles are drawn as lines, empirical ones as points with
error bars (one standard error), one colour per network.

Each statistic is plotted against the block (dense-layer number) on the rows where
it means something: forward and gradient second moments on the pre-activations (the
rows that feed an activation), dead fractions on the activations, weight / bias
gradient norms on the dense rows and gamma / beta gradient norms on BatchNorm rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..profile import Profile

__all__ = [
    "COLUMN_ROWS",
    "plot_profiles",
    "signal_plot",
    "gradient_plot",
    "dead_plot",
    "jacobian_plot",
    "phase_plot",
    "save_figure",
    "write_plots",
]

#: which rows each column is drawn on
COLUMN_ROWS: dict[str, str] = {
    "mean": "signal",
    "second_moment": "signal",
    "variance": "signal",
    "squared_mean": "signal",
    "correlation": "signal",
    "grad_second_moment": "signal",
    "active_fraction": "activation",
    "dead_fraction": "activation",
    "weight_grad_norm2": "dense",
    "bias_grad_norm2": "dense",
    "gamma_grad_norm2": "batchnorm",
    "beta_grad_norm2": "batchnorm",
}

_LABELS = {
    "mean": "mean of the pre-activation",
    "second_moment": "second moment q",
    "variance": "per-unit variance",
    "squared_mean": "per-unit squared mean",
    "correlation": "correlation of unrelated inputs",
    "grad_second_moment": "gradient second moment",
    "active_fraction": "active fraction",
    "dead_fraction": "dead-unit fraction",
    "weight_grad_norm2": "||dL/dW||^2",
    "bias_grad_norm2": "||dL/db||^2",
    "gamma_grad_norm2": "||dL/dgamma||^2",
    "beta_grad_norm2": "||dL/dbeta||^2",
}

_LOG_COLUMNS = {
    "weight_grad_norm2",
    "bias_grad_norm2",
    "gamma_grad_norm2",
    "beta_grad_norm2",
    "grad_second_moment",
}


def _rows(profile: Profile, which: str) -> np.ndarray:
    from .study import signal_rows

    if which == "signal":
        return signal_rows(profile)
    rows = np.asarray(
        [i for i, k in enumerate(profile.kind) if k == which], dtype=np.int64
    )
    return rows if rows.size else signal_rows(profile)


def _colors(profiles: Sequence[Profile]) -> dict[str, Any]:
    from matplotlib import colormaps

    names: list[str] = []
    for p in profiles:
        n = _net_name(p)
        if n not in names:
            names.append(n)
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(k % cmap.N) for k, n in enumerate(names)}


def _net_name(p: Profile) -> str:
    return str(getattr(p.network, "name", None) or "network")


_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X", "p", "h")
_MARK_COLORS = ("gold", "white", "tab:pink", "tab:cyan", "tab:orange", "lime")


def _new_figure(
    n_panels: int, width: float = 4.6, height: float = 3.6, pyplot: bool = False
):
    size = (width * n_panels, height)
    if pyplot:  # interactive use: plt.show() and Jupyter know the figure
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size, layout="constrained")
    else:
        from matplotlib.figure import Figure

        fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _draw(
    ax: Any,
    profiles: Sequence[Profile],
    column: str,
    colors: Mapping[str, Any],
    *,
    log: bool | None = None,
) -> int:
    """Draw one column of every profile on ``ax``; returns how many artists."""
    drawn = 0
    any_pos, span = True, 1.0
    for p in profiles:
        rows = _rows(p, COLUMN_ROWS.get(column, "signal"))
        if rows.size == 0:
            continue
        y = p.columns[column][rows]
        x = p.block[rows]
        ok = np.isfinite(y)
        if log or (log is None and column in _LOG_COLUMNS):
            # an exact zero (e.g. a bias cancelled by BatchNorm) has no place on a
            # log axis
            ok &= y > 0
        if not ok.any():
            continue
        x, y = x[ok], y[ok]
        name = _net_name(p)
        color = colors[name]
        if p.is_empirical:
            se = p.se(column)
            err = se[rows][ok] if se is not None else None
            if err is not None:
                err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(
                x,
                y,
                yerr=err,
                fmt="o",
                ms=3.5,
                color=color,
                capsize=2,
                elinewidth=1,
                label=f"{name} (measured)",
            )
        else:
            ax.plot(x, y, "-", color=color, lw=1.6, label=f"{name} (theory)")
        drawn += 1
        pos = y[y > 0]
        any_pos &= bool(pos.size == y.size)
        if pos.size:
            span = max(span, float(pos.max() / pos.min()))
    if log is None:
        log = column in _LOG_COLUMNS or (column == "second_moment" and span > 100)
    if log and any_pos and drawn:
        ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_title(_LABELS.get(column, column), fontsize=10)
    ax.grid(alpha=0.3)
    return drawn


def _legend(
    fig: Any,
    axes: Sequence[Any],
    colors: Mapping[str, Any],
    profiles: Sequence[Profile],
    inside: bool,
) -> None:
    """One entry per network (its colour) and one per engine (line / points)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2) for c in colors.values()]
    labels = list(colors)
    if any(not p.is_empirical for p in profiles):
        handles.append(Line2D([], [], color="k", lw=1.6))
        labels.append("theory (line)")
    if any(p.is_empirical for p in profiles):
        handles.append(Line2D([], [], color="k", marker="o", ms=3.5, ls="none"))
        labels.append("measured +- s.e. (points)")
    if inside:
        axes[0].legend(handles, labels, fontsize=7, loc="best")
    else:
        fig.legend(handles, labels, fontsize=7, loc="outside right upper")


def plot_profiles(
    profiles: Sequence[Profile] | Profile,
    ax: Any = None,
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    legend: bool = True,
    log: bool | None = None,
    pyplot: bool = False,
) -> Any:
    """Overlay profiles: analytic ones as lines, empirical ones as points with error
    bars, one panel per column.

    Parameters
    ----------
    profiles : Profile or sequence of Profile
    ax : Axes or sequence of Axes, optional
        Where to draw (one per column); a new Figure otherwise.
    columns : sequence of str
        Profile columns (default: second moment, mean, correlation).
    title : str, optional
    legend : bool
    log : bool, optional
        Force the y scale (default: log for gradient norms and for second moments
        spanning more than two decades).
    pyplot : bool
        Create the new Figure through ``matplotlib.pyplot`` (so that
        ``plt.show()`` opens it and Jupyter displays it); by default a bare
        Figure, which selects no backend and opens no window.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.savefig("profile.png")`` writes it.
    """
    if isinstance(profiles, Profile):
        profiles = [profiles]
    profiles = list(profiles)
    if not profiles or not all(isinstance(p, Profile) for p in profiles):
        raise TypeError("plot_profiles takes a Profile or a non-empty list of Profiles")
    cols = list(columns or ("second_moment", "mean", "correlation"))
    for c in cols:
        if c not in profiles[0].columns:
            raise ValueError(
                f"no column {c!r}; columns: {', '.join(profiles[0].columns)}"
            )
    if ax is None:
        fig, axes = _new_figure(len(cols), pyplot=pyplot)
    else:
        axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axes) != len(cols):
            raise ValueError(f"got {len(axes)} axes for {len(cols)} columns")
        fig = axes[0].figure
    colors = _colors(profiles)
    for a, c in zip(axes, cols, strict=True):
        _draw(a, profiles, c, colors, log=log)
    if legend and axes:
        _legend(fig, axes, colors, profiles, inside=ax is not None)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def signal_plot(profiles: Sequence[Profile], title: str | None = None) -> Any:
    """Second moment, mean and correlation per block."""
    return plot_profiles(
        profiles,
        columns=("second_moment", "mean", "correlation"),
        title=title or "signal propagation",
    )


def gradient_plot(profiles: Sequence[Profile], title: str | None = None) -> Any:
    """Weight and bias gradient norms per block (log scale); gamma / beta when the
    networks have BatchNorm, bias only when some network has biases."""
    cols = ["weight_grad_norm2"]
    for c in ("bias_grad_norm2", "gamma_grad_norm2", "beta_grad_norm2"):
        if any(np.any(np.isfinite(p.columns[c])) for p in profiles):
            cols.append(c)
    return plot_profiles(profiles, columns=cols, title=title or "gradients", log=True)


def dead_plot(profiles: Sequence[Profile], title: str | None = None) -> Any:
    """Fraction of units that are zero for the whole batch, per block."""
    return plot_profiles(
        profiles, columns=("dead_fraction",), title=title or "dead units", log=False
    )


def _jacobian_of(p: Profile) -> Mapping[str, Any] | None:
    j = p.extra.get("jacobian") if isinstance(p.extra, Mapping) else None
    return j if isinstance(j, Mapping) and j else None


def jacobian_plot(profiles: Sequence[Profile], title: str | None = None) -> Any | None:
    """Histogram of the squared singular values of the input-output Jacobian, where
    ``simulate(jacobian=True)`` computed them (None when no profile has them)."""
    have = [(p, _jacobian_of(p)) for p in profiles]
    have = [(p, j) for p, j in have if j is not None]
    if not have:
        return None
    fig, (ax,) = _new_figure(1, width=6.0)
    colors = _colors([p for p, _ in have])
    for p, j in have:
        name = _net_name(p)
        sv = j.get("singular_values")
        m1, m2 = j.get("m1", math.nan), j.get("m2", math.nan)
        label = f"{name}: m1 = {m1:.3g}, m2 = {m2:.3g}"
        if sv is not None and np.size(sv):
            s2 = np.asarray(sv, dtype=float).ravel() ** 2
            s2 = s2[np.isfinite(s2)]
            # singular values below 1e-12 of the largest are zero to rounding
            # (e.g. dead ReLU units); they are counted, not drawn
            floor = s2.max() * 1e-12 if s2.size else 0.0
            zero = int(np.sum(s2 <= floor))
            s2 = s2[s2 > floor]
            if s2.size:
                if zero:
                    label += f", {zero} of {s2.size + zero} ~ 0"
                lo, hi = np.log10(s2.min()), np.log10(s2.max())
                bins = np.logspace(lo, hi + 1e-9 + 0.01 * (hi == lo), 40)
                ax.hist(s2, bins=bins, histtype="step", color=colors[name], label=label)
                ax.set_xscale("log")
                continue
        ax.axvline(m1, color=colors[name], label=label)
    ax.set_xlabel("squared singular value of J")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(title or "input-output Jacobian spectrum", fontsize=11)
    return fig


def phase_plot(
    sigma_w2: np.ndarray,
    sigma_b2: np.ndarray,
    values: np.ndarray,
    *,
    quantity: str = "chi1",
    activation: str = "",
    critical: tuple[np.ndarray, np.ndarray] | None = None,
    marks: Sequence[tuple[float, float, str]] = (),
) -> Any:
    """The order/chaos phase diagram as a heatmap.

    Parameters
    ----------
    sigma_w2, sigma_b2 : 1-D arrays
        Grid axes (x: sigma_w2, y: sigma_b2).
    values : array (len(sigma_b2), len(sigma_w2))
        ``chi1`` (shown on a log colour scale centred on 1) or ``xi_c``.
    critical : (sigma_w2, sigma_b2) arrays, optional
        The critical line (chi1 = 1), drawn in black.
    marks : sequence of (sigma_w2, sigma_b2, label)
        Networks to mark (e.g. the user's).
    """
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    fig, (ax,) = _new_figure(1, width=6.4, height=4.8)
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v) & (v > 0)]
    if quantity == "chi1" and finite.size:
        lv = np.log10(np.where(v > 0, v, np.nan))
        lo = min(float(np.nanmin(lv)), -1e-3)
        hi = max(float(np.nanmax(lv)), 1e-3)
        mesh = ax.pcolormesh(
            sigma_w2,
            sigma_b2,
            lv,
            shading="auto",
            cmap="RdBu_r",
            norm=TwoSlopeNorm(0.0, lo, hi),
        )
        cb = fig.colorbar(mesh, ax=ax)
        cb.set_label("log10 chi1  (<0 ordered, >0 chaotic)")
    else:
        shown = np.where(np.isfinite(v) & (v > 0), v, np.nan)
        norm = LogNorm() if finite.size and finite.max() / finite.min() > 100 else None
        mesh = ax.pcolormesh(
            sigma_w2, sigma_b2, shown, shading="auto", cmap="viridis", norm=norm
        )
        cb = fig.colorbar(mesh, ax=ax)
        cb.set_label(f"{quantity} (layers)" if quantity.startswith("xi") else quantity)
    if critical is not None:
        cw, cbb = (np.asarray(a, dtype=float) for a in critical)
        ok = np.isfinite(cw) & np.isfinite(cbb)
        if ok.sum() >= 2:
            ax.plot(cw[ok], cbb[ok], "k-", lw=2, label="edge of chaos (chi1 = 1)")
        elif ok.sum() == 1:
            ax.plot(cw[ok], cbb[ok], "kD", ms=7, label="edge of chaos (chi1 = 1)")
    # one marker and colour per network, so that the legend tells them apart
    for k, (w, b, label) in enumerate(marks):
        ax.plot(
            [w],
            [b],
            marker=_MARKERS[k % len(_MARKERS)],
            color=_MARK_COLORS[k % len(_MARK_COLORS)],
            mec="k",
            ms=14 if k % len(_MARKERS) == 0 else 10,
            ls="none",
            label=label,
        )
    ax.set_xlim(float(np.min(sigma_w2)), float(np.max(sigma_w2)))
    ax.set_ylim(float(np.min(sigma_b2)), float(np.max(sigma_b2)))
    ax.set_xlabel("sigma_w2 (weight variance x fan_in)")
    ax.set_ylabel("sigma_b2 (bias variance)")
    ax.set_title(f"{activation} phase diagram: {quantity}", fontsize=11)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write a figure as PNG (Agg, no display), whole or not at all, and return
    the path."""
    from .writers import atomic_open

    path = os.fspath(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, dpi=dpi, format="png")
    return path


def write_plots(
    profiles: Sequence[Profile], out_dir: str | os.PathLike, *, title: str = ""
) -> list[str]:
    """Write ``signal.png``, ``gradients.png``, ``dead.png`` and, where computed,
    ``jacobian.png`` for a set of profiles, overlaid.  Returns the paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sfx = f": {title}" if title else ""
    paths = [
        save_figure(
            signal_plot(profiles, "signal propagation" + sfx),
            os.path.join(out_dir, "signal.png"),
        ),
        save_figure(
            gradient_plot(profiles, "gradients" + sfx),
            os.path.join(out_dir, "gradients.png"),
        ),
        save_figure(
            dead_plot(profiles, "dead units" + sfx), os.path.join(out_dir, "dead.png")
        ),
    ]
    jf = jacobian_plot(profiles)
    if jf is not None:
        paths.append(save_figure(jf, os.path.join(out_dir, "jacobian.png")))
    return paths

"""Training curves (matplotlib, imported on use)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_training"]


def plot_training(
    results: Sequence[Any],
    ax: Any = None,
    colors: Sequence[Any] | None = None,
    labels: Sequence[str | None] | None = None,
    held_out: bool = True,
):
    """Loss against steps for each :class:`~initdiag.training.TrainResult`: the
    training loss (solid; each seed thin, the mean over seeds thick) and, with
    ``held_out``, the held-out loss (dashed, mean over seeds); a diverged seed's
    curve stops where it diverged.  Returns the figure."""
    import matplotlib
    from matplotlib.figure import Figure

    if ax is None:
        # a Figure, never pyplot: nothing selects a backend or opens a window
        fig = Figure(figsize=(7.5, 4.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    n = len(results)
    colors = list(colors) if colors is not None else [None] * n
    labels = list(labels) if labels is not None else [None] * n
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for k, r in enumerate(results):
        c = colors[k] or cycle[k % len(cycle)]
        tr = r.train_curve()
        x = r.eval_steps
        for s in range(r.seeds):
            ax.plot(x, tr[s], color=c, lw=0.6, alpha=0.35)
        with np.errstate(invalid="ignore"):
            mean = np.mean(tr, axis=0)  # NaN after any seed diverged
        name = labels[k] or r.network
        ax.plot(x, mean, color=c, lw=2.0, label=f"{name} (lr {r.lr:g})")
        if held_out:
            with np.errstate(invalid="ignore"):
                ax.plot(x, np.mean(r.test_loss, axis=0), color=c, lw=1.2, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{results[0].loss} loss" if results else "loss")
    ax.set_title("training (solid) and held-out (dashed) loss")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig

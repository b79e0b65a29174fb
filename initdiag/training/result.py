"""What a training run returns: curves per seed, the learning rate chosen, the
per-layer gradient and update statistics, divergences as findings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TrainResult", "smoothed", "final_window"]


def final_window(steps: int) -> int:
    """Steps averaged for the final training loss: the last tenth (at least 1)."""
    return max(1, steps // 10)


def smoothed(loss: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of each row of ``loss`` over ``window`` steps (fewer at the
    start); NaN stays NaN (a diverged seed)."""
    c = np.cumsum(np.nan_to_num(loss, nan=np.inf), axis=-1)
    n = np.arange(1, loss.shape[-1] + 1)
    lo = np.concatenate([np.zeros(loss.shape[:-1] + (1,)), c], axis=-1)
    start = np.maximum(n - window, 0)
    with np.errstate(invalid="ignore"):
        out = (c - np.take(lo, start, axis=-1)) / (n - start)
    out[~np.isfinite(out)] = np.nan
    return out


def _finite(v: Any) -> Any:
    """``v`` with arrays as lists and every non-finite float as None (JSON)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error over seeds; inf when any seed diverged."""
    v = np.asarray(v, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    if not np.all(np.isfinite(v)):
        return math.inf, math.nan
    se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(np.mean(v)), se


@dataclass
class TrainResult:
    """One network trained over ``seeds`` fresh initialisations.

    Attributes
    ----------
    network : str
        The network's name.
    data : dict
        The task (:meth:`initdiag.training.data.Dataset.summary`).
    optimizer : dict
        The optimizer and its settings.
    lr : float
        The learning rate the curves below used (the best of ``lr_grid`` on the
        final training loss when a grid was searched).
    lr_search : list of dict
        Per learning rate tried: ``lr``, ``final_loss`` (mean over seeds; inf when
        a seed diverged), ``final_loss_se``, ``diverged`` (seeds).
    steps, seeds, batch_size, eval_every : int
    step_loss : array (seeds, steps)
        The loss of every training batch, before its update; NaN from a seed's
        divergence on.
    step_correct : array (seeds, steps)
        Correct predictions of every batch (classification; NaN for regression).
    eval_steps : array (E,)
        Updates done at each evaluation (0, eval_every, ..., steps).
    test_loss, test_acc : arrays (seeds, E)
        Held-out loss and accuracy in evaluation mode (BatchNorm's running
        statistics, no dropout).
    target : float
        The loss ``steps_to_target`` refers to.
    layer_stats : list of dict
        At every evaluation after the first update, per seed and parameter tensor:
        ``seed, step, layer, param, grad_norm, weight_norm, update_ratio``.
    findings : list of dict
        ``kind="divergence"`` with ``seed``, ``step``, ``lr`` and ``message``.
    meta : dict
        Backend, dtype, rng, the readout layer appended (if any), seconds.
    """

    network: str
    data: dict[str, Any]
    loss: str
    optimizer: dict[str, Any]
    lr: float
    lr_search: list[dict[str, Any]]
    steps: int
    seeds: int
    batch_size: int
    eval_every: int
    step_loss: np.ndarray
    step_correct: np.ndarray
    eval_steps: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    target: float
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- the numbers a comparison needs ------------------------------------------
    def train_curve(self) -> np.ndarray:
        """(seeds, E) training loss at each evaluation step: the mean batch loss
        over the ``eval_every`` steps before it (the first batch's at step 0)."""
        sm = smoothed(self.step_loss, self.eval_every)
        idx = np.clip(self.eval_steps - 1, 0, self.steps - 1)
        return sm[:, idx]

    def final_losses(self) -> np.ndarray:
        """(seeds,) mean batch loss over the last tenth of the steps (inf when the
        seed diverged)."""
        tail = self.step_loss[:, -final_window(self.steps) :]
        ok = np.all(np.isfinite(tail), axis=1)
        return np.where(ok, np.mean(np.where(ok[:, None], tail, 0.0), axis=1), np.inf)

    def final_loss(self) -> tuple[float, float]:
        """Mean final training loss over seeds and its standard error."""
        return _mean_se(self.final_losses())

    def final_test(self) -> tuple[float, float, float, float]:
        """Held-out loss and accuracy after the last step: (loss, se, acc, se)."""
        lm, ls = _mean_se(self.test_loss[:, -1])
        acc = self.test_acc[:, -1]
        # a diverged seed has no accuracy (an infinite loss, but no infinite
        # accuracy): NaN
        am, as_ = _mean_se(acc) if np.all(np.isfinite(acc)) else (math.nan, math.nan)
        return lm, ls, am, as_

    def steps_to(self, target: float | None = None) -> np.ndarray:
        """(seeds,) the first step at which the batch loss, averaged over the
        steps before as the final loss is (the last tenth of the run,
        :func:`final_window`), is <= ``target`` (default :attr:`target`); NaN where
        never."""
        t = self.target if target is None else float(target)
        sm = smoothed(self.step_loss, final_window(self.steps))
        hit = sm <= t
        out = np.full(self.seeds, np.nan)
        for s in range(self.seeds):
            k = np.flatnonzero(hit[s])
            if k.size:
                out[s] = k[0] + 1
        return out

    @property
    def steps_to_target(self) -> np.ndarray:
        return self.steps_to()

    @property
    def diverged(self) -> list[int]:
        return sorted({f["seed"] for f in self.findings if f["kind"] == "divergence"})

    # -- export ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values (non-finite numbers as None)."""
        fl, fse = self.final_loss()
        return _finite(
            {
                "network": self.network,
                "data": self.data,
                "loss": self.loss,
                "optimizer": self.optimizer,
                "lr": self.lr,
                "lr_search": self.lr_search,
                "steps": self.steps,
                "seeds": self.seeds,
                "batch_size": self.batch_size,
                "eval_every": self.eval_every,
                "target": self.target,
                "final_loss": fl,
                "final_loss_se": fse,
                "steps_to_target": self.steps_to(),
                "eval_steps": self.eval_steps,
                "train_loss": self.train_curve(),
                "test_loss": self.test_loss,
                "test_acc": self.test_acc,
                "step_loss": self.step_loss,
                "layer_stats": self.layer_stats,
                "findings": self.findings,
                "meta": self.meta,
            }
        )

    def to_json(self, path: str | None = None) -> str:
        """The result as JSON text (non-finite numbers as null); written to
        ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            from ..report.writers import atomic_open

            with atomic_open(path) as fh:
                fh.write(text)
        return text

    def to_frame(self):
        """A long pandas DataFrame: one row per seed and evaluation step with
        ``train_loss``, ``test_loss``, ``test_acc`` (pandas: the ``frames``
        extra)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "TrainResult.to_frame() needs pandas (pip install 'initdiag[frames]')"
            ) from None
        tr = self.train_curve()
        rows = [
            {
                "network": self.network,
                "lr": self.lr,
                "seed": s,
                "step": int(st),
                "train_loss": tr[s, j],
                "test_loss": self.test_loss[s, j],
                "test_acc": self.test_acc[s, j],
            }
            for s in range(self.seeds)
            for j, st in enumerate(self.eval_steps)
        ]
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None, color: Any = None, label: str | None = None):
        """Training (solid) and held-out (dashed) loss against steps: each seed
        thin, the mean over seeds thick; returns the figure."""
        from .plot import plot_training

        return plot_training([self], ax=ax, colors=[color], labels=[label])

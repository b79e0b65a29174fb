"""``initdiag.train``: short, honest training runs of a network on initdiag's own
kernels, over several fresh initialisations and a learning-rate grid."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .. import _rng
from ..empirical.memory import available_memory, fmt_bytes
from ..layers import Dense
from ..network import Network, require_network
from .data import Dataset, make_dataset
from .optim import DEFAULT_LR_GRIDS, make_optimizer
from .result import TrainResult, final_window
from .trainer import Trainer

__all__ = ["train", "with_readout", "training_steps", "thread_context"]

#: the default target as a fraction of the task's chance-level loss
TARGET_FRACTION = 0.25
#: a network whose largest Dense GEMM (2 B fan_in width flops) is below this
#: trains on one BLAS thread: waking a second one for every small GEMM costs more
#: than the split saves (and a machine loaded by other work makes it far worse)
SINGLE_THREAD_FLOPS = 2**27


def blas_threads(net: Network, batch: int) -> str:
    """ "default" (the caller's BLAS threads) for a network whose largest Dense
    GEMM reaches :data:`SINGLE_THREAD_FLOPS`, else "1"."""
    flops = max(
        (2 * batch * i.fan_in * i.width for i in net.infos if i.kind == "dense"),
        default=0,
    )
    return "default" if flops >= SINGLE_THREAD_FLOPS else "1"


@contextlib.contextmanager
def thread_context(net: Network, batch: int) -> Iterator[None]:
    """The thread policy of a training run, for the ``with`` block.  The Numba
    kernels between the GEMMs always run on one thread: a second Numba thread
    shares a core with an OpenBLAS worker still spinning after its GEMM, and both
    slow down (bench/TRAIN.md: the reference step 1.24 s with two Numba threads,
    1.05 s with one); BLAS keeps the caller's threads for a large network, one
    for a small one (:func:`blas_threads`)."""
    from ..empirical import _blas_single
    from ..empirical.fused import numba_threads

    with contextlib.ExitStack() as stack:
        stack.enter_context(numba_threads(1))
        if blas_threads(net, batch) == "1":
            stack.enter_context(_blas_single())
        yield


def with_readout(network: Network, outputs: int) -> tuple[Network, str | None]:
    """The network with a ``Dense(outputs)`` readout appended when its output
    width is not the task's (initialised by the network's own InitScheme), and
    the readout's row name (None when none was needed)."""
    if network.output_dim == outputs:
        return network, None
    layers = (
        *network.layers,
        Dense(
            outputs,
            bias=any(getattr(la, "bias", False) is True for la in network.layers),
        ),
    )
    net = Network(network.input_dim, layers, network.init, network.name)
    return net, net.infos[-1].name


def _int(v: Any, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{what} must be >= {lo}, got {v}")
    return int(v)


def _lrs(lr: Any, lr_grid: Any, optimizer: str) -> tuple[float, ...]:
    if lr is not None and lr_grid is not None:
        raise ValueError("give lr (one learning rate) or lr_grid (a search), not both")
    vals = (lr,) if lr is not None else (lr_grid or DEFAULT_LR_GRIDS[optimizer])
    if isinstance(vals, (int, float)):
        vals = (vals,)
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)):
            raise TypeError(f"learning rates must be numbers, got {v!r}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"learning rates must be finite and > 0, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _check_memory(net: Network, batch: int, n_eval: int, dt: np.dtype, opt) -> None:
    """Parameters, their gradients and optimizer state, and what the backward
    keeps (every row's output for the batch), before anything is allocated."""
    n_par = 0
    for info in net.infos:
        for slot in info.layer.slots():
            n_par += int(np.prod(info.layer.param_shape(slot, info.fan_in, info.width)))
    per_param = 2 + (2 if opt.name != "sgd" else (1 if opt.momentum else 0))
    acts = sum(info.width for info in net.infos) * max(batch, min(n_eval, 1024))
    need = (n_par * per_param + 2 * acts) * dt.itemsize
    avail = available_memory()
    if avail is not None and need > avail:
        raise ValueError(
            f"train() would need about {fmt_bytes(need)} (parameters, gradients and "
            f"optimizer state: {n_par:,} x {per_param}; activations of a batch of "
            f"{batch}) but the available memory is {fmt_bytes(avail)}; use a "
            "smaller batch_size or a narrower network"
        )


def training_steps(
    n_lr: int, seeds: int, steps: int, search_steps: int | None = None
) -> int:
    """Optimizer steps a :func:`train` call takes (its progress total)."""
    if search_steps is not None and n_lr > 1:
        return n_lr * search_steps + seeds * steps
    return n_lr * seeds * steps


def _run_seed(
    net: Network,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    loss: str,
    opt,
    lr: float,
    steps: int,
    batch: int,
    eval_every: int,
    dt: np.dtype,
    backend: str | None,
    entropy: int,
    seed: int,
    tick: Callable[[int], None],
) -> dict[str, Any]:
    """One seed: a fresh initialisation, a fresh data order, ``steps`` updates;
    ``arrays``: training inputs and targets, held-out inputs and targets, in the
    working dtype (:func:`_arrays`)."""
    tr = Trainer(net, loss, opt, lr, dt, backend, entropy, seed)
    X, yt, Xte, yte = arrays
    n = X.shape[0]
    order = np.random.default_rng([entropy, seed, 0xBA7C])
    perm, pos = order.permutation(n), 0
    step_loss = np.full(steps, np.nan)
    step_correct = np.full(steps, np.nan)
    evals = list(range(0, steps + 1, eval_every))
    if evals[-1] != steps:
        evals.append(steps)
    test = np.full((2, len(evals)), np.nan)
    stats: list[dict[str, Any]] = []
    finding = None
    test[:, 0] = tr.evaluate(Xte, yte)
    j = 1
    for k in range(steps):
        if pos + batch > n:  # a fresh order each epoch; the tail is dropped
            perm, pos = order.permutation(n), 0
        idx = perm[pos : pos + batch]
        pos += batch
        log = evals[j] == k + 1
        before = tr.flat.copy() if log else None
        value, correct = tr.step(X[idx], yt[idx])
        if not np.isfinite(value):
            finding = {
                "kind": "divergence",
                "seed": seed,
                "step": k,
                "lr": lr,
                "message": f"the training loss became {value} at step {k} "
                f"(seed {seed}, lr {lr:g}); training of this seed stopped",
            }
            tick(steps - k)
            break
        step_loss[k] = value
        step_correct[k] = correct if correct >= 0 else np.nan
        if log:
            test[:, j] = tr.evaluate(Xte, yte)
            for row in tr.layer_stats(before):
                stats.append({"seed": seed, "step": k + 1, **row})
            j += 1
        tick(1)
    return {
        "step_loss": step_loss,
        "step_correct": step_correct,
        "evals": evals,
        "test": test,
        "stats": stats,
        "finding": finding,
    }


def _arrays(ds: Dataset, loss: str, dt: np.dtype) -> tuple[np.ndarray, ...]:
    """(X_train, y_train, X_test, y_test) as the kernels take them, made once per
    call of :func:`train` (every rate and seed reads them)."""
    X = np.ascontiguousarray(ds.X_train, dtype=dt)
    Xte = np.ascontiguousarray(ds.X_test, dtype=dt)
    if loss == "cross_entropy":
        return X, ds.y_train, Xte, ds.y_test
    if ds.n_classes:  # squared error on one-hot class targets
        eye = np.eye(ds.n_classes, dtype=dt)
        return X, eye[ds.y_train], Xte, eye[ds.y_test]
    return (
        X,
        np.ascontiguousarray(ds.y_train, dtype=dt),
        Xte,
        np.ascontiguousarray(ds.y_test, dtype=dt),
    )


def train(
    network: Network,
    data: Any = None,
    *,
    steps: int = 200,
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    batch_size: int = 128,
    seeds: int = 4,
    loss: str | None = None,
    lr_grid: Sequence[float] | None = None,
    eval_every: int = 10,
    backend: str | None = None,
    dtype: Any = "float32",
    rng: int | np.random.Generator | None = 0,
    weight_decay: float | None = None,
    target: float | None = None,
    search_steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``network`` from ``seeds`` fresh initialisations on initdiag's kernels.

    Each seed draws the network's parameters exactly as :func:`initdiag.simulate`
    draws its seed (so the step-0 Profile measures these very networks), shuffles
    the training set afresh, and takes ``steps`` optimizer steps on batches of
    ``batch_size`` (training mode: BatchNorm on the batch's statistics, dropout
    on); every ``eval_every`` steps the held-out loss and accuracy are measured in
    evaluation mode (BatchNorm's running statistics, momentum 0.1, as torch).

    Parameters
    ----------
    network : Network
        Any network :func:`initdiag.simulate` accepts.  When its output width is
        not the task's (classes or targets), a ``Dense`` readout is appended,
        initialised by the network's InitScheme (``meta["readout"]``).
    data : None, "digits", Dataset or (X, y) arrays
        None: the synthetic task in the network's input dimension
        (:func:`initdiag.training.data.subspace_mixture`); ``"digits"``:
        scikit-learn's bundled digits (scikit-learn installed, no download);
        ``(X, y)`` or ``(X_train, y_train, X_test, y_test)``: integer labels or
        float targets (:func:`initdiag.training.data.from_arrays`).
    steps, batch_size, seeds, eval_every : int
    optimizer : {"sgd", "adam", "adamw"}
        torch.optim's SGD (``momentum``; dampening 0), Adam, AdamW (weight decay
        0.01 unless ``weight_decay``).
    lr : float, optional
        One learning rate; otherwise each of ``lr_grid`` (default
        :data:`initdiag.training.optim.DEFAULT_LR_GRIDS`) is run over every seed
        and the one with the lowest mean final training loss (the mean batch loss
        over the last tenth of the steps; a diverged seed counts as infinite) is
        kept.
    loss : {"cross_entropy", "mse"}, optional
        Default: cross-entropy for class labels, mean squared error for targets
        (``"mse"`` on labels uses one-hot targets).
    backend : str, optional
        Kernel backend (as :func:`initdiag.simulate`).
    dtype : {"float32", "float64"}
    rng : int, Generator or None
        Seeds the task, the parameters and the data order: the same ``rng`` gives
        the same curves.  A network whose largest Dense GEMM is below
        :data:`SINGLE_THREAD_FLOPS` trains on one BLAS and one Numba thread
        (faster there), so its curves do not depend on the caller's thread
        count; a larger one uses the caller's threads, and BLAS's thread count
        changes its rounding, which training can amplify over many steps.
    target : float, optional
        The loss :meth:`TrainResult.steps_to` counts steps to; default
        ``0.25`` of the task's chance-level loss.
    search_steps : int, optional
        A cheaper search: each rate of the grid runs seed 0 for ``search_steps``
        steps, the best (lowest mean batch loss over its last tenth) is kept and
        only it runs every seed for ``steps``.  Default: every rate over every
        seed for the full ``steps``.
    progress : callable, optional
        ``progress(done, total)`` in steps over learning rates and seeds.

    Returns
    -------
    TrainResult
        Divergence (a non-finite loss) is a finding with its step, never an
        exception.
    """
    require_network(network, "train()")
    from ..empirical import _check_dtype

    dt = _check_dtype(dtype)
    steps = _int(steps, "steps", 1)
    seeds = _int(seeds, "seeds", 1)
    batch_size = _int(batch_size, "batch_size", 2)
    eval_every = _int(eval_every, "eval_every", 1)
    opt = make_optimizer(optimizer, momentum, weight_decay)
    lrs = _lrs(lr, lr_grid, opt.name)
    entropy = _rng.entropy_of(rng)
    ds = make_dataset(data, network.input_dim, seed=entropy)
    if loss is None:
        loss = ds.loss
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"unknown loss {loss!r}; use 'cross_entropy' or 'mse'")
    if loss == "cross_entropy" and not ds.n_classes:
        raise ValueError(
            "loss='cross_entropy' needs class labels (integer y); these data have "
            "float targets: use loss='mse'"
        )
    n_train = ds.X_train.shape[0]
    if batch_size > n_train:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {n_train} training examples; use "
            f"batch_size <= {n_train}"
        )
    if batch_size <= 3 and any(i.kind == "batchnorm" for i in network.infos):
        from ..meanfield import batchnorm_small_batch

        raise ValueError(
            f"{batchnorm_small_batch(batch_size)}; use a batch of at least 4"
        )
    net, readout = with_readout(network, ds.outputs)
    _check_memory(net, batch_size, ds.X_test.shape[0], dt, opt)
    tgt = TARGET_FRACTION * ds.chance_loss() if target is None else float(target)

    pilot = search_steps is not None and len(lrs) > 1
    if pilot:
        search_steps = _int(search_steps, "search_steps", 1)
    # a list: the pilot's fallback run (:func:`_search`) adds to it
    total = [training_steps(len(lrs), seeds, steps, search_steps if pilot else None)]
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(done[0], total[0])

    arrays = _arrays(ds, loss, dt)

    def run(lr_k: float, n_seeds: int, n_steps: int) -> TrainResult:
        per_seed = [
            _run_seed(
                net,
                arrays,
                loss,
                opt,
                lr_k,
                n_steps,
                batch_size,
                eval_every,
                dt,
                backend,
                entropy,
                s,
                tick,
            )
            for s in range(n_seeds)
        ]
        return _assemble(
            per_seed,
            lr_k,
            network.name,
            ds,
            loss,
            opt,
            n_steps,
            n_seeds,
            batch_size,
            eval_every,
            tgt,
        )

    t0 = time.perf_counter()
    with thread_context(net, batch_size):
        res = _search(run, lrs, pilot, seeds, steps, search_steps, total)
    res.meta = {
        "backend": backend,
        "dtype": dt.name,
        "rng": entropy,
        "readout": readout,
        "seconds": time.perf_counter() - t0,
        "final_window": final_window(steps),
        "bn_momentum": 0.1,
        "network_rows": len(net.infos),
        "search": "pilot" if pilot else ("grid" if len(lrs) > 1 else "fixed"),
        "blas_threads": blas_threads(net, batch_size),
        "numba_threads": 1,
    }
    return res


def _search(run, lrs, pilot, seeds, steps, search_steps, total) -> TrainResult:
    """Every rate of ``lrs`` (on the pilot or in full); the best rate's run."""
    runs = [
        run(lr_k, 1, search_steps) if pilot else run(lr_k, seeds, steps) for lr_k in lrs
    ]
    search = [{**_full_entry(r), "full": not pilot} for r in runs]
    # the lowest mean final loss; all diverged: the smallest rate (the least bad)
    order = sorted(
        range(len(runs)), key=lambda i: (search[i]["final_loss"], runs[i].lr)
    )
    if not pilot:
        res = runs[order[0]]
    else:
        # the pilot saw one seed: when the chosen rate diverges on another, the
        # next rate of the pilot's order runs too, and the better full run is kept
        res = run(lrs[order[0]], seeds, steps)
        if res.diverged and len(order) > 1:
            total[0] += seeds * steps
            alt = run(lrs[order[1]], seeds, steps)
            search.append(_full_entry(res))
            if alt.final_loss()[0] < res.final_loss()[0]:
                res = alt
            search.append(_full_entry(alt))
    res.lr_search = search
    return res


def _full_entry(r: TrainResult) -> dict[str, Any]:
    fl, fse = r.final_loss()
    return {
        "lr": r.lr,
        "final_loss": fl,
        "final_loss_se": fse,
        "diverged": len(r.diverged),
        "seeds": r.seeds,
        "steps": r.steps,
        "full": True,
    }


def _assemble(per_seed, lr, name, ds, loss, opt, steps, seeds, batch, every, tgt):
    evals = np.array(per_seed[0]["evals"])
    return TrainResult(
        network=name,
        data=ds.summary(),
        loss=loss,
        optimizer=opt.describe(),
        lr=lr,
        lr_search=[],
        steps=steps,
        seeds=seeds,
        batch_size=batch,
        eval_every=every,
        step_loss=np.array([r["step_loss"] for r in per_seed]),
        step_correct=np.array([r["step_correct"] for r in per_seed]),
        eval_steps=evals,
        test_loss=np.array([r["test"][0] for r in per_seed]),
        test_acc=np.array([r["test"][1] for r in per_seed]),
        target=tgt,
        layer_stats=[row for r in per_seed for row in r["stats"]],
        findings=[r["finding"] for r in per_seed if r["finding"] is not None],
    )

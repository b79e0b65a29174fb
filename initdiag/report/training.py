"""Training runs in a study (``initdiag report --train STEPS``, a ``[train]``
table): every variant trained by :func:`initdiag.train`, a table, the curves, and
sentences that tie the step-0 findings to what training did, each generated from
the numbers just computed.

Variants train in parallel worker processes (one BLAS / Numba thread each: small
networks' GEMMs do not pay for a second thread, and a process per core keeps the
Python between the kernels of one run off the other's core).
"""

from __future__ import annotations

import math
import os
import queue
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..training import train
from ..training.optim import DEFAULT_LR_GRIDS
from ..training.run import training_steps

__all__ = [
    "TRAIN_DEFAULTS",
    "train_settings",
    "train_kwargs",
    "total_steps",
    "run_training",
    "training_target",
    "training_rows",
    "training_table",
    "training_sentences",
    "write_training_plot",
]

#: what ``--train STEPS`` uses unless the study's ``[train]`` table says otherwise
TRAIN_DEFAULTS: dict[str, Any] = {
    "seeds": 2,
    "optimizer": "sgd",
    "momentum": 0.9,
    "batch_size": 128,
    "eval_every": 10,
    "data": "synthetic",
}
#: the learning-rate pilot's length, as a fraction of the steps
PILOT_FRACTION = 0.25
#: two final losses differ "beyond noise" when their difference over its
#: standard error exceeds the two-sided quantile of this level of Student's t
#: with (fewer seeds - 1) degrees of freedom (Welch's conservative choice: with
#: 2 seeds a z of 2 means nothing)
NOISE_LEVEL = 0.95


def _difference(s: Mapping[str, Any], r: Mapping[str, Any]) -> tuple[float, float]:
    """(z, threshold): the difference of two variants' final losses over its
    standard error, and the t quantile it must exceed to be beyond noise."""
    from scipy.stats import t as student

    se = [
        x if x == x else 0.0
        for x in (s["train_final_loss_se"], r["train_final_loss_se"])
    ]
    d = s["train_final_loss"] - r["train_final_loss"]
    comb = math.hypot(*se)
    z = d / comb if comb > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
    df = min(s["train_seeds"], r["train_seeds"]) - 1
    thr = float(student.ppf(0.5 + NOISE_LEVEL / 2, df)) if df >= 1 else math.inf
    return z, thr


def _noise_words(thr: float, seeds: int) -> str:
    return f"{thr:.3g} is the two-sided {NOISE_LEVEL:.0%} t quantile for {seeds} seeds"


def train_settings(table: Mapping[str, Any] | None, steps: int | None) -> dict | None:
    """The study's ``[train]`` table over :data:`TRAIN_DEFAULTS`, ``steps`` from
    the option when given; None when neither asks for training (no ``steps``)."""
    s = {**TRAIN_DEFAULTS, **(table or {})}
    if steps is not None:
        s["steps"] = steps
    if "steps" not in s:
        return None
    if "lr" not in s and "search_steps" not in s:
        s["search_steps"] = max(1, int(round(PILOT_FRACTION * s["steps"])))
    return s


def train_kwargs(settings: Mapping[str, Any], rng: int = 0) -> dict[str, Any]:
    """The :func:`initdiag.train` keywords of a study's training settings."""
    kw = {
        k: settings[k]
        for k in (
            "steps",
            "seeds",
            "optimizer",
            "lr",
            "momentum",
            "batch_size",
            "eval_every",
            "search_steps",
        )
        if k in settings
    }
    if "lr_grid" in settings:
        kw["lr_grid"] = tuple(settings["lr_grid"])
    if "lr" in kw:
        kw.pop("search_steps", None)
    kw["data"] = (
        None if settings.get("data", "synthetic") == "synthetic" else settings["data"]
    )
    kw["rng"] = rng
    return kw


def total_steps(n_networks: int, settings: Mapping[str, Any]) -> int:
    """Optimizer steps of the whole study's training (the progress bar's share)."""
    kw = train_kwargs(settings)
    n_lr = (
        1 if "lr" in kw else len(kw.get("lr_grid") or DEFAULT_LR_GRIDS[kw["optimizer"]])
    )
    return n_networks * training_steps(
        n_lr, kw["seeds"], kw["steps"], kw.get("search_steps")
    )


# -- running (worker processes) --------------------------------------------------------

_PROGRESS: Any = None


def _worker_init(q: Any) -> None:
    """One BLAS and one Numba thread per worker process; progress goes to ``q``."""
    global _PROGRESS, _LIMITS
    from threadpoolctl import threadpool_limits

    _LIMITS = threadpool_limits(1)  # noqa: F841 - kept for the process's life
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    _PROGRESS = q


def _train_one(k: int, net: Any, kw: dict[str, Any]):
    last = [0]

    def tell(done: int, total: int) -> None:
        # a message per ten steps keeps the queue cheap
        if _PROGRESS is not None and (done - last[0] >= 10 or done == total):
            _PROGRESS.put((k, done - last[0]))
            last[0] = done

    return k, train(net, **kw, progress=tell)


def run_training(
    networks: Sequence[Any],
    settings: Mapping[str, Any],
    progress: Callable[[str, int], None] | None = None,
    rng: int = 0,
) -> list[Any]:
    """Train every network (in order; one :class:`~initdiag.training.TrainResult`
    each).  ``settings["workers"]`` processes (default: the cores, at most the
    networks); 1 runs here, in this process.  On Ctrl-C the workers stop and
    :class:`KeyboardInterrupt` carries the finished results as ``partial``
    (None for the others)."""
    kw = train_kwargs(settings, rng)
    n = len(networks)
    workers = int(settings.get("workers") or min(n, os.cpu_count() or 1))
    results: list[Any] = [None] * n
    names = [str(net.name) for net in networks]
    if workers <= 1:
        try:
            for k, net in enumerate(networks):
                results[k] = train(net, **kw, progress=_teller(progress, names[k]))
        except KeyboardInterrupt as exc:
            exc.partial = results  # type: ignore[attr-defined]
            raise
        return results
    return _run_pool(networks, kw, workers, progress, names, results)


def _teller(progress, name: str) -> Callable[[int, int], None]:
    """``train``'s ``progress(done, total)`` as increments of ``progress(label,
    steps)``."""
    seen = [0]

    def tell(done: int, total: int) -> None:
        if progress is not None:
            progress(f"{name}: train", done - seen[0])
        seen[0] = done

    return tell


def _run_pool(networks, kw, workers, progress, names, results):
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no inherited BLAS / OpenMP thread state
    q = ctx.Manager().Queue()
    pool = cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(q,)
    )
    try:
        futs = {pool.submit(_train_one, k, net, kw) for k, net in enumerate(networks)}
        pending = set(futs)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2)
            _drain(q, progress, names)
            for f in done:
                k, r = f.result()
                results[k] = r
        _drain(q, progress, names)
    except KeyboardInterrupt as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()
        exc.partial = results  # type: ignore[attr-defined]
        raise
    pool.shutdown()
    return results


def _drain(q: Any, progress, names) -> None:
    while True:
        try:
            k, steps = q.get_nowait()
        except queue.Empty:
            return
        if progress is not None:
            progress(f"{names[k]}: train", steps)


# -- the numbers -----------------------------------------------------------------------


def _sig2(x: float) -> float:
    """``x`` rounded up to two significant digits (a target loss a sentence can
    state, which the variant it came from does reach)."""
    if not (x > 0 and math.isfinite(x)):
        return x
    e = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10.0**e) * 10.0**e


def training_target(results: Sequence[Any]) -> float:
    """The loss the comparison counts steps to: the median of the variants' mean
    final training losses (diverged variants left out), rounded up to two
    significant digits; about half the variants reach it within the run."""
    finals = [r.final_loss()[0] for r in results if r is not None]
    finals = [f for f in finals if math.isfinite(f)]
    return _sig2(float(np.median(finals))) if finals else math.nan


def training_rows(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """Per variant with a training result: its name and :func:`train_summary`
    (the table shows the numbers the sentences cite)."""
    return [
        {"name": e.name, **train_summary(e.training)}
        for e in entries
        if getattr(e, "training", None) is not None
    ]


def _fmt(x: float, digits: int = 3) -> str:
    if x != x:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def training_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The training table: one line per variant (:func:`training_rows`)."""
    steps, target = rows[0]["train_steps"], rows[0]["train_target"]
    head = (
        f"{'variant':<30} {'lr':>7} {'loss @' + str(steps):>16} "
        f"{'held-out acc':>14} {'steps to ' + _fmt(target):>16}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        seeds = r["train_seeds"]
        loss = f"{_fmt(r['train_final_loss'])} +- {_fmt(r['train_final_loss_se'], 2)}"
        if r["train_diverged"]:
            loss = f"diverged ({r['train_diverged']}/{seeds})"
        acc = f"{_fmt(r['train_test_acc'])} +- {_fmt(r['train_test_acc_se'], 2)}"
        st = (
            f"{_fmt(r['train_steps_to_target'])} ({r['train_reached']}/{seeds})"
            if r["train_reached"]
            else "never"
        )
        out.append(
            f"{r['name'][:30]:<30} {r['train_lr']:>7.3g} {loss:>16} {acc:>14} {st:>16}"
        )
    return "\n".join(out)


def train_summary(r: Any) -> dict[str, Any]:
    """The summary keys of a variant's training (:func:`initdiag.report.study.summarize`
    adds them): every number a training sentence states."""
    fl, fse = r.final_loss()
    _, _, acc, acc_se = r.final_test()
    st = r.steps_to()
    hit = st[np.isfinite(st)]
    div = sorted(f["step"] for f in r.findings)
    return {
        "train_lr": r.lr,
        "train_final_loss": fl,
        "train_final_loss_se": fse,
        "train_test_acc": acc,
        "train_test_acc_se": acc_se,
        "train_target": r.target,
        "train_steps_to_target": float(np.mean(hit)) if hit.size else math.nan,
        "train_reached": int(hit.size),
        "train_seeds": r.seeds,
        "train_steps": r.steps,
        "train_diverged": len(div),
        "train_divergence_step": div[0] if div else math.nan,
    }


def _f(x: float) -> str:
    from .study import fmt

    return fmt(x)


def _setup_sentence(s0: Mapping[str, Any], settings: Mapping[str, Any]):
    from .study import Sentence

    t = settings.get("train") or {}
    opt = t.get("optimizer", "sgd")
    if opt == "sgd":
        opt = f"SGD (momentum {t.get('momentum', 0.9):g})"
    else:
        opt = {"adam": "Adam", "adamw": "AdamW"}.get(opt, opt)
    if "lr" in t:
        how = f"learning rate {t['lr']:g} for every variant"
    else:
        grid = t.get("lr_grid") or DEFAULT_LR_GRIDS[t.get("optimizer", "sgd")]
        pilot = t.get("search_steps")
        how = (
            "each variant's learning rate is the best of "
            + ", ".join(f"{g:g}" for g in grid)
            + " on its training loss"
            + (f" over a {pilot}-step pilot on seed 0" if pilot else "")
        )
    width = t.get("width")
    text = (
        f"Training: {s0['train_steps']} steps of {opt}, batch "
        f"{t.get('batch_size', 128)}, {s0['train_seeds']} fresh initialisations per "
        f"variant on {t.get('data_description') or 'the synthetic task'}"
        + (f", each variant rebuilt at width {width}" if width else "")
        + f"; {how}; the target loss {_f(s0['train_target'])} is the median of the "
        "variants' final training losses, rounded up to two significant digits."
    )
    return Sentence(
        "training:setup",
        text,
        [(0, "train_steps"), (0, "train_seeds"), (0, "train_target")],
    )


def _step0_clause(s: Mapping[str, Any]) -> tuple[str, list[str]]:
    """What the step-0 profile said: the signal's growth over the blocks and the
    gradient ratio first / last."""
    q0, q1, gr = (
        s.get("q_first", math.nan),
        s.get("q_last", math.nan),
        s.get("grad_ratio", math.nan),
    )
    ratio = q1 / q0 if q0 and q0 == q0 else math.nan
    # a residual network's signal rows are the stream after each block's add
    n = s["n_residual"] if s.get("residual") else s["n_blocks"]
    text = (
        f"at step 0 the signal's second moment went from {_f(q0)} to {_f(q1)} over "
        f"{n} blocks (x{_f(ratio)}) and the first block's gradient was "
        f"x{_f(gr)} the last's"
    )
    return text, ["q_first", "q_last", "grad_ratio"]


def _loss_clause(s, ref, ref_name: str) -> tuple[str, list[str]]:
    L, se = s["train_final_loss"], s["train_final_loss_se"]
    if s["train_diverged"]:
        return (
            f"training diverged in {s['train_diverged']} of {s['train_seeds']} seeds "
            f"(first at step {int(s['train_divergence_step'])}, learning rate "
            f"{s['train_lr']:g})",
            ["train_diverged", "train_divergence_step", "train_lr"],
        )
    text = f"after {s['train_steps']} steps its training loss is {_f(L)} +- {_f(se)}"
    keys = ["train_final_loss", "train_final_loss_se", "train_steps"]
    if ref is None:
        return text, keys
    L0, se0 = ref["train_final_loss"], ref["train_final_loss_se"]
    if not math.isfinite(L0):
        return text + f" ({ref_name} diverged)", keys
    z, thr = _difference(s, ref)
    n = min(s["train_seeds"], ref["train_seeds"])
    if abs(z) <= thr:
        text += (
            f", the same as {ref_name}'s {_f(L0)} +- {_f(se0)} within noise "
            f"(|z| = {abs(z):.1f}; {_noise_words(thr, n)})"
        )
    else:
        word = "lower" if L < L0 else "higher"
        text += (
            f", {word} than {ref_name}'s {_f(L0)} +- {_f(se0)} beyond noise "
            f"(|z| = {abs(z):.1f} > {thr:.3g})"
        )
    return text, keys


def _target_clause(s, ref, ref_name: str) -> tuple[str, list[str]]:
    """When the variant reached the study's target loss."""
    T, k = s["train_target"], s["train_steps_to_target"]
    keys = ["train_reached", "train_target"]
    if not s["train_reached"]:
        return f"it never reached loss {_f(T)} in {s['train_steps']} steps", keys
    keys.append("train_steps_to_target")
    text = (
        f"it reached loss {_f(T)} at step {_f(k)} (mean of the "
        f"{s['train_reached']} of {s['train_seeds']} seeds that did)"
    )
    return text, keys


def _ref_steps_clause(s, ref, ref_name: str) -> tuple[str, list[tuple[int, str]]]:
    """How the variant's steps to the target compare with the reference's (a
    clause and the reference's keys; empty when the variant did not reach it)."""
    if not s["train_reached"]:
        return "", []
    k, k0 = s["train_steps_to_target"], ref["train_steps_to_target"]
    if ref["train_reached"] and k0 > 0:
        # both are means over the seeds that reached the target: say how many
        return (
            f", {k / k0:.2f}x the steps of {ref_name} (its mean over the "
            f"{ref['train_reached']} of {ref['train_seeds']} seeds that did)",
            ["train_steps_to_target", "train_reached"],
        )
    return f", which {ref_name} never did", ["train_reached"]


def training_sentences(
    summaries: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> list[Any]:
    """The sentences on training, each from the summary numbers it cites (keys
    ``train_*`` plus the step-0 ``q_first``, ``q_last``, ``grad_ratio``).  The
    first variant is the reference the others are compared with."""
    from .study import Sentence

    idx = [i for i, s in enumerate(summaries) if "train_final_loss" in s]
    if not idx:
        return []
    out = [_setup_sentence(summaries[idx[0]], settings)]
    r0 = idx[0]
    # as in the step-0 explanation: each variant against the first variant of its
    # own layout, the first of a layout against the first overall
    first_of: dict[Any, int] = {}
    for i in idx:
        first_of.setdefault(summaries[i].get("family"), i)
    for i in idx:
        s = summaries[i]
        j = first_of[s.get("family")]
        j = r0 if j == i else j
        ref, ref_name = summaries[j], summaries[j]["name"]
        c0, k0 = _step0_clause(s)
        cl, kl = _loss_clause(s, None if i == r0 else ref, ref_name)
        parts, keys = [c0, cl], k0 + kl
        ref_keys: list[str] = []
        if not s["train_diverged"]:
            ct, kt = _target_clause(s, None if i == r0 else ref, ref_name)
            if i != r0:
                cr, ref_keys = _ref_steps_clause(s, ref, ref_name)
                ct += cr
            parts.append(ct)
            keys += kt
        who = s["name"] + (" (the reference)" if i == r0 else "")
        text = f"{who}: " + "; ".join(parts) + "."
        pos = [(i, k) for k in keys]
        if (
            i != r0
            and math.isfinite(ref["train_final_loss"])
            and not s["train_diverged"]
        ):
            ref_keys += ["train_final_loss", "train_final_loss_se"]
        pos += [(j, k) for k in ref_keys]
        out.append(Sentence(f"training:{s['name']}", text, pos))
    if len(idx) > 1:
        out.append(_noise_sentence(summaries, idx))
    return out


def _noise_sentence(summaries, idx) -> Any:
    """Which variants end at the best final loss within noise."""
    from .study import Sentence

    ok = [i for i in idx if math.isfinite(summaries[i]["train_final_loss"])]
    if not ok:
        return Sentence(
            "training:noise",
            "Every variant diverged: no final losses to compare.",
            [(i, "train_diverged") for i in idx],
        )
    best = min(ok, key=lambda i: summaries[i]["train_final_loss"])
    b = summaries[best]

    def within(i: int) -> bool:
        z, thr = _difference(summaries[i], b)
        return z <= thr

    tied = [i for i in ok if i != best and within(i)]
    noise = (
        f"a two-sided t test at {NOISE_LEVEL:.0%} with the fewer seeds - 1 degrees "
        "of freedom"
    )
    # the numbers the text shows or that decide who is tied with the lowest
    keys = [(best, "train_final_loss")] + [(i, "train_final_loss") for i in tied]
    name = b["name"]
    if len(tied) == len(ok) - 1 and tied:
        text = (
            f"No variant's final training loss differs from the lowest ({name}: "
            f"{_f(b['train_final_loss'])}) beyond noise ({noise}): after "
            f"{b['train_steps']} steps these initialisations train alike."
        )
    elif tied:
        text = (
            f"The lowest final training loss is {name}'s "
            f"({_f(b['train_final_loss'])}); "
            + ", ".join(summaries[i]["name"] for i in tied)
            + f" {'is' if len(tied) == 1 else 'are'} the same within noise "
            f"({noise}), every other variant ends higher."
        )
    else:
        text = (
            f"The lowest final training loss is {name}'s "
            f"({_f(b['train_final_loss'])}), "
            f"beyond noise ({noise}) below every other variant's."
        )
    return Sentence("training:noise", text, keys)


def write_training_plot(
    entries: Sequence[Any], out_dir: str, title: str = ""
) -> str | None:
    """``training.png``: every variant's curves (whole or not at all)."""
    from ..training.plot import plot_training
    from .writers import atomic_open

    res = [e.training for e in entries if getattr(e, "training", None) is not None]
    if not res:
        return None
    fig = plot_training(res, labels=[r.network for r in res])
    fig.set_size_inches(9, 5.5)
    if title:
        fig.axes[0].set_title(f"{title}: training (solid) and held-out (dashed) loss")
    path = os.path.join(out_dir, "training.png")
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, dpi=110, format="png")
    return path

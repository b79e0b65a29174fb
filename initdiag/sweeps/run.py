"""The driver: :func:`sweep` expands a grid, skips what the database already has,
sends chunks of points to an executor and commits each finished chunk."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .grid import GridError, expand
from .store import Store

__all__ = ["DEFAULT_MAX_POINTS", "GridError", "SweepResult", "sweep"]

#: grids larger than this need an explicit max_points= (the CLI: --yes)
DEFAULT_MAX_POINTS = 10_000
#: tries of a chunk whose worker died before it is split into single points, and
#: of a single point before it is stored as failed
_CHUNK_TRIES = 2
_POINT_TRIES = 3
#: worker deaths in a row, with no chunk coming back in between, before the sweep
#: stops: workers that die at start would otherwise fail every point one by one
_LOSSES_IN_A_ROW = 4


@dataclass
class SweepResult:
    """What one :func:`sweep` call did.

    ``total`` points in the grid, ``computed`` by this call, ``skipped`` (already in
    the database), ``failed`` (of the computed ones, stored with their error),
    ``overflowed`` (computed points whose simulation overflowed), ``seconds`` of
    wall time, ``run`` (the ``runs.id``), ``db`` (the database path), ``executor``
    (a description), ``interrupted`` (Ctrl-C stopped it).
    """

    db: str
    run: int
    total: int
    computed: int = 0
    skipped: int = 0
    failed: int = 0
    overflowed: int = 0
    seconds: float = 0.0
    executor: str = ""
    chunk: int = 0
    interrupted: bool = False
    base_hash: str = ""
    keys: list[str] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        """Computed points per second."""
        return self.computed / self.seconds if self.seconds > 0 else math.nan

    def points(self) -> list[dict[str, Any]]:
        """The rows of this sweep's points (see :mod:`initdiag.sweeps.store`)."""
        from .store import read_points

        keys = set(self.keys)
        return [r for r in read_points(self.db) if r["key"] in keys]

    def to_csv(self, path: str | os.PathLike, table: str = "points") -> str:
        from .store import export_csv

        return export_csv(self.db, path, table=table, run=self.run)

    def to_frame(self, table: str = "points"):
        from .store import to_frame

        return to_frame(self.db, table=table, run=self.run)

    def __str__(self) -> str:
        s = (
            f"{self.total} points: {self.computed} computed, {self.skipped} already "
            f"in {self.db}"
        )
        if self.failed:
            s += f", {self.failed} failed (stored with their error; retry_failed=True "
            s += "reruns them)"
        if self.overflowed:
            s += f", {self.overflowed} overflowed"
        if self.computed:
            s += f"; {self.seconds:.1f} s, {self.rate:.3g} points/s on {self.executor}"
        if self.interrupted:
            s += "; interrupted (run again to resume)"
        return s


class _Bar:
    """points done / total, rate and ETA: tqdm when installed, else the project's
    own bar (``initdiag.report.progress``); both draw on stderr only on a TTY."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.done = total, initial
        self.start_done = initial
        self.t0 = time.perf_counter()
        self._tqdm = None
        self._own = None
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=initial, unit="pt", desc="sweep")
        except ImportError:
            from ..report.progress import Progress

            self._own = Progress(total)
            self._own.update(self._label(), steps=initial)

    def _label(self) -> str:
        dt = time.perf_counter() - self.t0
        n = self.done - self.start_done
        if n <= 0 or dt <= 0:
            return "sweep"
        rate = n / dt
        eta = (self.total - self.done) / rate
        return f"{rate:.3g} pt/s ETA {_hms(eta)}"

    def update(self, steps: int) -> None:
        self.done += steps
        if self._tqdm is not None:
            self._tqdm.update(steps)
        elif self._own is not None:
            self._own.update(self._label(), steps=steps)

    def refresh(self) -> None:
        """Redraw (elapsed time and ETA move between finished chunks too)."""
        if self._tqdm is not None:
            self._tqdm.refresh()
        elif self._own is not None:
            self._own.set_label(self._label())

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._own is not None:
            self._own.close()


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        if s >= 3600
        else (f"{s // 60}:{s % 60:02d}")
    )


def _chunk_size(n: int, workers: int, empirical: bool) -> int:
    """Points per task: about eight tasks per worker for load balance, but no more
    than 16 empirical / 128 analytic points, so a finished chunk is committed (and
    a Ctrl-C or a dead worker loses) seconds of work, not minutes; and Dask sees
    hundreds of tasks for a large grid, not millions."""
    cap = 16 if empirical else 128
    return max(1, min(cap, math.ceil(n / (8 * max(workers, 1)))))


def sweep(
    base: Any,
    grid: Mapping[str, Any],
    *,
    seeds: int | None = None,
    analytic: bool = True,
    empirical: bool = True,
    executor: Any = "local",
    workers: int | None = None,
    address: str | None = None,
    db: str | os.PathLike = "sweep.sqlite",
    resume: bool = True,
    retry_failed: bool = False,
    progress: bool | Callable[[int, int], None] = True,
    chunk: int | None = None,
    max_points: int | None = DEFAULT_MAX_POINTS,
    batch_size: int | None = None,
    simulate: Mapping[str, Any] | None = None,
    analyze: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Profile every point of a grid of variants of ``base``; results in SQLite.

    Parameters
    ----------
    base : Network, str or dict
        The base network, or a study file / dict with one network (its
        ``[simulate]`` and ``[analyze]`` tables give the default settings).
    grid : mapping
        Parameter paths to lists of values, plus ``zip`` groups of linked axes
        (:mod:`initdiag.sweeps.grid` lists the paths), e.g.
        ``{"sigma_w2": [1, 1.5, 2], "sigma_b2": [0, 0.05], "depth": [10, 30]}``.
    seeds : int, optional
        Random networks per point for ``simulate`` (>= 2); default: the study's
        ``[simulate] seeds``, else 8.
    analytic, empirical : bool
        Run ``analyze`` / ``simulate`` at each point.
    executor : {"local", "dask"} or distributed.Client
        ``"local"``: a pool of ``workers`` processes (default: one per CPU);
        ``"dask"``: the scheduler at ``address``; a Client: its cluster.
    workers : int, optional
        Local pool size.
    address : str, optional
        Dask scheduler address, e.g. ``"tcp://10.0.0.1:8786"``.
    db : path
        The results database (created when missing).
    resume : bool
        Skip points already finished in ``db`` (with the requested engines);
        ``False`` recomputes every point and replaces its row.
    retry_failed : bool
        Also rerun points stored as failed (by default they are skipped, with their
        error kept).
    progress : bool or callable
        A bar on stderr (points done / total, rate, ETA; only on a TTY), or a
        function called as ``progress(done, total)`` after each committed chunk.
    chunk : int, optional
        Points per task (default: see :func:`_chunk_size`).
    max_points : int or None
        Refuse a grid of more points, before any work (``None``: no limit).
    batch_size : int, optional
        Examples per batch for both engines, unless the grid sweeps ``batch_size``
        (default: the study's, else 256).
    simulate, analyze : mapping, optional
        Further settings (``dtype``, ``backend``, ``input_correlation``, ...) over
        the study's.

    Returns
    -------
    SweepResult
        Counts, timing and the database; ``.points()``, ``.to_csv()``,
        ``.to_frame()``.

    Raises
    ------
    GridError (a ValueError)
        A bad grid, before any work: unknown path, empty list, a value the network
        rejects, too many points; the message names the key.
    KeyboardInterrupt
        After Ctrl-C: the chunks in flight are cancelled, every finished one is in
        the database, and the run is marked ``interrupted``; calling again resumes.

    Notes
    -----
    Each point's seed and database key are the SHA-256 of (its values, the base
    network, the settings, the initdiag version), so its numbers do not depend on
    the executor, the chunking or the order of completion, and resuming skips
    exactly the finished points.  Every point runs single-threaded; parallelism
    comes from running points side by side.

    The local pool starts fresh Python processes (``spawn``), which import the
    caller's main module: a script that calls ``sweep`` needs the usual
    ``if __name__ == "__main__":`` guard, and cannot be read from stdin (workers
    that die at start stop the sweep with a RuntimeError saying so).
    """
    if not (analytic or empirical):
        raise ValueError("analytic and empirical are both False: nothing to compute")
    for name, flag in (("resume", resume), ("retry_failed", retry_failed)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if chunk is not None and (
        isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
    ):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    from .executors import check_executor
    from .grid import base_from

    check_executor(executor, workers, address)

    network, study_sim, study_ana = base_from(base)
    sim = {**study_sim, **dict(simulate or {})}
    ana = {**study_ana, **dict(analyze or {})}
    study_seeds = sim.pop("seeds", None)
    if seeds is None:
        seeds = study_seeds if study_seeds is not None else 8
    bs = batch_size if batch_size is not None else sim.get("batch_size", 256)
    sim["batch_size"] = bs
    ana["batch_size"] = bs
    plan = expand(
        network,
        grid,
        seeds=seeds,
        simulate=sim,
        analyze=ana,
        max_points=max_points,
    )
    engines = [e for e, on in (("analytic", analytic), ("empirical", empirical)) if on]
    job = _Job(
        plan=plan,
        grid=grid,
        engines=engines,
        executor=executor,
        workers=workers,
        address=address,
        resume=resume,
        retry_failed=retry_failed,
        progress=progress,
        chunk=chunk,
    )
    store = Store(db)
    try:
        return _drive(store, job)
    finally:
        store.close()


@dataclass
class _Job:
    """What :func:`_drive` runs: the expanded plan and the sweep's options."""

    plan: Any
    grid: Mapping[str, Any]
    engines: list[str]
    executor: Any
    workers: int | None
    address: str | None
    resume: bool
    retry_failed: bool
    progress: bool | Callable[[int, int], None]
    chunk: int | None


def _todo(store: Store, plan, engines, resume: bool, retry_failed: bool):
    if not resume:
        return list(plan.points), 0
    have = store.status_of(p.key for p in plan.points)
    todo = []
    for p in plan.points:
        st = have.get(p.key)
        if st is None:
            todo.append(p)
            continue
        status, eng = st
        covered = set(engines) <= set(eng.split(","))
        if status == "failed" and retry_failed:
            todo.append(p)
        elif status == "done" and not covered:
            todo.append(p)
    return todo, len(plan.points) - len(todo)


def _drive(store: Store, job: _Job) -> SweepResult:
    from .. import __version__ as version
    from .compute import compute_chunk
    from .executors import make_executor

    plan, engines, progress = job.plan, job.engines, job.progress
    todo, skipped = _todo(store, plan, engines, job.resume, job.retry_failed)
    total = len(plan.points)
    if not todo:
        run = store.start_run(
            base_hash=plan.base_hash,
            base=plan.base,
            grid=job.grid,
            settings={**plan.payload(), "engines": engines},
            executor=job.executor if isinstance(job.executor, str) else "dask",
            workers=job.workers,
            total=total,
        )
        store.finish_run(run, "complete", skipped=skipped)
        return SweepResult(
            db=store.path,
            run=run,
            total=total,
            skipped=skipped,
            base_hash=plan.base_hash,
            keys=[p.key for p in plan.points],
        )
    ex = make_executor(job.executor, job.workers, job.address)
    size = job.chunk or _chunk_size(len(todo), ex.workers, "empirical" in engines)
    run = store.start_run(
        base_hash=plan.base_hash,
        base=plan.base,
        grid=job.grid,
        settings={**plan.payload(), "engines": engines, "chunk": size},
        executor=ex.kind,
        workers=ex.workers,
        total=total,
    )
    res = SweepResult(
        db=store.path,
        run=run,
        total=total,
        skipped=skipped,
        executor=ex.describe(),
        chunk=size,
        base_hash=plan.base_hash,
        keys=[p.key for p in plan.points],
    )
    payload = plan.payload()

    def task(points) -> dict[str, Any]:
        return {
            "payload": payload,
            "points": [
                {"key": p.key, "params": p.params, "seed": p.seed} for p in points
            ],
            "engines": engines,
            "version": version,
        }

    queue_: deque[tuple[list, int]] = deque(
        (todo[i : i + size], 0) for i in range(0, len(todo), size)
    )
    inflight: dict[Any, tuple[list, int]] = {}
    from .executors import Completed

    done_q = Completed()
    bar = _Bar(total, skipped, progress is True)
    callback = progress if callable(progress) else None
    t0 = time.perf_counter()
    status = "error"
    losses = 0  # worker deaths since the last chunk that came back
    try:
        while queue_ or inflight:
            # two chunks per worker keep every worker busy without handing the
            # executor the whole grid: Ctrl-C then cancels little, memory stays flat
            while queue_ and len(inflight) < 2 * ex.capacity() + 1:
                pts, tries = queue_.popleft()
                fut = ex.submit(compute_chunk, task(pts))
                inflight[fut] = (pts, tries)
                done_q.add(fut)
            fut = done_q.next(timeout=0.5)
            if fut is None:
                bar.refresh()
                continue
            if fut not in inflight:
                continue
            pts, tries = inflight.pop(fut)
            exc = fut.exception()
            if exc is not None:
                if not ex.is_lost_worker(exc):
                    raise RuntimeError(
                        f"the executor could not run a chunk of {len(pts)} points: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if ex.after_lost_worker(fut):
                    losses += 1
                if losses > _LOSSES_IN_A_ROW:
                    raise RuntimeError(_dying_workers(ex.kind, losses, exc))
                _requeue(queue_, pts, tries + 1, ex.kind, exc, store, run, plan, res)
                continue
            results = fut.result()
            losses = 0
            store.write_chunk(run, plan.base_hash, results)
            res.computed += len(results)
            res.failed += sum(1 for r in results if r.get("error"))
            res.overflowed += sum(
                1
                for r in results
                if any(f.get("kind") == "overflow" for f in r.get("findings", []))
            )
            bar.update(len(results))
            if callback is not None:
                callback(res.computed + res.skipped, total)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        res.interrupted = True
        raise
    finally:
        bar.close()
        res.seconds = time.perf_counter() - t0
        for f in inflight:
            f.cancel()
        ex.close(cancel=status != "complete")
        store.finish_run(
            run,
            status,
            computed=res.computed,
            skipped=res.skipped,
            failed=res.failed,
        )
    return res


def _dying_workers(kind: str, losses: int, exc: BaseException) -> str:
    hint = (
        "local workers are new Python processes that import the main module: "
        "call sweep() from a script file under `if __name__ == '__main__':` (not "
        "from stdin), or use the `initdiag sweep` command"
        if kind == "local"
        else "check the workers' logs (memory limits, a missing initdiag)"
    )
    return (
        f"{losses} worker processes died in a row and no chunk came back "
        f"({type(exc).__name__}: {exc}); {hint}"
    )


def _requeue(queue_, pts, tries, kind, exc, store, run, plan, res) -> None:
    """A chunk whose worker died: retry it; after that split it into single points,
    so one point that kills its worker cannot take its chunk-mates down; a single
    point that keeps killing workers is stored as failed.  Dask's scheduler has
    already retried a ``KilledWorker`` task on other workers."""
    exhausted = kind == "dask" and type(exc).__name__ == "KilledWorker"
    if len(pts) > 1:
        if tries < _CHUNK_TRIES and not exhausted:
            queue_.appendleft((pts, tries))
        else:
            queue_.extendleft((p_one, 0) for p_one in ([p] for p in reversed(pts)))
        return
    if tries < _POINT_TRIES and not exhausted:
        queue_.appendleft((pts, tries))
        return
    p = pts[0]
    err = (
        f"the worker process died while computing this point ({tries} tries): "
        f"{type(exc).__name__}: {exc}"
    )
    store.write_chunk(
        run,
        plan.base_hash,
        [
            {
                "key": p.key,
                "params": p.params,
                "seed": p.seed,
                "engines": [],
                "error": err,
            }
        ],
    )
    res.computed += 1
    res.failed += 1

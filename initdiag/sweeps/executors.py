"""Where chunks run: a local process pool or a Dask cluster, behind one interface.

Both are driven through the futures interface: ``submit(fn, arg)`` returns a future
(``concurrent.futures.Future`` or ``distributed.Future``), and :class:`Completed`
yields futures as they finish, fed by ``future.add_done_callback`` (which both kinds
have), so the driver in :mod:`initdiag.sweeps.run` is one code path for both.

An executor also says which failures are the infrastructure's (a worker process
that died: ``BrokenProcessPool`` locally; ``KilledWorker`` or a lost connection on
Dask), which the driver retries, as opposed to a chunk that raised.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "Completed",
    "DaskExecutor",
    "LocalExecutor",
    "check_executor",
    "make_executor",
]


class Completed:
    """Futures in the order they finish, with futures added while iterating.

    ``add(future)`` registers a done-callback that puts the future on a queue;
    ``next(timeout)`` returns the next finished future, or None after ``timeout``
    seconds (so the caller can redraw a progress bar, and Ctrl-C is seen promptly).
    """

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self.pending = 0

    def add(self, future: Any) -> None:
        self.pending += 1
        future.add_done_callback(self._q.put)

    def next(self, timeout: float = 0.5) -> Any | None:
        try:
            fut = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        self.pending -= 1
        return fut


class LocalExecutor:
    """A pool of ``workers`` processes (``concurrent.futures.ProcessPoolExecutor``).

    Processes are started with ``spawn``: forking a client that already runs Numba
    or OpenMP threads can deadlock the child.  A pool whose process died
    (``BrokenProcessPool``) is replaced by :meth:`restart`.
    """

    kind = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self.generation = 0
        self._pool = self._new_pool()

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .compute import init_local_worker

        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_local_worker,
        )

    def capacity(self) -> int:
        return self.workers

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        fut = self._pool.submit(fn, arg)
        fut.generation = self.generation  # type: ignore[attr-defined]
        return fut

    def is_lost_worker(self, exc: BaseException) -> bool:
        from concurrent.futures.process import BrokenProcessPool

        return isinstance(exc, BrokenProcessPool)

    def after_lost_worker(self, future: Any) -> bool:
        """Replace the broken pool once (its other futures fail with it); True when
        this future's failure was a new incident (the first of its pool)."""
        if getattr(future, "generation", None) != self.generation:
            return False
        self._terminate()
        self.generation += 1
        self._pool = self._new_pool()
        return True

    def pids(self) -> list[int]:
        procs = getattr(self._pool, "_processes", None) or {}
        return sorted(procs)

    def _terminate(self) -> None:
        pool = self._pool
        pool.shutdown(wait=False, cancel_futures=True)
        terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
            return
        # before 3.14 the pool has no public way to stop a running call; its
        # processes are in _processes
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            if p.is_alive():
                p.terminate()
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            p.join(timeout=5)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._terminate()
        else:
            self._pool.shutdown(wait=True)

    def describe(self) -> str:
        return f"local pool of {self.workers} process{'es' * (self.workers != 1)}"


class DaskExecutor:
    """A Dask cluster through ``distributed.Client`` (``client.submit``).

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (and left open).
    address : str, optional
        A scheduler address (``tcp://host:8786``); the client made for it is closed
        at the end.
    """

    kind = "dask"

    def __init__(self, client: Any = None, address: str | None = None) -> None:
        import distributed

        self._own = client is None
        if client is None:
            try:
                client = distributed.Client(address, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise ValueError(
                    f"cannot reach the Dask scheduler at {address}: {exc}"
                ) from None
        self.client = client
        self._checked = 0.0
        self.workers = 1
        self.capacity()
        self.generation = 0

    def capacity(self) -> int:
        """Worker threads of the cluster now (asked at most every 5 s: workers
        may join or leave during a sweep)."""
        now = time.monotonic()
        if now - self._checked > 5.0:
            self.workers = max(1, sum(self.client.nthreads().values()))
            self._checked = now
        return self.workers

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        # pure=False: every submission is its own task, never merged with another
        return self.client.submit(fn, arg, pure=False)

    def is_lost_worker(self, exc: BaseException) -> bool:
        from distributed.comm.core import CommClosedError
        from distributed.scheduler import KilledWorker

        return isinstance(exc, (KilledWorker, CommClosedError))

    def after_lost_worker(self, future: Any) -> bool:
        """Nothing to repair: the scheduler reschedules a dead worker's tasks
        itself (a KilledWorker is a task that has killed several)."""
        return True

    def close(self, cancel: bool = False) -> None:
        if self._own:
            self.client.close()

    def describe(self) -> str:
        return (
            f"dask cluster at {self.client.scheduler.address} ({self.workers} threads)"
        )


def _is_client(executor: Any) -> bool:
    return type(executor).__name__ == "Client" and hasattr(executor, "submit")


def check_executor(executor: Any, workers: int | None, address: str | None) -> None:
    """Reject a bad executor choice before anything is created or started.

    Raises
    ------
    ValueError
        Not ``"local"``, ``"dask"`` or a Client; ``"dask"`` without an address;
        an address for the local pool; bad ``workers``.
    ImportError
        ``"dask"`` without dask.distributed installed.
    """
    if executor == "local":
        if address is not None:
            raise ValueError(
                "address is for executor='dask'; the local executor runs here"
            )
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        return
    if executor == "dask":
        if not address:
            raise ValueError(
                "executor='dask' needs address='tcp://host:8786' (the scheduler) "
                "or a distributed.Client as executor"
            )
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ImportError(
                "executor='dask' needs dask.distributed: pip install "
                "'initdiag[dask]' (or dask[distributed])"
            ) from None
        return
    if _is_client(executor):
        return
    raise ValueError(
        f"executor must be 'local', 'dask' (with address='tcp://host:8786') or a "
        f"distributed.Client, got {executor!r}"
    )


def make_executor(
    executor: Any, workers: int | None, address: str | None
) -> LocalExecutor | DaskExecutor:
    """``"local"`` -> :class:`LocalExecutor`; ``"dask"`` (with ``address``) or a
    ``distributed.Client`` -> :class:`DaskExecutor` (after :func:`check_executor`)."""
    check_executor(executor, workers, address)
    if executor == "local":
        return LocalExecutor(workers)
    if executor == "dask":
        return DaskExecutor(address=address)
    return DaskExecutor(client=executor)

"""Stopping a long computation early and keeping what is finished.

Ctrl-C raises :class:`KeyboardInterrupt` in the main thread only.  A Monte Carlo
run whose seeds execute in worker threads would otherwise keep going until every
seed is done (the executor joins its workers), then throw all of it away.  The
mechanism here:

* :data:`STOP`, one process-wide event (SIGINT is process-wide too).  The per-layer
  loops of the empirical engine call :func:`poll` at the top of every layer; once
  the event is set, :func:`poll` raises :class:`Stopped`, which abandons the seed in
  progress (its half-filled statistics are discarded), so a worker stops within
  one layer's kernels.  :func:`request_stop` sets it from any thread (e.g. a GUI's
  cancel button); the engine sets it when the main thread receives Ctrl-C.
* :class:`Interrupted`, a :class:`KeyboardInterrupt` carrying the partial result:
  :func:`initdiag.simulate` raises it with a Profile aggregated over the seeds that
  finished (``meta["partial"] = True``, ``meta["seeds_finished"]``), and the report
  re-raises it with the study result so far.  Code that does not know about it
  sees an ordinary KeyboardInterrupt.
* :func:`deferred`, for the command line: while a result is being written, SIGINT is
  recorded instead of raised, so a file or the standard output is never left half
  written; the interrupt is raised after the block.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "STOP",
    "Stopped",
    "Interrupted",
    "poll",
    "request_stop",
    "reset",
    "deferred",
]

#: set when every running computation of this process should stop
STOP = threading.Event()


class Stopped(Exception):
    """Raised by :func:`poll` in a loop once :data:`STOP` is set."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or :func:`request_stop`) during a computation; ``partial`` holds
    what was finished (a :class:`~initdiag.profile.Profile` from ``simulate``, a
    study result from the report), or ``None``."""

    def __init__(self, partial: Any = None, message: str = "interrupted") -> None:
        super().__init__(message)
        self.partial = partial


def poll() -> None:
    """Raise :class:`Stopped` when a stop was requested (cheap: one flag read)."""
    if STOP.is_set():
        raise Stopped


def request_stop() -> None:
    """Ask every running computation to stop after its current kernel."""
    STOP.set()


def reset() -> None:
    """Clear a previous stop request (done when a new computation starts)."""
    STOP.clear()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT inside the block is held back and raised as KeyboardInterrupt after
    it (only in the main thread, where Python handles signals; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    try:
        old = signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError):  # pragma: no cover - no signal support
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt

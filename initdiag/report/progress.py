"""A minimal progress bar on stderr: shown only on a TTY, never with ``--quiet``."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class Progress:
    """Count ``total`` steps; draw ``label [#####.....] k/n  elapsed`` on ``stream``.

    Parameters
    ----------
    total : int
        Number of steps.
    enabled : bool or None
        ``None`` (default): on when ``stream`` is a TTY.  ``False``: draw nothing.
    stream : file, optional
        Defaults to ``sys.stderr``; stdout is never used, so output stays parseable.
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        width: int = 30,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = max(int(total), 1)
        self.done = 0
        self.width = width
        self.label = ""
        self._t0 = time.perf_counter()

    def update(self, label: str = "", steps: int = 1) -> None:
        """Advance ``steps`` and redraw with ``label``."""
        self.done = min(self.done + steps, self.total)
        self.label = label
        self._draw()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        fill = int(self.width * self.done / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        dt = time.perf_counter() - self._t0
        text = f"\r{self.label[:32]:<32} [{bar}] {self.done}/{self.total} {dt:5.1f}s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 52) + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

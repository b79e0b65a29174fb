"""Where Numba keeps the compiled kernels: a per-user cache, never the package.

By default ``@njit(cache=True)`` writes its cache next to the source, into the
package's ``__pycache__`` (Numba's ``InTreeCacheLocator``).  For an installed
package that is ``site-packages/initdiag/__pycache__``: files no installer knows
about, which survive ``pip uninstall`` and then shadow a later editable install
(the leftover folder is found as a namespace package ``initdiag`` without
``mlp``), and which cannot be written at all on a read-only site-packages.

Numba picks the locator of a function when the function is decorated
(``_CacheImpl.__init__`` tries ``UserProvidedCacheLocator`` first, which reads
``numba.config.CACHE_DIR`` and stores the resulting path on the dispatcher).  So
the ``njit`` every kernel module imports from :mod:`initdiag.kernels._threading`
calls :func:`begin` before decorating a ``cache=True`` function and :func:`end`
after: for that moment ``numba.config.CACHE_DIR`` points at :func:`cache_dir`;
afterwards it is restored, so the user's own Numba functions keep their usual
cache.  ``os.environ`` is never touched (importing initdiag does
not change the process environment).

The directory: ``NUMBA_CACHE_DIR`` when set (Numba itself honours it, and then
nothing is changed here); else ``$XDG_CACHE_HOME/initdiag/numba``, else
``~/.cache/initdiag/numba``; if that cannot be created (a read-only home), a
per-user folder under the system temporary directory.  Inside it Numba names a
subfolder after a hash of the source directory, so installs in different places
never share entries, and each entry is checked against the source file's hash.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile

__all__ = ["cache_dir", "begin", "end"]


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


@functools.lru_cache(maxsize=1)
def cache_dir() -> str:
    """The directory the compiled kernels are cached in (created if needed)."""
    env = os.environ.get("NUMBA_CACHE_DIR", "").strip()
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    path = os.path.join(base, "initdiag", "numba")
    if _writable_dir(path):
        return path
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "")
    return os.path.join(tempfile.gettempdir(), f"initdiag-numba-{uid}")


def begin() -> str | None:
    """Point Numba's cache at :func:`cache_dir` for the functions decorated next;
    returns the previous setting for :func:`end`."""
    try:
        from numba.core import config
    except ImportError:  # no numba: nothing is compiled
        return None
    # settle a pending re-read of NUMBA_* first: an eager compile inside the module
    # would otherwise reload the config and drop the setting below half-way
    config.reload_config()
    prev = config.CACHE_DIR
    if not prev:
        with contextlib.suppress(OSError):
            config.CACHE_DIR = cache_dir()
    return prev


def end(prev: str | None) -> None:
    """Restore the setting :func:`begin` returned."""
    if prev is None:
        return
    from numba.core import config

    config.CACHE_DIR = prev

"""Access to the cffi extension ``initdiag._cext`` (built from ``csrc/``).

The extension is optional: when it was not built (no C compiler at install time)
:func:`load` records why and the ``c`` backend reports itself unavailable.  Every
C entry point returns 0 or a negative ``IDG_E*`` code, checked by :func:`check`.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ._threading import ensure_configured

_STATE: tuple[Any, Any, str | None] | None = None  # (ffi, lib, error)
_FN_CACHE: dict = {}
_CTYPES = {
    np.dtype(np.float32): "float[]",
    np.dtype(np.float64): "double[]",
    np.dtype(np.uint8): "unsigned char[]",  # masks (idg_masked_scale)
}
_SUFFIX = {np.dtype(np.float32): "_f32", np.dtype(np.float64): "_f64"}
_ERRORS = {-1: "IDG_EINVAL (invalid argument)", -2: "IDG_ENOTIMPL (not implemented)"}


def load() -> tuple[Any, Any, str | None]:
    """Import the extension once; return (ffi, lib, None) or (None, None, reason)."""
    global _STATE
    if _STATE is None:
        # OMP_WAIT_POLICY must be in the environment before libgomp (linked by
        # _cext) loads
        ensure_configured()
        try:
            mod = importlib.import_module("initdiag._cext")
            _STATE = (mod.ffi, mod.lib, None)
        except ImportError as exc:
            _STATE = (
                None,
                None,
                f"the C extension initdiag._cext is not built ({exc}); install a C "
                "compiler (gcc or clang) and reinstall: "
                "pip install --no-build-isolation -e .",
            )
    return _STATE


def status() -> dict:
    """{'available': bool, 'reason': str | None, 'openmp': bool | None, ...}."""
    ffi, lib, err = load()
    if err is not None:
        return {"available": False, "reason": err, "openmp": None}
    major = ffi.new("int *")
    minor = ffi.new("int *")
    omp = ffi.new("int *")
    check(lib.idg_version(major, minor, omp), "idg_version")
    return {
        "available": True,
        "reason": None,
        "openmp": bool(omp[0]),
        "version": f"{major[0]}.{minor[0]}",
    }


def check(rc: int, name: str = "C kernel") -> None:
    """Raise RuntimeError for a negative return code of the C core."""
    if rc != 0:
        raise RuntimeError(
            f"initdiag C core: {name} returned {rc}: {_ERRORS.get(rc, 'unknown error')}"
        )


def fn(name: str, dtype: np.dtype):
    """The C function ``<name>_f32`` or ``<name>_f64`` for ``dtype``."""
    key = (name, dtype)
    f = _FN_CACHE.get(key)
    if f is None:
        f = getattr(load()[1], name + _SUFFIX[np.dtype(dtype)])
        _FN_CACHE[key] = f
    return f


def ptr(arr: np.ndarray | None):
    """A typed cffi pointer to a C-contiguous array's data, or NULL for None."""
    ffi = load()[0]
    if arr is None:
        return ffi.NULL
    return ffi.from_buffer(_CTYPES[arr.dtype], arr)

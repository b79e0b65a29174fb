"""Kernels of the empirical engine: dense, activation, BatchNorm, statistics,
residual add / scale / dropout masking, and the fused passes of ``simulate``;
and of training: the optimizer updates :func:`sgd_update` and :func:`adam_update`
and the loss heads :func:`mse_loss_grad` and :func:`softmax_xent_grad`.

Every op exists in four backends behind one public dispatcher (the fused ops
:func:`layer_stats`, :func:`unit_forward`, :func:`unit_backward`, :func:`gram`,
:func:`gram_dot` and :func:`residual_add_stats` in ``numpy`` and ``numba`` only:
asking them for ``c`` or ``cuda`` raises :class:`BackendUnavailableError`):

``numpy``
    The reference, float32 and float64, always available.
``numba``
    CPU, ``@njit(cache=True)``, parallel over row chunks or column blocks.
``c``
    The cffi extension ``initdiag._cext`` built from ``csrc/`` (OpenMP when the
    compiler has it); unavailable when the install found no C compiler.
``cuda``
    numba.cuda kernels (``_cuda_*.py``); needs a GPU and numba-cuda.

Backend resolution: the ``backend=`` argument, then :func:`set_backend`, then the
``INITDIAG_BACKEND`` environment variable, then ``"auto"``: ``cuda`` when an input
is a device array (``__cuda_array_interface__``), else ``numba`` when importable,
else ``numpy``.  ``auto`` never picks ``c`` (or ``cuda`` for host arrays); a named
backend never falls back to another: when unavailable it raises
:class:`BackendUnavailableError` saying how to get it.

Validation happens here, once, never in the kernels: inputs must be 2-D (1-D for
parameters) float32 or float64 arrays of one common dtype and sizes >= 1
(TypeError / ValueError otherwise; integer or float16 input is rejected, not
converted).  Non-contiguous or Fortran-ordered inputs are **copied once** to
C order (``np.ascontiguousarray``); an ``out=`` array must already be
C-contiguous with the right shape and dtype (it is written, never copied).

``out=``: every op takes it, by keyword, and it mirrors the op's array results:
one array for an op that returns one array, a tuple with one entry per returned
array, in the order returned, for an op that returns several (NumPy's ufunc
convention, ``np.divmod(a, b, out=(q, r))``; a None entry is allocated).  Given
arrays are written in place and returned themselves (with ``backend="cuda"`` and
host arrays, the device results are copied into them).  Ops whose results are
Python numbers take as ``out`` the float64 array their kernel writes:
:func:`layer_summary` (and :func:`layer_summary_array`) the (8,) vector,
:func:`row_correlation` the (1,) cell, :func:`gram_dot` the (2,) vector.  A wrong
shape raises ValueError; a wrong dtype, a non-contiguous array or a tuple of the
wrong length TypeError.

``activation=`` is a keyword everywhere an activation applies (keyword-only on the
BatchNorm and fused ops; :func:`dense_forward` still also takes it as its fourth
positional argument, and the activation ops as their second).

Matrix products on the CPU run in NumPy's BLAS.  Thread pools: importing
``initdiag`` or ``initdiag.kernels`` changes nothing in the process (no
environment variable, no Numba import).  :func:`configure_threads` sets
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP workers of Numba's pool and of the C
extension sleep instead of spinning on the cores OpenBLAS needs for the GEMMs
between our kernels) and Numba's threading-layer priority ``omp, tbb,
workqueue``; it runs by itself, with those defaults, before the first numba or c
kernel (and before the C extension loads, since libgomp reads the wait policy
once, when it initialises).  Call it first to choose otherwise; details and
measurements in ``initdiag.kernels._threading``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _registry, _threading
from ._names import ACTIVATIONS, LAYER_STATS_FIELDS, SUMMARY_FIELDS
from ._threading import configure_threads

__all__ = [
    "ACTIVATIONS",
    "LAYER_STATS_FIELDS",
    "SUMMARY_FIELDS",
    "BackendUnavailableError",
    "activation_backward",
    "activation_forward",
    "adam_update",
    "available_backends",
    "batchnorm_backward",
    "batchnorm_forward",
    "column_stats",
    "configure_threads",
    "dense_backward",
    "dense_forward",
    "get_backend",
    "gram",
    "gram_dot",
    "gram_layout",
    "layer_stats",
    "layer_summary",
    "layer_summary_array",
    "layernorm_backward",
    "layernorm_forward",
    "masked_scale",
    "mse_loss_grad",
    "residual_add",
    "residual_add_stats",
    "row_correlation",
    "set_backend",
    "sgd_update",
    "softmax_xent_grad",
    "unit_backward",
    "unit_forward",
]

BACKENDS = _registry.BACKENDS
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_default_backend: str | None = None


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run here (the message says why)."""


# ------------------------------------------------------------------ backends
def _cuda_status() -> tuple[bool, str | None]:
    try:
        from ._cuda_dense import cuda_status
    except ImportError as exc:
        return False, (
            f"the CUDA kernels cannot be imported ({exc}); install numba-cuda "
            "(pip install 'initdiag[cuda]') on a machine with an NVIDIA GPU"
        )
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install must not crash
        return False, f"importing the CUDA kernels failed: {type(exc).__name__}: {exc}"
    try:
        ok, reason = cuda_status()
    except Exception as exc:  # noqa: BLE001
        return False, f"cuda_status() failed: {type(exc).__name__}: {exc}"
    return bool(ok), reason


def _status(name: str) -> tuple[bool, str | None]:
    if name == "numpy":
        return True, None
    if name == "numba":
        err = _threading.NUMBA_IMPORT_ERROR
        return err is None, err
    if name == "c":
        from . import _c

        err = _c.load()[2]
        return err is None, err
    if name == "cuda":
        return _cuda_status()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends() -> dict[str, dict[str, Any]]:
    """Status of every backend.

    Returns
    -------
    dict
        ``{name: {"available": bool, "reason": str | None, ...}}`` for ``numpy``,
        ``numba``, ``c`` and ``cuda``; ``reason`` says why (and how to fix it) when
        unavailable.  Extra keys: ``numba`` -> ``threading_layer``, ``num_threads``;
        ``c`` -> ``openmp``, ``version``; every entry -> ``auto`` (whether
        ``backend="auto"`` would pick it for host arrays).
    """
    from . import _c

    res: dict[str, dict[str, Any]] = {}
    for name in BACKENDS:
        ok, reason = _status(name)
        res[name] = {"available": ok, "reason": reason}
    if res["numba"]["available"]:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = "not launched yet (priority: omp, tbb, workqueue)"
        res["numba"]["threading_layer"] = layer
        res["numba"]["num_threads"] = numba.get_num_threads()
    res["c"].update({k: v for k, v in _c.status().items() if k not in res["c"]})
    auto = "numba" if res["numba"]["available"] else "numpy"
    for name in BACKENDS:
        res[name]["auto"] = name == auto
    return res


def set_backend(backend: str | None) -> None:
    """Set the process-wide default backend (``None`` restores the env / auto rule).

    Raises
    ------
    ValueError
        For a name other than numpy, numba, c, cuda, auto or None.
    """
    global _default_backend
    if backend is not None:
        backend = _check_name(backend)
    _default_backend = backend


def get_backend() -> str:
    """The backend name a call without ``backend=`` would resolve (for host arrays)."""
    return _resolve(None, ())


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in (*BACKENDS, "auto"):
        raise ValueError(
            f"backend must be one of {(*BACKENDS, 'auto')} or None; got {name!r}"
        )
    return name.lower()


def _is_device(a: Any) -> bool:
    # copy_to_host: numba's device arrays, including the simulator's fakes
    return a is not None and (
        hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")
    )


def _resolve(backend: str | None, arrays: tuple) -> str:
    if backend is not None:
        name = _check_name(backend)
    elif _default_backend is not None:
        name = _default_backend
    else:
        env = os.environ.get("INITDIAG_BACKEND", "").strip()
        try:
            name = _check_name(env) if env else "auto"
        except ValueError as exc:
            raise ValueError(f"environment variable INITDIAG_BACKEND: {exc}") from None
    if name == "auto":
        if any(_is_device(a) for a in arrays):
            name = "cuda"
        else:
            name = "numba" if _threading.NUMBA_IMPORT_ERROR is None else "numpy"
    ok, reason = _status(name)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return name


def _resolve_op(op: str, backend: str | None, arrays: tuple) -> str:
    """:func:`_resolve`, then check that ``op`` has a variant on that backend."""
    name = _resolve(backend, arrays)
    if (op, name) not in _registry.REGISTRY:
        have = _registry.OP_BACKENDS[op]
        raise BackendUnavailableError(
            f"{op} has no {name!r} variant: it exists for backends {have} only "
            f"(the fused passes of simulate are NumPy + Numba); pass backend="
            f"{have[-1]!r} (host arrays)"
        )
    return name


# ------------------------------------------------------------------ validation
def _activation(activation: Any, negative_slope: float) -> tuple[str, float]:
    if activation is None:
        act = "identity"
    elif isinstance(activation, str):
        act = activation.lower()
    elif hasattr(activation, "name"):  # initdiag.network activation specs
        act = str(activation.name)
        negative_slope = getattr(activation, "negative_slope", negative_slope)
    else:
        raise TypeError(
            f"activation must be None, one of {ACTIVATIONS} or an initdiag activation "
            f"spec; got {activation!r}"
        )
    if act not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {ACTIVATIONS}"
        )
    try:
        slope = float(negative_slope)
    except (TypeError, ValueError):
        raise TypeError(
            f"negative_slope must be a real number; got {negative_slope!r}"
        ) from None
    if not math.isfinite(slope):
        raise ValueError(f"negative_slope must be finite; got {slope}")
    return act, slope


def _array(a: Any, name: str, ndim: int, dtype: np.dtype | None = None):
    """Validate one input; copy once to C order if needed; device arrays pass."""
    if _is_device(a):
        from numba import cuda

        arr = a if hasattr(a, "is_c_contiguous") else cuda.as_cuda_array(a)
        if not arr.is_c_contiguous():
            raise TypeError(
                f"{name}: device arrays must be C-contiguous; got strides {arr.strides}"
            )
    else:
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"{name} must be a NumPy array (or a CUDA device array); got "
                f"{type(a).__name__}; convert with np.asarray({name}, dtype=np.float32)"
            )
        arr = a
    if arr.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be float32 or float64; got {arr.dtype}; convert with "
            f"{name}.astype(np.float32) or .astype(np.float64)"
        )
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {arr.dtype} but the other arrays are {dtype}; all "
            "arrays of one call must share the dtype"
        )
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}")
    if any(s < 1 for s in arr.shape):
        raise ValueError(
            f"{name} must have every dimension >= 1; got shape {arr.shape}"
        )
    if isinstance(arr, np.ndarray) and not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)  # documented: one copy
    return arr


def _shape(arr, name: str, shape: tuple) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)}; got {tuple(arr.shape)}"
        )


def _out(out, name: str, shape: tuple, dtype: np.dtype, device: bool):
    if out is None:
        return _empty(shape, dtype, device)
    if device != _is_device(out) or not (
        _is_device(out) or isinstance(out, np.ndarray)
    ):
        raise TypeError(f"{name} must be a {'device' if device else 'NumPy'} array")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}; got {out.dtype}")
    _shape(out, name, shape)
    contiguous = out.flags.c_contiguous if isinstance(out, np.ndarray) else True
    if not contiguous:
        raise TypeError(f"{name} must be C-contiguous (it is written in place)")
    return out


def _outs(out: Any, labels: tuple[str, ...], op: str) -> tuple:
    """Split ``out=`` into one entry per array result (None: allocate)."""
    if len(labels) == 1:
        if isinstance(out, (tuple, list)):
            raise TypeError(
                f"{op}: out must be one array ({labels[0]}) or None; got a "
                f"{type(out).__name__} of {len(out)}"
            )
        return (out,)
    if out is None:
        return (None,) * len(labels)
    if not isinstance(out, (tuple, list)) or len(out) != len(labels):
        got = (
            f"a {type(out).__name__} of {len(out)}"
            if isinstance(out, (tuple, list))
            else type(out).__name__
        )
        raise TypeError(
            f"{op}: out must be None or a tuple of {len(labels)} arrays "
            f"({', '.join(labels)}; None entries are allocated); got {got}"
        )
    return tuple(out)


def _empty(shape, dtype, device: bool):
    if device:
        from numba import cuda

        return cuda.device_array(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


class _Cuda:
    """Host <-> device staging for backend='cuda' with NumPy inputs."""

    def __init__(self, backend: str, arrays: tuple) -> None:
        self.on = backend == "cuda"
        self.device_in = any(_is_device(a) for a in arrays if a is not None)
        self.staged = self.on and not self.device_in  # host arrays through the GPU

    def target(self, out, name: str, shape, dtype):
        """The array the kernel writes: ``out`` itself (validated), or a new one
        (no ``out``, or a host ``out`` staged through the GPU)."""
        if out is not None:
            _out(out, name, shape, np.dtype(dtype), self.device_in)
            if not self.staged:
                return out
        return self.alloc(shape, dtype)

    def land(self, res, out):
        """The result as the caller receives it: ``out`` itself when given."""
        res = self.get(res)
        if out is not None and res is not out:
            out[...] = res
            return out
        return res

    def put(self, a):
        if not self.on or a is None or _is_device(a):
            return a
        from numba import cuda

        return cuda.to_device(a)

    def alloc(self, shape, dtype):
        return _empty(shape, dtype, self.on)

    def get(self, a):
        if not self.on or a is None or self.device_in:
            return a
        return a.copy_to_host()


def _kernel(op: str, backend: str):
    return _registry.resolve(op, backend)


def _call(op: str, backend: str, *args):
    fn = _kernel(op, backend)
    if backend == "numba":
        with _threading.numba_serialize():
            return fn(*args)
    return fn(*args)


# ------------------------------------------------------------------ dense
def dense_forward(
    x: npt.NDArray[np.floating],
    w: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating] | None = None,
    activation: Any = None,
    *,
    negative_slope: float = 0.01,
    return_preactivation: bool = False,
    backend: str | None = None,
    out: npt.NDArray[np.floating] | None = None,
):
    """Dense layer ``y = act(x @ w.T + b)`` with bias and activation fused.

    Parameters
    ----------
    x : ndarray, shape (B, n_in), float32 or float64
    w : ndarray, shape (n_out, n_in), same dtype (PyTorch's Linear layout)
    b : ndarray, shape (n_out,), or None
    activation : str, activation spec or None (identity)
        One of :data:`ACTIVATIONS`.
    negative_slope : float
        leaky_relu's slope for negative inputs.
    return_preactivation : bool
        Also return ``x @ w.T + b``.
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None
    out : ndarray (B, n_out), or the tuple (y, pre) with return_preactivation
        Written and returned (module docstring: ``out=``).

    Returns
    -------
    y or (y, pre) : ndarray, shape (B, n_out)

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape; BackendUnavailableError for an unavailable backend.
    """
    act, slope = _activation(activation, negative_slope)
    x = _array(x, "x", 2)
    dt = x.dtype
    w = _array(w, "w", 2, dt)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w must have shape (n_out, {x.shape[1]}) to match x {x.shape}; "
            f"got {w.shape}"
        )
    if b is not None:
        b = _array(b, "b", 1, dt)
        _shape(b, "b", (w.shape[0],))
    if return_preactivation:
        out_y, out_pre = _outs(out, ("y", "pre"), "dense_forward")
    else:
        (out_y,), out_pre = _outs(out, ("y",), "dense_forward"), None
    name = _resolve(backend, (x, w, b))
    cu = _Cuda(name, (x, w, b))
    shape = (x.shape[0], w.shape[0])
    y = cu.target(out_y, "out y", shape, dt)
    pre = cu.target(out_pre, "out pre", shape, dt) if return_preactivation else None
    _call("dense_forward", name, cu.put(x), cu.put(w), cu.put(b), act, slope, y, pre)
    y = cu.land(y, out_y)
    return (y, cu.land(pre, out_pre)) if return_preactivation else y


def dense_backward(
    dy: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    w: npt.NDArray[np.floating],
    *,
    bias: bool = True,
    backend: str | None = None,
    out: tuple | None = None,
):
    """Dense layer gradients: ``dx = dy @ w``, ``dw = dy.T @ x``, ``db = sum_b dy``.

    Parameters
    ----------
    dy : ndarray, shape (B, n_out)
        Gradient with respect to the pre-activation ``x @ w.T + b``.
    x : ndarray, shape (B, n_in)
    w : ndarray, shape (n_out, n_in)
    bias : bool
        Compute ``db`` (else it is None).
    out : tuple (dx, dw, db), optional
        Written and returned; ``db`` must be None when ``bias`` is False.

    Returns
    -------
    (dx, dw, db) : (B, n_in), (n_out, n_in), (n_out,) or None
    """
    dy = _array(dy, "dy", 2)
    dt = dy.dtype
    x = _array(x, "x", 2, dt)
    w = _array(w, "w", 2, dt)
    B, n_out = dy.shape
    _shape(x, "x", (B, x.shape[1]))
    _shape(w, "w", (n_out, x.shape[1]))
    o_dx, o_dw, o_db = _outs(out, ("dx", "dw", "db"), "dense_backward")
    if o_db is not None and not bias:
        raise ValueError("dense_backward: out db must be None when bias=False")
    name = _resolve(backend, (dy, x, w))
    cu = _Cuda(name, (dy, x, w))
    dx = cu.target(o_dx, "out dx", x.shape, dt)
    dw = cu.target(o_dw, "out dw", w.shape, dt)
    db = cu.target(o_db, "out db", (n_out,), dt) if bias else None
    _call("dense_backward", name, cu.put(dy), cu.put(x), cu.put(w), dx, dw, db)
    return cu.land(dx, o_dx), cu.land(dw, o_dw), cu.land(db, o_db)


# ------------------------------------------------------------------ activation
def activation_forward(
    x: npt.NDArray[np.floating],
    activation: Any,
    *,
    negative_slope: float = 0.01,
    backend: str | None = None,
    out: npt.NDArray[np.floating] | None = None,
):
    """Element-wise ``act(x)`` for a (B, n) array (formulas in ``kernels.activation``).

    ``out`` may be ``x`` itself (in place).  Returns ``out`` (shape and dtype of x).
    """
    act, slope = _activation(activation, negative_slope)
    x = _array(x, "x", 2)
    (out,) = _outs(out, ("y",), "activation_forward")
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    y = cu.target(out, "out", x.shape, x.dtype)
    _call("activation_forward", name, cu.put(x), act, slope, y)
    return cu.land(y, out)


def activation_backward(
    dy: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    activation: Any,
    *,
    negative_slope: float = 0.01,
    backend: str | None = None,
    out: npt.NDArray[np.floating] | None = None,
):
    """``dy * act'(x)`` where x is the activation's input.

    ``out`` (shape and dtype of x) may be ``dy`` itself (in place); returns it,
    else a new array.
    """
    act, slope = _activation(activation, negative_slope)
    dy = _array(dy, "dy", 2)
    x = _array(x, "x", 2, dy.dtype)
    _shape(x, "x", dy.shape)
    (out,) = _outs(out, ("dx",), "activation_backward")
    name = _resolve(backend, (dy, x))
    cu = _Cuda(name, (dy, x))
    y = cu.target(out, "out", x.shape, x.dtype)
    _call("activation_backward", name, cu.put(dy), cu.put(x), act, slope, y)
    return cu.land(y, out)


# ------------------------------------------------------------------ residual
def _scale(scale: Any, dtype: np.dtype, name: str = "scale") -> float:
    """A finite real ``scale`` that stays finite when rounded to ``dtype``."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float); got {scale!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"{name} must be finite; got {s}")
    with np.errstate(over="ignore"):
        if not np.isfinite(dtype.type(s)):
            raise ValueError(
                f"{name} = {s} overflows {dtype}; use float64 arrays or a scale "
                f"of magnitude <= {float(np.finfo(dtype).max):.4g}"
            )
    return s


def _no_partial_overlap(out, op: str, arrays: dict) -> None:
    """``out`` may be one of ``arrays`` itself (in place) but not overlap one
    otherwise (the element-wise kernels would read entries already written)."""
    if not isinstance(out, np.ndarray):
        return
    for nm, a in arrays.items():
        if not isinstance(a, np.ndarray) or not np.may_share_memory(out, a):
            continue
        same = (
            a.__array_interface__["data"][0] == out.__array_interface__["data"][0]
            and a.strides == out.strides
        )
        if not same:
            raise ValueError(
                f"{op}: out overlaps {nm} without being {nm} itself; pass out={nm} "
                "(in place) or a separate array"
            )


def _residual_inputs(skip: Any, x: Any, scale: Any) -> tuple:
    """(skip or None, x, scale as float), validated: x (B, n) float, skip the same."""
    x = _array(x, "x", 2)
    s = _scale(scale, x.dtype)
    if skip is not None:
        skip = _array(skip, "skip", 2, x.dtype)
        _shape(skip, "skip", x.shape)
    return skip, x, s


def residual_add(
    skip: npt.NDArray[np.floating] | None,
    x: npt.NDArray[np.floating],
    scale: float = 1.0,
    *,
    backend: str | None = None,
    out: npt.NDArray[np.floating] | None = None,
):
    """Residual stream ``out = skip + scale * x`` (``skip`` None: ``scale * x``).

    The add of a residual block, ``y = skip + alpha * branch(x)`` (He et al. 2016
    with the branch scale of SkipInit / ReZero), and with ``skip=None`` the Scale
    layer ``alpha * x`` and the branch gradient ``alpha * g``.  Computed in the
    array dtype with ``scale`` rounded to it first (numpy, numba and c agree bit
    for bit; formulas and NaN semantics in ``initdiag.kernels.residual``).

    Parameters
    ----------
    skip : ndarray, shape (B, n), or None
        The shortcut; same dtype as x.
    x : ndarray, shape (B, n), float32 or float64
    scale : float
        Finite, and finite in the dtype of x.
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None
    out : ndarray (B, n), dtype of x, optional
        May be ``skip`` or ``x`` itself (in place), not a partial overlap.

    Returns
    -------
    ndarray, shape (B, n)
        ``out`` (a new array when None; also for ``skip=None, scale=1``).

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape / scale; BackendUnavailableError for an
        unavailable backend.
    """
    skip, x, s = _residual_inputs(skip, x, scale)
    (out,) = _outs(out, ("y",), "residual_add")
    _no_partial_overlap(out, "residual_add", {"skip": skip, "x": x})
    name = _resolve(backend, (skip, x))
    cu = _Cuda(name, (skip, x))
    y = cu.target(out, "out", x.shape, x.dtype)
    _call("residual_add", name, cu.put(skip), cu.put(x), s, y)
    return cu.land(y, out)


def _mask(mask: Any, shape: tuple) -> Any:
    """A C-contiguous uint8 (B, n) mask of zeros and ones (device arrays pass)."""
    if _is_device(mask):
        from numba import cuda

        # CuPy / PyTorch CUDA tensors: a numba view (NumPy dtype, contiguity)
        arr = mask if hasattr(mask, "is_c_contiguous") else cuda.as_cuda_array(mask)
        if arr.dtype != np.uint8:
            raise TypeError(f"mask must be uint8 (0 or 1); got {arr.dtype}")
        if not arr.is_c_contiguous():
            raise TypeError(
                f"mask: device arrays must be C-contiguous; got strides {arr.strides}"
            )
        _shape(arr, "mask", shape)
        return arr
    if not isinstance(mask, np.ndarray):
        raise TypeError(
            f"mask must be a NumPy uint8 array (0 = dropped, 1 = kept); got "
            f"{type(mask).__name__}; build it with initdiag._rng.fill_keep_mask or "
            "np.asarray(mask, dtype=np.uint8)"
        )
    if mask.dtype != np.uint8:
        raise TypeError(
            f"mask must be uint8 (0 = dropped, 1 = kept); got {mask.dtype}; "
            "convert with mask.astype(np.uint8)"
        )
    _shape(mask, "mask", shape)
    if mask.size and int(mask.max()) > 1:
        raise ValueError(
            f"mask must hold only 0 (dropped) and 1 (kept); found {int(mask.max())}; "
            "use (mask != 0).astype(np.uint8)"
        )
    return np.ascontiguousarray(mask)


def masked_scale(
    x: npt.NDArray[np.floating],
    mask: npt.NDArray[np.uint8],
    scale: float,
    *,
    backend: str | None = None,
    out: npt.NDArray[np.floating] | None = None,
):
    """Inverted-dropout masking ``out = x * (mask * scale)``.

    Training-mode dropout (Srivastava et al. 2014) as PyTorch computes it:
    ``y = x * m / (1 - p)`` with ``scale = 1 / (1 - p)``; its backward is the same
    op on the gradient with the same mask and scale.  As in PyTorch (which
    multiplies by the scaled mask), a dropped entry is ``x * 0``: 0 for finite
    x, NaN where x is NaN or +-inf.

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    mask : ndarray, shape (B, n), uint8
        1 where kept, 0 where dropped (``initdiag._rng.fill_keep_mask``).
    scale : float
        Finite, and finite in the dtype of x.
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None
    out : ndarray (B, n), dtype of x, optional
        May be ``x`` itself (in place), not a partial overlap.

    Returns
    -------
    ndarray, shape (B, n)

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape, a mask that is not uint8 0/1, a non-finite scale;
        BackendUnavailableError for an unavailable backend.
    """
    x = _array(x, "x", 2)
    s = _scale(scale, x.dtype)
    mask = _mask(mask, x.shape)
    (out,) = _outs(out, ("y",), "masked_scale")
    _no_partial_overlap(out, "masked_scale", {"x": x})
    name = _resolve(backend, (x, mask))
    cu = _Cuda(name, (x, mask))
    y = cu.target(out, "out", x.shape, x.dtype)
    _call("masked_scale", name, cu.put(x), cu.put(mask), s, y)
    return cu.land(y, out)


# ------------------------------------------------------------------ batchnorm
def _eps(eps: Any) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number; got {eps!r}") from None
    if not (math.isfinite(e) and e >= 0):
        raise ValueError(f"eps must be finite and >= 0; got {e}")
    return e


def batchnorm_forward(
    x: npt.NDArray[np.floating],
    gamma: npt.NDArray[np.floating],
    beta: npt.NDArray[np.floating],
    eps: float = 1e-5,
    *,
    activation: Any = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
    out: tuple | None = None,
):
    """Training-mode BatchNorm over the batch, optionally fused with an activation.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)`` with the per-feature
    batch mean and biased variance (Ioffe & Szegedy 2015; PyTorch training mode).

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    gamma, beta : ndarray, shape (n,), same dtype
    eps : float >= 0
    out : tuple (y, mean, invstd), optional
        Written and returned (None entries are allocated).

    Returns
    -------
    (y, mean, invstd) : (B, n), (n,), (n,), dtype of x
        ``mean`` and ``invstd = 1 / sqrt(var + eps)`` are what the backward needs.
    """
    act, slope = _activation(activation, negative_slope)
    e = _eps(eps)
    x = _array(x, "x", 2)
    dt = x.dtype
    n = x.shape[1]
    gamma = _array(gamma, "gamma", 1, dt)
    beta = _array(beta, "beta", 1, dt)
    _shape(gamma, "gamma", (n,))
    _shape(beta, "beta", (n,))
    o_y, o_mean, o_inv = _outs(out, ("y", "mean", "invstd"), "batchnorm_forward")
    name = _resolve(backend, (x, gamma, beta))
    cu = _Cuda(name, (x, gamma, beta))
    y = cu.target(o_y, "out y", x.shape, dt)
    mean = cu.target(o_mean, "out mean", (n,), dt)
    invstd = cu.target(o_inv, "out invstd", (n,), dt)
    _call(
        "batchnorm_forward",
        name,
        cu.put(x),
        cu.put(gamma),
        cu.put(beta),
        e,
        act,
        slope,
        y,
        mean,
        invstd,
    )
    return cu.land(y, o_y), cu.land(mean, o_mean), cu.land(invstd, o_inv)


def batchnorm_backward(
    dy: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    saved: tuple,
    gamma: npt.NDArray[np.floating],
    beta: npt.NDArray[np.floating] | None = None,
    *,
    activation: Any = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
    out: tuple | None = None,
):
    """Gradients of :func:`batchnorm_forward` (activation derivative fused).

    ``g = dy * act'(gamma * xhat + beta)``, ``dbeta = sum_b g``,
    ``dgamma = sum_b g * xhat``,
    ``dx = gamma * invstd / B * (B g - dbeta - xhat * dgamma)``.

    Parameters
    ----------
    dy : ndarray, shape (B, n)
        Gradient with respect to the forward's output.
    x : ndarray, shape (B, n)
        The forward's input.
    saved : (mean, invstd)
        As returned by the forward.
    gamma : ndarray, shape (n,)
    beta : ndarray, shape (n,) or None
        Needed only when ``activation`` is not identity (None counts as zero).
    out : tuple (dx, dgamma, dbeta), optional
        Written and returned (None entries are allocated).

    Returns
    -------
    (dx, dgamma, dbeta) : (B, n), (n,), (n,)
    """
    act, slope = _activation(activation, negative_slope)
    dy = _array(dy, "dy", 2)
    dt = dy.dtype
    x = _array(x, "x", 2, dt)
    _shape(x, "x", dy.shape)
    n = x.shape[1]
    try:
        mean, invstd = saved
    except (TypeError, ValueError):
        raise TypeError(
            "saved must be the (mean, invstd) pair returned by batchnorm_forward"
        ) from None
    mean = _array(mean, "saved mean", 1, dt)
    invstd = _array(invstd, "saved invstd", 1, dt)
    gamma = _array(gamma, "gamma", 1, dt)
    for arr, nm in ((mean, "saved mean"), (invstd, "saved invstd"), (gamma, "gamma")):
        _shape(arr, nm, (n,))
    if beta is not None:
        beta = _array(beta, "beta", 1, dt)
        _shape(beta, "beta", (n,))
    o_dx, o_dg, o_db = _outs(out, ("dx", "dgamma", "dbeta"), "batchnorm_backward")
    name = _resolve(backend, (dy, x, mean, invstd, gamma, beta))
    cu = _Cuda(name, (dy, x, mean, invstd, gamma, beta))
    dx = cu.target(o_dx, "out dx", x.shape, dt)
    dgamma = cu.target(o_dg, "out dgamma", (n,), dt)
    dbeta = cu.target(o_db, "out dbeta", (n,), dt)
    _call(
        "batchnorm_backward",
        name,
        cu.put(dy),
        cu.put(x),
        cu.put(mean),
        cu.put(invstd),
        cu.put(gamma),
        cu.put(beta),
        act,
        slope,
        dx,
        dgamma,
        dbeta,
    )
    return cu.land(dx, o_dx), cu.land(dgamma, o_dg), cu.land(dbeta, o_db)


def _ln_params(gamma: Any, beta: Any, n: int, dt: np.dtype) -> tuple:
    """LayerNorm's affine parameters: both None (no affine), gamma alone (zero bias,
    torch's ``bias=False``) or both, each of shape (n,) in x's dtype."""
    if gamma is None:
        if beta is not None:
            raise ValueError(
                "beta was given without gamma; pass both (affine), gamma alone "
                "(no bias) or neither (elementwise_affine=False)"
            )
        return None, None
    gamma = _array(gamma, "gamma", 1, dt)
    _shape(gamma, "gamma", (n,))
    if beta is not None:
        beta = _array(beta, "beta", 1, dt)
        _shape(beta, "beta", (n,))
    return gamma, beta


def layernorm_forward(
    x: npt.NDArray[np.floating],
    gamma: npt.NDArray[np.floating] | None = None,
    beta: npt.NDArray[np.floating] | None = None,
    eps: float = 1e-5,
    *,
    activation: Any = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
    out: tuple | None = None,
):
    """LayerNorm over the features of each example, optionally fused with an
    activation.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)`` with the per-example
    (per-row) mean and biased variance over the n features (Ba, Kiros & Hinton
    2016; ``torch.nn.LayerNorm(n, eps)``, the same in training and eval).

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    gamma, beta : ndarray, shape (n,), same dtype, or None
        Both None: no affine parameters (``elementwise_affine=False``); gamma
        alone: no bias.  None is never materialised as ones / zeros for the
        numpy, c and cuda kernels (the numba kernel gets a flag and, for a
        missing beta next to a gamma, a zero vector).
    eps : float >= 0
    activation : str, activation spec or None (identity)
    negative_slope : float
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None
    out : tuple (y, mean, invstd), optional
        Arrays to write (None entries are allocated): (B, n), (B,), (B,),
        C-contiguous, x's dtype; returned themselves.

    Returns
    -------
    (y, mean, invstd) : (B, n), (B,), (B,), dtype of x
        ``mean`` and ``invstd = 1 / sqrt(var + eps)`` are what the backward needs.

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape / layout of an input or ``out``, eps < 0, beta without
        gamma; BackendUnavailableError for an unavailable backend.
    """
    act, slope = _activation(activation, negative_slope)
    e = _eps(eps)
    x = _array(x, "x", 2)
    dt = x.dtype
    B, n = x.shape
    gamma, beta = _ln_params(gamma, beta, n, dt)
    name = _resolve(backend, (x, gamma, beta))
    o_y, o_mean, o_inv = _outs(out, ("y", "mean", "invstd"), "layernorm_forward")
    cu = _Cuda(name, (x, gamma, beta))
    y = cu.target(o_y, "out y", x.shape, dt)
    mean = cu.target(o_mean, "out mean", (B,), dt)
    invstd = cu.target(o_inv, "out invstd", (B,), dt)
    _call(
        "layernorm_forward",
        name,
        cu.put(x),
        cu.put(gamma),
        cu.put(beta),
        e,
        act,
        slope,
        y,
        mean,
        invstd,
    )
    return cu.land(y, o_y), cu.land(mean, o_mean), cu.land(invstd, o_inv)


def layernorm_backward(
    dy: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    saved: tuple,
    gamma: npt.NDArray[np.floating] | None = None,
    beta: npt.NDArray[np.floating] | None = None,
    *,
    activation: Any = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
    out: tuple | None = None,
):
    """Gradients of :func:`layernorm_forward` (activation derivative fused).

    With ``xhat = (x - mean) invstd``, ``g = dy * act'(gamma * xhat + beta)`` and
    ``h = g * gamma``: ``dbeta = sum_b g``, ``dgamma = sum_b g * xhat`` and, per
    row, ``dx = invstd / n * (n h - sum_j h - xhat * sum_j h xhat)``.

    Parameters
    ----------
    dy : ndarray, shape (B, n)
        Gradient with respect to the forward's output.
    x : ndarray, shape (B, n)
        The forward's input.
    saved : (mean, invstd)
        As returned by the forward, each of shape (B,).
    gamma, beta : ndarray, shape (n,), or None
        As given to the forward.
    out : tuple (dx, dgamma, dbeta), optional
        Arrays to write (None entries are allocated; dgamma / dbeta must be None
        without affine parameters), returned themselves.

    Returns
    -------
    (dx, dgamma, dbeta) : (B, n), (n,) or None, (n,) or None
        ``dgamma`` and ``dbeta`` are None without affine parameters (gamma None);
        with gamma but no beta, ``dbeta`` is the gradient of a zero bias.

    Raises
    ------
    TypeError, ValueError
        As :func:`layernorm_forward`; ``saved`` not a (mean, invstd) pair of (B,)
        arrays.
    """
    act, slope = _activation(activation, negative_slope)
    dy = _array(dy, "dy", 2)
    dt = dy.dtype
    x = _array(x, "x", 2, dt)
    _shape(x, "x", dy.shape)
    B, n = x.shape
    try:
        mean, invstd = saved
    except (TypeError, ValueError):
        raise TypeError(
            "saved must be the (mean, invstd) pair returned by layernorm_forward"
        ) from None
    mean = _array(mean, "saved mean", 1, dt)
    invstd = _array(invstd, "saved invstd", 1, dt)
    _shape(mean, "saved mean", (B,))
    _shape(invstd, "saved invstd", (B,))
    gamma, beta = _ln_params(gamma, beta, n, dt)
    name = _resolve(backend, (dy, x, mean, invstd, gamma, beta))
    o_dx, o_dg, o_db = _outs(out, ("dx", "dgamma", "dbeta"), "layernorm_backward")
    if gamma is None and (o_dg is not None or o_db is not None):
        raise TypeError(
            "layernorm_backward: out dgamma / dbeta given but there are no affine "
            "parameters (gamma is None); pass None for them"
        )
    cu = _Cuda(name, (dy, x, mean, invstd, gamma, beta))
    dx = cu.target(o_dx, "out dx", x.shape, dt)
    dgamma = cu.target(o_dg, "out dgamma", (n,), dt) if gamma is not None else None
    dbeta = cu.target(o_db, "out dbeta", (n,), dt) if gamma is not None else None
    _call(
        "layernorm_backward",
        name,
        cu.put(dy),
        cu.put(x),
        cu.put(mean),
        cu.put(invstd),
        cu.put(gamma),
        cu.put(beta),
        act,
        slope,
        dx,
        dgamma,
        dbeta,
    )
    return (
        cu.land(dx, o_dx),
        None if dgamma is None else cu.land(dgamma, o_dg),
        None if dbeta is None else cu.land(dbeta, o_db),
    )


# ------------------------------------------------------------------ statistics
def column_stats(
    x: npt.NDArray[np.floating],
    *,
    backend: str | None = None,
    out: tuple | None = None,
):
    """Per-feature statistics over the batch in one pass.

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    out : tuple (mean, var, frac_le0, frac_eq0) of float64 (n,) arrays, optional

    Returns
    -------
    (mean, var, frac_le0, frac_eq0) : four float64 arrays of shape (n,)
        Biased variance from shifted sums (numerically stable); fractions of
        entries <= 0 and == 0.
    """
    x = _array(x, "x", 2)
    n = x.shape[1]
    labels = ("mean", "var", "frac_le0", "frac_eq0")
    given = _outs(out, labels, "column_stats")
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    f64 = np.dtype(np.float64)
    outs = [
        cu.target(o, f"out {k}", (n,), f64) for o, k in zip(given, labels, strict=True)
    ]
    _call("column_stats", name, cu.put(x), *outs)
    return tuple(cu.land(r, o) for r, o in zip(outs, given, strict=True))


def layer_summary_array(
    x: npt.NDArray[np.floating],
    out: npt.NDArray[np.float64] | None = None,
    *,
    backend: str | None = None,
) -> npt.NDArray[np.float64]:
    """The 8 :data:`SUMMARY_FIELDS` of one layer output as a float64 array (hot path).

    ``out``, if given, must be a C-contiguous float64 array of shape (8,).
    """
    x = _array(x, "x", 2)
    (out,) = _outs(out, ("summary",), "layer_summary_array")
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    res = cu.target(out, "out", (8,), np.float64)
    _call("layer_summary", name, cu.put(x), res)
    return cu.land(res, out)


def layer_summary(
    x: npt.NDArray[np.floating],
    *,
    backend: str | None = None,
    out: npt.NDArray[np.float64] | None = None,
) -> dict[str, float]:
    """Profile statistics of one layer output ``x`` (B, n) as ``{field: float}``.

    Fields (:data:`SUMMARY_FIELDS`): mean, second_moment = mean(x^2), variance =
    mean over features of the biased batch variance, squared_mean = mean over
    features of the squared batch mean (Schoenholz et al. 2017), active_fraction
    (> 0), dead_fraction (features <= 0 for the whole batch), zero_fraction (== 0),
    nonfinite_count (NaN or inf entries).  ``out``: the float64 (8,) array the
    values are also written into (:func:`layer_summary_array`).
    """
    arr = layer_summary_array(x, out, backend=backend)
    if _is_device(arr):
        arr = arr.copy_to_host()
    return dict(zip(SUMMARY_FIELDS, (float(v) for v in arr), strict=False))


def row_correlation(
    x: npt.NDArray[np.floating],
    *,
    gram: bool = False,
    backend: str | None = None,
    out: npt.NDArray[np.float64] | None = None,
):
    """Mean uncentered cosine similarity between distinct rows of ``x`` (B, n).

    ``c = 1 / (B (B - 1)) * sum_{a != b} <x_a, x_b> / (|x_a| |x_b|)``, computed in
    O(B n) as ``(|sum_a u_a|^2 - sum_a |u_a|^2) / (B (B - 1))`` with unit rows
    ``u_a``.  Rows of zero norm count as cosine 0; B = 1 gives NaN.

    Returns
    -------
    float, or (float, ndarray (B, B) float64) when ``gram=True``
        The Gram matrix of cosines (GEMM in float64 on the host; diagonal 1, or 0
        for a zero row; always a new array).  ``out``, when given: the float64
        (1,) cell the kernel writes the correlation into.
    """
    x = _array(x, "x", 2)
    (out,) = _outs(out, ("correlation",), "row_correlation")
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    res = cu.target(out, "out", (1,), np.float64)
    _call("row_correlation", name, cu.put(x), res)
    res = cu.land(res, out)
    if _is_device(res):
        res = res.copy_to_host()
    c = float(res[0])
    if not gram:
        return c
    xh = x.copy_to_host() if _is_device(x) else x
    xd = np.asarray(xh, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", xd, xd))
    with np.errstate(all="ignore"):
        u = xd * np.where(norms == 0, 0.0, 1.0 / norms)[:, None]
    return c, u @ u.T


# ------------------------------------------------------------------ fused passes
# The passes simulate runs per layer (kernels/fused.py), NumPy and Numba only.  The
# empirical engine calls the raw kernels through kernels.fused.resolve("numba");
# these dispatchers are the validated entry for everybody else.
def _vec64(a: Any, name: str, n: int, default: float) -> npt.NDArray[np.float64]:
    """A float64 (n,) coefficient vector (float32 input is widened: lossless)."""
    if a is None:
        return np.full(n, default)
    a = _array(a, name, 1)
    _shape(a, name, (n,))
    return np.asarray(a, dtype=np.float64)


def _unit_coefficients(n: int, mean, invstd, gamma, beta) -> list:
    """The four float64 (n,) vectors of a unit; None: 0, 1, 1, 0 (no BatchNorm)."""
    return [
        _vec64(v, nm, n, d)
        for v, nm, d in (
            (mean, "mean", 0.0),
            (invstd, "invstd", 1.0),
            (gamma, "gamma", 1.0),
            (beta, "beta", 0.0),
        )
    ]


def _scratch(B: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    from .fused import row_chunks

    nch = row_chunks(B)
    return np.empty((nch, 4, n)), np.empty((nch, 4))


_NO_COLUMNS = np.empty(0)


def _stats_outs(given: tuple, n: int, column_moments: bool) -> tuple:
    """(stats, mean, var) outputs of a statistics pass, validated or allocated:
    float64 (10,) and, with ``column_moments``, (n,) (else empty: not written)."""
    f64 = np.dtype(np.float64)
    st = _out(given[0], "out stats", (10,), f64, False)
    if not column_moments:
        return st, _NO_COLUMNS, _NO_COLUMNS
    mean = _out(given[1], "out mean", (n,), f64, False)
    return st, mean, _out(given[2], "out var", (n,), f64, False)


def layer_stats(
    x: npt.NDArray[np.floating],
    *,
    column_moments: bool = False,
    backend: str | None = None,
    out: Any = None,
):
    """Every forward statistic ``simulate`` records of one layer output, one pass.

    Fields (:data:`LAYER_STATS_FIELDS`): the :func:`layer_summary` fields (but
    ``dead_fraction`` counts features with no entry > 0), then ``correlation``
    (:func:`row_correlation`'s mean uncentred cosine, NaN for B = 1) and
    ``any_nonzero`` (1.0 or 0.0).  Formulas: ``initdiag.kernels.fused``.

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    column_moments : bool
        Also return the per-feature batch mean and biased variance.
    backend : {"numpy", "numba", "auto"} or None
    out : ndarray float64 (10,), or the tuple (stats, mean, var) with
        ``column_moments`` (float64 (n,) vectors)

    Returns
    -------
    stats or (stats, mean, var) : float64 (10,) [, (n,), (n,)]

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape; BackendUnavailableError for c, cuda or an
        unavailable backend.
    """
    x = _array(x, "x", 2)
    B, n = x.shape
    labels = ("stats", "mean", "var") if column_moments else ("stats",)
    given = _outs(out, labels, "layer_stats")
    name = _resolve_op("layer_stats", backend, (x,))
    st, mean, var = _stats_outs(given, n, column_moments)
    acc, sc = _scratch(B, n)
    _call("layer_stats", name, x, acc, sc, st, mean, var)
    return (st, mean, var) if column_moments else st


def residual_add_stats(
    skip: npt.NDArray[np.floating] | None,
    x: npt.NDArray[np.floating],
    scale: float = 1.0,
    *,
    column_moments: bool = False,
    backend: str | None = None,
    out: tuple | None = None,
):
    """:func:`residual_add` and :func:`layer_stats` of its result in one pass.

    ``y = skip + scale * x`` (``skip`` None: ``scale * x``), bit for bit as
    :func:`residual_add` computes it, and the 10 :data:`LAYER_STATS_FIELDS` of
    ``y`` (equal to ``layer_stats(y)`` on the same backend).

    Parameters
    ----------
    skip : ndarray, shape (B, n), or None
    x : ndarray, shape (B, n), float32 or float64
    scale : float
    column_moments : bool
        Also return the per-feature batch mean and biased variance of y.
    backend : {"numpy", "numba", "auto"} or None
    out : tuple (y, stats) or (y, stats, mean, var), optional
        y (B, n) dtype of x (may be ``skip`` or ``x`` itself); the rest float64.

    Returns
    -------
    (y, stats) or (y, stats, mean, var)

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape / scale; BackendUnavailableError for c, cuda or an
        unavailable backend.
    """
    skip, x, s = _residual_inputs(skip, x, scale)
    B, n = x.shape
    labels = ("y", "stats", "mean", "var") if column_moments else ("y", "stats")
    given = _outs(out, labels, "residual_add_stats")
    name = _resolve_op("residual_add_stats", backend, (skip, x))
    y = _out(given[0], "out y", (B, n), x.dtype, False)
    _no_partial_overlap(y, "residual_add_stats", {"skip": skip, "x": x})
    st, mean, var = _stats_outs(given[1:], n, column_moments)
    acc, sc = _scratch(B, n)
    _call("residual_add_stats", name, skip, x, s, y, acc, sc, st, mean, var)
    return (y, st, mean, var) if column_moments else (y, st)


def unit_forward(
    x: npt.NDArray[np.floating],
    mean: npt.NDArray[np.floating] | None = None,
    invstd: npt.NDArray[np.floating] | None = None,
    gamma: npt.NDArray[np.floating] | None = None,
    beta: npt.NDArray[np.floating] | None = None,
    *,
    activation: Any = None,
    negative_slope: float = 0.01,
    record_y: bool = False,
    backend: str | None = None,
    out: tuple | None = None,
):
    """One BatchNorm + activation unit and the statistics of its outputs, one pass.

    ``y = gamma (x - mean) invstd + beta`` (Ioffe & Szegedy 2015, with the batch
    moments given: :func:`layer_stats` computes them), ``h = act(y)``, in the dtype
    of x with the coefficients rounded to it; ``y`` is not stored.  Without
    ``mean`` / ``invstd`` (0 and 1) and ``gamma`` / ``beta`` (1 and 0) it is a
    plain activation (then ``y = x`` exactly).

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    mean, invstd, gamma, beta : ndarray, shape (n,), or None
        Widened to float64 (the kernels take the coefficients in float64).
    activation : str, activation spec or None (identity)
    record_y : bool
        Also compute the statistics of ``y``.
    backend : {"numpy", "numba", "auto"} or None
    out : tuple (h, stats_y, stats_h), optional
        h (B, n) dtype of x; the statistics float64 (10,); ``stats_y`` must be
        None unless ``record_y``.

    Returns
    -------
    (h, stats_y, stats_h)
        ``stats_y`` is None unless ``record_y``; statistics as
        :func:`layer_stats` (:data:`LAYER_STATS_FIELDS`).
    """
    act, slope = _activation(activation, negative_slope)
    x = _array(x, "x", 2)
    B, n = x.shape
    coef = _unit_coefficients(n, mean, invstd, gamma, beta)
    o_h, o_y, o_st = _outs(out, ("h", "stats_y", "stats_h"), "unit_forward")
    if o_y is not None and not record_y:
        raise ValueError("unit_forward: out stats_y must be None unless record_y")
    name = _resolve_op("unit_forward", backend, (x,))
    f64 = np.dtype(np.float64)
    h = _out(o_h, "out h", (B, n), x.dtype, False)
    if np.may_share_memory(h, x):
        raise ValueError("unit_forward: out h must not overlap x")
    st_y = _out(o_y, "out stats_y", (10,), f64, False)
    st_h = _out(o_st, "out stats_h", (10,), f64, False)
    acc_h, sc_h = _scratch(B, n)
    # the y scratch is not touched unless record_y
    acc_y, sc_y = _scratch(B, n) if record_y else (acc_h, sc_h)
    from ._names import ACT_CODES

    _call(
        "unit_forward",
        name,
        x,
        *coef,
        ACT_CODES[act],
        slope,
        bool(record_y),
        h,
        acc_y,
        sc_y,
        acc_h,
        sc_h,
        st_y,
        st_h,
    )
    return h, (st_y if record_y else None), st_h


def unit_backward(
    g: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    mean: npt.NDArray[np.floating] | None = None,
    invstd: npt.NDArray[np.floating] | None = None,
    gamma: npt.NDArray[np.floating] | None = None,
    beta: npt.NDArray[np.floating] | None = None,
    *,
    activation: Any = None,
    negative_slope: float = 0.01,
    need_dx: bool = True,
    backend: str | None = None,
    out: tuple | None = None,
):
    """Backward of :func:`unit_forward` with the sums ``simulate`` records.

    ``g' = g act'(y)``; with BatchNorm (``mean`` and ``invstd`` given)
    ``dbeta = sum_b g'``, ``dgamma = sum_b g' xhat`` and
    ``dx = gamma invstd / B (B g' - dbeta - xhat dgamma)`` (the training-mode
    BatchNorm backward: the batch moments depend on x), without it ``dx = g'``.

    Parameters
    ----------
    g : ndarray, shape (B, n)
        Gradient with respect to the unit output h.
    x : ndarray, shape (B, n), same dtype
        The unit input.
    mean, invstd, gamma, beta : ndarray, shape (n,), or None
        As given to the forward; ``mean`` and ``invstd`` both or neither.
    need_dx : bool
        False skips the BatchNorm dx pass (``dx`` then holds g', ``dxsum`` and
        ``sums[2]`` are 0): the first layer needs no input gradient.
    out : tuple (dx, sums, dgamma, dbeta, dxsum), optional
        ``dx`` (B, n) dtype of g, must not overlap g or x; the rest float64.

    Returns
    -------
    (dx, sums, dgamma, dbeta, dxsum)
        ``sums`` float64 (3,) = [sum g^2, sum g'^2, sum dx^2]; ``dgamma``,
        ``dbeta`` (0 without BatchNorm) and ``dxsum`` (the column sums of dx: the
        bias gradient of a preceding Dense) float64 (n,).
    """
    act, slope = _activation(activation, negative_slope)
    g = _array(g, "g", 2)
    x = _array(x, "x", 2, g.dtype)
    _shape(x, "x", g.shape)
    B, n = g.shape
    if (mean is None) != (invstd is None):
        raise ValueError(
            "unit_backward: give mean and invstd both (a BatchNorm unit) or neither "
            "(a plain activation)"
        )
    has_bn = mean is not None
    coef = _unit_coefficients(n, mean, invstd, gamma, beta)
    labels = ("dx", "sums", "dgamma", "dbeta", "dxsum")
    o_dx, o_s, o_dg, o_db, o_dxs = _outs(out, labels, "unit_backward")
    name = _resolve_op("unit_backward", backend, (g, x))
    f64 = np.dtype(np.float64)
    dx = _out(o_dx, "out dx", (B, n), g.dtype, False)
    if np.may_share_memory(dx, g) or np.may_share_memory(dx, x):
        raise ValueError("unit_backward: out dx must not overlap g or x")
    sums = _out(o_s, "out sums", (3,), f64, False)
    dgamma = _out(o_dg, "out dgamma", (n,), f64, False)
    dbeta = _out(o_db, "out dbeta", (n,), f64, False)
    dxsum = _out(o_dxs, "out dxsum", (n,), f64, False)
    part, _ = _scratch(B, n)
    from ._names import ACT_CODES

    _call(
        "unit_backward",
        name,
        g,
        x,
        *coef,
        ACT_CODES[act],
        slope,
        has_bn,
        bool(need_dx),
        dx,
        part,
        sums,
        dgamma,
        dbeta,
        dxsum,
    )
    return dx, sums, dgamma, dbeta, dxsum


def gram_layout(B: int, *, backend: str | None = None) -> int:
    """Which entries of a B x B Gram :func:`gram` writes on ``backend``.

    Returns
    -------
    int
        0: the full matrix; -1: the upper triangle, by rows (BLAS syrk, numba for
        B >= 128); h > 0: the lower block triangle in blocks of h rows (numba when
        SciPy's BLAS table is unreachable).  Entries outside are left unset.
    """
    if isinstance(B, bool) or not isinstance(B, (int, np.integer)) or B < 1:
        raise ValueError(f"B must be an integer >= 1; got {B!r}")
    from .fused import gram_layout as layout

    return layout(int(B), _resolve_op("gram", backend, ()))


def gram(
    a: npt.NDArray[np.floating],
    *,
    backend: str | None = None,
    out: npt.NDArray[np.floating] | None = None,
):
    """The Gram matrix ``a a^T`` (B x B, dtype of a) by BLAS.

    Only the entries :func:`gram_layout` names are written (symmetric: the rest
    are their mirror images); :func:`gram_dot` reads exactly those.  ``out`` (B, B)
    is written and returned.
    """
    a = _array(a, "a", 2)
    B = a.shape[0]
    (out,) = _outs(out, ("gram",), "gram")
    name = _resolve_op("gram", backend, (a,))
    res = _out(out, "out", (B, B), a.dtype, False)
    if np.may_share_memory(res, a):
        raise ValueError("gram: out must not overlap a")
    return _call("gram", name, a, res)


def gram_dot(
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    *,
    layout: int | None = None,
    backend: str | None = None,
    out: npt.NDArray[np.float64] | None = None,
) -> tuple[float, float]:
    """``(sum_ij a_ij b_ij, trace a)`` in float64 for two symmetric Gram matrices.

    With ``a = G G^T`` and ``b = X X^T``: ``sum_ij a_ij b_ij = ||G^T X||_F^2``
    (simulate's weight-gradient norm without forming ``dW = G^T X``) and
    ``trace a = ||G||_F^2``.

    Parameters
    ----------
    a, b : ndarray, shape (B, B), one dtype
        Stored in ``layout`` (as :func:`gram` leaves them).
    layout : int or None
        :func:`gram_layout`'s code; None: the layout of :func:`gram` on the same
        backend.
    out : ndarray float64 (2,), optional
        Receives the two values.

    Returns
    -------
    (float, float)
    """
    a = _array(a, "a", 2)
    b = _array(b, "b", 2, a.dtype)
    B = a.shape[0]
    _shape(a, "a", (B, B))
    _shape(b, "b", (B, B))
    (out,) = _outs(out, ("dot_trace",), "gram_dot")
    name = _resolve_op("gram_dot", backend, (a, b))
    if layout is None:
        from .fused import gram_layout as _layout

        h = _layout(B, name)
    elif (
        isinstance(layout, bool)
        or not isinstance(layout, (int, np.integer))
        or not -1 <= layout <= B
    ):
        raise ValueError(
            f"layout must be an integer in [-1, {B}] (gram_layout's code); "
            f"got {layout!r}"
        )
    else:
        h = int(layout)
    res = _out(out, "out", (2,), np.dtype(np.float64), False)
    s, t = _call("gram_dot", name, a, b, h)
    res[0], res[1] = s, t
    return float(s), float(t)


# ------------------------------------------------------------------ training
def _hyper(value: Any, name: str, dtype: np.dtype, upper: float | None = None):
    """A finite real hyper-parameter >= 0 (and < ``upper``), finite in ``dtype``."""
    v = _scale(value, dtype, name)
    if v < 0 or (upper is not None and v >= upper):
        want = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {want}; got {value!r}")
    return v


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _inplace(a: Any, name: str, ndim: int, dtype: np.dtype | None = None):
    """An array the op updates in place: validated like any input, but never
    copied (a copy would lose the update), so it must be C-contiguous and
    writeable."""
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise TypeError(
                f"{name} is updated in place, so it must be C-contiguous; got shape "
                f"{a.shape} with strides {a.strides}; keep the optimizer state in "
                f"np.ascontiguousarray({name}) and pass that array every step"
            )
        if not a.flags.writeable:
            raise ValueError(f"{name} is updated in place but is read-only")
    return _array(a, name, ndim, dtype)


def _param_grad(param: Any, grad: Any) -> tuple:
    """(param, grad): param 1-D or 2-D float (in place), grad its shape and dtype."""
    nd = (
        getattr(param, "ndim", 1)
        if (isinstance(param, np.ndarray) or _is_device(param))
        else 1
    )
    if nd not in (1, 2):
        raise ValueError(
            "param must be 1-D (a bias or a normalisation scale) or 2-D (a weight "
            f"matrix); got shape {tuple(param.shape)}"
        )
    p = _inplace(param, "param", nd)
    g = _array(grad, "grad", nd, p.dtype)
    _shape(g, "grad", p.shape)
    return p, g


def _state(a: Any, name: str, p: Any):
    s = _inplace(a, name, p.ndim, p.dtype)
    _shape(s, name, p.shape)
    return s


def _distinct(op: str, arrays: dict) -> None:
    """No two of the arrays share memory (each is read or updated element-wise
    with the others: an alias would mix the parameter with its state)."""
    items = [(k, a) for k, a in arrays.items() if isinstance(a, np.ndarray)]
    for i, (ka, a) in enumerate(items):
        for kb, b in items[i + 1 :]:
            if np.may_share_memory(a, b):
                raise ValueError(
                    f"{op}: {ka} and {kb} share memory; each needs its own array"
                )


def sgd_update(
    param: npt.NDArray[np.floating],
    grad: npt.NDArray[np.floating],
    velocity: npt.NDArray[np.floating] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    backend: str | None = None,
) -> None:
    """One SGD step in place, with momentum, Nesterov momentum and weight decay.

    Exactly ``torch.optim.SGD`` (dampening 0; single-tensor implementation),
    element-wise in the array dtype with the hyper-parameters rounded to it::

        g = grad + weight_decay * param
        velocity = momentum * velocity + g
        g = g + momentum * velocity   (nesterov)   else   g = velocity
        param = param - lr * g

    and ``param = param - lr * g`` when ``momentum == 0`` (heavy ball: Polyak
    1964; Nesterov momentum in the form of Sutskever et al. 2013, "On the
    importance of initialization and momentum in deep learning").  Start
    ``velocity`` at zeros: the first step then gives torch's ``velocity = g``.
    The numpy, numba and c variants agree bit for bit; with torch to a few ulps
    a step (its CPU loops fuse some products into FMAs; ``initdiag.kernels.optim``).

    Parameters
    ----------
    param : ndarray, shape (n,) or (n_out, n_in), float32 or float64
        Updated in place; C-contiguous.
    grad : ndarray, the shape and dtype of param
    velocity : ndarray, the shape and dtype of param, or None
        The momentum buffer, updated in place; may be None when momentum is 0
        (then a given array is left untouched).
    lr : float >= 0
    momentum : float >= 0
    weight_decay : float >= 0
        L2 penalty added to the gradient (coupled, as torch.optim.SGD).
    nesterov : bool
        Needs momentum > 0.
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, a non-contiguous param / velocity, a
        non-real hyper-parameter.
    ValueError
        Wrong shapes, negative or non-finite hyper-parameters, nesterov without
        momentum, momentum without a velocity, arrays that share memory;
        BackendUnavailableError for an unavailable backend.
    """
    p, g = _param_grad(param, grad)
    dt = p.dtype
    a = _hyper(lr, "lr", dt)
    mu = _hyper(momentum, "momentum", dt)
    wd = _hyper(weight_decay, "weight_decay", dt)
    nest = _flag(nesterov, "nesterov")
    if nest and mu == 0:
        raise ValueError(
            "nesterov=True needs momentum > 0 (as torch.optim.SGD); got momentum=0"
        )
    if mu != 0 and velocity is None:
        raise ValueError(
            f"momentum={momentum!r} needs a velocity array: pass np.zeros_like(param)"
            " before the first step and the same array at every step"
        )
    v = _state(velocity, "velocity", p) if velocity is not None else None
    _distinct("sgd_update", {"param": p, "grad": g, "velocity": v})
    name = _resolve_op("sgd_update", backend, (p, g, v))
    _call("sgd_update", name, p, g, v if mu != 0 else None, a, mu, wd, nest)


def adam_update(
    param: npt.NDArray[np.floating],
    grad: npt.NDArray[np.floating],
    m: npt.NDArray[np.floating],
    v: npt.NDArray[np.floating],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    backend: str | None = None,
) -> None:
    """One Adam (or AdamW) step in place on ``param``, ``m`` and ``v``.

    Adam (Kingma & Ba 2015, "Adam: a method for stochastic optimization",
    Algorithm 1) as ``torch.optim.Adam``; with ``decoupled=True`` AdamW
    (Loshchilov & Hutter 2019, "Decoupled weight decay regularization") as
    ``torch.optim.AdamW``.  Element-wise, in the array dtype, in the operation
    order of torch's single-tensor implementation::

        param = param * (1 - lr * weight_decay)          (decoupled)
        g = grad + weight_decay * param                  (not decoupled)
        m = m + (1 - beta1) * (g - m)                    (= beta1 m + (1 - beta1) g)
        v = beta2 * v + (1 - beta2) * g * g
        param = param - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

    with ``bc1 = 1 - beta1^step`` and ``bc2 = 1 - beta2^step`` computed here in
    float64, once.  Start ``m`` and ``v`` at zeros.

    Parameters
    ----------
    param : ndarray, shape (n,) or (n_out, n_in), float32 or float64
        Updated in place; C-contiguous.
    grad : ndarray, the shape and dtype of param
    m, v : ndarray, the shape and dtype of param
        First and second moment estimates, updated in place.
    step : int >= 1
        The 1-based count of this update (the bias corrections use it).
    lr : float >= 0
    beta1, beta2 : float in [0, 1)
    eps : float >= 0
    weight_decay : float >= 0
    decoupled : bool
        AdamW's decoupled decay instead of Adam's L2 term in the gradient.
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, non-contiguous state, a non-integer step.
    ValueError
        Wrong shapes, step < 1, hyper-parameters out of range, arrays that share
        memory; BackendUnavailableError for an unavailable backend.
    """
    p, g = _param_grad(param, grad)
    dt = p.dtype
    ms = _state(m, "m", p)
    vs = _state(v, "v", p)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"step must be an integer (1 for the first update); got {step!r}"
        )
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based update count); got {step}")
    a = _hyper(lr, "lr", dt)
    b1 = _hyper(beta1, "beta1", dt, upper=1.0)
    b2 = _hyper(beta2, "beta2", dt, upper=1.0)
    e = _hyper(eps, "eps", dt)
    wd = _hyper(weight_decay, "weight_decay", dt)
    dec = _flag(decoupled, "decoupled")
    _distinct("adam_update", {"param": p, "grad": g, "m": ms, "v": vs})
    t = int(step)
    step_size = a / (1.0 - b1**t)
    # torch takes bias_correction2 ** 0.5 (pow, not sqrt): the same float64 value
    # keeps the rounded scalar identical
    bc2_sqrt = (1.0 - b2**t) ** 0.5
    name = _resolve_op("adam_update", backend, (p, g, ms, vs))
    _call("adam_update", name, p, g, ms, vs, a, b1, b2, e, wd, dec, step_size, bc2_sqrt)


def mse_loss_grad(
    y: npt.NDArray[np.floating],
    target: npt.NDArray[np.floating],
    *,
    out: npt.NDArray[np.floating] | None = None,
    backend: str | None = None,
) -> tuple[float, npt.NDArray[np.floating]]:
    """Mean squared error and its gradient, fused: one sweep over the entries.

    ``loss = (1 / N) sum (y - target)^2`` over all N entries
    (``torch.nn.MSELoss(reduction="mean")``), accumulated in float64, and
    ``grad = dloss/dy = 2 (y - target) / N`` in y's dtype.

    Parameters
    ----------
    y : ndarray, shape (B, n), float32 or float64
    target : ndarray, shape (B, n), same dtype
    out : ndarray (B, n), dtype of y, optional
        Receives grad; may be ``y`` or ``target`` itself (in place).
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None

    Returns
    -------
    (loss, grad) : (float, ndarray (B, n))
        The loss is NaN / inf when an entry is.

    Raises
    ------
    TypeError, ValueError
        Wrong dtype / shape; BackendUnavailableError for an unavailable backend.
    """
    y = _array(y, "y", 2)
    t = _array(target, "target", 2, y.dtype)
    _shape(t, "target", y.shape)
    (out,) = _outs(out, ("grad",), "mse_loss_grad")
    if out is not None:
        _no_partial_overlap(out, "mse_loss_grad", {"y": y, "target": t})
    name = _resolve(backend, (y, t))
    cu = _Cuda(name, (y, t))
    g = cu.target(out, "out", y.shape, y.dtype)
    res = np.empty(1)
    _call("mse_loss_grad", name, cu.put(y), cu.put(t), g, res)
    return float(res[0]), cu.land(g, out)


def _labels(labels: Any, B: int, C: int) -> npt.NDArray[np.int64]:
    """Class indices: a (B,) integer array with entries in [0, C), as int64."""
    if _is_device(labels):
        from numba import cuda

        # validated on the host (a copy of B integers); the kernel gets int64 back
        view = labels if hasattr(labels, "copy_to_host") else cuda.as_cuda_array(labels)
        labels = view.copy_to_host()
    if not isinstance(labels, np.ndarray):
        raise TypeError(
            "labels must be a NumPy integer array of class indices; got "
            f"{type(labels).__name__}; convert with np.asarray(labels, dtype=np.int64)"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(
            f"labels must be integer class indices in [0, {C}) (not one-hot or "
            f"probabilities); got dtype {labels.dtype}; convert with "
            "labels.astype(np.int64)"
        )
    if labels.shape != (B,):
        raise ValueError(
            f"labels must have shape ({B},), one class index per row of logits; got "
            f"{labels.shape}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= C))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is outside [0, {C}): logits have {C} "
            f"classes ({bad.size} label(s) out of range)"
        )
    return np.ascontiguousarray(labels, dtype=np.int64)


def softmax_xent_grad(
    logits: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    *,
    out: npt.NDArray[np.floating] | None = None,
    backend: str | None = None,
) -> tuple[float, int, npt.NDArray[np.floating]]:
    """Softmax cross-entropy, its gradient and the correct count, fused per row.

    Per row b, with the max-subtracted log-sum-exp (stable for any finite
    logits; e.g. Goodfellow, Bengio & Courville 2016, "Deep Learning", sec. 4.1)
    in float64::

        loss = (1 / B) sum_b (M_b + log sum_j exp(z_bj - M_b) - z_b,y_b),
        M_b = max_j z_bj
        grad = (softmax(z) - onehot(labels)) / B          (in the logits' dtype)

    (``torch.nn.CrossEntropyLoss()``, mean over rows).  ``n_correct`` counts the
    rows whose first maximum (``np.argmax``; a NaN counts as the maximum) is the
    label.  Non-finite logits do not raise: the loss and that row's gradient
    come back NaN (or inf), for the caller to record.

    Parameters
    ----------
    logits : ndarray, shape (B, C), float32 or float64
    labels : ndarray, shape (B,), any integer dtype
        Class indices in [0, C) (copied once to int64 when of another dtype; a
        device array is copied to the host to be checked).
    out : ndarray (B, C), dtype of logits, optional
        Receives grad; must not overlap logits.
    backend : {"numpy", "numba", "c", "cuda", "auto"} or None

    Returns
    -------
    (loss, n_correct, grad) : (float, int, ndarray (B, C))

    Raises
    ------
    TypeError
        Non-float logits, non-integer labels (e.g. one-hot floats).
    ValueError
        Wrong shapes, a label outside [0, C) (named with its index), out
        overlapping logits; BackendUnavailableError for an unavailable backend.
    """
    z = _array(logits, "logits", 2)
    B, C = z.shape
    lab = _labels(labels, B, C)
    (out,) = _outs(out, ("grad",), "softmax_xent_grad")
    _distinct("softmax_xent_grad", {"logits": z, "out": out})
    name = _resolve(backend, (z,))
    cu = _Cuda(name, (z,))
    g = cu.target(out, "out", z.shape, z.dtype)
    res = np.empty(2)
    _call("softmax_xent_grad", name, cu.put(z), cu.put(lab), g, res)
    return float(res[0]), int(res[1]), cu.land(g, out)

"""Kernels of the empirical engine: dense, activation, BatchNorm, statistics.

Every op exists in four backends behind one public dispatcher:

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

Matrix products on the CPU run in NumPy's BLAS; thread-pool policy (OpenMP wait
policy, Numba threading layer) is documented in ``initdiag.kernels._threading``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _registry, _threading
from .activation import ACTIVATIONS
from .stats import SUMMARY_FIELDS

_threading.configure()

__all__ = [
    "ACTIVATIONS",
    "SUMMARY_FIELDS",
    "BackendUnavailableError",
    "activation_backward",
    "activation_forward",
    "available_backends",
    "batchnorm_backward",
    "batchnorm_forward",
    "column_stats",
    "dense_backward",
    "dense_forward",
    "get_backend",
    "layer_summary",
    "layer_summary_array",
    "layernorm_backward",
    "layernorm_forward",
    "row_correlation",
    "set_backend",
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
        name = _check_name(env) if env else "auto"
    if name == "auto":
        if any(_is_device(a) for a in arrays):
            name = "cuda"
        else:
            name = "numba" if _threading.NUMBA_IMPORT_ERROR is None else "numpy"
    ok, reason = _status(name)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
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
    out : ndarray, shape (B, n_out), optional

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
    name = _resolve(backend, (x, w, b))
    cu = _Cuda(name, (x, w, b))
    shape = (x.shape[0], w.shape[0])
    staged = cu.on and not cu.device_in  # host arrays through the GPU
    if out is not None:
        _out(out, "out", shape, dt, cu.device_in)
    y = out if out is not None and not staged else cu.alloc(shape, dt)
    pre = cu.alloc(shape, dt) if return_preactivation else None
    _call("dense_forward", name, cu.put(x), cu.put(w), cu.put(b), act, slope, y, pre)
    if staged:
        y, pre = cu.get(y), cu.get(pre)
        if out is not None:
            out[...] = y
            y = out
    return (y, pre) if return_preactivation else y


def dense_backward(
    dy: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    w: npt.NDArray[np.floating],
    *,
    bias: bool = True,
    backend: str | None = None,
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
    name = _resolve(backend, (dy, x, w))
    cu = _Cuda(name, (dy, x, w))
    dx = cu.alloc(x.shape, dt)
    dw = cu.alloc(w.shape, dt)
    db = cu.alloc((n_out,), dt) if bias else None
    _call("dense_backward", name, cu.put(dy), cu.put(x), cu.put(w), dx, dw, db)
    return cu.get(dx), cu.get(dw), cu.get(db)


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
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    staged = cu.on and not cu.device_in
    if out is not None:
        _out(out, "out", x.shape, x.dtype, cu.device_in)
    y = out if out is not None and not staged else cu.alloc(x.shape, x.dtype)
    _call("activation_forward", name, cu.put(x), act, slope, y)
    if staged:
        y = cu.get(y)
        if out is not None:
            out[...] = y
            y = out
    return y


def activation_backward(
    dy: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    activation: Any,
    *,
    negative_slope: float = 0.01,
    backend: str | None = None,
):
    """``dy * act'(x)`` where x is the activation's input; returns a new array."""
    act, slope = _activation(activation, negative_slope)
    dy = _array(dy, "dy", 2)
    x = _array(x, "x", 2, dy.dtype)
    _shape(x, "x", dy.shape)
    name = _resolve(backend, (dy, x))
    cu = _Cuda(name, (dy, x))
    y = cu.alloc(x.shape, x.dtype)
    _call("activation_backward", name, cu.put(dy), cu.put(x), act, slope, y)
    return cu.get(y)


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
):
    """Training-mode BatchNorm over the batch, optionally fused with an activation.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)`` with the per-feature
    batch mean and biased variance (Ioffe & Szegedy 2015; PyTorch training mode).

    Parameters
    ----------
    x : ndarray, shape (B, n), float32 or float64
    gamma, beta : ndarray, shape (n,), same dtype
    eps : float >= 0

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
    name = _resolve(backend, (x, gamma, beta))
    cu = _Cuda(name, (x, gamma, beta))
    y = cu.alloc(x.shape, dt)
    mean = cu.alloc((n,), dt)
    invstd = cu.alloc((n,), dt)
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
    return cu.get(y), cu.get(mean), cu.get(invstd)


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
    name = _resolve(backend, (dy, x, mean, invstd, gamma, beta))
    cu = _Cuda(name, (dy, x, mean, invstd, gamma, beta))
    dx = cu.alloc(x.shape, dt)
    dgamma = cu.alloc((n,), dt)
    dbeta = cu.alloc((n,), dt)
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
    return cu.get(dx), cu.get(dgamma), cu.get(dbeta)


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
    out: npt.NDArray[np.floating] | None = None,
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
    out : ndarray, shape (B, n), optional
        C-contiguous, x's dtype; written and returned as ``y``.

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
    cu = _Cuda(name, (x, gamma, beta))
    staged = cu.on and not cu.device_in  # host arrays through the GPU
    if out is not None:
        _out(out, "out", x.shape, dt, cu.device_in)
    y = out if out is not None and not staged else cu.alloc(x.shape, dt)
    mean = cu.alloc((B,), dt)
    invstd = cu.alloc((B,), dt)
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
    if staged:
        y = cu.get(y)
        if out is not None:
            out[...] = y
            y = out
    return y, cu.get(mean), cu.get(invstd)


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
    out: npt.NDArray[np.floating] | None = None,
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
    out : ndarray, shape (B, n), optional
        C-contiguous, x's dtype; written and returned as ``dx``.

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
    cu = _Cuda(name, (dy, x, mean, invstd, gamma, beta))
    staged = cu.on and not cu.device_in
    if out is not None:
        _out(out, "out", x.shape, dt, cu.device_in)
    dx = out if out is not None and not staged else cu.alloc(x.shape, dt)
    dgamma = cu.alloc((n,), dt) if gamma is not None else None
    dbeta = cu.alloc((n,), dt) if gamma is not None else None
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
    if staged:
        dx = cu.get(dx)
        if out is not None:
            out[...] = dx
            dx = out
    return dx, cu.get(dgamma), cu.get(dbeta)


# ------------------------------------------------------------------ statistics
def column_stats(x: npt.NDArray[np.floating], *, backend: str | None = None):
    """Per-feature statistics over the batch in one pass.

    Returns
    -------
    (mean, var, frac_le0, frac_eq0) : four float64 arrays of shape (n,)
        Biased variance from shifted sums (numerically stable); fractions of
        entries <= 0 and == 0.
    """
    x = _array(x, "x", 2)
    n = x.shape[1]
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    outs = [cu.alloc((n,), np.dtype(np.float64)) for _ in range(4)]
    _call("column_stats", name, cu.put(x), *outs)
    return tuple(cu.get(o) for o in outs)


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
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    f64 = np.dtype(np.float64)
    if out is not None and (not cu.on or cu.device_in):
        res = _out(out, "out", (8,), f64, cu.device_in)
    else:
        res = cu.alloc((8,), f64)
    _call("layer_summary", name, cu.put(x), res)
    res = cu.get(res)
    if out is not None and res is not out:
        _out(out, "out", (8,), f64, False)
        out[...] = res
        return out
    return res


def layer_summary(
    x: npt.NDArray[np.floating], *, backend: str | None = None
) -> dict[str, float]:
    """Profile statistics of one layer output ``x`` (B, n) as ``{field: float}``.

    Fields (:data:`SUMMARY_FIELDS`): mean, second_moment = mean(x^2), variance =
    mean over features of the biased batch variance, squared_mean = mean over
    features of the squared batch mean (Schoenholz et al. 2017), active_fraction
    (> 0), dead_fraction (features <= 0 for the whole batch), zero_fraction (== 0),
    nonfinite_count (NaN or inf entries).
    """
    arr = layer_summary_array(x, backend=backend)
    if _is_device(arr):
        arr = arr.copy_to_host()
    return dict(zip(SUMMARY_FIELDS, (float(v) for v in arr), strict=False))


def row_correlation(
    x: npt.NDArray[np.floating], *, gram: bool = False, backend: str | None = None
):
    """Mean uncentered cosine similarity between distinct rows of ``x`` (B, n).

    ``c = 1 / (B (B - 1)) * sum_{a != b} <x_a, x_b> / (|x_a| |x_b|)``, computed in
    O(B n) as ``(|sum_a u_a|^2 - sum_a |u_a|^2) / (B (B - 1))`` with unit rows
    ``u_a``.  Rows of zero norm count as cosine 0; B = 1 gives NaN.

    Returns
    -------
    float, or (float, ndarray (B, B) float64) when ``gram=True``
        The Gram matrix of cosines (GEMM in float64 on the host; diagonal 1, or 0
        for a zero row).
    """
    x = _array(x, "x", 2)
    name = _resolve(backend, (x,))
    cu = _Cuda(name, (x,))
    res = cu.alloc((1,), np.dtype(np.float64))
    _call("row_correlation", name, cu.put(x), res)
    res = cu.get(res)
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

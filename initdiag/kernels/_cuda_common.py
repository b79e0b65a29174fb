"""Shared pieces of the numba.cuda kernels: settings, device functions, transfers.

Settings are read by the host launchers at every launch (so tests can patch them
small and make multi-block paths run under the CUDA simulator):

``THREADS_PER_BLOCK``
    threads per block of the element-wise and reduction kernels (reductions are
    clamped to :data:`REDUCE_SMEM`).
``MAX_BLOCKS``
    cap on the blocks of one grid dimension; grid-stride loops cover the rest.
``TILE``
    edge of the square thread block and shared-memory tile of the GEMM kernels;
    at most :data:`TILE_MAX` (the compile-time size of the shared tiles).  The
    kernels take the tile edge from ``cuda.blockDim.x`` at run time, so patching
    ``TILE`` after a kernel was compiled stays correct.
``REDUCE_COLS``
    columns handled by one block of a column reduction; the other
    ``THREADS_PER_BLOCK // REDUCE_COLS`` thread rows split the batch.  8 columns
    make each row segment one full 32-byte memory sector in float32 (two in
    float64) and give n / 8 blocks (128 at width 1024, about one per SM of a
    large GPU); wider blocks would coalesce more per row but leave SMs idle.

``TILE_MAX`` and ``REDUCE_SMEM`` size shared arrays, which numba needs as
compile-time constants: kernel modules import them by name, never patch them.

Nothing here compiles at import: kernels and device functions carry no signature.
The module imports without numba-cuda (``cuda_status()`` then says why CUDA is
unavailable); the kernel modules need it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:  # numba-cuda is an optional extra (``pip install initdiag[cuda]``)
    from numba import config as _numba_config
    from numba import cuda
except Exception as exc:  # pragma: no cover - depends on the environment
    cuda = None
    _numba_config = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 4096
TILE = 16
REDUCE_COLS = 8

TILE_MAX = 16
TILE_PAD = TILE_MAX + 1  # a padded row keeps column reads of a tile bank-conflict free
REDUCE_SMEM = 256

# one table of activation codes and constants for every backend
from .activation import (  # noqa: E402, F401 - re-exported for the CUDA modules
    _INV_SQRT2,
    _INV_SQRT2PI,
    _TWO_OVER_SQRTPI,
    ACT_CODES,
    ACTIVATIONS,
    ERF,
    GELU,
    IDENTITY,
    LEAKY,
    RELU,
    SELU,
    SELU_ALPHA,
    SELU_SCALE,
    SIGMOID,
    SILU,
    TANH,
)

_SELU_SA = SELU_SCALE * SELU_ALPHA


def simulator_active() -> bool:
    """True when numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return _numba_config is not None and bool(_numba_config.ENABLE_CUDASIM)


def cuda_status() -> tuple[bool, str | None]:
    """Whether the CUDA kernels can run here, and why not (or a note).

    Returns
    -------
    (available, reason)
        ``(False, reason)`` when numba-cuda is missing or no GPU/driver is found;
        ``(True, note)`` under the CUDA simulator (correct but very slow);
        ``(True, None)`` on a working GPU.
    """
    if cuda is None:
        return False, (
            f"numba-cuda is not importable ({_IMPORT_ERROR}); "
            "install it with `pip install initdiag[cuda]` (numba-cuda)"
        )
    if simulator_active():
        return True, (
            "numba CUDA simulator active (NUMBA_ENABLE_CUDASIM=1): kernels run as "
            "Python threads, correct but slow"
        )
    try:
        ok = bool(cuda.is_available())
    except Exception as exc:  # pragma: no cover - driver specific
        return False, f"CUDA driver error: {type(exc).__name__}: {exc}"
    if not ok:
        return False, (
            "no usable CUDA GPU or driver (numba.cuda.is_available() is False); "
            "run on a machine with an NVIDIA GPU and driver, or use another backend"
        )
    return True, None


# --------------------------------------------------------------------- launch sizes
def blocks_for(n: int, per_block: int) -> int:
    """Blocks for ``n`` items at ``per_block`` items a block, in [1, MAX_BLOCKS]."""
    return max(1, min(MAX_BLOCKS, -(-int(n) // int(per_block))))


def threads_1d() -> int:
    """Threads per block of the element-wise kernels."""
    return max(1, min(1024, int(THREADS_PER_BLOCK)))


def reduce_block() -> tuple[int, int]:
    """(columns, batch rows) of one column-reduction block."""
    tpb = max(1, min(REDUCE_SMEM, int(THREADS_PER_BLOCK)))
    cols = max(1, min(int(REDUCE_COLS), tpb))
    return cols, max(1, tpb // cols)


def tile() -> int:
    """Edge of the GEMM tile / thread block, in [1, TILE_MAX]."""
    return max(1, min(TILE_MAX, int(TILE)))


def act_code(act: str) -> int:
    """Integer code of an activation name (the kernels branch on it)."""
    return ACT_CODES[act]


# --------------------------------------------------------------------- transfers
def is_device_array(a: Any) -> bool:
    """True for GPU arrays: anything with ``__cuda_array_interface__`` (numba device
    arrays, CuPy, PyTorch CUDA tensors), and the simulator's fake device arrays."""
    if a is None or isinstance(a, np.ndarray):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return simulator_active() and type(a).__name__ == "FakeCUDAArray"


def as_device(a: Any) -> Any:
    """A numba device-array view of a device array (no copy)."""
    if simulator_active():
        return a
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    if isinstance(a, DeviceNDArray):
        return a
    return cuda.as_cuda_array(a)


class Transfer:
    """Moves a launcher's arguments to the device and NumPy outputs back.

    Device arrays are used in place; NumPy inputs are copied in; NumPy outputs get a
    device buffer that :meth:`finish` copies back into them.  Launches and copies go
    to the default stream, so they are ordered after work the caller queued there.
    """

    def __init__(self) -> None:
        self._back: list[tuple[Any, np.ndarray]] = []

    def input(self, a: Any) -> Any:
        if is_device_array(a):
            return as_device(a)
        return cuda.to_device(np.ascontiguousarray(a))

    def output(self, a: Any) -> Any:
        if is_device_array(a):
            return as_device(a)
        d = cuda.device_array(a.shape, dtype=a.dtype)
        self._back.append((d, a))
        return d

    def scratch(self, shape: int | tuple[int, ...]) -> Any:
        """A small float64 device buffer (row norms and the like)."""
        return cuda.device_array(shape, dtype=np.float64)

    def finish(self) -> None:
        for d, h in self._back:
            d.copy_to_host(h)
        self._back.clear()


def flat(a: Any) -> Any:
    """1-D view of a C-contiguous device array."""
    return a.reshape(a.size)


# --------------------------------------------------------------------- device code
# The activation helpers are written once and shared by every kernel.  Literal
# constants are float64, so a float32 kernel evaluates the transcendental part in
# float64 and rounds once on store (the element-wise kernels are memory bound; the
# GEMM's inner loop stays in the array dtype).  Every form avoids overflow in exp(),
# which under the simulator (plain Python math) would raise instead of giving inf.


def _sigmoid_py(v):
    """Logistic function without overflow: exp of a non-positive argument only."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)  # NaN lands here and stays NaN
    return e / (1.0 + e)


def _act_forward_py(code, v, slope):
    """act(v) for the activation ``code`` (NaN in, NaN out; relu(NaN) = NaN)."""
    if code == RELU:
        return 0.0 if v <= 0 else v
    if code == LEAKY:
        return v * slope if v < 0 else v
    if code == TANH:
        return math.tanh(v)
    if code == SIGMOID:
        return _sigmoid(v)
    if code == GELU:
        # x Phi(x) with Phi from erfc: no cancellation for x << 0
        return v * (0.5 * math.erfc(-v * _INV_SQRT2))
    if code == SILU:
        return v * _sigmoid(v)
    if code == SELU:
        if v > 0:
            return SELU_SCALE * v
        return _SELU_SA * math.expm1(v)
    if code == ERF:
        return math.erf(v)
    return v


def _act_grad_py(code, g, v, slope):
    """g * act'(v); relu passes no gradient where v <= 0 (even a NaN g), and a NaN
    input gives a NaN gradient for every activation but identity."""
    if code == RELU:
        if v > 0:
            return g
        return 0.0 if v <= 0 else v
    if code == LEAKY:
        if v < 0:
            return g * slope
        return g if v >= 0 else v
    if code == TANH:
        t = math.tanh(v)
        return g * (1.0 - t * t)
    if code == SIGMOID:
        s = _sigmoid(v)
        return g * (s * (1.0 - s))
    if code == GELU:
        return g * (
            0.5 * math.erfc(-v * _INV_SQRT2)
            + v * (_INV_SQRT2PI * math.exp(-0.5 * v * v))
        )
    if code == SILU:
        s = _sigmoid(v)
        return g * (s + v * s * (1.0 - s))
    if code == SELU:
        if v > 0:
            return g * SELU_SCALE
        return g * (_SELU_SA * math.exp(v))  # v <= 0 or NaN: no overflow
    if code == ERF:
        return g * (_TWO_OVER_SQRTPI * math.exp(-v * v))
    return g


def _col_sum_py(sm, tx, bx, by):
    """Sum of the ``by`` partials of column ``tx`` stored at ``sm[r * bx + tx]``,
    in row order (deterministic)."""
    s = sm[tx]
    for r in range(1, by):
        s += sm[r * bx + tx]
    return s


def _block_sum_py(sm, tid, nthreads):
    """Tree sum of ``sm[0:nthreads]`` into ``sm[0]`` (any ``nthreads``; every thread
    of the block must call it)."""
    step = 1
    while step < nthreads:
        if tid % (2 * step) == 0 and tid + step < nthreads:
            sm[tid] += sm[tid + step]
        step *= 2
        cuda.syncthreads()
    return sm[0]


def _tile_dot_py(a, a_km, b, b_kn, m0, n0, M, N, K, As, Bs, zero):
    """One thread's element of the (m0, n0) output tile of C = A @ B^T-ish.

    ``A`` is M x K stored row-major (``a_km`` false) or K x M (``a_km`` true);
    ``B`` is N x K (``b_kn`` false) or K x N (``b_kn`` true).  The block is
    T x T threads (T = blockDim.x); thread (ty, tx) accumulates C[m0 + ty, n0 + tx].
    Loads are coalesced (tx runs along each operand's contiguous axis); tiles are
    stored as As[m, k], Bs[n, k] with a padded row, so the inner loop reads Bs down a
    column without bank conflicts.  Out-of-range entries load as zero, and the
    products of real entries never meet a padding zero of the other operand along k.
    Every thread of the block must call this (it synchronises).
    """
    T = cuda.blockDim.x
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    acc = zero
    for k0 in range(0, K, T):
        if a_km:
            k = k0 + ty
            m = m0 + tx
            As[tx, ty] = a[k, m] if (k < K and m < M) else zero
        else:
            m = m0 + ty
            k = k0 + tx
            As[ty, tx] = a[m, k] if (m < M and k < K) else zero
        if b_kn:
            k = k0 + ty
            n = n0 + tx
            Bs[tx, ty] = b[k, n] if (k < K and n < N) else zero
        else:
            n = n0 + ty
            k = k0 + tx
            Bs[ty, tx] = b[n, k] if (n < N and k < K) else zero
        cuda.syncthreads()
        if T == TILE_MAX:
            for kk in range(TILE_MAX):  # constant trip count: unrolled
                acc += As[ty, kk] * Bs[tx, kk]
        else:
            for kk in range(T):
                acc += As[ty, kk] * Bs[tx, kk]
        cuda.syncthreads()
    return acc


if cuda is not None:
    _sigmoid = cuda.jit(device=True)(_sigmoid_py)
    act_forward = cuda.jit(device=True)(_act_forward_py)
    act_grad = cuda.jit(device=True)(_act_grad_py)
    col_sum = cuda.jit(device=True)(_col_sum_py)
    block_sum = cuda.jit(device=True)(_block_sum_py)
    tile_dot = cuda.jit(device=True)(_tile_dot_py)


def ptx_kernels() -> list[tuple[str, Any, Any]]:
    """Every CUDA kernel as (name, python function, signature builder(dtype)).

    The builder maps a numba float type (``float32`` / ``float64``) to the argument
    types the host launcher passes; the PTX test compiles each with
    ``numba.cuda.compile_ptx``.
    """
    from . import (
        _cuda_activation,
        _cuda_batchnorm,
        _cuda_dense,
        _cuda_layernorm,
        _cuda_residual,
        _cuda_stats,
    )

    out: list[tuple[str, Any, Any]] = []
    mods = (
        _cuda_dense,
        _cuda_activation,
        _cuda_batchnorm,
        _cuda_layernorm,
        _cuda_stats,
        _cuda_residual,
    )
    for mod in mods:
        out.extend(mod.PTX_KERNELS)
    return out

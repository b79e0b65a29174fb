"""numba.cuda twins of the dense layer (see ``initdiag.kernels.dense`` for the
contract)::

    dense_forward_cuda(x, w, b, act, slope, out, pre_out) -> out
    dense_backward_cuda(dy, x, w, dx, dw, db) -> (dx, dw, db)

Both GEMMs are shared-memory tiled (T x T threads per block, T = ``_cuda_common.TILE``,
one output element per thread, grid-stride over output tiles).  The forward fuses the
bias and the activation into the GEMM's epilogue (and writes the pre-activation when
``pre_out`` is given); the backward runs dx = dy @ w and dw = dy^T @ x in one launch
(``blockIdx.z`` picks the product) and db = sum_b dy as a column reduction with
float64 accumulators.  Arguments may be NumPy arrays (copied in and out) or device
arrays (written in place; the launch is asynchronous on the default stream).
"""

from __future__ import annotations

from typing import Any

from numba import boolean as _b1
from numba import cuda
from numba import float64 as _f64
from numba import int64 as _i64

from . import _cuda_common as _cc
from ._cuda_common import REDUCE_SMEM, TILE_MAX, TILE_PAD
from ._cuda_common import cuda_status as cuda_status  # re-exported for dispatch


def _dense_forward_kernel_py(x, w, b, has_bias, act, slope, out, pre_out, write_pre):
    """out = act(x @ w.T + b) by T x T tiles; pre_out gets x @ w.T + b if write_pre."""
    As = cuda.shared.array((TILE_MAX, TILE_PAD), dtype=x.dtype)
    Bs = cuda.shared.array((TILE_MAX, TILE_PAD), dtype=x.dtype)
    zero = x.dtype.type(0)
    T = cuda.blockDim.x
    M = x.shape[0]
    K = x.shape[1]
    N = w.shape[0]
    tiles_m = (M + T - 1) // T
    tiles_n = (N + T - 1) // T
    for tm in range(cuda.blockIdx.y, tiles_m, cuda.gridDim.y):
        for tn in range(cuda.blockIdx.x, tiles_n, cuda.gridDim.x):
            m0 = tm * T
            n0 = tn * T
            acc = _cc.tile_dot(x, False, w, False, m0, n0, M, N, K, As, Bs, zero)
            m = m0 + cuda.threadIdx.y
            n = n0 + cuda.threadIdx.x
            if m < M and n < N:
                z = acc
                if has_bias:
                    z += b[n]
                if write_pre:
                    pre_out[m, n] = z
                out[m, n] = _cc.act_forward(act, z, slope)


def _dense_backward_kernel_py(dy, x, w, dx, dw):
    """blockIdx.z == 0: dx = dy @ w; blockIdx.z == 1: dw = dy.T @ x (T x T tiles)."""
    As = cuda.shared.array((TILE_MAX, TILE_PAD), dtype=dy.dtype)
    Bs = cuda.shared.array((TILE_MAX, TILE_PAD), dtype=dy.dtype)
    zero = dy.dtype.type(0)
    T = cuda.blockDim.x
    Bsz = dy.shape[0]
    n_out = dy.shape[1]
    n_in = x.shape[1]
    if cuda.blockIdx.z == 0:
        # dx (Bsz, n_in) = dy (Bsz x n_out, row-major) @ w (n_out x n_in: K x N)
        M = Bsz
        N = n_in
        K = n_out
    else:
        # dw (n_out, n_in) = dy^T (dy stored K x M) @ x (Bsz x n_in: K x N)
        M = n_out
        N = n_in
        K = Bsz
    tiles_m = (M + T - 1) // T
    tiles_n = (N + T - 1) // T
    for tm in range(cuda.blockIdx.y, tiles_m, cuda.gridDim.y):
        for tn in range(cuda.blockIdx.x, tiles_n, cuda.gridDim.x):
            m0 = tm * T
            n0 = tn * T
            m = m0 + cuda.threadIdx.y
            n = n0 + cuda.threadIdx.x
            if cuda.blockIdx.z == 0:
                acc = _cc.tile_dot(dy, False, w, True, m0, n0, M, N, K, As, Bs, zero)
                if m < M and n < N:
                    dx[m, n] = acc
            else:
                acc = _cc.tile_dot(dy, True, x, True, m0, n0, M, N, K, As, Bs, zero)
                if m < M and n < N:
                    dw[m, n] = acc


def _dense_backward_db_kernel_py(dy, db):
    """db[j] = sum_b dy[b, j]: column reduction, float64 accumulators, fixed order."""
    sm = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockDim.x
    by = cuda.blockDim.y
    B = dy.shape[0]
    n = dy.shape[1]
    groups = (n + bx - 1) // bx
    for g in range(cuda.blockIdx.x, groups, cuda.gridDim.x):
        j = g * bx + tx
        s = 0.0
        if j < n:
            for r in range(ty, B, by):
                s += float(dy[r, j])
        sm[ty * bx + tx] = s
        cuda.syncthreads()
        if ty == 0 and j < n:
            db[j] = _cc.col_sum(sm, tx, bx, by)
        cuda.syncthreads()


_dense_forward_kernel = cuda.jit(_dense_forward_kernel_py)
_dense_backward_kernel = cuda.jit(_dense_backward_kernel_py)
_dense_backward_db_kernel = cuda.jit(_dense_backward_db_kernel_py)


def _tile_grid(rows: int, cols: int, t: int) -> tuple[int, int]:
    return _cc.blocks_for(cols, t), _cc.blocks_for(rows, t)


def dense_forward_cuda(
    x: Any, w: Any, b: Any, act: str, slope: float, out: Any, pre_out: Any
) -> Any:
    """CUDA variant of ``_dense_forward_<b>``: out = act(x @ w.T + b); returns out."""
    tr = _cc.Transfer()
    d_x = tr.input(x)
    d_w = tr.input(w)
    has_bias = b is not None
    # absent optional arrays are replaced by arrays of the right type that the
    # kernel never touches (a flag says so): no allocation, one compiled variant
    d_b = tr.input(b) if has_bias else d_w[0]
    d_out = tr.output(out)
    write_pre = pre_out is not None
    d_pre = tr.output(pre_out) if write_pre else d_out
    t = _cc.tile()
    gx, gy = _tile_grid(d_x.shape[0], d_w.shape[0], t)
    _dense_forward_kernel[(gx, gy), (t, t)](
        d_x,
        d_w,
        d_b,
        has_bias,
        _cc.act_code(act),
        float(slope),
        d_out,
        d_pre,
        write_pre,
    )
    tr.finish()
    return out


def dense_backward_cuda(dy: Any, x: Any, w: Any, dx: Any, dw: Any, db: Any) -> tuple:
    """CUDA variant of ``_dense_backward_<b>``: dx = dy @ w, dw = dy.T @ x,
    db = dy.sum(0) (skipped when db is None); returns (dx, dw, db)."""
    tr = _cc.Transfer()
    d_dy = tr.input(dy)
    d_x = tr.input(x)
    d_w = tr.input(w)
    d_dx = tr.output(dx)
    d_dw = tr.output(dw)
    B, n_out = d_dy.shape
    n_in = d_x.shape[1]
    t = _cc.tile()
    gx = _cc.blocks_for(n_in, t)  # both products have n_in columns
    gy = _cc.blocks_for(max(B, n_out), t)
    _dense_backward_kernel[(gx, gy, 2), (t, t)](d_dy, d_x, d_w, d_dx, d_dw)
    if db is not None:
        d_db = tr.output(db)
        bx, by = _cc.reduce_block()
        _dense_backward_db_kernel[_cc.blocks_for(n_out, bx), (bx, by)](d_dy, d_db)
    tr.finish()
    return dx, dw, db


def _sig_forward(dt):
    m = dt[:, ::1]
    v = dt[::1]
    return (m, m, v, _b1, _i64, _f64, m, m, _b1)


def _sig_backward(dt):
    m = dt[:, ::1]
    return (m, m, m, m, m)


def _sig_db(dt):
    return (dt[:, ::1], dt[::1])


PTX_KERNELS = [
    ("_dense_forward_kernel", _dense_forward_kernel_py, _sig_forward),
    ("_dense_backward_kernel", _dense_backward_kernel_py, _sig_backward),
    ("_dense_backward_db_kernel", _dense_backward_db_kernel_py, _sig_db),
]

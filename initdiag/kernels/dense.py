"""Dense (fully connected) layer: GEMM through BLAS, fused epilogue (all CPU backends).

Contract (every variant has the same signature, writes into the outputs it is
given, returns them, never validates, allocates or raises)::

    _dense_forward_<b>(x, w, b, act, slope, out, pre_out) -> out
        x (B, n_in), w (n_out, n_in), b (n_out,) or None;
        out (B, n_out) = act(x @ w.T + b); pre_out None or (B, n_out) receiving
        the pre-activation x @ w.T + b.
    _dense_backward_<b>(dy, x, w, dx, dw, db) -> (dx, dw, db)
        dy (B, n_out) = dL/d(pre-activation); dx = dy @ w, dw = dy.T @ x,
        db = dy.sum(0) (db None: skipped).

The matrix products always go to the BLAS that NumPy links (``np.matmul`` with
``out=``): on this project's reference machine OpenBLAS reached about twice the
GFLOP/s of Numba's ``np.dot`` (SciPy's BLAS).  What surrounds the GEMM is ours:
the numba and c variants add the bias, write the pre-activation and apply the
activation in one pass over the GEMM output while it is still in cache
(``csrc/kernels_tmpl.inc``: ``idg_dense_epilogue``).
"""

from __future__ import annotations

import numpy as np

from ._threading import njit, prange
from .activation import (
    ACT_CODES,
    PAR_CHUNK,
    RELU,
    _act_span_nb,
    _activation_forward_numpy,
    act_threads,
)


def _gemm_target(out, pre_out):
    return out if pre_out is None else pre_out


# --------------------------------------------------------------------------- numpy
def _dense_forward_numpy(x, w, b, act, slope, out, pre_out):
    """NumPy reference: GEMM, then bias and activation as separate array ops."""
    acc = _gemm_target(out, pre_out)
    np.matmul(x, w.T, out=acc)
    if b is not None:
        acc += b
    _activation_forward_numpy(acc, act, slope, out)
    return out


def _dense_backward_numpy(dy, x, w, dx, dw, db):
    """NumPy reference of (dy @ w, dy.T @ x, dy.sum(0))."""
    np.matmul(dy, w, out=dx)
    np.matmul(dy.T, x, out=dw)
    if db is not None:
        np.sum(dy, axis=0, out=db)
    return dx, dw, db


# --------------------------------------------------------------------------- numba
@njit(cache=True, error_model="numpy")
def _epilogue_rows_nb(acc, b, has_b, write_pre, code, slope, out, r0, r1):
    """Rows r0..r1: v = acc + b (stored back into acc if write_pre), out = act(v);
    bias + relu / identity in one pass over each row."""
    n = acc.shape[1]
    zero = np.zeros(1, out.dtype)[0]
    for i in range(r0, r1):
        o = out[i]
        if write_pre:
            a = acc[i]
            if has_b:
                for j in range(n):
                    a[j] += b[j]
            _act_span_nb(a, o, code, slope)
        elif has_b:  # acc is out: touch only o (in place, vectorisable)
            if code == RELU:
                for j in range(n):
                    v = o[j] + b[j]
                    o[j] = zero if v <= 0 else v
            else:
                for j in range(n):
                    o[j] += b[j]
                _act_span_nb(o, o, code, slope)
        else:
            _act_span_nb(o, o, code, slope)


@njit(cache=True, parallel=True, error_model="numpy")
def _dense_epilogue_nb(acc, b, has_b, write_pre, code, slope, out, par):
    """Fused bias + pre-activation copy + activation over the GEMM output (row
    chunks in parallel when ``par``)."""
    B, n = acc.shape
    nch = min(B, (B * n + PAR_CHUNK - 1) // PAR_CHUNK)
    if nch <= 1 or not par:
        _epilogue_rows_nb(acc, b, has_b, write_pre, code, slope, out, 0, B)
    else:
        for c in prange(nch):
            r0 = c * B // nch
            r1 = (c + 1) * B // nch
            _epilogue_rows_nb(acc, b, has_b, write_pre, code, slope, out, r0, r1)
    return out


@njit(cache=True, error_model="numpy")
def _colsum_block_nb(x, j0, j1, out):
    """out[j] = sum_i x[i, j] for j0 <= j < j1, float64 accumulation."""
    B = x.shape[0]
    w = j1 - j0
    acc = np.zeros(w)
    for i in range(B):
        row = x[i, j0:j1]
        for j in range(w):
            acc[j] += row[j]
    for j in range(w):
        out[j0 + j] = acc[j]


@njit(cache=True, parallel=True, error_model="numpy")
def _colsum_nb(x, out):
    """Column sums, parallel over column blocks above PAR_CHUNK elements."""
    B, n = x.shape
    blk = 256
    nblk = (n + blk - 1) // blk
    if nblk <= 1 or B * n < PAR_CHUNK:
        for bi in range(nblk):
            _colsum_block_nb(x, bi * blk, min(n, (bi + 1) * blk), out)
    else:
        for bi in prange(nblk):
            _colsum_block_nb(x, bi * blk, min(n, (bi + 1) * blk), out)
    return out


def _dense_forward_numba(x, w, b, act, slope, out, pre_out):
    """BLAS GEMM (numpy) + Numba fused epilogue."""
    acc = _gemm_target(out, pre_out)
    np.matmul(x, w.T, out=acc)
    has_b = b is not None
    if not has_b and pre_out is None and act == "identity":
        return out
    bb = b if has_b else out[0, :0]
    par = act_threads(out.size, act) > 1
    _dense_epilogue_nb(
        acc, bb, has_b, pre_out is not None, ACT_CODES[act], float(slope), out, par
    )
    return out


def _dense_backward_numba(dy, x, w, dx, dw, db):
    """BLAS GEMMs (numpy) + Numba column sum for db."""
    np.matmul(dy, w, out=dx)
    np.matmul(dy.T, x, out=dw)
    if db is not None:
        _colsum_nb(dy, db)
    return dx, dw, db


# --------------------------------------------------------------------------- c
def _dense_forward_c(x, w, b, act, slope, out, pre_out):
    """BLAS GEMM (numpy) + C fused epilogue (idg_dense_epilogue)."""
    from ._c import check, fn, ptr

    acc = _gemm_target(out, pre_out)
    np.matmul(x, w.T, out=acc)
    if b is None and pre_out is None and act == "identity":
        return out
    B, n = out.shape
    check(
        fn("idg_dense_epilogue", out.dtype)(
            ptr(out),
            ptr(pre_out),
            ptr(b),
            B,
            n,
            ACT_CODES[act],
            float(slope),
            act_threads(out.size, act, c=True),
        ),
        "idg_dense_epilogue",
    )
    return out


def _dense_backward_c(dy, x, w, dx, dw, db):
    """BLAS GEMMs (numpy) + C column sum for db (idg_colsum)."""
    from ._c import check, fn, ptr

    np.matmul(dy, w, out=dx)
    np.matmul(dy.T, x, out=dw)
    if db is not None:
        B, n = dy.shape
        check(fn("idg_colsum", dy.dtype)(ptr(dy), B, n, ptr(db)), "idg_colsum")
    return dx, dw, db



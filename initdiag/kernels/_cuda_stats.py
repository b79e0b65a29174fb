"""numba.cuda twins of the layer statistics (contract in ``initdiag.kernels.stats``)::

    column_stats_cuda(x, mean, var, frac_le0, frac_eq0)
        -> (mean, var, frac_le0, frac_eq0)   # float64 (n,) each
    layer_summary_cuda(x, out) -> out          # out float64 (8,), SUMMARY_FIELDS order
    row_correlation_cuda(x, out) -> out        # out float64 (1,)

All accumulators are float64.  Column reductions (blocks of ``REDUCE_COLS`` features
x a few batch rows, partials combined in shared memory in a fixed order) give the
per-feature numbers; the variance uses shifted sums with the column's first entry as
shift (Chan, Golub & LeVeque 1983).  ``layer_summary`` then sums its per-feature
numbers over each block's features and adds them to ``out`` with float64 atomics
(so the last bits may depend on block order), and a one-thread kernel divides by the
counts.  ``row_correlation`` uses sum_{a != b} <u_a, u_b> = |sum_a u_a|^2 -
sum_a |u_a|^2 with u_a = x_a / |x_a| (u_a = 0 for a zero row): one block per row for
the norms (tree sum in shared memory), a column reduction for sum_a u_a, O(B n) work
and a B-element float64 scratch; B = 1 gives NaN.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda
from numba import float64 as _f64
from numba import int64 as _i64

from . import _cuda_common as _cc
from ._cuda_common import REDUCE_SMEM


def _stats_fill_kernel_py(a, value):
    """a[:] = value (zeroes the atomic accumulators)."""
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] = value


def _column_stats_kernel_py(x, mean, var, frac_le0, frac_eq0):
    """Per column: mean, biased variance (shifted sums), fraction <= 0, == 0."""
    s1 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    s2 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    sle = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    seq = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockDim.x
    by = cuda.blockDim.y
    B = x.shape[0]
    n = x.shape[1]
    groups = (n + bx - 1) // bx
    for g in range(cuda.blockIdx.x, groups, cuda.gridDim.x):
        j = g * bx + tx
        a1 = 0.0
        a2 = 0.0
        le = 0.0
        eq = 0.0
        if j < n:
            k = float(x[0, j])
            for r in range(ty, B, by):
                v = float(x[r, j])
                d = v - k
                a1 += d
                a2 += d * d
                if v <= 0.0:
                    le += 1.0
                if v == 0.0:
                    eq += 1.0
        t = ty * bx + tx
        s1[t] = a1
        s2[t] = a2
        sle[t] = le
        seq[t] = eq
        cuda.syncthreads()
        if ty == 0 and j < n:
            m1 = _cc.col_sum(s1, tx, bx, by) / B
            v2 = _cc.col_sum(s2, tx, bx, by) / B - m1 * m1
            if v2 < 0.0:  # rounding only; NaN passes
                v2 = 0.0
            mean[j] = float(x[0, j]) + m1
            var[j] = v2
            frac_le0[j] = _cc.col_sum(sle, tx, bx, by) / B
            frac_eq0[j] = _cc.col_sum(seq, tx, bx, by) / B
        cuda.syncthreads()


def _layer_summary_kernel_py(x, out):
    """Adds per-block sums of the 8 raw summary quantities to out (float64 atomics):
    sum_j mean_j, sum x^2, sum_j var_j, sum_j mean_j^2, #>0, #dead features, #==0,
    #non-finite."""
    s1 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    s2 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    sq = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    spos = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    sle = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    seq = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    snf = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    sm2 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockDim.x
    by = cuda.blockDim.y
    B = x.shape[0]
    n = x.shape[1]
    groups = (n + bx - 1) // bx
    for g in range(cuda.blockIdx.x, groups, cuda.gridDim.x):
        j = g * bx + tx
        a1 = 0.0
        a2 = 0.0
        q = 0.0
        pos = 0.0
        le = 0.0
        eq = 0.0
        nf = 0.0
        if j < n:
            k = float(x[0, j])
            for r in range(ty, B, by):
                v = float(x[r, j])
                d = v - k
                a1 += d
                a2 += d * d
                q += v * v
                if v > 0.0:
                    pos += 1.0
                if v <= 0.0:
                    le += 1.0
                if v == 0.0:
                    eq += 1.0
                if not math.isfinite(v):
                    nf += 1.0
        t = ty * bx + tx
        s1[t] = a1
        s2[t] = a2
        sq[t] = q
        spos[t] = pos
        sle[t] = le
        seq[t] = eq
        snf[t] = nf
        cuda.syncthreads()
        if ty == 0 and j < n:
            # per-feature numbers, kept in slot tx (only this thread touches
            # column tx's slots r * bx + tx)
            m1 = _cc.col_sum(s1, tx, bx, by) / B
            v2 = _cc.col_sum(s2, tx, bx, by) / B - m1 * m1
            if v2 < 0.0:
                v2 = 0.0
            mj = float(x[0, j]) + m1
            qj = _cc.col_sum(sq, tx, bx, by)
            pj = _cc.col_sum(spos, tx, bx, by)
            lj = _cc.col_sum(sle, tx, bx, by)
            ej = _cc.col_sum(seq, tx, bx, by)
            nj = _cc.col_sum(snf, tx, bx, by)
            s1[tx] = mj
            s2[tx] = v2
            sq[tx] = qj
            sm2[tx] = mj * mj
            spos[tx] = pj
            sle[tx] = 1.0 if lj == B else 0.0
            seq[tx] = ej
            snf[tx] = nj
        cuda.syncthreads()
        if ty == 0 and tx == 0:
            cols = min(bx, n - g * bx)
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            t3 = 0.0
            t4 = 0.0
            t5 = 0.0
            t6 = 0.0
            t7 = 0.0
            for c in range(cols):
                t0 += s1[c]
                t1 += sq[c]
                t2 += s2[c]
                t3 += sm2[c]
                t4 += spos[c]
                t5 += sle[c]
                t6 += seq[c]
                t7 += snf[c]
            cuda.atomic.add(out, 0, t0)
            cuda.atomic.add(out, 1, t1)
            cuda.atomic.add(out, 2, t2)
            cuda.atomic.add(out, 3, t3)
            cuda.atomic.add(out, 4, t4)
            cuda.atomic.add(out, 5, t5)
            cuda.atomic.add(out, 6, t6)
            cuda.atomic.add(out, 7, t7)
        cuda.syncthreads()


def _layer_summary_finish_kernel_py(out, B, n):
    """Sums -> means: per-feature sums / n, per-entry counts / (B n)."""
    if cuda.grid(1) == 0:
        N = B * n
        out[0] = out[0] / n
        out[1] = out[1] / N
        out[2] = out[2] / n
        out[3] = out[3] / n
        out[4] = out[4] / N
        out[5] = out[5] / n
        out[6] = out[6] / N


def _row_correlation_norms_kernel_py(x, inv, out):
    """inv[a] = 1/|x_a| (0 for a zero row); out[0] -= sum_a |u_a|^2 (atomics)."""
    sm = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    B = x.shape[0]
    n = x.shape[1]
    for a in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        s = 0.0
        for k in range(tid, n, bd):
            v = float(x[a, k])
            s += v * v
        sm[tid] = s
        cuda.syncthreads()
        ss = _cc.block_sum(sm, tid, bd)
        if tid == 0:
            r = 0.0 if ss == 0.0 else 1.0 / math.sqrt(ss)  # NaN stays NaN
            inv[a] = r
            cuda.atomic.add(out, 0, -(ss * r * r))
        cuda.syncthreads()


def _row_correlation_kernel_py(x, inv, out):
    """out[0] += sum_j (sum_a x[a, j] inv[a])^2 (column reduction + atomics)."""
    sm = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockDim.x
    by = cuda.blockDim.y
    B = x.shape[0]
    n = x.shape[1]
    groups = (n + bx - 1) // bx
    for g in range(cuda.blockIdx.x, groups, cuda.gridDim.x):
        j = g * bx + tx
        s = 0.0
        if j < n:
            for r in range(ty, B, by):
                s += float(x[r, j]) * inv[r]
        sm[ty * bx + tx] = s
        cuda.syncthreads()
        if ty == 0 and j < n:
            c = _cc.col_sum(sm, tx, bx, by)
            sm[tx] = c * c
        cuda.syncthreads()
        if ty == 0 and tx == 0:
            t = 0.0
            for c in range(min(bx, n - g * bx)):
                t += sm[c]
            cuda.atomic.add(out, 0, t)
        cuda.syncthreads()


def _row_correlation_finish_kernel_py(out, B):
    """out[0] /= B (B - 1); NaN for B < 2."""
    if cuda.grid(1) == 0:
        if B < 2:
            out[0] = math.nan
        else:
            out[0] = out[0] / (B * (B - 1))


_stats_fill_kernel = cuda.jit(_stats_fill_kernel_py)
_column_stats_kernel = cuda.jit(_column_stats_kernel_py)
_layer_summary_kernel = cuda.jit(_layer_summary_kernel_py)
_layer_summary_finish_kernel = cuda.jit(_layer_summary_finish_kernel_py)
_row_correlation_norms_kernel = cuda.jit(_row_correlation_norms_kernel_py)
_row_correlation_kernel = cuda.jit(_row_correlation_kernel_py)
_row_correlation_finish_kernel = cuda.jit(_row_correlation_finish_kernel_py)


def column_stats_cuda(
    x: Any, mean: Any, var: Any, frac_le0: Any, frac_eq0: Any
) -> tuple:
    """CUDA variant of ``_column_stats_<b>``; outputs float64 (n,)."""
    tr = _cc.Transfer()
    d_x = tr.input(x)
    outs = [tr.output(a) for a in (mean, var, frac_le0, frac_eq0)]
    bx, by = _cc.reduce_block()
    _column_stats_kernel[_cc.blocks_for(d_x.shape[1], bx), (bx, by)](d_x, *outs)
    tr.finish()
    return mean, var, frac_le0, frac_eq0


def layer_summary_cuda(x: Any, out: Any) -> Any:
    """CUDA variant of ``_layer_summary_<b>``; out float64 (8,)."""
    tr = _cc.Transfer()
    d_x = tr.input(x)
    d_out = tr.output(out)
    B, n = d_x.shape
    _stats_fill_kernel[1, 8](d_out, 0.0)
    bx, by = _cc.reduce_block()
    _layer_summary_kernel[_cc.blocks_for(n, bx), (bx, by)](d_x, d_out)
    _layer_summary_finish_kernel[1, 1](d_out, B, n)
    tr.finish()
    return out


def row_correlation_cuda(x: Any, out: Any) -> Any:
    """CUDA variant of ``_row_correlation_<b>``; out float64 (1,)."""
    tr = _cc.Transfer()
    d_x = tr.input(x)
    d_out = tr.output(out)
    B, n = d_x.shape
    inv = tr.scratch(B)
    _stats_fill_kernel[1, 1](d_out, 0.0)
    tpb = min(_cc.threads_1d(), REDUCE_SMEM)
    _row_correlation_norms_kernel[_cc.blocks_for(B, 1), tpb](d_x, inv, d_out)
    bx, by = _cc.reduce_block()
    _row_correlation_kernel[_cc.blocks_for(n, bx), (bx, by)](d_x, inv, d_out)
    _row_correlation_finish_kernel[1, 1](d_out, B)
    tr.finish()
    return out


def _sig_fill(dt):
    return (_f64[::1], _f64)


def _sig_colstats(dt):
    v = _f64[::1]
    return (dt[:, ::1], v, v, v, v)


def _sig_summary(dt):
    return (dt[:, ::1], _f64[::1])


def _sig_summary_finish(dt):
    return (_f64[::1], _i64, _i64)


def _sig_norms(dt):
    return (dt[:, ::1], _f64[::1], _f64[::1])


def _sig_rowcorr_finish(dt):
    return (_f64[::1], _i64)


PTX_KERNELS = [
    ("_stats_fill_kernel", _stats_fill_kernel_py, _sig_fill),
    ("_column_stats_kernel", _column_stats_kernel_py, _sig_colstats),
    ("_layer_summary_kernel", _layer_summary_kernel_py, _sig_summary),
    (
        "_layer_summary_finish_kernel",
        _layer_summary_finish_kernel_py,
        _sig_summary_finish,
    ),
    ("_row_correlation_norms_kernel", _row_correlation_norms_kernel_py, _sig_norms),
    ("_row_correlation_kernel", _row_correlation_kernel_py, _sig_norms),
    (
        "_row_correlation_finish_kernel",
        _row_correlation_finish_kernel_py,
        _sig_rowcorr_finish,
    ),
]

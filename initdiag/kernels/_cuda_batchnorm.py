"""numba.cuda twins of training-mode BatchNorm (+ fused activation); contract in
``initdiag.kernels.batchnorm``::

    batchnorm_forward_cuda(x, gamma, beta, eps, act, slope, out, mean, invstd) -> out
    batchnorm_backward_cuda(dy, x, mean, invstd, gamma, beta, act, slope,
                            dx, dgamma, dbeta) -> (dx, dgamma, dbeta)

Each pass is a column reduction (blocks of ``REDUCE_COLS`` features x a few batch
rows, float64 partials combined in shared memory in a fixed order, so results are
deterministic) followed by an element-wise kernel over the flattened batch.  The
variance uses shifted sums (shift = the column's first entry; Chan, Golub & LeVeque
1983), var = S2/B - (S1/B)^2 with S_k = sum_b (x_b - x_0)^k, in float64.
Element-wise arithmetic is float64 as well and rounds once on store.  Backward
(Ioffe & Szegedy 2015): xhat = (x - mean) invstd, g = dy act'(gamma xhat + beta),
dbeta = sum_b g, dgamma = sum_b g xhat, dx = gamma invstd / B (B g - dbeta - xhat
dgamma).  ``beta`` may be None in the backward (zero).
"""

from __future__ import annotations

import math
from typing import Any

from numba import boolean as _b1
from numba import cuda
from numba import float64 as _f64
from numba import int64 as _i64

from . import _cuda_common as _cc
from ._cuda_common import REDUCE_SMEM


def _batchnorm_forward_stats_kernel_py(x, eps, mean, invstd):
    """Per column: mean and 1/sqrt(biased var + eps) by shifted float64 sums."""
    s1 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    s2 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
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
        if j < n:
            k = float(x[0, j])
            for r in range(ty, B, by):
                d = float(x[r, j]) - k
                a1 += d
                a2 += d * d
        s1[ty * bx + tx] = a1
        s2[ty * bx + tx] = a2
        cuda.syncthreads()
        if ty == 0 and j < n:
            m1 = _cc.col_sum(s1, tx, bx, by) / B
            var = _cc.col_sum(s2, tx, bx, by) / B - m1 * m1
            if var < 0.0:  # rounding only; NaN passes
                var = 0.0
            sd = math.sqrt(var + eps)
            mean[j] = float(x[0, j]) + m1
            invstd[j] = math.inf if sd == 0.0 else 1.0 / sd
        cuda.syncthreads()


def _batchnorm_forward_kernel_py(x, gamma, beta, mean, invstd, act, slope, out):
    """out = act(gamma (x - mean) invstd + beta) on the flattened (B * n) batch."""
    n = gamma.shape[0]
    size = x.shape[0]
    for i in range(cuda.grid(1), size, cuda.gridsize(1)):
        j = i % n
        z = (float(x[i]) - float(mean[j])) * float(invstd[j]) * float(gamma[j]) + float(
            beta[j]
        )
        out[i] = _cc.act_forward(act, z, slope)


def _batchnorm_backward_reduce_kernel_py(
    dy, x, mean, invstd, gamma, beta, has_beta, per_row, act, slope, dgamma, dbeta
):
    """Per column: dbeta = sum g, dgamma = sum g xhat (float64, fixed order).

    ``per_row``: mean / invstd hold one entry per row (LayerNorm's statistics,
    ``_cuda_layernorm``) instead of one per column (BatchNorm's)."""
    sb = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    sg = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockDim.x
    by = cuda.blockDim.y
    B = x.shape[0]
    n = x.shape[1]
    groups = (n + bx - 1) // bx
    for grp in range(cuda.blockIdx.x, groups, cuda.gridDim.x):
        j = grp * bx + tx
        ab = 0.0
        ag = 0.0
        if j < n:
            mu = 0.0 if per_row else float(mean[j])
            inv = 0.0 if per_row else float(invstd[j])
            ga = float(gamma[j])
            be = float(beta[j]) if has_beta else 0.0
            for r in range(ty, B, by):
                if per_row:
                    mu = float(mean[r])
                    inv = float(invstd[r])
                xh = (float(x[r, j]) - mu) * inv
                g = _cc.act_grad(act, float(dy[r, j]), ga * xh + be, slope)
                ab += g
                ag += g * xh
        sb[ty * bx + tx] = ab
        sg[ty * bx + tx] = ag
        cuda.syncthreads()
        if ty == 0 and j < n:
            dbeta[j] = _cc.col_sum(sb, tx, bx, by)
            dgamma[j] = _cc.col_sum(sg, tx, bx, by)
        cuda.syncthreads()


def _batchnorm_backward_kernel_py(
    dy, x, mean, invstd, gamma, beta, has_beta, act, slope, dgamma, dbeta, B, dx
):
    """dx = gamma invstd / B (B g - dbeta - xhat dgamma) on the flattened batch."""
    n = gamma.shape[0]
    size = x.shape[0]
    for i in range(cuda.grid(1), size, cuda.gridsize(1)):
        j = i % n
        inv = float(invstd[j])
        ga = float(gamma[j])
        be = float(beta[j]) if has_beta else 0.0
        xh = (float(x[i]) - float(mean[j])) * inv
        g = _cc.act_grad(act, float(dy[i]), ga * xh + be, slope)
        dx[i] = ga * inv / B * (B * g - float(dbeta[j]) - xh * float(dgamma[j]))


_batchnorm_forward_stats_kernel = cuda.jit(_batchnorm_forward_stats_kernel_py)
_batchnorm_forward_kernel = cuda.jit(_batchnorm_forward_kernel_py)
_batchnorm_backward_reduce_kernel = cuda.jit(_batchnorm_backward_reduce_kernel_py)
_batchnorm_backward_kernel = cuda.jit(_batchnorm_backward_kernel_py)


def param_grads(
    d_dy,
    d_x,
    d_mean,
    d_inv,
    d_gamma,
    d_beta,
    has_beta,
    per_row,
    code,
    slope,
    d_dgamma,
    d_dbeta,
) -> None:
    """Launch the column reduction dbeta = sum_b g, dgamma = sum_b g xhat on device
    arrays (BatchNorm; LayerNorm with ``per_row`` statistics)."""
    bx, by = _cc.reduce_block()
    _batchnorm_backward_reduce_kernel[_cc.blocks_for(d_x.shape[1], bx), (bx, by)](
        d_dy,
        d_x,
        d_mean,
        d_inv,
        d_gamma,
        d_beta,
        has_beta,
        per_row,
        code,
        float(slope),
        d_dgamma,
        d_dbeta,
    )


def batchnorm_forward_cuda(
    x: Any,
    gamma: Any,
    beta: Any,
    eps: float,
    act: str,
    slope: float,
    out: Any,
    mean: Any,
    invstd: Any,
) -> Any:
    """CUDA variant of ``_batchnorm_forward_<b>``; writes out, mean, invstd; returns
    out."""
    tr = _cc.Transfer()
    d_x = tr.input(x)
    d_gamma = tr.input(gamma)
    d_beta = tr.input(beta)
    d_out = tr.output(out)
    d_mean = tr.output(mean)
    d_inv = tr.output(invstd)
    n = d_x.shape[1]
    bx, by = _cc.reduce_block()
    _batchnorm_forward_stats_kernel[_cc.blocks_for(n, bx), (bx, by)](
        d_x, float(eps), d_mean, d_inv
    )
    tpb = _cc.threads_1d()
    fx = _cc.flat(d_x)
    _batchnorm_forward_kernel[_cc.blocks_for(fx.shape[0], tpb), tpb](
        fx,
        d_gamma,
        d_beta,
        d_mean,
        d_inv,
        _cc.act_code(act),
        float(slope),
        _cc.flat(d_out),
    )
    tr.finish()
    return out


def batchnorm_backward_cuda(
    dy: Any,
    x: Any,
    mean: Any,
    invstd: Any,
    gamma: Any,
    beta: Any,
    act: str,
    slope: float,
    dx: Any,
    dgamma: Any,
    dbeta: Any,
) -> tuple:
    """CUDA variant of ``_batchnorm_backward_<b>``; returns (dx, dgamma, dbeta)."""
    tr = _cc.Transfer()
    d_dy = tr.input(dy)
    d_x = tr.input(x)
    d_mean = tr.input(mean)
    d_inv = tr.input(invstd)
    d_gamma = tr.input(gamma)
    has_beta = beta is not None
    d_beta = tr.input(beta) if has_beta else d_gamma  # never read when absent
    d_dx = tr.output(dx)
    d_dgamma = tr.output(dgamma)
    d_dbeta = tr.output(dbeta)
    B, n = d_x.shape
    code = _cc.act_code(act)
    param_grads(
        d_dy,
        d_x,
        d_mean,
        d_inv,
        d_gamma,
        d_beta,
        has_beta,
        False,
        code,
        slope,
        d_dgamma,
        d_dbeta,
    )
    tpb = _cc.threads_1d()
    fx = _cc.flat(d_x)
    _batchnorm_backward_kernel[_cc.blocks_for(fx.shape[0], tpb), tpb](
        _cc.flat(d_dy),
        fx,
        d_mean,
        d_inv,
        d_gamma,
        d_beta,
        has_beta,
        code,
        float(slope),
        d_dgamma,
        d_dbeta,
        B,
        _cc.flat(d_dx),
    )
    tr.finish()
    return dx, dgamma, dbeta


def _sig_fwd_stats(dt):
    return (dt[:, ::1], _f64, dt[::1], dt[::1])


def _sig_fwd(dt):
    v = dt[::1]
    return (v, v, v, v, v, _i64, _f64, v)


def _sig_bwd_reduce(dt):
    m = dt[:, ::1]
    v = dt[::1]
    return (m, m, v, v, v, v, _b1, _b1, _i64, _f64, v, v)


def _sig_bwd(dt):
    v = dt[::1]
    return (v, v, v, v, v, v, _b1, _i64, _f64, v, v, _i64, v)


PTX_KERNELS = [
    (
        "_batchnorm_forward_stats_kernel",
        _batchnorm_forward_stats_kernel_py,
        _sig_fwd_stats,
    ),
    ("_batchnorm_forward_kernel", _batchnorm_forward_kernel_py, _sig_fwd),
    (
        "_batchnorm_backward_reduce_kernel",
        _batchnorm_backward_reduce_kernel_py,
        _sig_bwd_reduce,
    ),
    ("_batchnorm_backward_kernel", _batchnorm_backward_kernel_py, _sig_bwd),
]

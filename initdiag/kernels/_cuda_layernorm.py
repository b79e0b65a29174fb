"""numba.cuda twins of LayerNorm (+ fused activation); contract in
``initdiag.kernels.layernorm``::

    layernorm_forward_cuda(x, gamma, beta, eps, act, slope, out, mean, invstd) -> out
    layernorm_backward_cuda(dy, x, mean, invstd, gamma, beta, act, slope,
                            dx, dgamma, dbeta) -> (dx, dgamma, dbeta)

``gamma`` None: no affine parameters (``dgamma`` / ``dbeta`` None, untouched);
``beta`` None: a zero bias.

One block per row (grid-stride over rows) for the row statistics and the output:
each thread sums its strided share of the row in float64, the block adds the
partials by a tree in shared memory (a fixed order: deterministic), and the same
block then writes the row.  The variance uses sums shifted by the row's first entry
(Chan, Golub & LeVeque 1983): var = S2/n - (S1/n)^2, S_p = sum_j (x_j - x_0)^p.
Backward (Ba, Kiros & Hinton 2016): per row, with xhat = (x - mean) invstd,
g = dy act'(gamma xhat + beta) and h = g gamma, dx = invstd / n (n h - sum h -
xhat sum h xhat); ``dgamma = sum_b g xhat`` and ``dbeta = sum_b g`` are column sums:
BatchNorm's column reduction (``_cuda_batchnorm.param_grads``, blocks of
``REDUCE_COLS`` features x a few batch rows) with per-row statistics, run only with
affine parameters.  Arithmetic is float64 and rounds once on store.
"""

from __future__ import annotations

import math
from typing import Any

from numba import boolean as _b1
from numba import cuda
from numba import float64 as _f64
from numba import int64 as _i64

from . import _cuda_common as _cc
from ._cuda_batchnorm import param_grads
from ._cuda_common import REDUCE_SMEM


def _block_sums_py(s1, s2, a1, a2, tid, bd):
    """(sum a1, sum a2) over the block's threads (tree sums in shared memory; every
    thread must call it)."""
    s1[tid] = a1
    s2[tid] = a2
    cuda.syncthreads()
    return _cc.block_sum(s1, tid, bd), _cc.block_sum(s2, tid, bd)


def _ln_h_py(dy, x, gamma, beta, affine, has_beta, act, slope, row, j, mu, iv):
    """(xhat, h) of entry (row, j): h = gamma dy act'(gamma xhat + beta)."""
    xh = (float(x[row, j]) - mu) * iv
    ga = float(gamma[j]) if affine else 1.0
    be = float(beta[j]) if has_beta else 0.0
    return xh, _cc.act_grad(act, float(dy[row, j]), ga * xh + be, slope) * ga


_block_sums = cuda.jit(device=True)(_block_sums_py)
_ln_h = cuda.jit(device=True)(_ln_h_py)


def _layernorm_forward_kernel_py(
    x, gamma, beta, affine, has_beta, eps, act, slope, out, mean, invstd
):
    """Per row: mean, invstd (shifted float64 sums, tree-added), then
    out = act(gamma (x - mean) invstd + beta) with the stored (rounded) statistics."""
    s1 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    s2 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    B = x.shape[0]
    n = x.shape[1]
    for row in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        k = float(x[row, 0])
        a1 = 0.0
        a2 = 0.0
        for j in range(tid, n, bd):
            d = float(x[row, j]) - k
            a1 += d
            a2 += d * d
        t1, t2 = _block_sums(s1, s2, a1, a2, tid, bd)
        if tid == 0:
            ms = t1 / n
            var = t2 / n - ms * ms
            if var < 0.0:  # rounding only; NaN passes
                var = 0.0
            sd = math.sqrt(var + eps)
            mean[row] = k + ms
            invstd[row] = math.inf if sd == 0.0 else 1.0 / sd
        # the block sees thread 0's global writes after the barrier
        cuda.syncthreads()
        mu = float(mean[row])
        iv = float(invstd[row])
        for j in range(tid, n, bd):
            z = (float(x[row, j]) - mu) * iv
            if affine:
                z = z * float(gamma[j]) + (float(beta[j]) if has_beta else 0.0)
            out[row, j] = _cc.act_forward(act, z, slope)
        cuda.syncthreads()  # s1 / s2 are refilled for the next row


def _layernorm_backward_kernel_py(
    dy, x, mean, invstd, gamma, beta, affine, has_beta, act, slope, dx
):
    """Per row: sums of h = g gamma and h xhat (tree-added), then
    dx = invstd / n (n h - sum h - xhat sum h xhat), h recomputed."""
    s1 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    s2 = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    B = x.shape[0]
    n = x.shape[1]
    for row in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        mu = float(mean[row])
        iv = float(invstd[row])
        a1 = 0.0
        a2 = 0.0
        args = (dy, x, gamma, beta, affine, has_beta, act, slope, row)
        for j in range(tid, n, bd):
            xh, h = _ln_h(*args, j, mu, iv)
            a1 += h
            a2 += h * xh
        t1, t2 = _block_sums(s1, s2, a1, a2, tid, bd)
        for j in range(tid, n, bd):
            xh, h = _ln_h(*args, j, mu, iv)
            dx[row, j] = iv / n * (n * h - t1 - xh * t2)
        cuda.syncthreads()


_layernorm_forward_kernel = cuda.jit(_layernorm_forward_kernel_py)
_layernorm_backward_kernel = cuda.jit(_layernorm_backward_kernel_py)


def _row_threads() -> int:
    """Threads of a one-block-per-row kernel (its shared partials hold REDUCE_SMEM)."""
    return min(_cc.threads_1d(), REDUCE_SMEM)


def _params(tr: _cc.Transfer, gamma: Any, beta: Any, stand_in: Any) -> tuple:
    """(affine, has_beta, d_gamma, d_beta); a missing parameter is replaced by
    ``stand_in`` (a 1-D device array of the same dtype that is never read)."""
    affine = gamma is not None
    has_beta = beta is not None
    d_gamma = tr.input(gamma) if affine else stand_in
    d_beta = tr.input(beta) if has_beta else stand_in
    return affine, has_beta, d_gamma, d_beta


def layernorm_forward_cuda(
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
    """CUDA variant of ``_layernorm_forward_<b>``; writes out, mean, invstd; returns
    out."""
    tr = _cc.Transfer()
    d_x = tr.input(x)
    d_out = tr.output(out)
    d_mean = tr.output(mean)
    d_inv = tr.output(invstd)
    affine, has_beta, d_gamma, d_beta = _params(tr, gamma, beta, d_mean)
    _layernorm_forward_kernel[_cc.blocks_for(d_x.shape[0], 1), _row_threads()](
        d_x,
        d_gamma,
        d_beta,
        affine,
        has_beta,
        float(eps),
        _cc.act_code(act),
        float(slope),
        d_out,
        d_mean,
        d_inv,
    )
    tr.finish()
    return out


def layernorm_backward_cuda(
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
    """CUDA variant of ``_layernorm_backward_<b>``; returns (dx, dgamma, dbeta)."""
    tr = _cc.Transfer()
    d_dy = tr.input(dy)
    d_x = tr.input(x)
    d_mean = tr.input(mean)
    d_inv = tr.input(invstd)
    affine, has_beta, d_gamma, d_beta = _params(tr, gamma, beta, d_mean)
    d_dx = tr.output(dx)
    B, n = d_x.shape
    code = _cc.act_code(act)
    _layernorm_backward_kernel[_cc.blocks_for(B, 1), _row_threads()](
        d_dy,
        d_x,
        d_mean,
        d_inv,
        d_gamma,
        d_beta,
        affine,
        has_beta,
        code,
        float(slope),
        d_dx,
    )
    if affine:
        param_grads(
            d_dy,
            d_x,
            d_mean,
            d_inv,
            d_gamma,
            d_beta,
            has_beta,
            True,
            code,
            slope,
            tr.output(dgamma),
            tr.output(dbeta),
        )
    tr.finish()
    return dx, dgamma, dbeta


def _sig_fwd(dt):
    m = dt[:, ::1]
    v = dt[::1]
    return (m, v, v, _b1, _b1, _f64, _i64, _f64, m, v, v)


def _sig_bwd(dt):
    m = dt[:, ::1]
    v = dt[::1]
    return (m, m, v, v, v, v, _b1, _b1, _i64, _f64, m)


PTX_KERNELS = [
    ("_layernorm_forward_kernel", _layernorm_forward_kernel_py, _sig_fwd),
    ("_layernorm_backward_kernel", _layernorm_backward_kernel_py, _sig_bwd),
]

"""numba.cuda twins of the loss heads (contract, formulas and NaN semantics in
``initdiag.kernels.loss``)::

    mse_loss_grad_cuda(y, t, grad, res) -> grad          # res[0] = loss
    softmax_xent_grad_cuda(z, labels, grad, res) -> grad # res = (loss, n_correct)

One block per row (grid-stride over the rows), its threads strided over the
row's entries: the squared error and the exponential sum are reduced in float64
in shared memory (a fixed tree, so a given launch shape always sums in the same
order), the softmax's max / argmax with a pairwise rule that keeps the first
maximum (a NaN counts as the maximum, as in np.argmax).  Each row's result
lands in a float64 device scratch; the host sums the rows in row order.
``res`` is a host float64 array; the other arrays may be device arrays or NumPy
arrays (copied in, and ``grad`` back).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda
from numba import float64 as _f64
from numba import int64 as _i64

from . import _cuda_common as _cc
from ._cuda_common import REDUCE_SMEM


def _mse_loss_grad_kernel_py(y, t, grad, rows, scale):
    """Per row: grad = (y - t) * scale, rows[i] = sum (y - t)^2 (float64)."""
    sm = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    B, n = y.shape
    for i in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        acc = 0.0
        for j in range(tid, n, bd):
            d = y[i, j] - t[i, j]
            grad[i, j] = d * scale
            acc += _f64(d) * _f64(d)
        sm[tid] = acc
        cuda.syncthreads()
        total = _cc.block_sum(sm, tid, bd)
        if tid == 0:
            rows[i] = total
        cuda.syncthreads()  # sm is reused by the next row


def _first_max_py(va, ia, vb, ib):
    """The (value, index) pair that np.argmax would keep of two: NaN first, then
    the larger value, then the smaller index."""
    a_nan = va != va
    b_nan = vb != vb
    if a_nan and b_nan:
        return (va, ia) if ia < ib else (vb, ib)
    if a_nan:
        return va, ia
    if b_nan:
        return vb, ib
    if vb > va or (vb == va and ib < ia):
        return vb, ib
    return va, ia


_first_max = cuda.jit(device=True)(_first_max_py)


def _softmax_xent_grad_kernel_py(z, labels, grad, rows, inv_b):
    """Per row: max / argmax, sum exp(z - max), the gradient; rows[i] = row loss,
    rows[B + i] = 1.0 if the first argmax is the label."""
    sv = cuda.shared.array(REDUCE_SMEM, dtype=_f64)
    si = cuda.shared.array(REDUCE_SMEM, dtype=_i64)
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    B, C = z.shape
    for i in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        v = -math.inf
        k = C  # no entry yet: loses every comparison
        for j in range(tid, C, bd):
            if k == C:
                v, k = _f64(z[i, j]), j
            else:
                v, k = _first_max(v, k, _f64(z[i, j]), j)
        sv[tid] = v
        si[tid] = k
        cuda.syncthreads()
        step = 1
        while step < bd:
            if tid % (2 * step) == 0 and tid + step < bd:
                sv[tid], si[tid] = _first_max(
                    sv[tid], si[tid], sv[tid + step], si[tid + step]
                )
            step *= 2
            cuda.syncthreads()
        zm = sv[0]
        arg = si[0]
        cuda.syncthreads()  # everyone has read sv[0] before it is reused
        acc = 0.0
        for j in range(tid, C, bd):
            acc += math.exp(_f64(z[i, j]) - zm)
        sv[tid] = acc
        cuda.syncthreads()
        s = _cc.block_sum(sv, tid, bd)
        inv = 1.0 / s
        y = labels[i]
        for j in range(tid, C, bd):
            p = math.exp(_f64(z[i, j]) - zm) * inv
            if j == y:
                p -= 1.0
            grad[i, j] = p * inv_b
        if tid == 0:
            rows[i] = math.log(s) + (zm - _f64(z[i, y]))
            rows[B + i] = 1.0 if arg == y else 0.0
        cuda.syncthreads()


_mse_loss_grad_kernel = cuda.jit(_mse_loss_grad_kernel_py)
_softmax_xent_grad_kernel = cuda.jit(_softmax_xent_grad_kernel_py)


def _launch_rows(B: int) -> tuple[int, int]:
    return _cc.blocks_for(B, 1), max(1, min(REDUCE_SMEM, _cc.threads_1d()))


def mse_loss_grad_cuda(y: Any, t: Any, grad: Any, res: np.ndarray) -> Any:
    """CUDA variant of ``_mse_loss_grad_<b>``; returns grad."""
    tr = _cc.Transfer()
    d_y, d_t = tr.input(y), tr.input(t)
    d_g = tr.output(grad)
    B, n = d_y.shape
    rows = tr.scratch(B)
    grid, tpb = _launch_rows(B)
    _mse_loss_grad_kernel[grid, tpb](d_y, d_t, d_g, rows, d_y.dtype.type(2.0 / (B * n)))
    tr.finish()
    res[0] = float(np.sum(rows.copy_to_host())) / (B * n)
    return grad


def softmax_xent_grad_cuda(z: Any, labels: Any, grad: Any, res: np.ndarray) -> Any:
    """CUDA variant of ``_softmax_xent_grad_<b>``; returns grad."""
    tr = _cc.Transfer()
    d_z, d_lab = tr.input(z), tr.input(labels)
    d_g = tr.output(grad)
    B = d_z.shape[0]
    rows = tr.scratch(2 * B)
    grid, tpb = _launch_rows(B)
    _softmax_xent_grad_kernel[grid, tpb](d_z, d_lab, d_g, rows, 1.0 / B)
    tr.finish()
    h = rows.copy_to_host()
    res[0] = float(np.sum(h[:B])) / B
    res[1] = float(np.sum(h[B:]))
    return grad


def _sig_mse(dt):
    return (dt[:, ::1], dt[:, ::1], dt[:, ::1], _f64[::1], dt)


def _sig_xent(dt):
    return (dt[:, ::1], _i64[::1], dt[:, ::1], _f64[::1], _f64)


PTX_KERNELS = [
    ("_mse_loss_grad_kernel", _mse_loss_grad_kernel_py, _sig_mse),
    ("_softmax_xent_grad_kernel", _softmax_xent_grad_kernel_py, _sig_xent),
]

"""numba.cuda twins of the element-wise activations (contract and formulas in
``initdiag.kernels.activation``)::

    activation_forward_cuda(x, act, slope, out) -> out        # out = act(x)
    activation_backward_cuda(dy, x, act, slope, out) -> out   # out = dy * act'(x)

One thread per element, grid-stride over the flattened (C-contiguous) arrays; the
activation is a device function shared with the fused kernels
(``_cuda_common.act_forward`` / ``act_grad``).  ``out`` may be ``x`` (in place).
"""

from __future__ import annotations

from typing import Any

from numba import cuda
from numba import float64 as _f64
from numba import int64 as _i64

from . import _cuda_common as _cc


def _activation_forward_kernel_py(x, act, slope, out):
    """out[i] = act(x[i]) on flat arrays."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = _cc.act_forward(act, x[i], slope)


def _activation_backward_kernel_py(dy, x, act, slope, out):
    """out[i] = dy[i] * act'(x[i]) on flat arrays."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = _cc.act_grad(act, dy[i], x[i], slope)


_activation_forward_kernel = cuda.jit(_activation_forward_kernel_py)
_activation_backward_kernel = cuda.jit(_activation_backward_kernel_py)


def activation_forward_cuda(x: Any, act: str, slope: float, out: Any) -> Any:
    """CUDA variant of ``_activation_forward_<b>``; returns out."""
    tr = _cc.Transfer()
    d_x = _cc.flat(tr.input(x))
    d_out = _cc.flat(tr.output(out))
    tpb = _cc.threads_1d()
    _activation_forward_kernel[_cc.blocks_for(d_x.shape[0], tpb), tpb](
        d_x, _cc.act_code(act), float(slope), d_out
    )
    tr.finish()
    return out


def activation_backward_cuda(dy: Any, x: Any, act: str, slope: float, out: Any) -> Any:
    """CUDA variant of ``_activation_backward_<b>``; returns out."""
    tr = _cc.Transfer()
    d_dy = _cc.flat(tr.input(dy))
    d_x = _cc.flat(tr.input(x))
    d_out = _cc.flat(tr.output(out))
    tpb = _cc.threads_1d()
    _activation_backward_kernel[_cc.blocks_for(d_x.shape[0], tpb), tpb](
        d_dy, d_x, _cc.act_code(act), float(slope), d_out
    )
    tr.finish()
    return out


def _sig_forward(dt):
    return (dt[::1], _i64, _f64, dt[::1])


def _sig_backward(dt):
    return (dt[::1], dt[::1], _i64, _f64, dt[::1])


PTX_KERNELS = [
    ("_activation_forward_kernel", _activation_forward_kernel_py, _sig_forward),
    ("_activation_backward_kernel", _activation_backward_kernel_py, _sig_backward),
]

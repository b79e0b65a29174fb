"""numba.cuda twins of the residual ops (contract, formulas and NaN semantics in
``initdiag.kernels.residual``)::

    residual_add_cuda(skip, x, scale, out) -> out   # skip + scale * x (skip None:
                                                    # scale * x)
    masked_scale_cuda(x, mask, scale, out) -> out   # x * (mask * scale)

One thread per element, grid-stride over the flattened (C-contiguous) arrays.  The
launchers pass ``scale`` as a scalar of the array dtype, so a float32 kernel
computes in float32 (NVVM may contract ``skip + s * x`` into one fused
multiply-add).  ``out`` may be ``skip`` or ``x`` (in place).
"""

from __future__ import annotations

from typing import Any

from numba import cuda
from numba import uint8 as _u8

from . import _cuda_common as _cc


def _residual_add_kernel_py(skip, x, s, out):
    """out[i] = skip[i] + s * x[i] on flat arrays."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = skip[i] + s * x[i]


def _scale_kernel_py(x, s, out):
    """out[i] = s * x[i] on flat arrays."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = s * x[i]


def _masked_scale_kernel_py(x, mask, s, out):
    """out[i] = x[i] * (s if mask[i] else 0): NaN / inf * 0 -> NaN (PyTorch)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    zero = s - s
    for i in range(start, x.shape[0], stride):
        out[i] = x[i] * (s if mask[i] != 0 else zero)


_residual_add_kernel = cuda.jit(_residual_add_kernel_py)
_scale_kernel = cuda.jit(_scale_kernel_py)
_masked_scale_kernel = cuda.jit(_masked_scale_kernel_py)


def _launch(kernel, inputs: tuple, scale: float, out: Any) -> Any:
    """``kernel(*inputs, s, out)`` on flat device views, ``s`` the scale as a
    scalar of the output dtype; returns out (NumPy outputs copied back)."""
    tr = _cc.Transfer()
    d_in = [_cc.flat(tr.input(a)) for a in inputs]
    d_out = _cc.flat(tr.output(out))
    tpb = _cc.threads_1d()
    grid = _cc.blocks_for(d_out.shape[0], tpb)
    kernel[grid, tpb](*d_in, d_out.dtype.type(scale), d_out)
    tr.finish()
    return out


def residual_add_cuda(skip: Any, x: Any, scale: float, out: Any) -> Any:
    """CUDA variant of ``_residual_add_<b>``; returns out."""
    if skip is None:
        return _launch(_scale_kernel, (x,), scale, out)
    return _launch(_residual_add_kernel, (skip, x), scale, out)


def masked_scale_cuda(x: Any, mask: Any, scale: float, out: Any) -> Any:
    """CUDA variant of ``_masked_scale_<b>``; returns out."""
    return _launch(_masked_scale_kernel, (x, mask), scale, out)


def _sig_residual_add(dt):
    return (dt[::1], dt[::1], dt, dt[::1])


def _sig_scale(dt):
    return (dt[::1], dt, dt[::1])


def _sig_masked_scale(dt):
    return (dt[::1], _u8[::1], dt, dt[::1])


PTX_KERNELS = [
    ("_residual_add_kernel", _residual_add_kernel_py, _sig_residual_add),
    ("_scale_kernel", _scale_kernel_py, _sig_scale),
    ("_masked_scale_kernel", _masked_scale_kernel_py, _sig_masked_scale),
]

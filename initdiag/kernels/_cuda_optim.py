"""numba.cuda twins of the optimizer updates (contract, formulas, operation order
and modes in ``initdiag.kernels.optim``)::

    sgd_update_cuda(p, g, v, lr, momentum, weight_decay, nesterov) -> p
    adam_update_cuda(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled,
                     step_size, bc2_sqrt) -> p

One thread per element, grid-stride over the flattened (C-contiguous) arrays; the
per-element arithmetic is ``optim._sgd_element`` / ``_adam_element``, the same
Python source the CPU loops jit.  The
launchers pass every hyper-parameter as a scalar of the array dtype, so a float32
kernel computes in float32 (NVVM may contract a multiply and an add into one
fused multiply-add: one rounding fewer than the CPU variants).  Device arrays are
updated in place; NumPy arrays are copied in, updated on the device and copied
back into themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda
from numba import int32 as _i32

from . import _cuda_common as _cc
from . import optim as _optim
from .optim import _PLAIN, _adam_wd_mode, _sgd_mode

_sgd_element = cuda.jit(device=True)(_optim._sgd_element)
_adam_element = cuda.jit(device=True)(_optim._adam_element)


def _sgd_update_kernel_py(p, g, v, lr, mu, wd, mode):
    """SGD on flat arrays (``v`` not written in mode 0, where it may be ``p``)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(start, p.shape[0], stride):
        pk, vk = _sgd_element(p[k], g[k], v[k], lr, mu, wd, mode)
        p[k] = pk
        if mode != _PLAIN:
            v[k] = vk


def _adam_update_kernel_py(p, g, m, v, w1, b2, w2, eps, wd, decay, ss, bc2s, mode):
    """Adam / AdamW on flat arrays."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(start, p.shape[0], stride):
        p[k], m[k], v[k] = _adam_element(
            p[k], g[k], m[k], v[k], w1, b2, w2, eps, wd, decay, ss, bc2s, mode
        )


_sgd_update_kernel = cuda.jit(_sgd_update_kernel_py)
_adam_update_kernel = cuda.jit(_adam_update_kernel_py)


class _InPlace:
    """Device views of arrays updated in place: device arrays as they are, NumPy
    arrays copied in and, by :meth:`finish`, back into themselves."""

    def __init__(self) -> None:
        self._back: list[tuple[Any, np.ndarray]] = []

    def __call__(self, a: Any) -> Any:
        if _cc.is_device_array(a):
            return _cc.flat(_cc.as_device(a))
        d = cuda.to_device(a)
        self._back.append((d, a))
        return _cc.flat(d)

    def finish(self) -> None:
        for d, h in self._back:
            d.copy_to_host(h)
        self._back.clear()


def _grid(n: int) -> tuple[int, int]:
    tpb = _cc.threads_1d()
    return _cc.blocks_for(n, tpb), tpb


def sgd_update_cuda(
    p: Any, g: Any, v: Any, lr: float, momentum: float, weight_decay: float,
    nesterov: bool,
) -> Any:  # fmt: skip
    """CUDA variant of ``_sgd_update_<b>``; returns p."""
    io = _InPlace()
    tr = _cc.Transfer()
    d_p = io(p)
    d_g = _cc.flat(tr.input(g))
    mode = _sgd_mode(momentum, nesterov)
    d_v = d_p if v is None else io(v)  # never read or written in mode 0
    t = d_p.dtype.type
    grid, tpb = _grid(d_p.shape[0])
    _sgd_update_kernel[grid, tpb](
        d_p, d_g, d_v, t(lr), t(momentum), t(weight_decay), mode
    )
    io.finish()
    return p


def adam_update_cuda(
    p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled: bool, step_size: float,
    bc2_sqrt: float,
) -> Any:  # fmt: skip
    """CUDA variant of ``_adam_update_<b>``; returns p."""
    io = _InPlace()
    tr = _cc.Transfer()
    d_p, d_m, d_v = io(p), io(m), io(v)
    d_g = _cc.flat(tr.input(g))
    t = d_p.dtype.type
    grid, tpb = _grid(d_p.shape[0])
    _adam_update_kernel[grid, tpb](
        d_p, d_g, d_m, d_v, t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(eps),
        t(weight_decay), t(1.0 - lr * weight_decay), t(step_size), t(bc2_sqrt),
        _adam_wd_mode(weight_decay, decoupled),
    )  # fmt: skip
    io.finish()
    return p


def _sig_sgd_update(dt):
    return (dt[::1], dt[::1], dt[::1], dt, dt, dt, _i32)


def _sig_adam_update(dt):
    return (dt[::1],) * 4 + (dt,) * 8 + (_i32,)


PTX_KERNELS = [
    ("_sgd_update_kernel", _sgd_update_kernel_py, _sig_sgd_update),
    ("_adam_update_kernel", _adam_update_kernel_py, _sig_adam_update),
]

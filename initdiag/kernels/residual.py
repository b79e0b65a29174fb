"""Residual add, scalar scale and inverted-dropout masking (all CPU backends).

Contract (see ``initdiag.kernels``; every variant has the same signature, writes into
the output it is given, returns it, never validates, allocates or raises)::

    _residual_add_<b>(skip, x, scale, out) -> out    # out = skip + scale * x
                                                     # (skip None: out = scale * x)
    _masked_scale_<b>(x, mask, scale, out) -> out    # out = x * (mask * scale)

``skip``, ``x`` and ``out`` are C-contiguous arrays of one float dtype and shape,
``mask`` a C-contiguous uint8 array of that shape, ``scale`` a Python float.
``out`` may be ``skip`` or ``x`` itself (in place; entry i is read before it is
written); partial overlaps are not allowed.

Where these ops sit (He et al. 2016, "Deep residual learning", eq. 1, with a branch
multiplier as in SkipInit, De & Smith 2020, and ReZero, Bachlechner et al. 2021):

- residual stream ``y = skip + scale * branch(x)``; its backward hands ``g`` to the
  shortcut unchanged and ``scale * g`` to the branch (``skip=None``);
- the Scale layer ``y = alpha * x`` and its input gradient ``alpha * g``
  (``skip=None``);
- inverted dropout in training mode (Srivastava et al. 2014; PyTorch's
  ``nn.Dropout``): ``y = x * m / (1 - p)`` with ``m`` the keep mask
  (``initdiag._rng.fill_keep_mask``), and its backward ``g * m / (1 - p)``.

Arithmetic: in the array dtype.  ``scale`` is first rounded to it (float32 stays
float32), then ``skip + s * x`` is one multiply and one add, each rounded, so the
numpy, numba and c variants agree bit for bit (the C core compiles without FP
contraction; the cuda variant may fuse the multiply-add, one rounding fewer).
``skip=None`` with ``scale = 1`` still writes ``out`` (a copy of x).

NaN and inf propagate through both ops by IEEE arithmetic.  For the mask this
is PyTorch's choice: ``torch.nn.functional.dropout`` multiplies by the scaled
mask (``x * (m * s)``), so a dropped entry gives ``x * 0``: 0 (with x's sign) for
finite x, NaN for x = NaN or +-inf.  A dropout layer therefore does not hide a
non-finite input from the statistics.  A mask byte other than 0 counts as 1 (the
public dispatcher only accepts 0 and 1).

The numba variants loop over the flattened arrays in chunks of ``PAR_CHUNK``
(parallel when :func:`elementwise_threads` says so, like the cheap activations); the
fused residual add + statistics of ``simulate`` lives in ``kernels.fused``
(``residual_add_stats``).
"""

from __future__ import annotations

import numpy as np

from ._threading import (
    COST_STATS,
    c_threads,
    njit,
    numba_threads,
    prange,
    sweep_threads,
)
from .activation import PAR_CHUNK


def elementwise_threads(N: int, c: bool = False) -> int:
    """Threads for one of these passes over N elements (the cost of a statistics
    pass per element: two reads and a write of cheap arithmetic)."""
    return sweep_threads(N, c_threads() if c else numba_threads(), COST_STATS)


# --------------------------------------------------------------------------- numpy
def _residual_add_numpy(skip, x, scale, out):
    """NumPy reference of ``out = skip + scale * x`` (``skip`` None: ``scale * x``)."""
    s = x.dtype.type(scale)
    with np.errstate(all="ignore"):
        if skip is None:
            np.multiply(x, s, out=out)
        elif np.may_share_memory(out, skip):
            # in place on skip: the product needs its own buffer
            np.add(skip, s * x, out=out)
        else:
            np.multiply(x, s, out=out)
            np.add(skip, out, out=out)
    return out


def _masked_scale_numpy(x, mask, scale, out):
    """NumPy reference of ``out = x * (mask * scale)`` (PyTorch's dropout order)."""
    s = x.dtype.type(scale)
    with np.errstate(all="ignore"):
        w = np.where(mask != 0, s, x.dtype.type(0))
        np.multiply(x, w, out=out)
    return out


# --------------------------------------------------------------------------- numba
_ADD, _SCALE, _MASK = 0, 1, 2
_NO_MASK = np.zeros(0, np.uint8)


@njit(cache=True, error_model="numpy")
def _span_nb(a, b, mask, s, out, mode):
    """On 1-D slices: out = a + s * b (_ADD), s * b (_SCALE) or b * (s if mask
    else 0) (_MASK: a select, then one product, so NaN / inf * 0 -> NaN as in
    PyTorch's dropout).  ``s`` is in the dtype (no widening); one tight loop per
    mode, so each vectorises."""
    if mode == _ADD:
        for k in range(b.shape[0]):
            out[k] = a[k] + s * b[k]
    elif mode == _SCALE:
        for k in range(b.shape[0]):
            out[k] = s * b[k]
    else:
        zero = s - s
        for k in range(b.shape[0]):
            w = s if mask[k] != 0 else zero
            out[k] = b[k] * w


@njit(cache=True, parallel=True, error_model="numpy")
def _elementwise_nb(a, b, mask, s, out, mode, par):
    """:func:`_span_nb` over C-contiguous arrays, in parallel chunks when ``par``
    (``a`` is read only by _ADD, ``mask`` only by _MASK)."""
    af = a.reshape(-1)
    bf = b.reshape(-1)
    mf = mask.reshape(-1)
    of = out.reshape(-1)
    N = bf.size
    nch = (N + PAR_CHUNK - 1) // PAR_CHUNK
    if nch <= 1 or not par:
        _span_nb(af, bf, mf, s, of, mode)
    else:
        for c in prange(nch):
            lo = c * N // nch
            hi = (c + 1) * N // nch
            m = mf[lo:hi] if mode == _MASK else mf
            _span_nb(af[lo:hi], bf[lo:hi], m, s, of[lo:hi], mode)
    return out


def _residual_add_numba(skip, x, scale, out):
    """Numba variant of ``out = skip + scale * x``."""
    par = elementwise_threads(x.size) > 1
    mode, a = (_SCALE, x) if skip is None else (_ADD, skip)
    return _elementwise_nb(a, x, _NO_MASK, x.dtype.type(scale), out, mode, par)


def _masked_scale_numba(x, mask, scale, out):
    """Numba variant of ``out = x * (mask * scale)``."""
    par = elementwise_threads(x.size) > 1
    return _elementwise_nb(x, x, mask, x.dtype.type(scale), out, _MASK, par)


# --------------------------------------------------------------------------- c
def _c_elementwise(name, a, b, scale, out):
    """One C entry point ``name(a, b, N, scale, out, nthr)`` (a may be None)."""
    from ._c import check, fn, ptr

    N = out.size
    rc = fn(name, out.dtype)(
        ptr(a), ptr(b), N, float(scale), ptr(out), elementwise_threads(N, c=True)
    )
    check(rc, name)
    return out


def _residual_add_c(skip, x, scale, out):
    """C variant of ``out = skip + scale * x`` (``skip`` None: NULL)."""
    return _c_elementwise("idg_residual_add", skip, x, scale, out)


def _masked_scale_c(x, mask, scale, out):
    """C variant of ``out = x * (mask * scale)``."""
    return _c_elementwise("idg_masked_scale", x, mask, scale, out)

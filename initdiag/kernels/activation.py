"""Element-wise activations and their derivatives (all CPU backends).

Contract (see ``initdiag.kernels``; every variant has the same signature, writes into
the outputs it is given, returns them, never validates, allocates or raises)::

    _activation_forward_<b>(x, act, slope, out) -> out          # out = act(x)
    _activation_backward_<b>(dy, x, act, slope, out) -> out     # out = dy * act'(x)

``act`` is one of :data:`ACTIVATIONS`; ``slope`` is leaky_relu's negative slope.
``out`` may be ``x`` itself (in place).  Formulas (float64 references in
``tests/naive.py``):

========== ======================================= =====================================
act        act(x)                                  act'(x)
========== ======================================= =====================================
relu       0 if x <= 0 else x                      1 if x > 0, 0 if x <= 0
leaky_relu slope * x if x < 0 else x               slope if x < 0 else 1
tanh       tanh x                                  1 - tanh^2 x
sigmoid    s = 1 / (1 + e^-x)                      s (1 - s)
gelu       x Phi(x), Phi(x) = erfc(-x/sqrt2) / 2   Phi(x) + x phi(x)
silu       x s(x)                                  s + x s (1 - s)
selu       scale * (x if x > 0 else a (e^x - 1))   scale * (1 if x > 0 else a e^x)
erf        erf x                                   2 / sqrt(pi) e^-x^2
identity   x                                       1
========== ======================================= =====================================

GELU is the exact (erf) form of Hendrycks & Gimpel (2016); SELU uses PyTorch's
constants (Klambauer et al. 2017).  NaN and inf propagate: relu(NaN) = NaN, and the
derivative at a NaN input is NaN (relu / leaky_relu included), except that relu
passes no gradient where x <= 0.

The numba and c variants loop in Numba / C for relu, leaky_relu, identity, gelu,
selu and erf, but hand tanh, sigmoid and silu (and erf's derivative) to NumPy's
SIMD ufuncs (:data:`DELEGATE_FORWARD`, :data:`DELEGATE_BACKWARD`): a scalar libm
loop was measured 4x-100x slower than NumPy 2 for those (bench/KERNELS.md).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ._names import (  # noqa: F401 - the activation table, re-exported here
    _INV_SQRT2,
    _INV_SQRT2PI,
    _TWO_OVER_SQRTPI,
    ACT_CODES,
    ACTIVATIONS,
    ERF,
    GELU,
    IDENTITY,
    LEAKY,
    RELU,
    SELU,
    SELU_ALPHA,
    SELU_SCALE,
    SIGMOID,
    SILU,
    TANH,
)
from ._numba_common import act_grad_nb as _act_grad_nb
from ._numba_common import act_nb as _act_nb
from ._threading import c_threads, njit, numba_threads, prange, sweep_threads

# Activations whose NumPy ufunc path (NumPy 2's SIMD exp / tanh) beats a scalar
# libm loop by 4x-70x on 512 x 1024 float32 (bench/KERNELS.md): the numba and c
# variants hand these to NumPy instead of looping over scalar libm calls
# (gelu / erf / selu stay ours: SciPy's erf / erfc and np.where are no faster).
DELEGATE_FORWARD = frozenset({"tanh", "sigmoid", "silu"})
DELEGATE_BACKWARD = frozenset({"tanh", "sigmoid", "silu", "erf"})

# element count per parallel chunk (whether to go parallel at all: act_threads)
PAR_CHUNK = 1 << 16

# relative cost per element (initdiag.kernels._threading.sweep_threads): the
# select-only activations cost about a statistics pass; the others (scalar libm
# calls) about 16 times more
_CHEAP = frozenset({"relu", "leaky_relu", "identity"})


def act_threads(N: int, act: str, backward: bool = False, c: bool = False) -> int:
    """Threads for an activation pass over N elements under the wait policy."""
    cost = (2 if backward else 1) if act in _CHEAP else 16
    return sweep_threads(N, c_threads() if c else numba_threads(), cost)


# --------------------------------------------------------------------------- numpy
def _activation_forward_numpy(x, act, slope, out):
    """NumPy reference of ``out = act(x)``."""
    with np.errstate(all="ignore"):
        if act == "relu":
            # NaN must survive: maximum propagates NaN
            np.maximum(x, 0, out=out)
        elif act == "leaky_relu":
            np.copyto(out, np.where(x < 0, x * slope, x))
        elif act == "tanh":
            np.tanh(x, out=out)
        elif act == "sigmoid":
            np.copyto(out, 1 / (1 + np.exp(-x)))
        elif act == "gelu":
            np.copyto(out, x * (0.5 * special.erfc(-x * _INV_SQRT2)))
        elif act == "silu":
            np.copyto(out, x * (1 / (1 + np.exp(-x))))
        elif act == "selu":
            neg = (SELU_SCALE * SELU_ALPHA) * np.expm1(x)
            np.copyto(out, np.where(x > 0, SELU_SCALE * x, neg))
        elif act == "erf":
            special.erf(x, out=out)
        else:  # identity
            if out is not x:
                np.copyto(out, x)
    return out


def _deriv_numpy(x, act, slope):
    if act == "tanh":
        t = np.tanh(x)
        return 1 - t * t
    if act == "sigmoid":
        s = 1 / (1 + np.exp(-x))
        return s * (1 - s)
    if act == "gelu":
        return 0.5 * special.erfc(-x * _INV_SQRT2) + x * (
            _INV_SQRT2PI * np.exp(-0.5 * x * x)
        )
    if act == "silu":
        s = 1 / (1 + np.exp(-x))
        return s + x * s * (1 - s)
    if act == "selu":
        return np.where(x > 0, SELU_SCALE, (SELU_SCALE * SELU_ALPHA) * np.exp(x))
    if act == "erf":
        return _TWO_OVER_SQRTPI * np.exp(-x * x)
    raise AssertionError(act)


def _activation_backward_numpy(dy, x, act, slope, out):
    """NumPy reference of ``out = dy * act'(x)``."""
    with np.errstate(all="ignore"):
        if act == "relu":
            r = np.where(x > 0, dy, np.where(x <= 0, 0, x))
        elif act == "leaky_relu":
            r = np.where(x < 0, dy * slope, np.where(x >= 0, dy, x))
        elif act == "identity":
            r = dy
        else:
            r = dy * _deriv_numpy(x, act, slope)
        np.copyto(out, r, casting="unsafe")
    return out


# --------------------------------------------------------------------------- numba
@njit(cache=True, error_model="numpy")
def _act_span_nb(x, out, code, slope):
    """out = act(x) on 1-D slices; relu/identity get tight loops.  0-based
    indices on contiguous slices: LLVM vectorises these loops."""
    hi = x.shape[0]
    if code == RELU:
        zero = np.zeros(1, out.dtype)[0]  # typed zero: the select stays in dtype
        for k in range(hi):
            v = x[k]
            out[k] = zero if v <= 0 else v
    elif code == IDENTITY:
        for k in range(hi):
            out[k] = x[k]
    elif code == LEAKY:
        s = np.full(1, slope, out.dtype)[0]
        for k in range(hi):
            v = x[k]
            out[k] = v * s if v < 0 else v  # a select, not a branch
    else:
        for k in range(hi):
            out[k] = _act_nb(x[k], code, slope)


@njit(cache=True, error_model="numpy")
def _act_grad_span_nb(dy, x, out, code, slope):
    """out = dy * act'(x) on 1-D slices."""
    hi = x.shape[0]
    if code == RELU:
        zero = np.zeros(1, out.dtype)[0]
        for k in range(hi):
            v = x[k]
            keep = dy[k] if v > 0 else zero  # selects: no branch to mispredict
            out[k] = keep if v == v else v
    elif code == IDENTITY:
        for k in range(hi):
            out[k] = dy[k]
    elif code == LEAKY:
        s = np.full(1, slope, out.dtype)[0]
        for k in range(hi):
            v = x[k]
            keep = dy[k] * s if v < 0 else dy[k]
            out[k] = keep if v == v else v
    else:
        for k in range(hi):
            out[k] = _act_grad_nb(dy[k], x[k], code, slope)


@njit(cache=True, parallel=True, error_model="numpy")
def _act_fwd_nb(x, code, slope, out, par):
    """act over a C-contiguous 2-D array, in parallel chunks when ``par``."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    N = xf.size
    nch = (N + PAR_CHUNK - 1) // PAR_CHUNK
    if nch <= 1 or not par:
        _act_span_nb(xf, of, code, slope)
    else:
        for c in prange(nch):
            lo = c * N // nch
            hi = (c + 1) * N // nch
            _act_span_nb(xf[lo:hi], of[lo:hi], code, slope)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _act_bwd_nb(dy, x, code, slope, out, par):
    """dy * act'(x) over C-contiguous 2-D arrays, in parallel chunks when ``par``."""
    df = dy.reshape(-1)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    N = xf.size
    nch = (N + PAR_CHUNK - 1) // PAR_CHUNK
    if nch <= 1 or not par:
        _act_grad_span_nb(df, xf, of, code, slope)
    else:
        for c in prange(nch):
            lo = c * N // nch
            hi = (c + 1) * N // nch
            _act_grad_span_nb(df[lo:hi], xf[lo:hi], of[lo:hi], code, slope)
    return out


def _activation_forward_numba(x, act, slope, out):
    """Numba variant of ``out = act(x)`` (DELEGATE_FORWARD acts: NumPy ufuncs)."""
    if act in DELEGATE_FORWARD:
        return _activation_forward_numpy(x, act, slope, out)
    _act_fwd_nb(x, ACT_CODES[act], float(slope), out, act_threads(x.size, act) > 1)
    return out


def _activation_backward_numba(dy, x, act, slope, out):
    """Numba variant of ``out = dy * act'(x)`` (DELEGATE_BACKWARD: NumPy)."""
    if act in DELEGATE_BACKWARD:
        return _activation_backward_numpy(dy, x, act, slope, out)
    _act_bwd_nb(
        dy, x, ACT_CODES[act], float(slope), out, act_threads(x.size, act, True) > 1
    )
    return out


# --------------------------------------------------------------------------- c
def _activation_forward_c(x, act, slope, out):
    """C variant of ``out = act(x)`` (DELEGATE_FORWARD acts: NumPy ufuncs)."""
    from ._c import check, fn, ptr

    if act in DELEGATE_FORWARD:
        return _activation_forward_numpy(x, act, slope, out)

    check(
        fn("idg_activation_forward", x.dtype)(
            ptr(x),
            x.size,
            ACT_CODES[act],
            float(slope),
            ptr(out),
            act_threads(x.size, act, c=True),
        ),
        "idg_activation_forward",
    )
    return out


def _activation_backward_c(dy, x, act, slope, out):
    """C variant of ``out = dy * act'(x)`` (DELEGATE_BACKWARD acts: NumPy)."""
    from ._c import check, fn, ptr

    if act in DELEGATE_BACKWARD:
        return _activation_backward_numpy(dy, x, act, slope, out)

    check(
        fn("idg_activation_backward", x.dtype)(
            ptr(dy),
            ptr(x),
            x.size,
            ACT_CODES[act],
            float(slope),
            ptr(out),
            act_threads(x.size, act, True, c=True),
        ),
        "idg_activation_backward",
    )
    return out



"""Fused optimizer updates: SGD (momentum, Nesterov, weight decay) and Adam / AdamW.

Contract (see ``initdiag.kernels``; every variant has the same signature, updates
its arrays in place, returns ``p``, never validates, allocates or raises)::

    _sgd_update_<b>(p, g, v, lr, momentum, weight_decay, nesterov) -> p
    _adam_update_<b>(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled,
                     step_size, bc2_sqrt) -> p

``p``, ``g`` and the state arrays (``v``: the SGD velocity, None when
``momentum == 0``; ``m``, ``v``: Adam's moments) are distinct C-contiguous arrays
of one float dtype and shape; the hyper-parameters are Python floats (``nesterov``
and ``decoupled`` bools); Adam's bias corrections come in as ``step_size = lr /
(1 - beta1^t)`` and ``bc2_sqrt = sqrt(1 - beta2^t)``, computed once in float64 by
the dispatcher.

Arithmetic, per element, in the array dtype with every hyper-parameter rounded to
it first (as PyTorch does with its Python scalars), in the operation order of
PyTorch's single-tensor (``foreach=False``) implementations
(``torch/optim/sgd.py``, ``torch/optim/adam.py``, torch 2.x):

SGD (Robbins & Monro 1951; heavy-ball momentum, Polyak 1964; Nesterov 1983 in the
form of Sutskever et al. 2013; ``torch.optim.SGD`` with dampening 0)::

    g = grad + wd * p                       (wd != 0)
    v = momentum * v + g                    (momentum != 0; v starts at zeros, so the
                                             first step gives torch's v = g)
    g = g + momentum * v  if nesterov else  g = v
    p = p - lr * g

Adam (Kingma & Ba 2015, Algorithm 1) / AdamW (Loshchilov & Hutter 2019)::

    p = p * (1 - lr * wd)                   (AdamW, wd != 0)
    g = grad + wd * p                       (Adam, wd != 0: L2 in the gradient)
    m = m + (1 - beta1) * (g - m)           (= beta1 m + (1 - beta1) g: torch's lerp_)
    v = (beta2 * v) + ((1 - beta2) * g) * g (torch's mul_ then addcmul_)
    p = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps)   (torch's addcdiv_)

The numpy, numba and c variants perform exactly these roundings (the C core is
built without FP contraction), so they agree bit for bit; PyTorch's vectorised CPU
loops fuse some of the products into FMAs (``add`` with ``alpha``, ``lerp``), so
they agree with it to a few ulps per step; the cuda variant may contract too.
NaN and inf propagate by IEEE arithmetic (a diverging run keeps its NaNs).

The numba variants loop over the flattened arrays in chunks of ``PAR_CHUNK``
(parallel when :func:`update_threads` says so): an update is a memory-bound sweep
reading two to four arrays and writing one to three.
"""

from __future__ import annotations

import math

import numpy as np

from ._threading import (
    COST_BN_FORWARD,
    COST_STATS,
    c_threads,
    njit,
    numba_threads,
    prange,
    sweep_threads,
)
from .activation import PAR_CHUNK

# Weight-decay modes of the Adam kernels (the numba and c variants branch on them).
_WD_NONE, _WD_L2, _WD_DECOUPLED = 0, 1, 2
# SGD modes: plain, heavy-ball momentum, Nesterov momentum.
_PLAIN, _HEAVY, _NESTEROV = 0, 1, 2


def training_threads(N: int, cost: int, c: bool = False) -> int:
    """Threads for one sweep of a training kernel (an update, a loss head) over N
    elements of relative cost ``cost`` (``_threading.sweep_threads``)."""
    return sweep_threads(N, c_threads() if c else numba_threads(), cost)


def update_threads(N: int, adam: bool, c: bool = False) -> int:
    """Threads for one update sweep over N elements: SGD costs about a statistics
    pass per element, Adam (a square root and a division) about a BatchNorm
    forward."""
    return training_threads(N, COST_BN_FORWARD if adam else COST_STATS, c)


def _sgd_mode(momentum: float, nesterov: bool) -> int:
    if momentum == 0:
        return _PLAIN
    return _NESTEROV if nesterov else _HEAVY


def _adam_wd_mode(weight_decay: float, decoupled: bool) -> int:
    if weight_decay == 0:
        return _WD_NONE
    return _WD_DECOUPLED if decoupled else _WD_L2


# --------------------------------------------------------------------------- numpy
def _sgd_update_numpy(p, g, v, lr, momentum, weight_decay, nesterov):
    """NumPy reference of the SGD update (module docstring), in place."""
    t = p.dtype.type
    with np.errstate(all="ignore"):
        if weight_decay != 0:
            g = g + t(weight_decay) * p
        if momentum != 0:
            mu = t(momentum)
            np.multiply(v, mu, out=v)
            np.add(v, g, out=v)
            g = g + mu * v if nesterov else v
        p -= t(lr) * g
    return p


def _adam_update_numpy(
    p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step_size, bc2_sqrt
):
    """NumPy reference of the Adam / AdamW update (module docstring), in place."""
    t = p.dtype.type
    with np.errstate(all="ignore"):
        mode = _adam_wd_mode(weight_decay, decoupled)
        if mode == _WD_DECOUPLED:
            np.multiply(p, t(1.0 - lr * weight_decay), out=p)
        elif mode == _WD_L2:
            g = g + t(weight_decay) * p
        m += t(1.0 - beta1) * (g - m)
        np.multiply(v, t(beta2), out=v)
        v += (t(1.0 - beta2) * g) * g
        denom = np.sqrt(v) / t(bc2_sqrt) + t(eps)
        p -= (t(step_size) * m) / denom
    return p


# --------------------------------------------------------------------------- numba
# One element of each update, written once: jitted here for the CPU loops and by
# ``_cuda_optim`` as a CUDA device function.  Scalars come in the array dtype.
def _sgd_element(pk, gk, vk, lr, mu, wd, mode):
    """One SGD element: returns (p', v') (v' is vk itself in _PLAIN mode)."""
    if wd != wd - wd:
        gk = gk + wd * pk
    if mode != _PLAIN:
        vk = mu * vk + gk
        gk = gk + mu * vk if mode == _NESTEROV else vk
    return pk - lr * gk, vk


def _adam_element(pk, gk, mk, vk, w1, b2, w2, eps, wd, decay, ss, bc2s, mode):
    """One Adam / AdamW element (``w1 = 1 - beta1``, ``w2 = 1 - beta2``,
    ``decay = 1 - lr wd``): returns (p', m', v')."""
    if mode == _WD_DECOUPLED:
        pk = pk * decay
    elif mode == _WD_L2:
        gk = gk + wd * pk
    mk = mk + w1 * (gk - mk)
    vk = vk * b2 + (w2 * gk) * gk
    return pk - (ss * mk) / (math.sqrt(vk) / bc2s + eps), mk, vk


_sgd_element_nb = njit(cache=True, error_model="numpy")(_sgd_element)
_adam_element_nb = njit(cache=True, error_model="numpy")(_adam_element)


@njit(cache=True, error_model="numpy")
def _sgd_span_nb(p, g, v, lr, mu, wd, mode):
    """SGD on 1-D slices (``v`` neither read for use nor written in _PLAIN)."""
    for k in range(p.shape[0]):
        p[k], vk = _sgd_element_nb(p[k], g[k], v[k], lr, mu, wd, mode)
        if mode != _PLAIN:
            v[k] = vk


@njit(cache=True, parallel=True, error_model="numpy")
def _sgd_nb(p, g, v, lr, mu, wd, mode, par):
    """:func:`_sgd_span_nb` over C-contiguous arrays, in parallel chunks if ``par``."""
    pf = p.reshape(-1)
    gf = g.reshape(-1)
    vf = v.reshape(-1)
    N = pf.size
    nch = (N + PAR_CHUNK - 1) // PAR_CHUNK
    if nch <= 1 or not par:
        _sgd_span_nb(pf, gf, vf, lr, mu, wd, mode)
    else:
        for c in prange(nch):
            lo = c * N // nch
            hi = (c + 1) * N // nch
            vs = vf[lo:hi] if mode != _PLAIN else vf
            _sgd_span_nb(pf[lo:hi], gf[lo:hi], vs, lr, mu, wd, mode)
    return p


@njit(cache=True, error_model="numpy")
def _adam_span_nb(p, g, m, v, w1, b2, w2, eps, wd, decay, ss, bc2s, mode):
    """Adam / AdamW on 1-D slices."""
    for k in range(p.shape[0]):
        p[k], m[k], v[k] = _adam_element_nb(
            p[k], g[k], m[k], v[k], w1, b2, w2, eps, wd, decay, ss, bc2s, mode
        )


@njit(cache=True, parallel=True, error_model="numpy")
def _adam_nb(p, g, m, v, w1, b2, w2, eps, wd, decay, ss, bc2s, mode, par):
    """:func:`_adam_span_nb` over C-contiguous arrays, in parallel chunks if ``par``."""
    pf = p.reshape(-1)
    gf = g.reshape(-1)
    mf = m.reshape(-1)
    vf = v.reshape(-1)
    N = pf.size
    nch = (N + PAR_CHUNK - 1) // PAR_CHUNK
    if nch <= 1 or not par:
        _adam_span_nb(pf, gf, mf, vf, w1, b2, w2, eps, wd, decay, ss, bc2s, mode)
    else:
        for c in prange(nch):
            lo = c * N // nch
            hi = (c + 1) * N // nch
            _adam_span_nb(
                pf[lo:hi], gf[lo:hi], mf[lo:hi], vf[lo:hi],
                w1, b2, w2, eps, wd, decay, ss, bc2s, mode,
            )  # fmt: skip
    return p


def _sgd_update_numba(p, g, v, lr, momentum, weight_decay, nesterov):
    """Numba variant of the SGD update."""
    t = p.dtype.type
    mode = _sgd_mode(momentum, nesterov)
    par = update_threads(p.size, adam=False) > 1
    vv = p if v is None else v  # never read or written in _PLAIN mode
    _sgd_nb(p, g, vv, t(lr), t(momentum), t(weight_decay), mode, par)
    return p


def _adam_update_numba(
    p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step_size, bc2_sqrt
):
    """Numba variant of the Adam / AdamW update."""
    t = p.dtype.type
    mode = _adam_wd_mode(weight_decay, decoupled)
    par = update_threads(p.size, adam=True) > 1
    _adam_nb(
        p, g, m, v, t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(eps),
        t(weight_decay), t(1.0 - lr * weight_decay), t(step_size), t(bc2_sqrt),
        mode, par,
    )  # fmt: skip
    return p


# --------------------------------------------------------------------------- c
def _sgd_update_c(p, g, v, lr, momentum, weight_decay, nesterov):
    """C variant (idg_sgd_update); ``v`` None is passed as NULL."""
    from ._c import check, fn, ptr

    N = p.size
    rc = fn("idg_sgd_update", p.dtype)(
        ptr(p), ptr(g), ptr(v), N, float(lr), float(momentum), float(weight_decay),
        _sgd_mode(momentum, nesterov), update_threads(N, adam=False, c=True),
    )  # fmt: skip
    check(rc, "idg_sgd_update")
    return p


def _adam_update_c(
    p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step_size, bc2_sqrt
):
    """C variant (idg_adam_update)."""
    from ._c import check, fn, ptr

    N = p.size
    rc = fn("idg_adam_update", p.dtype)(
        ptr(p), ptr(g), ptr(m), ptr(v), N, 1.0 - beta1, float(beta2), 1.0 - beta2,
        float(eps), float(weight_decay), 1.0 - lr * weight_decay, float(step_size),
        float(bc2_sqrt), _adam_wd_mode(weight_decay, decoupled),
        update_threads(N, adam=True, c=True),
    )  # fmt: skip
    check(rc, "idg_adam_update")
    return p

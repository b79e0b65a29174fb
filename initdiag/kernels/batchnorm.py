"""Training-mode BatchNorm, optionally fused with the following activation.

Contract (every variant has the same signature, writes into the outputs it is
given, returns them, never validates, allocates (beyond per-block scratch) or
raises)::

    _batchnorm_forward_<b>(x, gamma, beta, eps, act, slope, out, mean, invstd) -> out
    _batchnorm_backward_<b>(dy, x, mean, invstd, gamma, beta, act, slope,
                            dx, dgamma, dbeta) -> (dx, dgamma, dbeta)

Forward, per feature j over the batch of B rows (Ioffe & Szegedy 2015; biased
variance as PyTorch in training mode)::

    mean_j = (1/B) sum_b x_bj,   var_j = (1/B) sum_b (x_bj - mean_j)^2,
    invstd_j = 1 / sqrt(var_j + eps),
    out_bj = act(z_bj),  z_bj = gamma_j (x_bj - mean_j) invstd_j + beta_j.

Backward, with xhat = (x - mean) invstd and g = dy * act'(z)::

    dbeta_j = sum_b g_bj,   dgamma_j = sum_b g_bj xhat_bj,
    dx_bj = gamma_j invstd_j / B * (B g_bj - dbeta_j - xhat_bj dgamma_j).

``beta`` may be None in the backward (it only enters z for act != identity).

Numba and C variants: parallel over blocks of columns (one per thread), so no
reduction crosses threads.  The variance
uses sums shifted by the first row (Chan, Golub & LeVeque 1983), accumulated in
float64, never E[x^2] - E[x]^2 of the raw data.
"""

from __future__ import annotations

import math

import numpy as np

from ._threading import njit, prange
from .activation import (
    ACT_CODES,
    DELEGATE_BACKWARD,
    DELEGATE_FORWARD,
    IDENTITY,
    RELU,
    _act_grad_nb,
    _act_nb,
    _activation_backward_numpy,
    _activation_forward_numpy,
)

# FMA contraction only (a * b + c in one rounding, as gcc does by default for C):
# no reassociation, NaN / inf semantics untouched
_CONTRACT = {"contract"}

# widest column block (the C core keeps per-block scratch on the stack: MAXBLK)
_MAX_BLOCK = 1024


def block_width(B: int, n: int, itemsize: int, nthreads: int = 2) -> int:
    """Columns per parallel block: one block per thread, a multiple of 16, <= 1024.

    Wide blocks win: rows of a narrow block are short strided pieces (a new page
    every few hundred bytes), which measured 1.5x slower than full-width rows for
    512 x 1024 float32 (129 vs 83 us single-threaded for blocks of 128 columns).
    """
    w = -(-n // max(1, nthreads))
    return int(min(_MAX_BLOCK, max(16, (w + 15) // 16 * 16)))


# --------------------------------------------------------------------------- numpy
def _batchnorm_forward_numpy(x, gamma, beta, eps, act, slope, out, mean, invstd):
    """NumPy reference (two-pass mean / variance)."""
    m = x.mean(axis=0)
    d = x - m
    v = np.mean(d * d, axis=0)
    mean[...] = m
    np.divide(1, np.sqrt(v + eps), out=invstd)
    np.multiply(d, gamma * invstd, out=out)
    out += beta
    _activation_forward_numpy(out, act, slope, out)
    return out


def _batchnorm_backward_numpy(
    dy, x, mean, invstd, gamma, beta, act, slope, dx, dgamma, dbeta
):
    """NumPy reference of the standard BatchNorm backward formula."""
    B = x.shape[0]
    xhat = (x - mean) * invstd
    if act == "identity":
        g = dy
    else:
        z = gamma * xhat + (0 if beta is None else beta)
        g = _activation_backward_numpy(dy, z, act, slope, np.empty_like(dy))
    np.sum(g, axis=0, out=dbeta)
    np.sum(g * xhat, axis=0, out=dgamma)
    np.multiply(gamma * invstd / B, B * g - dbeta - xhat * dgamma, out=dx)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- numba
@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_stats_block_nb(x, j0, j1, kt, s1, s2):
    """Shifted sums of columns j0..j1: kt = first row (dtype of x); s1, s2 float64.

    Four rows per sweep, their partial sums in the dtype of x, so the float64
    accumulators are read and written once per four rows (the loop is then bound
    by loading x; all indices are 0-based on contiguous row slices so LLVM
    vectorises it)."""
    B = x.shape[0]
    w = j1 - j0
    r = x[0, j0:j1]
    for j in range(w):
        kt[j] = r[j]
        s1[j] = 0.0
        s2[j] = 0.0
    i = 0
    while i + 4 <= B:
        r0 = x[i, j0:j1]
        r1 = x[i + 1, j0:j1]
        r2 = x[i + 2, j0:j1]
        r3 = x[i + 3, j0:j1]
        for j in range(w):
            d0 = r0[j] - kt[j]
            d1 = r1[j] - kt[j]
            d2 = r2[j] - kt[j]
            d3 = r3[j] - kt[j]
            s1[j] += (d0 + d1) + (d2 + d3)
            s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    while i < B:
        r0 = x[i, j0:j1]
        for j in range(w):
            d0 = r0[j] - kt[j]
            s1[j] += d0
            s2[j] += d0 * d0
        i += 1


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_fwd_block_nb(
    x, gamma, beta, eps, code, slope, out, mean, invstd, j0, j1, w64, wt
):
    """BatchNorm forward of columns j0..j1 (statistics pass, then output pass).

    Scratch comes from the caller (w64: 2 float64 rows, wt: 5 rows of x's dtype):
    allocating inside the parallel region was measured to make the kernel
    sensitive to the process's allocator churn (bench/KERNELS.md)."""
    B = x.shape[0]
    w = j1 - j0
    kt = wt[0, :w]
    s1 = w64[0, :w]
    s2 = w64[1, :w]
    _bn_stats_block_nb(x, j0, j1, kt, s1, s2)
    mu = wt[1, :w]
    sc = wt[2, :w]
    be = wt[3, :w]
    for j in range(w):
        ms = s1[j] / B
        var = s2[j] / B - ms * ms
        if var < 0.0:
            var = 0.0
        mean[j0 + j] = kt[j] + ms
        invstd[j0 + j] = 1.0 / math.sqrt(var + eps)
        mu[j] = mean[j0 + j]
        sc[j] = gamma[j0 + j] * invstd[j0 + j]
        be[j] = beta[j0 + j]
    wt[4, 0] = 0.0
    zero = wt[4, 0]  # a zero of x's dtype keeps the relu select in that dtype
    for i in range(B):
        r = x[i, j0:j1]
        o = out[i, j0:j1]
        if code == IDENTITY:
            for j in range(w):
                o[j] = (r[j] - mu[j]) * sc[j] + be[j]
        elif code == RELU:
            for j in range(w):
                z = (r[j] - mu[j]) * sc[j] + be[j]
                o[j] = zero if z <= 0 else z
        else:
            for j in range(w):
                z = (r[j] - mu[j]) * sc[j] + be[j]
                o[j] = _act_nb(z, code, slope)


@njit(cache=True, parallel=True, error_model="numpy")
def _bn_fwd_nb(x, gamma, beta, eps, code, slope, out, mean, invstd, blk, w64, wt):
    """Parallel over column blocks of width blk; w64 (2 nblk, blk), wt (5 nblk, blk)."""
    n = x.shape[1]
    nblk = (n + blk - 1) // blk
    if nblk <= 1:
        _bn_fwd_block_nb(
            x, gamma, beta, eps, code, slope, out, mean, invstd, 0, n, w64, wt
        )
    else:
        for bi in prange(nblk):
            j1 = min(n, (bi + 1) * blk)
            _bn_fwd_block_nb(
                x,
                gamma,
                beta,
                eps,
                code,
                slope,
                out,
                mean,
                invstd,
                bi * blk,
                j1,
                w64[2 * bi : 2 * bi + 2],
                wt[5 * bi : 5 * bi + 5],
            )
    return out


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_bwd_block_nb(
    dy, x, mean, invstd, gamma, beta, code, slope, dx, dgamma, dbeta, j0, j1, w64, wt
):
    """BatchNorm backward of columns j0..j1 (reduction pass, then dx pass).

    relu's derivative is written as selects (no branch to mispredict on random
    signs); other activations go through the scalar ``_act_grad_nb``."""
    B = x.shape[0]
    w = j1 - j0
    mu = mean[j0:j1]
    inv = invstd[j0:j1]
    ga = gamma[j0:j1]
    be = beta[j0:j1]
    sb = w64[0, :w]
    sg = w64[1, :w]
    for j in range(w):
        sb[j] = 0.0
        sg[j] = 0.0
    wt[4, 0] = 0.0
    zero = wt[4, 0]
    i0 = 0
    if code == IDENTITY:
        # four rows per sweep, partial sums in the dtype of x: the float64
        # accumulators are loaded and stored once per four rows
        while i0 + 4 <= B:
            d0 = dy[i0, j0:j1]
            d1 = dy[i0 + 1, j0:j1]
            d2 = dy[i0 + 2, j0:j1]
            d3 = dy[i0 + 3, j0:j1]
            r0 = x[i0, j0:j1]
            r1 = x[i0 + 1, j0:j1]
            r2 = x[i0 + 2, j0:j1]
            r3 = x[i0 + 3, j0:j1]
            for j in range(w):
                sb[j] += (d0[j] + d1[j]) + (d2[j] + d3[j])
                sg[j] += inv[j] * (
                    (d0[j] * (r0[j] - mu[j]) + d1[j] * (r1[j] - mu[j]))
                    + (d2[j] * (r2[j] - mu[j]) + d3[j] * (r3[j] - mu[j]))
                )
            i0 += 4
    for i in range(i0, B):
        d = dy[i, j0:j1]
        r = x[i, j0:j1]
        if code == IDENTITY:
            for j in range(w):
                h = (r[j] - mu[j]) * inv[j]
                sb[j] += d[j]
                sg[j] += d[j] * h
        elif code == RELU:
            for j in range(w):
                h = (r[j] - mu[j]) * inv[j]
                z = ga[j] * h + be[j]
                keep = d[j] if z > 0 else zero
                gj = keep if z == z else z
                sb[j] += gj
                sg[j] += gj * h
        else:
            for j in range(w):
                h = (r[j] - mu[j]) * inv[j]
                z = np.float64(ga[j]) * np.float64(h) + np.float64(be[j])
                gj = _act_grad_nb(np.float64(d[j]), z, code, slope)
                sb[j] += gj
                sg[j] += gj * h
    a = wt[0, :w]
    c0 = wt[1, :w]
    c1 = wt[2, :w]
    for j in range(w):
        dbeta[j0 + j] = sb[j]
        dgamma[j0 + j] = sg[j]
        f = np.float64(ga[j]) * np.float64(inv[j])
        a[j] = f
        c0[j] = -f * sb[j] / B
        c1[j] = -f * sg[j] / B
    for i in range(B):
        d = dy[i, j0:j1]
        r = x[i, j0:j1]
        o = dx[i, j0:j1]
        if code == IDENTITY:
            for j in range(w):
                h = (r[j] - mu[j]) * inv[j]
                o[j] = a[j] * d[j] + c0[j] + h * c1[j]
        elif code == RELU:
            for j in range(w):
                h = (r[j] - mu[j]) * inv[j]
                z = ga[j] * h + be[j]
                keep = d[j] if z > 0 else zero
                gj = keep if z == z else z
                o[j] = a[j] * gj + c0[j] + h * c1[j]
        else:
            for j in range(w):
                h = (r[j] - mu[j]) * inv[j]
                z = np.float64(ga[j]) * np.float64(h) + np.float64(be[j])
                gj = _act_grad_nb(np.float64(d[j]), z, code, slope)
                o[j] = a[j] * gj + c0[j] + h * c1[j]


@njit(cache=True, parallel=True, error_model="numpy")
def _bn_bwd_nb(
    dy, x, mean, invstd, gamma, beta, code, slope, dx, dgamma, dbeta, blk, w64, wt
):
    """Parallel over column blocks of width blk; w64 (2 nblk, blk), wt (5 nblk, blk)."""
    n = x.shape[1]
    nblk = (n + blk - 1) // blk
    if nblk <= 1:
        _bn_bwd_block_nb(
            dy,
            x,
            mean,
            invstd,
            gamma,
            beta,
            code,
            slope,
            dx,
            dgamma,
            dbeta,
            0,
            n,
            w64,
            wt,
        )
    else:
        for bi in prange(nblk):
            j1 = min(n, (bi + 1) * blk)
            _bn_bwd_block_nb(
                dy,
                x,
                mean,
                invstd,
                gamma,
                beta,
                code,
                slope,
                dx,
                dgamma,
                dbeta,
                bi * blk,
                j1,
                w64[2 * bi : 2 * bi + 2],
                wt[5 * bi : 5 * bi + 5],
            )
    return dx


def _nthreads() -> int:
    try:
        import numba

        return numba.get_num_threads()
    except ImportError:  # pragma: no cover
        return 1


def _split_forward(act, slope, out):
    """BatchNorm ran with identity; apply a DELEGATE_FORWARD act with NumPy."""
    _activation_forward_numpy(out, act, slope, out)
    return out


def _split_backward_g(dy, x, mean, invstd, gamma, beta, act, slope):
    """g = dy * act'(z), z = gamma (x - mean) invstd + beta, with NumPy ufuncs."""
    z = (x - mean) * (gamma * invstd)
    if beta is not None:
        z += beta
    return _activation_backward_numpy(dy, z, act, slope, z)


def _batchnorm_forward_numba(x, gamma, beta, eps, act, slope, out, mean, invstd):
    """Numba variant: fused statistics + normalise + activation (DELEGATE_FORWARD
    activations: BatchNorm fused, then the activation by NumPy's SIMD ufuncs)."""
    if act in DELEGATE_FORWARD:
        _batchnorm_forward_numba(
            x, gamma, beta, eps, "identity", slope, out, mean, invstd
        )
        return _split_forward(act, slope, out)
    B, n = x.shape
    blk = block_width(B, n, x.itemsize, _nthreads())
    nblk = -(-n // blk)
    w64 = np.empty((2 * nblk, blk))
    wt = np.empty((5 * nblk, blk), x.dtype)
    _bn_fwd_nb(
        x,
        gamma,
        beta,
        float(eps),
        ACT_CODES[act],
        float(slope),
        out,
        mean,
        invstd,
        blk,
        w64,
        wt,
    )
    return out


def _batchnorm_backward_numba(
    dy, x, mean, invstd, gamma, beta, act, slope, dx, dgamma, dbeta
):
    """Numba variant: fused activation derivative + reductions + dx."""
    if act in DELEGATE_BACKWARD:
        g = _split_backward_g(dy, x, mean, invstd, gamma, beta, act, slope)
        return _batchnorm_backward_numba(
            g, x, mean, invstd, gamma, None, "identity", slope, dx, dgamma, dbeta
        )
    B, n = x.shape
    if beta is None:
        beta = np.zeros_like(gamma)
    blk = block_width(B, n, x.itemsize, _nthreads())
    nblk = -(-n // blk)
    w64 = np.empty((2 * nblk, blk))
    wt = np.empty((5 * nblk, blk), x.dtype)
    _bn_bwd_nb(
        dy,
        x,
        mean,
        invstd,
        gamma,
        beta,
        ACT_CODES[act],
        float(slope),
        dx,
        dgamma,
        dbeta,
        blk,
        w64,
        wt,
    )
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- c
def _batchnorm_forward_c(x, gamma, beta, eps, act, slope, out, mean, invstd):
    """C variant (idg_batchnorm_forward); DELEGATE_FORWARD acts as in numba."""
    from ._c import check, fn, ptr

    if act in DELEGATE_FORWARD:
        _batchnorm_forward_c(x, gamma, beta, eps, "identity", slope, out, mean, invstd)
        return _split_forward(act, slope, out)

    B, n = x.shape
    blk = block_width(B, n, x.itemsize, _c_threads())
    check(
        fn("idg_batchnorm_forward", x.dtype)(
            ptr(x),
            ptr(gamma),
            ptr(beta),
            B,
            n,
            float(eps),
            ACT_CODES[act],
            float(slope),
            ptr(out),
            ptr(mean),
            ptr(invstd),
            blk,
        ),
        "idg_batchnorm_forward",
    )
    return out


def _batchnorm_backward_c(
    dy, x, mean, invstd, gamma, beta, act, slope, dx, dgamma, dbeta
):
    """C variant (idg_batchnorm_backward); beta None is passed as NULL (zero)."""
    from ._c import check, fn, ptr

    if act in DELEGATE_BACKWARD:
        g = _split_backward_g(dy, x, mean, invstd, gamma, beta, act, slope)
        return _batchnorm_backward_c(
            g, x, mean, invstd, gamma, None, "identity", slope, dx, dgamma, dbeta
        )

    B, n = x.shape
    blk = block_width(B, n, x.itemsize, _c_threads())
    check(
        fn("idg_batchnorm_backward", x.dtype)(
            ptr(dy),
            ptr(x),
            ptr(mean),
            ptr(invstd),
            ptr(gamma),
            ptr(beta),
            B,
            n,
            ACT_CODES[act],
            float(slope),
            ptr(dx),
            ptr(dgamma),
            ptr(dbeta),
            blk,
        ),
        "idg_batchnorm_backward",
    )
    return dx, dgamma, dbeta


def _c_threads() -> int:
    from ._c import load

    ffi, lib, err = load()
    return int(lib.idg_num_threads()) if err is None else 1

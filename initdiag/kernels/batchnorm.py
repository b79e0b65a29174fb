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

Numba and C variants: blocks of columns, one per thread when the kernel runs in
parallel (``_threading.sweep_threads``: at 512 x 1024 under the default passive
wait policy it runs on one thread), so no reduction crosses threads.  The variance
uses sums shifted by the first row (Chan, Golub & LeVeque 1983), never
E[x^2] - E[x]^2 of the raw data; column sums run in the dtype of x over blocks of
``ROW_BLOCK`` rows and in float64 across blocks.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba_common import act_grad_nb as _act_grad_nb
from ._numba_common import act_nb as _act_nb
from ._numba_common import bn_bwd_acc4_nb as _bn_bwd_acc4_nb
from ._threading import (
    COST_BN_BACKWARD,
    COST_BN_FORWARD,
    c_threads,
    njit,
    numba_threads,
    prange,
    sweep_threads,
)
from .activation import (
    ACT_CODES,
    DELEGATE_BACKWARD,
    DELEGATE_FORWARD,
    IDENTITY,
    RELU,
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
# rows summed in the dtype of x before each float64 update of the column sums
ROW_BLOCK = 64


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_acc8_nb(x, i, j0, j1, kt, a1, a2):
    """Rows i..i+7 of columns j0..j1: a1 += sum d, a2 += sum d^2, d = x - kt, in
    the dtype of x (each accumulator loaded and stored once per eight rows)."""
    w = j1 - j0
    r0 = x[i, j0:j1]
    r1 = x[i + 1, j0:j1]
    r2 = x[i + 2, j0:j1]
    r3 = x[i + 3, j0:j1]
    r4 = x[i + 4, j0:j1]
    r5 = x[i + 5, j0:j1]
    r6 = x[i + 6, j0:j1]
    r7 = x[i + 7, j0:j1]
    for j in range(w):
        k = kt[j]
        d0 = r0[j] - k
        d1 = r1[j] - k
        d2 = r2[j] - k
        d3 = r3[j] - k
        d4 = r4[j] - k
        d5 = r5[j] - k
        d6 = r6[j] - k
        d7 = r7[j] - k
        a1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
        q = d0 * d0
        q += d1 * d1
        q += d2 * d2
        q += d3 * d3
        p = d4 * d4
        p += d5 * d5
        p += d6 * d6
        p += d7 * d7
        a2[j] += q + p


@njit(cache=True, error_model="numpy")
def _col64_nb(x, j, k):
    """Shifted sums (s1, s2) of column j in float64 (the rare path: columns whose
    sums overflowed the dtype, or hold NaN / inf)."""
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[0]):
        d = np.float64(x[i, j]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_stats_block_nb(x, j0, j1, kt, s1, s2, a1, a2):
    """Shifted sums of columns j0..j1: kt = first row (dtype of x); s1, s2 float64.

    Blocks of ROW_BLOCK rows are summed in the dtype of x (a1, a2: scratch of that
    dtype), eight rows per sweep, then added to the float64 sums: the loop runs at
    the dtype's SIMD width.  A column whose float32 sum of squares overflowed
    although its entries are finite is summed again in float64."""
    B = x.shape[0]
    w = j1 - j0
    r = x[0, j0:j1]
    for j in range(w):
        kt[j] = r[j]
        s1[j] = 0.0
        s2[j] = 0.0
    i = 0
    while i < B:
        ie = min(B, i + ROW_BLOCK)
        for j in range(w):
            a1[j] = 0.0
            a2[j] = 0.0
        while i + 8 <= ie:
            _bn_acc8_nb(x, i, j0, j1, kt, a1, a2)
            i += 8
        while i < ie:
            ri = x[i, j0:j1]
            for j in range(w):
                d0 = ri[j] - kt[j]
                a1[j] += d0
                a2[j] += d0 * d0
            i += 1
        for j in range(w):
            s1[j] += np.float64(a1[j])
            s2[j] += np.float64(a2[j])
    for j in range(w):
        if not s2[j] < math.inf:
            s1[j], s2[j] = _col64_nb(x, j0 + j, np.float64(kt[j]))


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_dx4_nb(dy, x, dx, i, j0, j1, mu, inv, ga, be, a, c0, c1, relu, zero):
    """Rows i..i+3 of dx = a g + c0 + xhat c1 (g = dy, or dy relu'(z) when
    ``relu``; coefficients loaded once per four rows)."""
    w = j1 - j0
    d0 = dy[i, j0:j1]
    d1 = dy[i + 1, j0:j1]
    d2 = dy[i + 2, j0:j1]
    d3 = dy[i + 3, j0:j1]
    r0 = x[i, j0:j1]
    r1 = x[i + 1, j0:j1]
    r2 = x[i + 2, j0:j1]
    r3 = x[i + 3, j0:j1]
    o0 = dx[i, j0:j1]
    o1 = dx[i + 1, j0:j1]
    o2 = dx[i + 2, j0:j1]
    o3 = dx[i + 3, j0:j1]
    for j in range(w):
        m = mu[j]
        iv = inv[j]
        aj = a[j]
        cz = c0[j]
        cx = c1[j]
        h0 = (r0[j] - m) * iv
        h1 = (r1[j] - m) * iv
        h2 = (r2[j] - m) * iv
        h3 = (r3[j] - m) * iv
        g0 = d0[j]
        g1 = d1[j]
        g2 = d2[j]
        g3 = d3[j]
        if relu:
            gm = ga[j]
            bt = be[j]
            z0 = gm * h0 + bt
            z1 = gm * h1 + bt
            z2 = gm * h2 + bt
            z3 = gm * h3 + bt
            # a NaN z comes from a NaN xhat (or parameter), which h * c1 below
            # carries into dx anyway: no NaN select needed here
            g0 = g0 if z0 > zero else zero
            g1 = g1 if z1 > zero else zero
            g2 = g2 if z2 > zero else zero
            g3 = g3 if z3 > zero else zero
        o0[j] = aj * g0 + (h0 * cx + cz)
        o1[j] = aj * g1 + (h1 * cx + cz)
        o2[j] = aj * g2 + (h2 * cx + cz)
        o3[j] = aj * g3 + (h3 * cx + cz)


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_fwd_block_nb(
    x, gamma, beta, eps, code, slope, out, mean, invstd, blk, bi, w64, wt
):
    """BatchNorm forward of column block bi (columns bi blk .. (bi + 1) blk):
    statistics pass, then output pass.

    Scratch comes from the caller (w64: 2 float64 rows, wt: 5 rows of x's dtype per
    block): allocating inside the parallel region was measured to make the kernel
    sensitive to the process's allocator churn (bench/KERNELS.md)."""
    B, n = x.shape
    j0 = bi * blk
    j1 = min(n, j0 + blk)
    w = j1 - j0
    w64 = w64[2 * bi : 2 * bi + 2]
    wt = wt[5 * bi : 5 * bi + 5]
    kt = wt[0, :w]
    s1 = w64[0, :w]
    s2 = w64[1, :w]
    _bn_stats_block_nb(x, j0, j1, kt, s1, s2, wt[1, :w], wt[2, :w])
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
    # one row per sweep: measured faster than four (47 vs 43 us for 512 x 1024
    # float32), the opposite of the dx pass, which has more per-column terms
    for i in range(B):
        r = x[i, j0:j1]
        o = out[i, j0:j1]
        if code == IDENTITY:
            for j in range(w):
                o[j] = (r[j] - mu[j]) * sc[j] + be[j]
        elif code == RELU:
            for j in range(w):
                z = (r[j] - mu[j]) * sc[j] + be[j]
                o[j] = zero if z <= zero else z
        else:
            for j in range(w):
                z = (r[j] - mu[j]) * sc[j] + be[j]
                o[j] = _act_nb(z, code, slope)


@njit(cache=True, parallel=True, error_model="numpy")
def _bn_fwd_nb(x, gamma, beta, eps, code, slope, out, mean, invstd, blk, par, w64, wt):
    """Column blocks of width blk, in parallel when ``par``; w64 (2 nblk, blk),
    wt (5 nblk, blk)."""
    nblk = (x.shape[1] + blk - 1) // blk
    args = (x, gamma, beta, eps, code, slope, out, mean, invstd, blk)
    if nblk <= 1 or not par:
        for bi in range(nblk):
            _bn_fwd_block_nb(*args, bi, w64, wt)
    else:
        for bi in prange(nblk):
            _bn_fwd_block_nb(*args, bi, w64, wt)
    return out


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bn_bwd_block_nb(
    dy, x, mean, invstd, gamma, beta, code, slope, dx, dgamma, dbeta, blk, bi, w64, wt
):
    """BatchNorm backward of column block bi (reduction pass, then dx pass);
    scratch as in :func:`_bn_fwd_block_nb`.

    relu's derivative is written as selects (no branch to mispredict on random
    signs); other activations go through the scalar ``_act_grad_nb``."""
    B, n = x.shape
    j0 = bi * blk
    j1 = min(n, j0 + blk)
    w = j1 - j0
    w64 = w64[2 * bi : 2 * bi + 2]
    wt = wt[5 * bi : 5 * bi + 5]
    mu = mean[j0:j1]
    inv = invstd[j0:j1]
    ga = gamma[j0:j1]
    be = beta[j0:j1]
    sb = w64[0, :w]
    sg = w64[1, :w]
    ab = wt[0, :w]  # per row block, in the dtype of x (then into sb, sg)
    ag = wt[1, :w]
    for j in range(w):
        sb[j] = 0.0
        sg[j] = 0.0
    wt[4, 0] = 0.0
    zero = wt[4, 0]
    i = 0
    while i < B:
        ie = min(B, i + ROW_BLOCK)
        for j in range(w):
            ab[j] = zero
            ag[j] = zero
        if code == IDENTITY or code == RELU:
            while i + 4 <= ie:
                _bn_bwd_acc4_nb(
                    dy, x, i, j0, j1, mu, inv, ga, be, code == RELU, ab, ag, zero
                )
                i += 4
        while i < ie:
            d = dy[i, j0:j1]
            r = x[i, j0:j1]
            if code == IDENTITY:
                for j in range(w):
                    h = (r[j] - mu[j]) * inv[j]
                    ab[j] += d[j]
                    ag[j] += d[j] * h
            elif code == RELU:
                for j in range(w):
                    h = (r[j] - mu[j]) * inv[j]
                    z = ga[j] * h + be[j]
                    keep = d[j] if z > zero else zero
                    gj = keep if z == z else z
                    ab[j] += gj
                    ag[j] += gj * h
            else:
                for j in range(w):
                    h = (r[j] - mu[j]) * inv[j]
                    z = np.float64(ga[j]) * np.float64(h) + np.float64(be[j])
                    gj = _act_grad_nb(np.float64(d[j]), z, code, slope)
                    ab[j] += gj
                    ag[j] += gj * h
            i += 1
        for j in range(w):
            sb[j] += np.float64(ab[j])
            sg[j] += np.float64(ag[j])
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
    i0 = 0
    if code == IDENTITY or code == RELU:
        while i0 + 4 <= B:
            _bn_dx4_nb(
                dy, x, dx, i0, j0, j1, mu, inv, ga, be, a, c0, c1, code == RELU, zero
            )
            i0 += 4
    for i in range(i0, B):
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
                keep = d[j] if z > zero else zero
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
    dy, x, mean, invstd, gamma, beta, code, slope, dx, dgamma, dbeta, blk, par, w64, wt
):
    """Column blocks of width blk, in parallel when ``par``; w64 (2 nblk, blk),
    wt (5 nblk, blk)."""
    nblk = (x.shape[1] + blk - 1) // blk
    args = (dy, x, mean, invstd, gamma, beta, code, slope, dx, dgamma, dbeta, blk)
    if nblk <= 1 or not par:
        for bi in range(nblk):
            _bn_bwd_block_nb(*args, bi, w64, wt)
    else:
        for bi in prange(nblk):
            _bn_bwd_block_nb(*args, bi, w64, wt)
    return dx


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
    nt = sweep_threads(B * n, numba_threads(), COST_BN_FORWARD)
    blk = block_width(B, n, x.itemsize, nt)
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
        nt > 1,
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
    nt = sweep_threads(B * n, numba_threads(), COST_BN_BACKWARD)
    blk = block_width(B, n, x.itemsize, nt)
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
        nt > 1,
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
    nt = sweep_threads(B * n, c_threads(), COST_BN_FORWARD)
    blk = block_width(B, n, x.itemsize, nt)
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
            nt,
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
    nt = sweep_threads(B * n, c_threads(), COST_BN_BACKWARD)
    blk = block_width(B, n, x.itemsize, nt)
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
            nt,
        ),
        "idg_batchnorm_backward",
    )
    return dx, dgamma, dbeta



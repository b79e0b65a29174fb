"""The fused passes of ``simulate``: layer statistics, BatchNorm + activation units,
residual adds with their statistics, Gram matrices (the hot path of the numba
backend).

The generic path of :mod:`initdiag.empirical` calls one kernel dispatcher per op and
per statistic (each a pass over a B x n array, each allocating).  Here one pass
computes every forward statistic of a layer output, one pass computes BatchNorm +
activation and the statistics of both outputs, and two passes compute the backward
of activation + BatchNorm with the gradient second moments and the parameter
gradients' column sums.  Contract (every variant has the same signature, writes
into the outputs it is given and returns them; ``acc``/``sc``/``part`` are float64
scratch of :func:`row_chunks` rows, ``code``/``slope`` the activation's
``ACT_CODES`` entry and leaky_relu slope; mean / invstd / gamma / beta float64)::

    _layer_stats_<b>(x, acc, sc, out, colmean, colvar) -> out
        out float64 (10,): LAYER_STATS_FIELDS; colmean / colvar float64 (n,) get
        the column means and biased variances (skipped when of length 0)
    _unit_forward_<b>(x, mean, invstd, gamma, beta, code, slope, rec_y, h,
                      acc_y, sc_y, acc_h, sc_h, out_y, out_h) -> h
        h = act(y), y = (x - mean) gamma invstd + beta; out_h (and out_y when
        rec_y) the layer_stats of h (of y); y itself is never stored
    _unit_backward_<b>(g, x, mean, invstd, gamma, beta, code, slope, has_bn,
                       need_dx, dx, part, sums, dgamma, dbeta, dxsum) -> dx
        see :func:`_unit_backward_numba`
    _residual_add_stats_<b>(skip, x, scale, out, acc, sc, st, colmean, colvar)
        -> out
        out = skip + scale * x (skip None: scale * x) exactly as
        ``kernels.residual`` computes it, and st (10,) / colmean / colvar its
        layer_stats, in one pass: each chunk of rows is summed while it is in
        cache; out may be skip or x itself
    _gram_<b>(a, out) -> out                    # a a^T in gram_layout(B, b)
    _gram_dot_<b>(a, b, layout) -> (sum_ij a_ij b_ij, trace a), float64

Backends: ``numpy`` (the reference: plain vectorised NumPy, float64 accumulation)
and ``numba`` (the hot path; its ``gram`` is BLAS syrk, as the design wants CPU
matrix products in BLAS).  There is no c or cuda variant.  The public dispatchers
(``initdiag.kernels.layer_stats`` ...) validate; :func:`resolve` hands the raw
kernels of one backend to callers that run them per layer on their own buffers.

Formulas are those of the kernel contract (``initdiag.kernels``) and of
:mod:`initdiag.profile`:

- per layer output ``x`` (B x n): ``mean``, ``second_moment = mean(x^2)``,
  ``variance = mean_j var_b x[:, j]`` (biased, from sums shifted by row 0),
  ``squared_mean = mean_j (mean_b x[:, j])^2``, ``active_fraction`` (> 0),
  ``dead_fraction`` (features with no entry > 0), ``zero_fraction``, the number of
  non-finite entries, the mean uncentred cosine
  ``(|sum_a u_a|^2 - sum_a |u_a|^2) / (B (B - 1))`` with ``u_a = x_a / |x_a|``
  (zero rows count as cosine 0; NaN for B = 1) and whether any entry is nonzero;
- BatchNorm (training mode, Ioffe & Szegedy 2015): ``xhat = (x - mean) invstd``,
  ``y = gamma xhat + beta``; backward ``g' = g act'(y)``, ``dbeta = sum_b g'``,
  ``dgamma = sum_b g' xhat``, ``dx = gamma invstd / B (B g' - dbeta - xhat dgamma)``.

Determinism: rows are split into a fixed number of chunks (independent of the thread
count), each with its own partial sums, reduced in chunk order; results are
therefore bit-identical whatever ``numba.set_num_threads`` says.  BatchNorm output,
activation output and gradients are computed in the working dtype with the
coefficients rounded to it, as the BatchNorm kernels of :mod:`initdiag.kernels` do,
so the fused and generic paths agree to rounding.

Precision: inside a chunk of 64 rows the column sums accumulate in the working
dtype, vectorised over whole rows, and so does each row's sum of squares; chunk
partials and row sums are combined in float64.  For float32 that bounds the error
by ~64 eps32 relative to the summed magnitudes (1e-5 at worst, against Monte Carlo
standard errors of 1e-3 and more), and made the passes 1.5x-2x faster than
float64 accumulation (bench/SIMULATE.md).  Where a chunk's float32 sums overflow
although its entries are finite (values beyond ~1e19), that chunk is recomputed in
float64 (the rare path); non-finite entries propagate as before.  Fast-math: FMA
contraction in the element loops and ``reassoc`` in the horizontal row sums only
(no nnan / ninf).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import _registry
from ._names import ACT_CODES, ACTIVATIONS, IDENTITY, RELU
from ._numba_common import act_grad_nb as _act_grad
from ._numba_common import act_nb as _act
from ._numba_common import bn_bwd_acc4_nb as _bn_bwd_acc4_nb
from ._numba_common import sumsq_nb as _row_sumsq
from ._threading import njit, prange

__all__ = ["FusedKernels", "gram_layout", "resolve", "row_chunks"]

# rows per chunk: fixed, so the reduction order does not depend on the thread count
_ROWS = 64


def row_chunks(B: int) -> int:
    """Number of row chunks of a batch of ``B`` rows."""
    return (B + _ROWS - 1) // _ROWS


# --------------------------------------------------------------------------- numpy
_EMPTY = np.empty(0)


def _layer_stats_numpy(x, acc, sc, out, colmean, colvar):
    """NumPy reference of the 10 LAYER_STATS_FIELDS (two-pass column moments in
    float64; ``acc`` / ``sc`` unused)."""
    B, n = x.shape
    N = x.size
    xd = x.astype(np.float64)
    with np.errstate(all="ignore"):
        m = xd.mean(axis=0)
        d = xd - m
        v = np.mean(d * d, axis=0)
        out[0] = m.mean()
        out[1] = np.einsum("ij,ij->", xd, xd) / N
        out[2] = v.mean()
        out[3] = np.mean(m * m)
    pos = np.count_nonzero(x > 0, axis=0)
    zeros = np.count_nonzero(x == 0)
    out[4] = pos.sum() / N
    out[5] = np.count_nonzero(pos == 0) / n
    out[6] = zeros / N
    out[7] = N - np.count_nonzero(np.isfinite(x))
    _registry.resolve("row_correlation", "numpy")(x, out[8:9])
    out[9] = 1.0 if zeros < N else 0.0
    if colmean.shape[0] == n:
        colmean[:] = m
        colvar[:] = v
    return out


def _residual_add_stats_numpy(skip, x, scale, out, acc, sc, st, colmean, colvar):
    """NumPy reference: ``kernels.residual``'s NumPy add, then
    :func:`_layer_stats_numpy` of the result."""
    _registry.resolve("residual_add", "numpy")(skip, x, scale, out)
    _layer_stats_numpy(out, acc, sc, st, colmean, colvar)
    return out


def _affine_numpy(x, mean, invstd, gamma, beta):
    """y = (x - mean) gamma invstd + beta in the dtype of x, the coefficients
    rounded to it first (as every BatchNorm kernel computes it)."""
    dt = x.dtype
    mu = mean.astype(dt)
    sc = (gamma * invstd).astype(dt)
    be = beta.astype(dt)
    return (x - mu) * sc + be


def _unit_forward_numpy(
    x,
    mean,
    invstd,
    gamma,
    beta,
    code,
    slope,
    rec_y,
    h,
    acc_y,
    sc_y,
    acc_h,
    sc_h,
    out_y,
    out_h,
):
    """NumPy reference of the unit forward: relu / identity in the working dtype,
    every other activation in float64 rounded to it (as the numba variant)."""
    act = ACTIVATIONS[code]
    forward = _registry.resolve("activation_forward", "numpy")
    with np.errstate(all="ignore"):
        y = _affine_numpy(x, mean, invstd, gamma, beta)
        if act in ("relu", "identity"):
            forward(y, act, slope, h)
        else:
            h[...] = forward(y.astype(np.float64), act, slope, np.empty(y.shape))
    if rec_y:
        _layer_stats_numpy(y, acc_y, sc_y, out_y, _EMPTY, _EMPTY)
    _layer_stats_numpy(h, acc_h, sc_h, out_h, _EMPTY, _EMPTY)
    return h


def _unit_backward_numpy(
    g,
    x,
    mean,
    invstd,
    gamma,
    beta,
    code,
    slope,
    has_bn,
    need_dx,
    dx,
    part,
    sums,
    dgamma,
    dbeta,
    dxsum,
):
    """NumPy reference of the unit backward (float64 sums, g' and dx rounded to
    the working dtype where the numba variant stores them; ``part`` unused)."""
    B = x.shape[0]
    act = ACTIVATIONS[code]
    backward = _registry.resolve("activation_backward", "numpy")
    with np.errstate(all="ignore"):
        if act == "identity":
            dx[...] = g
        else:
            y = _affine_numpy(x, mean, invstd, gamma, beta)
            if act == "relu":
                backward(g, y, act, slope, dx)
            else:
                g64 = g.astype(np.float64)
                dx[...] = backward(g64, y.astype(np.float64), act, slope, g64)
        gd = g.astype(np.float64)
        gp = dx.astype(np.float64)
        sums[0] = np.einsum("ij,ij->", gd, gd)
        sums[1] = np.einsum("ij,ij->", gp, gp)
        if not has_bn:
            dgamma[:] = 0.0
            dbeta[:] = 0.0
            dxsum[:] = gp.sum(axis=0)
            sums[2] = sums[1]
            return dx
        xhat = (x.astype(np.float64) - mean) * invstd
        dbeta[:] = gp.sum(axis=0)
        dgamma[:] = (gp * xhat).sum(axis=0)
        if not need_dx:
            dxsum[:] = 0.0
            sums[2] = 0.0
            return dx
        dx[...] = (gamma * invstd) * (gp - dbeta / B - xhat * (dgamma / B))
        dd = dx.astype(np.float64)
        sums[2] = np.einsum("ij,ij->", dd, dd)
        dxsum[:] = dd.sum(axis=0)
    return dx


def _gram_numpy(a, out):
    """NumPy reference: the full ``a a^T`` (float64 products, rounded to the dtype);
    a full matrix is valid in every layout."""
    a64 = a.astype(np.float64)
    out[...] = a64 @ a64.T
    return out


def _gram_weights(B: int, h: int) -> np.ndarray:
    """How often each stored entry of a Gram in layout ``h`` counts in
    ``sum_ij a_ij b_ij`` (0 for entries the layout leaves unset)."""
    i = np.arange(B)[:, None]
    j = np.arange(B)[None, :]
    if h == 0:
        return np.ones((B, B))
    if h < 0:  # upper triangle by rows
        return np.where(j > i, 2.0, np.where(j == i, 1.0, 0.0))
    k0 = (i // h) * h
    k1 = np.minimum(k0 + h, B)
    return np.where(j < k0, 2.0, np.where(j < k1, 1.0, 0.0))


def _gram_dot_numpy(a, b, h):
    """NumPy reference of :func:`_gram_dot_numba`, float64."""
    w = _gram_weights(a.shape[0], h)
    keep = w > 0  # entries the layout leaves unset may hold anything
    with np.errstate(all="ignore"):
        a64 = a.astype(np.float64)
        p = a64[keep] * b.astype(np.float64)[keep]
        s = float(np.sum(w[keep] * p))
    return s, float(np.trace(a64))


def _row_sumsq_numpy(r):
    """sum r^2 of a 1-D array in float64."""
    r64 = r.astype(np.float64)
    return float(r64 @ r64)


# --------------------------------------------------------------------------- numba
@njit(cache=True, error_model="numpy")
def _count_nonfinite(r):
    c = 0
    for j in range(r.shape[0]):
        if not math.isfinite(r[j]):
            c += 1
    return c


# Element loops: FMA contraction only (a * b + c in one rounding); the horizontal row
# sums of squares also reassociate (so LLVM may vectorise them).  NaN / inf
# semantics are untouched (no nnan / ninf).
_CONTRACT = {"contract"}
_SUM = {"contract", "reassoc"}


@njit(cache=True, error_model="numpy", fastmath=_SUM)
def _sumsq_t(r, zero):
    """sum_j r_j^2 accumulated in the dtype of ``r`` (``zero``: a zero of it)."""
    s = zero
    for j in range(r.shape[0]):
        v = r[j]
        s += v * v
    return np.float64(s)


@njit(cache=True, error_model="numpy")
def _sumsq(r, zero):
    """sum r^2 of one row in float64: accumulated in the row's dtype, recomputed in
    float64 when that overflowed although every entry is finite (|r| > ~1e19)."""
    ss = _sumsq_t(r, zero)
    if not ss < math.inf and _count_nonfinite(r) == 0:
        ss = _row_sumsq(r)
    return ss


@njit(cache=True, error_model="numpy")
def _row_scale(r, zero, sc):
    """1/|r| (0 for a zero row) and the row's scalar contributions to ``sc``:
    [sum r^2, nonzero rows, zero entries (added by the caller), non-finite entries]."""
    ss = _sumsq(r, zero)
    if not math.isfinite(ss):
        sc[3] += _count_nonfinite(r)
    inv = 0.0
    if ss > 0.0:
        inv = 1.0 / math.sqrt(ss)
        sc[1] += 1.0
    sc[0] += ss
    return inv


@njit(cache=True, error_model="numpy")
def _t128(one):
    """128 in the dtype of ``one`` (``one * 128`` would be float64 in Numba)."""
    b = one
    for _ in range(7):
        b = b + b
    return b


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _acc4(r0, r1, r2, r3, iv, shift, t, one, zero):
    """Four rows into the chunk accumulators ``t`` (4, n), in the rows' dtype:
    sum d, sum d^2 (d = r - shift), sum r / |r|, and the counts (r > 0) + 128
    (r == 0) in one number (at most 64 + 128 * 64 per chunk: exact in float32).
    ``iv``: the four rows' 1/|r|.  One sweep over four rows loads and stores each
    accumulator once per four rows; four accumulators, four rows and the shift
    keep the pointer count low enough for LLVM's runtime alias checks (a fifth
    accumulator row stopped the loop from vectorising: 2.3x slower)."""
    n = r0.shape[0]
    i0 = iv[0]
    i1 = iv[1]
    i2 = iv[2]
    i3 = iv[3]
    t0 = t[0]
    t1 = t[1]
    t2 = t[2]
    t3 = t[3]
    big = _t128(one)
    for j in range(n):
        k = shift[j]
        v0 = r0[j]
        v1 = r1[j]
        v2 = r2[j]
        v3 = r3[j]
        d0 = v0 - k
        d1 = v1 - k
        d2 = v2 - k
        d3 = v3 - k
        t0[j] += (d0 + d1) + (d2 + d3)
        t1[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        t2[j] += (v0 * i0 + v1 * i1) + (v2 * i2 + v3 * i3)
        c = t3[j]
        c = c + one if v0 > zero else c
        c = c + one if v1 > zero else c
        c = c + one if v2 > zero else c
        c = c + one if v3 > zero else c
        c = c + big if v0 == zero else c
        c = c + big if v1 == zero else c
        c = c + big if v2 == zero else c
        c = c + big if v3 == zero else c
        t3[j] = c


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _acc1(r, inv, shift, t, one, zero):
    """:func:`_acc4` of a single row (chunk remainders)."""
    t0 = t[0]
    t1 = t[1]
    t2 = t[2]
    t3 = t[3]
    big = _t128(one)
    for j in range(r.shape[0]):
        v = r[j]
        d = v - shift[j]
        t0[j] += d
        t1[j] += d * d
        t2[j] += v * inv
        t3[j] += (one if v > zero else zero) + (big if v == zero else zero)


@njit(cache=True, error_model="numpy")
def _stats_rows(rows, b0, b1, shift, t, iv, sc, one, zero):
    """Chunk accumulators t[:4] of rows b0..b1 of ``rows`` (zeroed here)."""
    t[:4] = zero
    _stats_more(rows, b0, b1, shift, t, iv, sc, one, zero)


@njit(cache=True, error_model="numpy")
def _stats_more(rows, b0, b1, shift, t, iv, sc, one, zero):
    """Rows b0..b1 of ``rows`` into the chunk accumulators t[:4]: four rows per
    sweep, then the remainder one by one (so feeding a chunk in groups of four
    rows sums in exactly the order of one call over the chunk)."""
    b = b0
    while b + 4 <= b1:
        for q in range(4):
            iv[q] = _row_scale(rows[b + q], zero, sc)
        _acc4(rows[b], rows[b + 1], rows[b + 2], rows[b + 3], iv, shift, t, one, zero)
        b += 4
    while b < b1:
        iv[0] = _row_scale(rows[b], zero, sc)
        _acc1(rows[b], iv[0], shift, t, one, zero)
        b += 1


@njit(cache=True, error_model="numpy")
def _flush(t, rows, b0, b1, shift64, a, sc):
    """Chunk accumulators ``t`` (dtype of the rows) into the float64 partials ``a``
    (4, n) and the zero count into sc[2].  Where the dtype's sums overflowed (a
    non-finite sum of squares), the chunk's sums are recomputed in float64 from the
    rows (the rare path; non-finite entries then propagate as before).  t[3] holds
    (count > 0) + 128 (count == 0)."""
    n = a.shape[1]
    ok = True
    z = 0.0
    for j in range(n):
        s = np.float64(t[1, j])
        ok = ok and s < math.inf
        c = np.float64(t[3, j])
        zj = math.floor(c / 128.0)
        z += zj
        a[3, j] = c - 128.0 * zj
    sc[2] += z
    if ok:
        for k in range(3):
            for j in range(n):
                a[k, j] = np.float64(t[k, j])
        return
    a[:3] = 0.0
    for b in range(b0, b1):
        r = rows[b]
        ss = _row_sumsq(r)
        inv = 1.0 / math.sqrt(ss) if ss > 0.0 else 0.0
        for j in range(n):
            v = np.float64(r[j])
            d = v - shift64[j]
            a[0, j] += d
            a[1, j] += d * d
            a[2, j] += v * inv


@njit(cache=True, error_model="numpy")
def _first_row_shift(r, shift, shift64):
    """Shift of the shifted sums: the first row (0 where it is not finite)."""
    for j in range(r.shape[0]):
        v = np.float64(r[j])
        v = v if math.isfinite(v) else 0.0
        shift[j] = v
        shift64[j] = np.float64(shift[j])


@njit(cache=True, error_model="numpy")
def _chunk_scratch(like):
    """(t, iv, one, zero) of one chunk's statistics: accumulators t (5, n) and the
    rows' 1/|r| iv (4,) in the dtype of the row ``like`` (n,), and a one and a
    zero of that dtype (the counts and selects stay in it)."""
    t = np.empty((5, like.shape[0]), like.dtype)
    t[4, 0] = 1.0
    one = t[4, 0]
    return t, np.empty(4, like.dtype), one, one - one


@njit(cache=True, error_model="numpy")
def _finish(acc, sc, shift, B, out, colmean, colvar):
    """Reduce chunk partials (in chunk order) into the 10 statistics ``out``:
    [mean, second_moment, variance, squared_mean, active_fraction, dead_fraction,
    zero_fraction, nonfinite_count, correlation, any_nonzero]; writes the column mean
    and biased variance (float64) when ``colmean`` has length n."""
    nch = acc.shape[0]
    n = shift.shape[0]
    tot = np.zeros((4, n))
    s = np.zeros(4)
    for c in range(nch):
        for k in range(4):
            for j in range(n):
                tot[k, j] += acc[c, k, j]
            s[k] += sc[c, k]
    m_all = 0.0
    var_all = 0.0
    sqm = 0.0
    pos = 0.0
    dead = 0.0
    su = 0.0
    for j in range(n):
        dm = tot[0, j] / B
        mj = shift[j] + dm
        vj = max(tot[1, j] / B - dm * dm, 0.0)
        m_all += mj
        var_all += vj
        sqm += mj * mj
        pos += tot[3, j]
        dead += 1.0 if tot[3, j] == 0.0 else 0.0
        su += tot[2, j] * tot[2, j]
        if colmean.shape[0] == n:
            colmean[j] = mj
            colvar[j] = vj
    N = float(B) * n
    out[0] = m_all / n
    out[1] = s[0] / N
    out[2] = var_all / n
    out[3] = sqm / n
    out[4] = pos / N
    out[5] = dead / n
    out[6] = s[2] / N
    out[7] = s[3]
    out[8] = (su - s[1]) / (float(B) * (B - 1)) if B > 1 else np.nan
    out[9] = 1.0 if s[2] < N else 0.0


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _layer_stats_numba(x, acc, sc, out, colmean, colvar):
    """Every forward statistic of ``x`` (B x n) in one pass (see :func:`_finish`);
    ``acc`` (nch, 4, n), ``sc`` (nch, 4) are scratch; column mean / variance are
    written when ``colmean`` has length n (BatchNorm reuses them)."""
    B, n = x.shape
    nch = acc.shape[0]
    shift = np.empty(n, x.dtype)
    shift64 = np.empty(n)
    _first_row_shift(x[0], shift, shift64)
    for c in prange(nch):
        t, iv, one, zero = _chunk_scratch(x[0])
        sc[c] = 0.0
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        _stats_rows(x, b0, b1, shift, t, iv, sc[c], one, zero)
        _flush(t, x, b0, b1, shift64, acc[c], sc[c])
    _finish(acc, sc, shift64, B, out, colmean, colvar)
    return out


@njit(cache=True, error_model="numpy")
def _residual_row(skip, x, b, s, r):
    """r = skip[b] + s * x[b] (skip None: s * x[b]) in the dtype, as
    ``kernels.residual`` computes it (no FMA contraction: the same bits)."""
    xr = x[b]
    if skip is None:
        for j in range(xr.shape[0]):
            r[j] = s * xr[j]
    else:
        sr = skip[b]
        for j in range(xr.shape[0]):
            r[j] = sr[j] + s * xr[j]


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _residual_add_stats_numba(skip, x, scale, out, acc, sc, st, colmean, colvar):
    """out = skip + scale * x and its :func:`_layer_stats_numba` statistics in one
    pass: each group of four rows is summed right after it is written (still in
    L1), in the chunk order and grouping of :func:`_stats_rows`, so ``st`` equals
    layer_stats of ``out`` bit for bit.  ``scale`` is rounded to the dtype first.
    ``out`` may be ``skip`` or ``x``: row 0 (the shift) is computed into scratch
    before any row is overwritten."""
    B, n = x.shape
    nch = acc.shape[0]
    s = np.full(1, scale, out.dtype)[0]
    row0 = np.empty(n, out.dtype)
    _residual_row(skip, x, 0, s, row0)
    shift = np.empty(n, out.dtype)
    shift64 = np.empty(n)
    _first_row_shift(row0, shift, shift64)
    for c in prange(nch):
        t, iv, one, zero = _chunk_scratch(out[0])
        sc[c] = 0.0
        t[:4] = zero
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        for g in range(b0, b1, 4):
            e = min(g + 4, b1)
            for b in range(g, e):
                _residual_row(skip, x, b, s, out[b])
            _stats_more(out, g, e, shift, t, iv, sc[c], one, zero)
        _flush(t, out, b0, b1, shift64, acc[c], sc[c])
    _finish(acc, sc, shift64, B, st, colmean, colvar)
    return out


@njit(cache=True, error_model="numpy")
def _affine(mean, invstd, gamma, beta, dt_like):
    """Per-column coefficients (mean, gamma invstd, beta, invstd) from float64,
    rounded to the dtype of ``dt_like`` (the working dtype).  Plain loops: called
    from the parallel passes, where array expressions would become parallel loops
    of their own."""
    n = mean.shape[0]
    mu = np.empty(n, dt_like.dtype)
    sc = np.empty(n, dt_like.dtype)
    be = np.empty(n, dt_like.dtype)
    iv = np.empty(n, dt_like.dtype)
    for j in range(n):
        mu[j] = mean[j]
        sc[j] = gamma[j] * invstd[j]
        be[j] = beta[j]
        iv[j] = invstd[j]
    return mu, sc, be, iv


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _unit_row(xr, mu, s, be, code, slope, yr, hr, zero):
    """y = (x - mean) gamma invstd + beta and h = act(y), in the dtype of the rows
    (as the BatchNorm kernels compute them)."""
    for j in range(xr.shape[0]):
        yr[j] = (xr[j] - mu[j]) * s[j] + be[j]
    if code == RELU:
        for j in range(xr.shape[0]):
            v = yr[j]
            hr[j] = zero if v <= zero else v
    elif code == IDENTITY:
        for j in range(xr.shape[0]):
            hr[j] = yr[j]
    else:
        for j in range(xr.shape[0]):
            hr[j] = _act(np.float64(yr[j]), code, slope)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _unit_forward_numba(
    x,
    mean,
    invstd,
    gamma,
    beta,
    code,
    slope,
    rec_y,
    h,
    acc_y,
    sc_y,
    acc_h,
    sc_h,
    out_y,
    out_h,
):
    """h = act(gamma (x - mean) invstd + beta) with the statistics of y (when
    ``rec_y``) and of h, in one pass over x (a chunk of y rows at a time lives in
    scratch).  Plain activation: mean 0, invstd 1, gamma 1, beta 0 (then y = x
    exactly).  ``mean``/``invstd``/``gamma``/``beta`` float64."""
    B, n = x.shape
    mu, s, be, _ = _affine(mean, invstd, gamma, beta, h[0])
    nch = acc_h.shape[0]
    shy = np.empty(n, h.dtype)
    shy64 = np.empty(n)
    shh = np.empty(n, h.dtype)
    shh64 = np.empty(n)
    y0 = np.empty(n, h.dtype)
    h0 = np.empty(n, h.dtype)
    zero0 = np.zeros(1, h.dtype)[0]
    _unit_row(x[0], mu, s, be, code, slope, y0, h0, zero0)
    _first_row_shift(y0, shy, shy64)
    _first_row_shift(h0, shh, shh64)
    for c in prange(nch):
        t, iv, one, zero = _chunk_scratch(h[0])
        yb = np.empty((_ROWS, n), h.dtype)
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        for b in range(b0, b1):
            _unit_row(x[b], mu, s, be, code, slope, yb[b - b0], h[b], zero)
        if rec_y:
            sc_y[c] = 0.0
            _stats_rows(yb, 0, b1 - b0, shy, t, iv, sc_y[c], one, zero)
            _flush(t, yb, 0, b1 - b0, shy64, acc_y[c], sc_y[c])
        sc_h[c] = 0.0
        _stats_rows(h, b0, b1, shh, t, iv, sc_h[c], one, zero)
        _flush(t, h, b0, b1, shh64, acc_h[c], sc_h[c])
    empty = np.empty(0)
    if rec_y:
        _finish(acc_y, sc_y, shy64, B, out_y, empty, empty)
    _finish(acc_h, sc_h, shh64, B, out_h, empty, empty)
    return h


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _grad_row(gr, xr, mu, s, be, code, slope, gp, zero):
    """g' = g act'(y) in the dtype of ``gp``; y recomputed exactly as forward."""
    n = xr.shape[0]
    if code == IDENTITY:
        for j in range(n):
            gp[j] = gr[j]
    elif code == RELU:
        for j in range(n):
            v = (xr[j] - mu[j]) * s[j] + be[j]
            gp[j] = gr[j] if v > zero else (zero if v <= zero else v)
    else:
        for j in range(n):
            v = (xr[j] - mu[j]) * s[j] + be[j]
            gp[j] = _act_grad(np.float64(gr[j]), np.float64(v), code, slope)


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _add4(r0, r1, r2, r3, t):
    """t += r0 + r1 + r2 + r3."""
    for j in range(t.shape[0]):
        t[j] += (r0[j] + r1[j]) + (r2[j] + r3[j])


@njit(cache=True, error_model="numpy")
def _bwd_flush(t, a, k, gp, x, b0, b1, mean, invstd, xhat):
    """Chunk column sums ``t`` (dtype of the rows) into a[k] (and a[k + 1] when
    ``xhat``: the sums of g' xhat); recomputed in float64 from the rows where the
    dtype's sums overflowed (the rare path)."""
    n = a.shape[1]
    ok = True
    for j in range(n):
        ok = ok and abs(np.float64(t[0, j])) < math.inf
        if xhat:
            ok = ok and abs(np.float64(t[1, j])) < math.inf
    if ok:
        for j in range(n):
            a[k, j] = np.float64(t[0, j])
            if xhat:
                a[k + 1, j] = np.float64(t[1, j])
        return
    for j in range(n):
        a[k, j] = 0.0
        if xhat:
            a[k + 1, j] = 0.0
    for b in range(b0, b1):
        for j in range(n):
            v = np.float64(gp[b, j])
            a[k, j] += v
            if xhat:
                a[k + 1, j] += v * ((np.float64(x[b, j]) - mean[j]) * invstd[j])


@njit(cache=True, parallel=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _unit_backward_numba(
    g,
    x,
    mean,
    invstd,
    gamma,
    beta,
    code,
    slope,
    has_bn,
    need_dx,
    dx,
    part,
    sums,
    dgamma,
    dbeta,
    dxsum,
):
    """Backward of :func:`_unit_forward_numba`: g (B x n) is the gradient w.r.t. h.

    ``sums`` (float64, 3) receives [sum g^2, sum g'^2, sum dx^2] (g' = g act'(y),
    the gradient w.r.t. y); ``dgamma``, ``dbeta`` (BatchNorm) and ``dxsum`` (the
    column sums of dx, i.e. the bias gradient of a preceding Dense) are float64 (n,).
    ``part`` (nch, 4, n) is scratch; ``dx`` must not alias ``g``.  The first pass
    writes g' into dx; without BatchNorm dx = g', with it the second pass overwrites
    dx in place by the standard formula (module docstring).  ``need_dx`` False skips
    the second pass (first layer: dx then holds g')."""
    B, n = x.shape
    mu, s, be, ivt = _affine(mean, invstd, gamma, beta, g[0])
    nch = part.shape[0]
    ss = np.zeros((nch, 3))
    for c in prange(nch):
        t = np.empty((3, n), g.dtype)
        t[2, 0] = 1.0
        zero = t[2, 0] - t[2, 0]
        t[:] = zero
        part[c] = 0.0
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        for b in range(b0, b1):
            # g' is kept in dx: the second pass reads it back
            _grad_row(g[b], x[b], mu, s, be, code, slope, dx[b], zero)
            ss[c, 0] += _sumsq(g[b], zero)
            ss[c, 1] += _sumsq(dx[b], zero)
        b = b0
        while b + 4 <= b1:
            if has_bn:
                # t0 += g', t1 += g' xhat over four rows (g' is in dx)
                _bn_bwd_acc4_nb(dx, x, b, 0, n, mu, ivt, s, be, False, t[0], t[1], zero)
            else:
                _add4(dx[b], dx[b + 1], dx[b + 2], dx[b + 3], t[0])
            b += 4
        while b < b1:
            for j in range(n):
                v = dx[b, j]
                t[0, j] += v
                if has_bn:
                    t[1, j] += v * ((x[b, j] - mu[j]) * ivt[j])
            b += 1
        if has_bn:
            _bwd_flush(t, part[c], 0, dx, x, b0, b1, mean, invstd, True)
        else:
            _bwd_flush(t, part[c], 2, dx, x, b0, b1, mean, invstd, False)
    dbeta[:] = 0.0
    dgamma[:] = 0.0
    dxsum[:] = 0.0
    for c in range(nch):
        for j in range(n):
            dbeta[j] += part[c, 0, j]
            dgamma[j] += part[c, 1, j]
            dxsum[j] += part[c, 2, j]
    sums[:] = 0.0
    for c in range(nch):
        sums[0] += ss[c, 0]
        sums[1] += ss[c, 1]
    if not has_bn:
        sums[2] = sums[1]
        return dx
    if not need_dx:
        return dx
    # dx = gamma invstd / B (B g' - dbeta - xhat dgamma) = a g' + c0 + xhat c1
    ca = np.empty(n, g.dtype)
    c0 = np.empty(n, g.dtype)
    c1 = np.empty(n, g.dtype)
    for j in range(n):
        f = gamma[j] * invstd[j]
        ca[j] = f
        c0[j] = -f * dbeta[j] / B
        c1[j] = -f * dgamma[j] / B
    for cc in prange(nch):
        c = nch - 1 - cc  # reverse order: the rows the first pass saw last are cached
        t = np.empty((3, n), g.dtype)
        t[2, 0] = 1.0
        zero = t[2, 0] - t[2, 0]
        t[:] = zero
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        for b in range(b0, b1):
            dxr = dx[b]  # holds g' on entry
            xr = x[b]
            for j in range(n):
                dxr[j] = ca[j] * dxr[j] + c0[j] + ((xr[j] - mu[j]) * ivt[j]) * c1[j]
            ss[c, 2] += _sumsq(dxr, zero)
        b = b0
        while b + 4 <= b1:
            _add4(dx[b], dx[b + 1], dx[b + 2], dx[b + 3], t[0])
            b += 4
        while b < b1:
            for j in range(n):
                t[0, j] += dx[b, j]
            b += 1
        part[c, 2] = 0.0
        _bwd_flush(t, part[c], 2, dx, x, b0, b1, mean, invstd, False)
    for c in range(nch):
        sums[2] += ss[c, 2]
        for j in range(n):
            dxsum[j] += part[c, 2, j]
    return dx


# BLAS syrk from SciPy's Cython BLAS table (the OpenBLAS SciPy ships), called through
# ctypes, which releases the GIL during the call.  scipy.linalg.blas.ssyrk holds the
# GIL: two seed workers calling it took 2x the time of one (measured).
_SYRK: dict = {}


def _syrk_functions() -> dict:
    """{dtype: ctypes function} for float32 (ssyrk) and float64 (dsyrk); empty
    when SciPy's Cython BLAS table is not reachable (the blocked GEMM path then)."""
    if "loaded" in _SYRK:
        return _SYRK["fns"]
    fns: dict = {}
    try:
        import ctypes

        from scipy.linalg import cython_blas

        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype = ctypes.c_char_p
        get_name.argtypes = [ctypes.py_object]
        get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        get_ptr.restype = ctypes.c_void_p
        get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
        ip = ctypes.POINTER(ctypes.c_int)
        for dt, name, ct in (
            (np.float32, "ssyrk", ctypes.c_float),
            (np.float64, "dsyrk", ctypes.c_double),
        ):
            cap = cython_blas.__pyx_capi__[name]
            addr = get_ptr(cap, get_name(cap))
            proto = ctypes.CFUNCTYPE(
                None,
                ctypes.c_char_p,
                ctypes.c_char_p,
                ip,
                ip,
                ctypes.POINTER(ct),
                ctypes.c_void_p,
                ip,
                ctypes.POINTER(ct),
                ctypes.c_void_p,
                ip,
            )
            fns[np.dtype(dt)] = (proto(addr), ct)
    except Exception:  # pragma: no cover - SciPy without the Cython BLAS table
        fns = {}
    _SYRK["fns"] = fns
    _SYRK["loaded"] = True
    return fns


def _syrk(a: np.ndarray, out: np.ndarray) -> None:
    """The upper triangle by rows of ``a a^T`` into ``out`` (b x b, unit column
    stride, any row stride: a block of a larger Gram) by one BLAS syrk: ``a``
    (b x N, unit column stride) is read as the column-major N x b matrix it is."""
    import ctypes

    fn, ct = _syrk_functions()[a.dtype]
    b, N = a.shape
    n_, k_ = ctypes.c_int(b), ctypes.c_int(N)
    lda = ctypes.c_int(a.strides[0] // a.itemsize)
    ldc = ctypes.c_int(out.strides[0] // out.itemsize)
    one, zero = ct(1.0), ct(0.0)
    fn(
        b"L",
        b"T",
        ctypes.byref(n_),
        ctypes.byref(k_),
        ctypes.byref(one),
        a.ctypes.data,
        ctypes.byref(lda),
        ctypes.byref(zero),
        out.ctypes.data,
        ctypes.byref(ldc),
    )


def gram_parts(a: np.ndarray, out: np.ndarray, parts: int) -> list[Callable[[], Any]]:
    """:func:`_gram_numba` as ``parts`` independent tasks (each one BLAS call or a
    few) that together write the same layout into ``out``; run them on ``parts``
    threads with single-threaded BLAS to spread one Gram over the cores.

    Layout -1 (syrk): rows are cut into ``parts`` blocks ``a_k``; the diagonal
    blocks of the upper triangle are syrks ``a_k a_k^T``, the blocks right of them
    GEMMs ``a_k a_l^T`` (l > k).  The Gram's flops, ``B^2 N`` in all, are dealt to
    the tasks greedily, largest first (a diagonal block costs ``b^2 N``, an
    off-diagonal one ``2 b_k b_l N``), so that the tasks cost about the same.
    Which task runs where does not change the result; a different ``parts`` does,
    by float rounding only (a GEMM block sums in another order than the syrk).
    Other layouts, or ``parts == 1``: one task, :func:`_gram_numba` itself.
    """
    B, N = a.shape
    if parts <= 1 or _gram_layout_numba(B) != -1:
        return [functools.partial(_gram_numba, a, out)]
    assert (
        out.flags.c_contiguous and out.dtype == a.dtype and a.strides[1] == a.itemsize
    )
    edges = [B * k // parts for k in range(parts + 1)]
    blocks = []
    for k in range(parts):
        r0, r1 = edges[k], edges[k + 1]
        blocks.append(
            ((r1 - r0) ** 2, functools.partial(_syrk, a[r0:r1], out[r0:r1, r0:r1]))
        )
        for m in range(k + 1, parts):
            c0, c1 = edges[m], edges[m + 1]
            blocks.append(
                (
                    2 * (r1 - r0) * (c1 - c0),
                    functools.partial(
                        np.matmul, a[r0:r1], a[c0:c1].T, out=out[r0:r1, c0:c1]
                    ),
                )
            )
    groups: list[list[Callable]] = [[] for _ in range(parts)]
    cost = [0] * parts
    for c, task in sorted(blocks, key=lambda t: -t[0]):
        k = cost.index(min(cost))
        groups[k].append(task)
        cost[k] += c
    return [functools.partial(_run_all, g) for g in groups if g]


def _run_all(tasks: list[Callable[[], Any]]) -> None:
    for t in tasks:
        t()


def _gram_layout_numba(B: int) -> int:
    """Layout of :func:`_gram_numba`'s result: -1 = upper triangle by rows (BLAS syrk),
    h > 0 = lower block triangle in blocks of h rows, 0 = full matrix."""
    if B < 128:
        return 0
    return -1 if _syrk_functions() else B // 2


def _gram_numba(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``a a^T`` (B x B) by BLAS, in the layout ``_gram_layout_numba(B)`` names.

    -1: one syrk (``uplo='L', trans='T'`` on ``a`` read as the column-major
    N x B matrix it is, so no copy): row i of ``out`` holds entries i..B-1; entries
    left of the diagonal are left unset.  B = 512, N = 1024 float32, one thread:
    1.33 ms, against 1.74 ms for the blocked GEMMs below (h = 256) and 4.65 ms for
    the GEMM forming dW (bench/SIMULATE.md).
    h > 0 (SciPy's BLAS table unreachable): row blocks ``a_k = a[kh : (k + 1) h]``,
    the diagonal blocks ``a_k a_k^T`` and the blocks left of them
    ``a_k a[: kh]^T``; blocks right of the diagonal blocks are left unset.
    0: the full matrix (small B)."""
    B, N = a.shape
    h = _gram_layout_numba(B)
    if h == 0:
        return np.matmul(a, a.T, out=out)
    if h < 0:
        a = np.ascontiguousarray(a)
        assert out.flags.c_contiguous and out.dtype == a.dtype
        _syrk(a, out)
        return out
    for s0 in range(0, B, h):
        e = min(s0 + h, B)
        ak = a[s0:e]
        np.matmul(ak, ak.T, out=out[s0:e, s0:e])
        if s0:
            np.matmul(ak, a[:s0].T, out=out[s0:e, :s0])
    return out


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_SUM)
def _dot_t(a, b, k0, k1, zero):
    """sum_{k0 <= j < k1} a_j b_j accumulated in the dtype of ``a`` (a row piece:
    at most B terms), returned as float64; in float64 where that overflows."""
    r = zero
    for j in range(k0, k1):
        r += a[j] * b[j]
    if abs(np.float64(r)) < math.inf:
        return np.float64(r)
    # the dtype overflowed (Grams near the float32 range): float64 products
    s = 0.0
    for j in range(k0, k1):
        s += np.float64(a[j]) * np.float64(b[j])
    return s


@njit(cache=True, nogil=True, error_model="numpy")
def _gram_dot_numba(a, b, h):
    """(sum_ij a_ij b_ij, trace a) in float64 for two symmetric B x B Gram matrices
    stored as :func:`_gram_numba` leaves them (``h`` its block size; 0 = full matrices):
    ``||G^T X||_F^2 = <G G^T, X X^T>``, ``trace(G G^T) = ||G||_F^2``.  h = -1: row
    ``i`` contributes its diagonal entry once and the entries right of it twice;
    h > 0: row ``i`` in the block starting at ``k0`` contributes twice its entries
    left of ``k0`` and once those of its diagonal block.  Each row piece is summed
    in the Grams' dtype (vectorised), the rows in float64."""
    B = a.shape[0]
    s = 0.0
    t = 0.0
    zero = np.zeros(1, a.dtype)[0]
    for i in range(B):
        ai = a[i]
        bi = b[i]
        t += np.float64(ai[i])
        if h < 0:  # upper triangle by rows
            d = np.float64(ai[i]) * np.float64(bi[i])
            s += 2.0 * _dot_t(ai, bi, i + 1, B, zero) + d
            continue
        if h == 0:
            k0 = 0
            k1 = B
        else:
            k0 = (i // h) * h
            k1 = min(k0 + h, B)
        s += 2.0 * _dot_t(ai, bi, 0, k0, zero) + _dot_t(ai, bi, k0, k1, zero)
    return s, t


# --------------------------------------------------------------------------- entry
def gram_layout(B: int, backend: str = "numba") -> int:
    """Layout of the Gram matrices ``backend``'s ``gram`` writes for ``B`` rows:
    0 = full matrix, -1 = upper triangle by rows, h > 0 = lower block triangle in
    blocks of h rows (:func:`_gram_numba`).  The numpy reference writes full ones."""
    return 0 if backend == "numpy" else _gram_layout_numba(B)


@dataclass(frozen=True)
class FusedKernels:
    """The raw fused kernels of one backend (:func:`resolve`): no validation, no
    allocation, the signatures of the module docstring.  For callers that run
    them once per layer on buffers they built (the empirical engine)."""

    backend: str
    layer_stats: Callable
    unit_forward: Callable
    unit_backward: Callable
    gram: Callable
    gram_dot: Callable
    residual_add_stats: Callable
    gram_layout: Callable[[int], int]
    row_sumsq: Callable[[np.ndarray], float]
    ACT_CODES: ClassVar[dict[str, int]] = ACT_CODES
    IDENTITY: ClassVar[int] = IDENTITY


@functools.cache
def resolve(backend: str = "numba") -> FusedKernels:
    """The fused kernels of ``backend`` ("numba" or "numpy"), from the registry.

    The fast entry of the empirical engine: the public dispatchers
    (``initdiag.kernels.unit_forward`` ...) validate and allocate on every call,
    which a per-layer loop over preallocated buffers must not pay.

    Raises
    ------
    ValueError
        For a backend other than numpy or numba (there is no c or cuda variant).
    """
    if backend not in _registry.OP_BACKENDS["unit_forward"]:
        raise ValueError(
            f"the fused kernels exist for backends "
            f"{_registry.OP_BACKENDS['unit_forward']} only; got {backend!r}"
        )
    ops = {op: _registry.resolve(op, backend) for op in _registry.FUSED_OPS}
    return FusedKernels(
        backend=backend,
        gram_layout=functools.partial(gram_layout, backend=backend),
        row_sumsq=_row_sumsq if backend == "numba" else _row_sumsq_numpy,
        **ops,
    )

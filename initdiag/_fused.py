"""Private fused Numba passes of ``simulate`` (the hot path of the numba backend).

The generic path of :mod:`initdiag.empirical` calls one kernel dispatcher per op and
per statistic (each a pass over a B x n array, each allocating).  Here one pass
computes every forward statistic of a layer output, one pass computes BatchNorm +
activation and the statistics of both outputs, and two passes compute the backward
of activation + BatchNorm with the gradient second moments and the parameter
gradients' column sums.  Formulas are those of the kernel contract
(``initdiag.kernels``) and of :mod:`initdiag.profile`:

- per layer output ``x`` (B x n): ``mean``, ``second_moment = mean(x^2)``,
  ``variance = mean_j var_b x[:, j]`` (biased, from sums shifted by row 0),
  ``squared_mean = mean_j (mean_b x[:, j])^2``, ``active_fraction``,
  ``dead_fraction``, ``zero_fraction``, the number of non-finite entries and the
  mean uncentred cosine ``(|sum_a u_a|^2 - sum_a |u_a|^2) / (B (B - 1))`` with
  ``u_a = x_a / |x_a|`` (zero rows count as cosine 0);
- BatchNorm (training mode, Ioffe & Szegedy 2015): ``xhat = (x - mean) invstd``,
  ``y = gamma xhat + beta``; backward ``g' = g act'(y)``, ``dbeta = sum_b g'``,
  ``dgamma = sum_b g' xhat``, ``dx = gamma invstd / B (B g' - dbeta - xhat dgamma)``.

Determinism: rows are split into a fixed number of chunks (independent of the thread
count), each with its own partial sums, reduced in chunk order; results are
therefore bit-identical whatever ``numba.set_num_threads`` says.  Every value that
the generic path stores in the working dtype (BatchNorm output, activation output,
gradients) is rounded to that dtype here too, so the two paths agree to rounding.

The only fast-math is ``reassoc`` on the row sums of squares (``_row_sumsq``, shared
with the kernels as ``initdiag.kernels.stats._sumsq_nb``),
so that LLVM may vectorise that reduction.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .kernels.activation import ACT_CODES
from .kernels.activation import _act_grad_nb as _act_grad
from .kernels.activation import _act_nb as _act
from .kernels.stats import _sumsq_nb as _row_sumsq

__all__ = [
    "ACT_CODES",
    "row_chunks",
    "col_stats",
    "unit_forward",
    "unit_backward",
    "gram_dot",
]

RELU = ACT_CODES["relu"]
IDENTITY = ACT_CODES["identity"]

# rows per chunk: fixed, so the reduction order does not depend on the thread count
_ROWS = 64


def row_chunks(B: int) -> int:
    """Number of row chunks of a batch of ``B`` rows."""
    return (B + _ROWS - 1) // _ROWS


@njit(cache=True, error_model="numpy")
def _count_nonfinite(r):
    c = 0
    for j in range(r.shape[0]):
        if not math.isfinite(r[j]):
            c += 1
    return c


@njit(cache=True, error_model="numpy", inline="always")
def _acc_row(r, shift, acc, sc):
    """Add one row ``r`` to the partial column sums ``acc`` (4, n) and scalars ``sc``.

    acc: [sum (r - shift), sum (r - shift)^2, sum r / |r|, count r > 0];
    sc: [sum r^2, nonzero rows, zero entries, non-finite entries].
    """
    n = r.shape[0]
    ss = _row_sumsq(r)
    if not math.isfinite(ss):
        sc[3] += _count_nonfinite(r)
    inv = 0.0
    if ss > 0.0:
        inv = 1.0 / math.sqrt(ss)
        sc[1] += 1.0
    sc[0] += ss
    zeros = 0
    s0 = acc[0]
    s1 = acc[1]
    s2 = acc[2]
    s3 = acc[3]
    for j in range(n):
        v = np.float64(r[j])
        d = v - shift[j]
        s0[j] += d
        s1[j] += d * d
        s2[j] += v * inv
        s3[j] += 1.0 if v > 0 else 0.0
        zeros += 1 if v == 0 else 0
    sc[2] += zeros


@njit(cache=True, error_model="numpy", inline="always")
def _row_scale(r, sc):
    """1/|r| (0 for a zero row) and the row's scalar contributions to ``sc``."""
    ss = _row_sumsq(r)
    if not math.isfinite(ss):
        sc[3] += _count_nonfinite(r)
    inv = 0.0
    if ss > 0.0:
        inv = 1.0 / math.sqrt(ss)
        sc[1] += 1.0
    sc[0] += ss
    return inv


@njit(cache=True, error_model="numpy", inline="always")
def _acc_row2(r, q, shift, acc, sc):
    """:func:`_acc_row` of two rows ``r``, ``q`` in one sweep (half the traffic on
    the accumulators, which dominates this loop)."""
    n = r.shape[0]
    ir = _row_scale(r, sc)
    iq = _row_scale(q, sc)
    zeros = 0
    s0 = acc[0]
    s1 = acc[1]
    s2 = acc[2]
    s3 = acc[3]
    for j in range(n):
        v = np.float64(r[j])
        u = np.float64(q[j])
        d = v - shift[j]
        e = u - shift[j]
        s0[j] += d + e
        s1[j] += d * d + e * e
        s2[j] += v * ir + u * iq
        s3[j] += (1.0 if v > 0 else 0.0) + (1.0 if u > 0 else 0.0)
        zeros += (1 if v == 0 else 0) + (1 if u == 0 else 0)
    sc[2] += zeros


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
def col_stats(x, acc, sc, out, colmean, colvar):
    """Every forward statistic of ``x`` (B x n) in one pass (see :func:`_finish`);
    ``acc`` (nch, 4, n), ``sc`` (nch, 4) are scratch; column mean / variance are
    written when ``colmean`` has length n (BatchNorm reuses them)."""
    B, n = x.shape
    nch = acc.shape[0]
    shift = np.empty(n)
    for j in range(n):
        v = np.float64(x[0, j])
        shift[j] = v if math.isfinite(v) else 0.0
    for c in prange(nch):
        acc[c] = 0.0
        sc[c] = 0.0
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        for b in range(b0, b1 - 1, 2):
            _acc_row2(x[b], x[b + 1], shift, acc[c], sc[c])
        if (b1 - b0) % 2 == 1:
            _acc_row(x[b1 - 1], shift, acc[c], sc[c])
    _finish(acc, sc, shift, B, out, colmean, colvar)
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _unit_row(xr, mean, invstd, gamma, beta, code, slope, yr, hr):
    """y = gamma (x - mean) invstd + beta and h = act(y), both rounded to the dtype
    of ``yr`` / ``hr``."""
    for j in range(xr.shape[0]):
        yr[j] = gamma[j] * ((np.float64(xr[j]) - mean[j]) * invstd[j]) + beta[j]
    if code == RELU:
        zero = np.zeros(1, hr.dtype)[0]
        for j in range(xr.shape[0]):
            v = yr[j]
            hr[j] = zero if v <= 0 else v
    elif code == IDENTITY:
        for j in range(xr.shape[0]):
            hr[j] = yr[j]
    else:
        for j in range(xr.shape[0]):
            hr[j] = _act(np.float64(yr[j]), code, slope)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def unit_forward(
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
    ``rec_y``) and of h, in one pass.  Plain activation: mean 0, invstd 1, gamma 1,
    beta 0 (then y = x exactly).  ``mean``/``invstd``/``gamma``/``beta`` float64."""
    B, n = x.shape
    nch = acc_h.shape[0]
    shy = np.zeros(n)
    shh = np.zeros(n)
    y0 = np.empty(n, h.dtype)
    h0 = np.empty(n, h.dtype)
    _unit_row(x[0], mean, invstd, gamma, beta, code, slope, y0, h0)
    for j in range(n):
        a = np.float64(y0[j])
        shy[j] = a if math.isfinite(a) else 0.0
        a = np.float64(h0[j])
        shh[j] = a if math.isfinite(a) else 0.0
    for c in prange(nch):
        acc_h[c] = 0.0
        sc_h[c] = 0.0
        if rec_y:
            acc_y[c] = 0.0
            sc_y[c] = 0.0
        yr = np.empty(n, h.dtype)
        yq = np.empty(n, h.dtype)
        b0, b1 = c * _ROWS, min((c + 1) * _ROWS, B)
        for b in range(b0, b1 - 1, 2):
            _unit_row(x[b], mean, invstd, gamma, beta, code, slope, yr, h[b])
            _unit_row(x[b + 1], mean, invstd, gamma, beta, code, slope, yq, h[b + 1])
            if rec_y:
                _acc_row2(yr, yq, shy, acc_y[c], sc_y[c])
            _acc_row2(h[b], h[b + 1], shh, acc_h[c], sc_h[c])
        if (b1 - b0) % 2 == 1:
            b = b1 - 1
            _unit_row(x[b], mean, invstd, gamma, beta, code, slope, yr, h[b])
            if rec_y:
                _acc_row(yr, shy, acc_y[c], sc_y[c])
            _acc_row(h[b], shh, acc_h[c], sc_h[c])
    empty = np.empty(0)
    if rec_y:
        _finish(acc_y, sc_y, shy, B, out_y, empty, empty)
    _finish(acc_h, sc_h, shh, B, out_h, empty, empty)


@njit(cache=True, error_model="numpy", inline="always")
def _grad_row(gr, xr, mean, invstd, gamma, beta, code, slope, yr, gp):
    """g' = g act'(y) rounded to the dtype of ``gp``; y recomputed as in forward."""
    for j in range(xr.shape[0]):
        yr[j] = gamma[j] * ((np.float64(xr[j]) - mean[j]) * invstd[j]) + beta[j]
    if code == RELU:
        zero = np.zeros(1, gp.dtype)[0]
        for j in range(xr.shape[0]):
            v = yr[j]
            gp[j] = gr[j] if v > 0 else (zero if v <= 0 else v)
    elif code == IDENTITY:
        for j in range(xr.shape[0]):
            gp[j] = gr[j]
    else:
        for j in range(xr.shape[0]):
            gp[j] = _act_grad(np.float64(gr[j]), np.float64(yr[j]), code, slope)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def unit_backward(
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
    """Backward of :func:`unit_forward`: g (B x n) is the gradient w.r.t. h.

    ``sums`` (float64, 3) receives [sum g^2, sum g'^2, sum dx^2] (g' = g act'(y),
    the gradient w.r.t. y); ``dgamma``, ``dbeta`` (BatchNorm) and ``dxsum`` (the
    column sums of dx, i.e. the bias gradient of a preceding Dense) are float64 (n,).
    ``part`` (nch, 4, n) is scratch; ``dx`` must not alias ``g``.  The first pass
    writes g' into dx; without BatchNorm dx = g', with it the second pass overwrites
    dx in place by the standard formula (module docstring).  ``need_dx`` False skips
    the second pass (first layer: dx then holds g')."""
    B, n = x.shape
    nch = part.shape[0]
    ss = np.zeros((nch, 3))
    for c in prange(nch):
        part[c] = 0.0
        yr = np.empty(n, g.dtype)
        p0 = part[c, 0]
        p1 = part[c, 1]
        p2 = part[c, 2]
        for b in range(c * _ROWS, min((c + 1) * _ROWS, B)):
            gp = dx[b]  # g' is kept in dx: the second pass reads it back
            _grad_row(g[b], x[b], mean, invstd, gamma, beta, code, slope, yr, gp)
            ss[c, 0] += _row_sumsq(g[b])
            ss[c, 1] += _row_sumsq(gp)
            if has_bn:
                for j in range(n):
                    v = np.float64(gp[j])
                    p0[j] += v
                    p1[j] += v * ((np.float64(x[b, j]) - mean[j]) * invstd[j])
            else:
                for j in range(n):
                    p2[j] += np.float64(gp[j])
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
        return
    if not need_dx:
        return
    coef = np.empty(n)
    for j in range(n):
        coef[j] = gamma[j] * invstd[j] / B
    for cc in prange(nch):
        c = nch - 1 - cc  # reverse order: the rows the first pass saw last are cached
        part[c, 2] = 0.0
        p2 = part[c, 2]
        for b in range(c * _ROWS, min((c + 1) * _ROWS, B)):
            dxr = dx[b]  # holds g' on entry
            xr = x[b]
            for j in range(n):
                xh = (np.float64(xr[j]) - mean[j]) * invstd[j]
                dxr[j] = coef[j] * (B * np.float64(dxr[j]) - dbeta[j] - xh * dgamma[j])
                p2[j] += np.float64(dxr[j])
            ss[c, 2] = ss[c, 2] + _row_sumsq(dxr)
    for c in range(nch):
        sums[2] += ss[c, 2]
        for j in range(n):
            dxsum[j] += part[c, 2, j]


def gram_split(B: int) -> int:
    """Block size of the blocked Gram matrix (:func:`gram`); 0 = unblocked."""
    return B // 2 if B >= 128 else 0


def gram(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The lower block triangle of ``a a^T`` (B x B) by BLAS: with ``h =
    gram_split(B)``, row blocks ``a_k = a[kh : (k + 1) h]`` (the last one may be
    shorter), the diagonal blocks ``a_k a_k^T`` (syrk, both triangles) and the
    blocks left of them ``a_k a[: kh]^T`` (one gemm per block row); blocks right of
    the diagonal blocks are left unset.  Same flops as one syrk of ``a``, but ~9%
    faster with single-threaded OpenBLAS (SkylakeX kernels) at B = 512, N = 1024:
    h = 256 1.74 ms, h = 128 1.83 ms, h = 64 2.16 ms, one syrk 1.91 ms
    (bench/SIMULATE.md).  ``h = 0``: one syrk, full matrix."""
    h = gram_split(a.shape[0])
    if h == 0:
        return np.matmul(a, a.T, out=out)
    B = a.shape[0]
    for s in range(0, B, h):
        e = min(s + h, B)
        ak = a[s:e]
        np.matmul(ak, ak.T, out=out[s:e, s:e])
        if s:
            np.matmul(ak, a[:s].T, out=out[s:e, :s])
    return out


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def gram_dot(a, b, h):
    """(sum_ij a_ij b_ij, trace a) in float64 for two symmetric B x B Gram matrices
    stored as :func:`gram` leaves them (``h`` its block size; 0 = full matrices):
    ``||G^T X||_F^2 = <G G^T, X X^T>``, ``trace(G G^T) = ||G||_F^2``.  Row ``i`` in
    the block starting at ``k0`` contributes twice its entries left of ``k0`` and
    once those of its diagonal block."""
    B = a.shape[0]
    s = 0.0
    t = 0.0
    for i in range(B):
        ai = a[i]
        bi = b[i]
        t += np.float64(ai[i])
        if h == 0:
            k0 = 0
            k1 = B
        else:
            k0 = (i // h) * h
            k1 = min(k0 + h, B)
        r = 0.0
        for j in range(k0):
            r += np.float64(ai[j]) * np.float64(bi[j])
        d = 0.0
        for j in range(k0, k1):
            d += np.float64(ai[j]) * np.float64(bi[j])
        s += 2.0 * r + d
    return s, t

"""One-pass statistics of a layer output (all CPU backends).

Contract (every variant has the same signature, writes into the outputs it is
given, returns them, never validates, allocates (beyond per-block scratch) or
raises)::

    _column_stats_<b>(x, mean, var, frac_le0, frac_eq0)
        -> (mean, var, frac_le0, frac_eq0)
    _layer_summary_<b>(x, out) -> out           # out float64 (8,), SUMMARY_FIELDS
    _row_correlation_<b>(x, out) -> out         # out float64 (1,)

Per feature j over the batch (B rows): mean_j, biased var_j, fraction of entries
<= 0 and == 0.  Variances come from sums shifted by the first row (Chan, Golub &
LeVeque 1983), in one pass over x; never E[x^2] - E[x]^2 of the raw data.  The
numba and C variants sum blocks of ``ROW_BLOCK`` rows in the dtype of x (SIMD at
the dtype's width: twice the float32 lanes of float64) and the blocks in float64,
so float32 results carry float32 rounding (tests: B eps32 relative to max |x|);
columns whose float32 sums overflow are summed again in float64.

``layer_summary`` (x of shape (B, n)): mean = mean(x); second_moment = mean(x^2)
(= mean_j (var_j + mean_j^2)); variance = mean_j var_j; squared_mean = mean_j
mean_j^2 (Schoenholz et al. 2017's channel statistics); active_fraction = share
of entries > 0; dead_fraction = share of features with x[b, j] <= 0 for every b;
zero_fraction = share of entries == 0; nonfinite_count = number of NaN/inf.

``row_correlation``: mean over ordered pairs a != b of the uncentered cosine
<x_a, x_b> / (|x_a| |x_b|), rows of zero norm counting as cosine 0, B = 1 giving
NaN; a NaN or inf entry makes it NaN.  With u_a = x_a / |x_a|:
sum_{a != b} <u_a, u_b> = |sum_a u_a|^2 - sum_a |u_a|^2, which is O(B n) and
needs no Gram matrix.
"""

from __future__ import annotations

import math

import numpy as np

from ._names import SUMMARY_FIELDS  # noqa: F401 - re-exported here
from ._numba_common import sumsq_nb as _sumsq_nb
from ._threading import c_threads, njit, numba_threads, prange, sweep_threads
from .batchnorm import _col64_nb, block_width

# columns per parallel block of row_correlation: a row slice of 256 elements is a
# few cache lines, and n = 1024 gives 4 blocks for 2 threads
STATS_BLOCK = 256

# rows summed in the dtype of x before each float64 update (column statistics).
# Counts are kept in the dtype too, as (<= 0) + (ROW_BLOCK + 1) (== 0): at most
# ROW_BLOCK (ROW_BLOCK + 2) = 4224, exact in float32.
ROW_BLOCK = 64

# FMA contraction only (one rounding for a * b + c); no reassociation, NaN / inf
# semantics untouched
_CONTRACT = {"contract"}


# --------------------------------------------------------------------------- numpy
def _column_stats_numpy(x, mean, var, frac_le0, frac_eq0):
    """NumPy reference (two-pass mean / variance, in float64)."""
    xd = x.astype(np.float64)
    m = xd.mean(axis=0)
    mean[...] = m
    d = xd - m
    var[...] = np.mean(d * d, axis=0)
    frac_le0[...] = np.mean(x <= 0, axis=0)
    frac_eq0[...] = np.mean(x == 0, axis=0)
    return mean, var, frac_le0, frac_eq0


def _layer_summary_numpy(x, out):
    """NumPy reference of the 8 SUMMARY_FIELDS."""
    B, n = x.shape
    m = np.empty(n)
    v = np.empty(n)
    le0 = np.empty(n)
    eq0 = np.empty(n)
    _column_stats_numpy(x, m, v, le0, eq0)
    out[0] = m.mean()
    out[1] = np.mean(v + m * m)
    out[2] = v.mean()
    out[3] = np.mean(m * m)
    out[4] = np.count_nonzero(x > 0) / x.size
    out[5] = np.count_nonzero(le0 == 1.0) / n
    out[6] = np.count_nonzero(x == 0) / x.size
    out[7] = x.size - np.count_nonzero(np.isfinite(x))
    return out


def _row_correlation_numpy(x, out):
    """NumPy reference using the |sum u|^2 - sum |u|^2 identity, float64."""
    B = x.shape[0]
    xd = x.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", xd, xd))
    with np.errstate(all="ignore"):
        inv = np.where(norms == 0, 0.0, 1.0 / norms)
        u = xd * inv[:, None]
        s = u.sum(axis=0)
        # B = 1: no pair; |S|^2 - |u|^2 is rounding noise, not 0 / 0
        out[0] = (s @ s - np.sum(u * u)) / (B * (B - 1)) if B > 1 else np.nan
    return out


# --------------------------------------------------------------------------- numba
@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _colacc8_nb(x, i, j0, j1, k, a1, a2, ac, one, big, zero):
    """Rows i..i+7, columns j0..j1 into the block accumulators (dtype of x):
    a1 += sum d, a2 += sum d^2 (d = x - k), ac += count(x <= 0) + big count(x == 0).

    Eight rows per sweep: each accumulator is loaded and stored once per eight
    rows; the counts are masked adds on one accumulator (four arrays, eight rows and
    the shift keep LLVM's runtime alias checks small enough to vectorise).  The
    shifted sums repeat batchnorm._bn_acc8_nb on purpose: calling it and then a
    counts-only sweep over the same rows measured 62-64 vs 46-47 us (512 x 1024
    float32, one thread)."""
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
        kj = k[j]
        v0 = r0[j]
        v1 = r1[j]
        v2 = r2[j]
        v3 = r3[j]
        v4 = r4[j]
        v5 = r5[j]
        v6 = r6[j]
        v7 = r7[j]
        d0 = v0 - kj
        d1 = v1 - kj
        d2 = v2 - kj
        d3 = v3 - kj
        d4 = v4 - kj
        d5 = v5 - kj
        d6 = v6 - kj
        d7 = v7 - kj
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
        c = ac[j]
        c = c + one if v0 <= zero else c
        c = c + one if v1 <= zero else c
        c = c + one if v2 <= zero else c
        c = c + one if v3 <= zero else c
        c = c + one if v4 <= zero else c
        c = c + one if v5 <= zero else c
        c = c + one if v6 <= zero else c
        c = c + one if v7 <= zero else c
        c = c + big if v0 == zero else c
        c = c + big if v1 == zero else c
        c = c + big if v2 == zero else c
        c = c + big if v3 == zero else c
        c = c + big if v4 == zero else c
        c = c + big if v5 == zero else c
        c = c + big if v6 == zero else c
        c = c + big if v7 == zero else c
        ac[j] = c


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _colacc1_nb(x, i, j0, j1, k, a1, a2, ac, one, big, zero):
    """:func:`_colacc8_nb` of the single row i."""
    r = x[i, j0:j1]
    for j in range(j1 - j0):
        v = r[j]
        d = v - k[j]
        a1[j] += d
        a2[j] += d * d
        ac[j] += (one if v <= zero else zero) + (big if v == zero else zero)


@njit(cache=True, error_model="numpy")
def _colacc_block_nb(x, j0, j1, m, v, cle, ceq, at):
    """Columns j0..j1 of x: mean m, biased variance v (clipped at 0; NaN passes)
    and the counts <= 0, == 0, all float64 arrays of length j1 - j0.

    Variances come from sums shifted by the first row.  Rows are taken in blocks
    of ``ROW_BLOCK``, summed in the dtype of x (``at``: 4 rows of scratch of that
    dtype) and added to float64 totals after each block (kept in m and v until the
    end): the element loop runs at the dtype's SIMD width (16 float32 lanes with
    AVX-512) and the error is that of ROW_BLOCK-term sums in the dtype plus
    float64 across blocks.  Columns whose sum of squares is not finite are summed
    again in float64 (values beyond ~1e19 overflow float32 squares; NaN / inf
    propagate)."""
    B = x.shape[0]
    w = j1 - j0
    kt = at[0, :w]
    a1 = at[1, :w]
    a2 = at[2, :w]
    ac = at[3, :w]
    s1 = m  # float64 sums until the end
    s2 = v
    r = x[0, j0:j1]
    for j in range(w):
        kt[j] = r[j]
        s1[j] = 0.0
        s2[j] = 0.0
        cle[j] = 0.0
        ceq[j] = 0.0
    # one, zero and the count weight of x == 0 in the dtype of x
    a1[0] = 1.0
    one = a1[0]
    zero = one - one
    a1[0] = ROW_BLOCK + 1.0
    big = a1[0]
    i = 0
    while i < B:
        ie = min(B, i + ROW_BLOCK)
        for j in range(w):
            a1[j] = zero
            a2[j] = zero
            ac[j] = zero
        while i + 8 <= ie:
            _colacc8_nb(x, i, j0, j1, kt, a1, a2, ac, one, big, zero)
            i += 8
        while i < ie:
            _colacc1_nb(x, i, j0, j1, kt, a1, a2, ac, one, big, zero)
            i += 1
        for j in range(w):
            s1[j] += np.float64(a1[j])
            s2[j] += np.float64(a2[j])
            c = np.float64(ac[j])
            e = math.floor(c / (ROW_BLOCK + 1.0))
            ceq[j] += e
            cle[j] += c - (ROW_BLOCK + 1.0) * e
    for j in range(w):
        k = np.float64(kt[j])
        t1 = s1[j]
        t2 = s2[j]
        if not abs(t2) < math.inf:
            t1, t2 = _col64_nb(x, j0 + j, k)
        ms = t1 / B
        var = t2 / B - ms * ms
        m[j] = k + ms
        v[j] = 0.0 if var < 0.0 else var


@njit(cache=True, error_model="numpy")
def _count_nonfinite_nb(x, j):
    """(NaN count, inf count) of column j: the rare path, taken only for columns
    whose shifted sum of squares is not finite."""
    nan = 0.0
    inf = 0.0
    for i in range(x.shape[0]):
        v = x[i, j]
        if v != v:
            nan += 1.0
        elif abs(v) == math.inf:
            inf += 1.0
    return nan, inf


@njit(cache=True, error_model="numpy")
def _colstats_block_nb(x, blk, bi, mean, var, frac_le0, frac_eq0, at):
    """column_stats of column block bi (``at``: 4 rows of scratch per block),
    written straight into the outputs."""
    B, n = x.shape
    j0 = bi * blk
    j1 = min(n, j0 + blk)
    le = frac_le0[j0:j1]
    eq = frac_eq0[j0:j1]
    _colacc_block_nb(
        x, j0, j1, mean[j0:j1], var[j0:j1], le, eq, at[4 * bi : 4 * bi + 4]
    )
    for j in range(j1 - j0):
        le[j] /= B
        eq[j] /= B


@njit(cache=True, parallel=True, error_model="numpy")
def _column_stats_nb(x, mean, var, frac_le0, frac_eq0, blk, par, at):
    """Column blocks of width blk, in parallel when ``par`` (one pass over x);
    ``at``: (4 nblk, blk) scratch of x's dtype."""
    nblk = (x.shape[1] + blk - 1) // blk
    if nblk <= 1 or not par:
        for bi in range(nblk):
            _colstats_block_nb(x, blk, bi, mean, var, frac_le0, frac_eq0, at)
    else:
        for bi in prange(nblk):
            _colstats_block_nb(x, blk, bi, mean, var, frac_le0, frac_eq0, at)
    return mean


@njit(cache=True, error_model="numpy")
def _summary_block_nb(x, blk, bi, p, at):
    """Partial sums of the 8 summary numbers over column block bi into p (8,)."""
    B, n = x.shape
    j0 = bi * blk
    j1 = min(n, j0 + blk)
    w = j1 - j0
    m = np.empty(w)
    v = np.empty(w)
    cle = np.empty(w)
    ceq = np.empty(w)
    _colacc_block_nb(x, j0, j1, m, v, cle, ceq, at[4 * bi : 4 * bi + 4])
    for j in range(w):
        # entries > 0 = B - (<= 0) - NaN; NaN / inf counted on the rare path (a
        # column with a non-finite sum of squares has a non-finite variance)
        nan = 0.0
        inf = 0.0
        if not abs(v[j]) < math.inf:
            nan, inf = _count_nonfinite_nb(x, j0 + j)
        p[0] += m[j]
        p[1] += v[j] + m[j] * m[j]
        p[2] += v[j]
        p[3] += m[j] * m[j]
        p[4] += B - cle[j] - nan
        p[5] += 1.0 if cle[j] == B else 0.0
        p[6] += ceq[j]
        p[7] += nan + inf


@njit(cache=True, parallel=True, error_model="numpy")
def _layer_summary_nb(x, out, blk, par, at):
    """Column blocks of width blk, in parallel when ``par``; per-block partial
    sums, combined in block order."""
    B, n = x.shape
    nblk = (n + blk - 1) // blk
    # np.empty + a serial fill: in a parallel=True function np.zeros would itself
    # become a parallel loop and wake the thread pool even for tiny inputs
    parts = np.empty((nblk, 8))
    for bi in range(nblk):
        for f in range(8):
            parts[bi, f] = 0.0
    if nblk <= 1 or not par:
        for bi in range(nblk):
            _summary_block_nb(x, blk, bi, parts[bi], at)
    else:
        for bi in prange(nblk):
            _summary_block_nb(x, blk, bi, parts[bi], at)
    tot = np.empty(8)
    for f in range(8):
        tot[f] = 0.0
    for bi in range(nblk):
        for f in range(8):
            tot[f] += parts[bi, f]
    N = B * n
    out[0] = tot[0] / n
    out[1] = tot[1] / n
    out[2] = tot[2] / n
    out[3] = tot[3] / n
    out[4] = tot[4] / N
    out[5] = tot[5] / n
    out[6] = tot[6] / N
    out[7] = tot[7]
    return out


@njit(cache=True, error_model="numpy")
def _rc_norm_nb(x, a, inv, uu):
    """1 / |x_a| (0 for a zero row) and |u_a|^2 = |x_a|^2 / |x_a|^2 of row a."""
    s = _sumsq_nb(x[a])
    ia = 0.0 if s == 0.0 else 1.0 / math.sqrt(s)
    inv[a] = ia
    uu[a] = s * ia * ia


@njit(cache=True, error_model="numpy")
def _rc_block_nb(x, j0, j1, inv):
    """sum_j (sum_a x_aj / |x_a|)^2 over columns j0..j1, four rows per sweep."""
    B = x.shape[0]
    w = j1 - j0
    S = np.zeros(w)
    a = 0
    while a + 4 <= B:
        r0 = x[a, j0:j1]
        r1 = x[a + 1, j0:j1]
        r2 = x[a + 2, j0:j1]
        r3 = x[a + 3, j0:j1]
        i0 = inv[a]
        i1 = inv[a + 1]
        i2 = inv[a + 2]
        i3 = inv[a + 3]
        for j in range(w):
            S[j] += (np.float64(r0[j]) * i0 + np.float64(r1[j]) * i1) + (
                np.float64(r2[j]) * i2 + np.float64(r3[j]) * i3
            )
        a += 4
    while a < B:
        r = x[a, j0:j1]
        ia = inv[a]
        for j in range(w):
            S[j] += np.float64(r[j]) * ia
        a += 1
    sb = 0.0
    for j in range(w):
        sb += S[j] * S[j]
    return sb


@njit(cache=True, parallel=True, error_model="numpy")
def _row_correlation_nb(x, out, par):
    """Row norms, then S = sum_a u_a by column block (each in parallel when
    ``par``); sum_a |u_a|^2 comes from the norms."""
    B, n = x.shape
    if B < 2:
        out[0] = np.nan
        return out
    inv = np.empty(B)
    uu = np.empty(B)
    blk = STATS_BLOCK
    nblk = (n + blk - 1) // blk
    parts = np.empty(nblk)  # not np.zeros: see _layer_summary_nb
    if not par:
        for a in range(B):
            _rc_norm_nb(x, a, inv, uu)
        for bi in range(nblk):
            parts[bi] = _rc_block_nb(x, bi * blk, min(n, (bi + 1) * blk), inv)
    else:
        for a in prange(B):
            _rc_norm_nb(x, a, inv, uu)
        for bi in prange(nblk):
            parts[bi] = _rc_block_nb(x, bi * blk, min(n, (bi + 1) * blk), inv)
    s2 = 0.0
    for bi in range(nblk):
        s2 += parts[bi]
    t = 0.0
    for a in range(B):
        t += uu[a]
    out[0] = (s2 - t) / (B * (B - 1.0))
    return out


def _sweep_plan(x, nthreads):
    """(block width, parallel?, scratch) of a column-statistics sweep over x."""
    B, n = x.shape
    nt = sweep_threads(B * n, nthreads)
    blk = block_width(B, n, x.itemsize, nt)
    nblk = -(-n // blk)
    return blk, nt > 1 and nblk > 1, np.empty((4 * nblk, blk), x.dtype)


def _column_stats_numba(x, mean, var, frac_le0, frac_eq0):
    """Numba variant: one pass over x, shifted sums (dtype per row block, float64
    across blocks)."""
    blk, par, at = _sweep_plan(x, numba_threads())
    _column_stats_nb(x, mean, var, frac_le0, frac_eq0, blk, par, at)
    return mean, var, frac_le0, frac_eq0


def _layer_summary_numba(x, out):
    """Numba variant: one pass over x."""
    blk, par, at = _sweep_plan(x, numba_threads())
    _layer_summary_nb(x, out, blk, par, at)
    return out


def _row_correlation_numba(x, out):
    """Numba variant: two passes over x (norms, then the sum of unit rows)."""
    B, n = x.shape
    _row_correlation_nb(x, out, sweep_threads(B * n, numba_threads(), 2) > 1)
    return out


# --------------------------------------------------------------------------- c
def _c_sweep(B, n, itemsize, cost=1):
    """(block width, threads) of a C column-statistics sweep."""
    nt = sweep_threads(B * n, c_threads(), cost)
    return block_width(B, n, itemsize, nt), nt


def _column_stats_c(x, mean, var, frac_le0, frac_eq0):
    """C variant (idg_column_stats)."""
    from ._c import check, fn, ptr

    B, n = x.shape
    blk, nt = _c_sweep(B, n, x.itemsize)
    check(
        fn("idg_column_stats", x.dtype)(
            ptr(x), B, n, ptr(mean), ptr(var), ptr(frac_le0), ptr(frac_eq0), blk, nt
        ),
        "idg_column_stats",
    )
    return mean, var, frac_le0, frac_eq0


def _layer_summary_c(x, out):
    """C variant (idg_layer_summary)."""
    from ._c import check, fn, ptr

    B, n = x.shape
    blk, nt = _c_sweep(B, n, x.itemsize)
    check(
        fn("idg_layer_summary", x.dtype)(ptr(x), B, n, ptr(out), blk, nt),
        "idg_layer_summary",
    )
    return out


def _row_correlation_c(x, out):
    """C variant (idg_row_correlation); 2 B float64 of scratch from here."""
    from ._c import check, fn, ptr

    B, n = x.shape
    scratch = np.empty(2 * B)
    check(
        fn("idg_row_correlation", x.dtype)(
            ptr(x), B, n, ptr(scratch), ptr(out), _c_sweep(B, n, x.itemsize, 2)[1]
        ),
        "idg_row_correlation",
    )
    return out



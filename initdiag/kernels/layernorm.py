"""LayerNorm over the features of each example, optionally fused with an activation.

Contract (every variant has the same signature, writes into the outputs it is
given, returns them, never validates, allocates (beyond per-chunk scratch) or
raises)::

    _layernorm_forward_<b>(x, gamma, beta, eps, act, slope, out, mean, invstd) -> out
    _layernorm_backward_<b>(dy, x, mean, invstd, gamma, beta, act, slope,
                            dx, dgamma, dbeta) -> (dx, dgamma, dbeta)

``gamma`` None means no affine parameters (``torch.nn.LayerNorm(n,
elementwise_affine=False)``): gamma = 1, beta = 0, and the backward leaves
``dgamma`` / ``dbeta`` None.  ``beta`` None with a ``gamma`` is a zero bias
(torch's ``bias=False``); ``dbeta`` is still computed then.

Forward, per example b over its n features (Ba, Kiros & Hinton 2016, "Layer
Normalization", arXiv:1607.06450; biased variance, as ``torch.nn.LayerNorm`` in
training and eval alike)::

    mean_b = (1/n) sum_j x_bj,   var_b = (1/n) sum_j (x_bj - mean_b)^2,
    invstd_b = 1 / sqrt(var_b + eps),
    out_bj = act(z_bj),  z_bj = gamma_j (x_bj - mean_b) invstd_b + beta_j.

Backward, with xhat = (x - mean) invstd, g = dy * act'(z) and h = g gamma::

    dbeta_j = sum_b g_bj,   dgamma_j = sum_b g_bj xhat_bj,
    dx_bj = invstd_b / n * (n h_bj - sum_k h_bk - xhat_bj sum_k h_bk xhat_bk).

Numba and C variants sweep each row several times while it sits in L1 (forward: its
sums, then its output; backward: g when the activation is not the identity, the row
sums, the column partials, then dx), rows in chunks of ``ROW_CHUNK``, the chunks in
parallel when ``_threading.sweep_threads`` says the work pays.  The variance uses
sums shifted by the row's first entry (Chan, Golub & LeVeque 1983), never E[x^2] -
E[x]^2 of the raw data; row sums run in the dtype of x over spans of ``SPAN``
features (vectorised: Numba with reassociation, C with OpenMP SIMD reductions, so
their order follows the vector width) and in float64 across spans; float32 input
keeps float32 accuracy (tests hold it to n eps32).  A row whose float32 sum of
squares overflowed on finite entries is summed again in float64.  ``dgamma`` /
``dbeta`` are column sums: each chunk sums its rows in the dtype of x into its own
row of scratch, and the chunks are added in float64 in chunk order afterwards, so
the result does not depend on the thread count.

DELEGATE_FORWARD / DELEGATE_BACKWARD activations (tanh, sigmoid, silu, erf's
derivative) go to NumPy's SIMD ufuncs around the identity kernel, as in
``kernels.batchnorm`` (bench/KERNELS.md).
"""

from __future__ import annotations

import math

import numpy as np

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
    _act_grad_nb,
    _act_nb,
    _activation_backward_numpy,
    _activation_forward_numpy,
)
from .batchnorm import _CONTRACT, _split_forward

# rows per chunk: the unit of parallel work and of the dtype-precision column sums
# of dgamma / dbeta (as ROW_BLOCK in kernels.batchnorm); the C core has the same
ROW_CHUNK = 64
# features summed in the dtype of x before each float64 update of a row sum
SPAN = 1024

# reassoc lets LLVM vectorise the row sums (a float reduction is otherwise one
# serial add chain: measured 2.3x slower for 512 x 1024 float32); no nnan / ninf,
# so NaN and inf propagate as without it
_REDUCE = {"contract", "reassoc"}

# relative cost per element for sweep_threads: a LayerNorm pass reads and writes
# what a BatchNorm pass does
COST_LN_FORWARD, COST_LN_BACKWARD = COST_BN_FORWARD, COST_BN_BACKWARD


# --------------------------------------------------------------------------- numpy
def _layernorm_forward_numpy(x, gamma, beta, eps, act, slope, out, mean, invstd):
    """NumPy reference (two-pass mean / variance)."""
    m = x.mean(axis=1)
    d = x - m[:, None]
    v = np.mean(d * d, axis=1)
    mean[...] = m
    with np.errstate(divide="ignore"):  # var + eps == 0 gives inf, as in C
        np.divide(1, np.sqrt(v + eps), out=invstd)
    with np.errstate(invalid="ignore"):
        np.multiply(d, invstd[:, None], out=out)
    if gamma is not None:
        out *= gamma
    if beta is not None:
        out += beta
    _activation_forward_numpy(out, act, slope, out)
    return out


def _ln_g_numpy(dy, xhat, gamma, beta, act, slope):
    """g = dy * act'(z), z = gamma xhat + beta (gamma / beta None: 1 / 0)."""
    if act == "identity":
        return dy
    z = xhat * gamma if gamma is not None else xhat.copy()
    if beta is not None:
        z += beta
    return _activation_backward_numpy(dy, z, act, slope, z)


def _layernorm_backward_numpy(
    dy, x, mean, invstd, gamma, beta, act, slope, dx, dgamma, dbeta
):
    """NumPy reference of the LayerNorm backward formula."""
    n = x.shape[1]
    with np.errstate(invalid="ignore"):
        xhat = (x - mean[:, None]) * invstd[:, None]
    g = _ln_g_numpy(dy, xhat, gamma, beta, act, slope)
    if gamma is not None:
        np.sum(g, axis=0, out=dbeta)
        np.sum(g * xhat, axis=0, out=dgamma)
        h = g * gamma
    else:
        h = g
    s1 = h.sum(axis=1, keepdims=True)
    s2 = (h * xhat).sum(axis=1, keepdims=True)
    np.multiply(invstd[:, None] / n, n * h - s1 - xhat * s2, out=dx)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- numba
# The span loop sits inside the reassoc functions: called once per span from a
# caller's loop, the row sums measured 2.7x slower (1.45 vs 0.53 ms for the
# 512 x 1024 float32 backward, one thread).
@njit(cache=True, error_model="numpy", fastmath=_REDUCE)
def _ln_shifted_sums_nb(r, k, zero):
    """sum (r - k), sum (r - k)^2 in float64, spans of SPAN summed in the dtype."""
    n = r.shape[0]
    s1 = 0.0
    s2 = 0.0
    for j0 in range(0, n, SPAN):
        a1 = zero
        a2 = zero
        for j in range(j0, min(n, j0 + SPAN)):
            d = r[j] - k
            a1 += d
            a2 += d * d
        s1 += np.float64(a1)
        s2 += np.float64(a2)
    return s1, s2


@njit(cache=True, error_model="numpy")
def _ln_row_sums_nb(r, zero):
    """Shifted sums (k, s1, s2) of row r: k = r[0], s_p = sum_j (r_j - k)^p in
    float64 over spans summed in the dtype; again in float64 when the dtype's
    sum of squares overflowed (or the row holds NaN / inf)."""
    k = r[0]
    s1, s2 = _ln_shifted_sums_nb(r, k, zero)
    if not s2 < math.inf:
        kd = np.float64(k)
        s1 = 0.0
        s2 = 0.0
        for j in range(r.shape[0]):
            d = np.float64(r[j]) - kd
            s1 += d
            s2 += d * d
    return k, s1, s2


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _ln_fwd_rows_nb(
    x, gamma, beta, affine, eps, code, slope, out, mean, invstd, i0, i1, zero
):
    """LayerNorm forward of rows i0..i1: row sums, then the output pass."""
    n = x.shape[1]
    for i in range(i0, i1):
        r = x[i]
        o = out[i]
        k, s1, s2 = _ln_row_sums_nb(r, zero)
        ms = s1 / n
        var = s2 / n - ms * ms
        if var < 0.0:  # rounding only; NaN passes
            var = 0.0
        mean[i] = k + ms
        invstd[i] = 1.0 / math.sqrt(var + eps)
        mu = mean[i]  # the stored (dtype) values, as the backward will see them
        iv = invstd[i]
        if affine:
            if code == IDENTITY:
                for j in range(n):
                    o[j] = (r[j] - mu) * iv * gamma[j] + beta[j]
            elif code == RELU:
                for j in range(n):
                    z = (r[j] - mu) * iv * gamma[j] + beta[j]
                    o[j] = zero if z <= zero else z
            else:
                for j in range(n):
                    o[j] = _act_nb((r[j] - mu) * iv * gamma[j] + beta[j], code, slope)
        elif code == IDENTITY:
            for j in range(n):
                o[j] = (r[j] - mu) * iv
        elif code == RELU:
            for j in range(n):
                z = (r[j] - mu) * iv
                o[j] = zero if z <= zero else z
        else:
            for j in range(n):
                o[j] = _act_nb((r[j] - mu) * iv, code, slope)


@njit(cache=True, parallel=True, error_model="numpy")
def _ln_fwd_nb(x, gamma, beta, affine, eps, code, slope, out, mean, invstd, par, zero):
    """Chunks of ROW_CHUNK rows, in parallel when ``par``."""
    B = x.shape[0]
    nch = (B + ROW_CHUNK - 1) // ROW_CHUNK
    args = (x, gamma, beta, affine, eps, code, slope, out, mean, invstd)
    if nch <= 1 or not par:
        _ln_fwd_rows_nb(*args, 0, B, zero)
    else:
        for c in prange(nch):
            _ln_fwd_rows_nb(*args, c * ROW_CHUNK, min(B, (c + 1) * ROW_CHUNK), zero)
    return out


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _ln_g_row_nb(d, r, mu, iv, gamma, beta, affine, code, slope, o, zero):
    """o = d * act'(z) for one row, z = gamma xhat + beta (1 / 0 without affine);
    relu's derivative as selects on the loaded d (``d[j] if z > 0`` would be a
    conditional load, which LLVM leaves as a branch: measured 3x slower), NaN z
    propagating; one loop per case (LLVM does not unswitch the affine test)."""
    n = r.shape[0]
    if code == RELU and affine:
        for j in range(n):
            dj = d[j]
            z = (r[j] - mu) * iv * gamma[j] + beta[j]
            keep = dj if z > zero else zero
            o[j] = keep if z == z else z
    elif code == RELU:
        for j in range(n):
            dj = d[j]
            z = (r[j] - mu) * iv
            keep = dj if z > zero else zero
            o[j] = keep if z == z else z
    else:
        for j in range(n):
            z = np.float64((r[j] - mu) * iv)
            if affine:
                z = z * np.float64(gamma[j]) + np.float64(beta[j])
            o[j] = _act_grad_nb(np.float64(d[j]), z, code, slope)


@njit(cache=True, error_model="numpy", fastmath=_REDUCE)
def _ln_bwd_sums_nb(g, r, mu, iv, gamma, affine, zero):
    """(sum h, sum h xhat) over a row in float64, h = g gamma (g without affine),
    spans of SPAN summed in the dtype."""
    n = r.shape[0]
    s1 = 0.0
    s2 = 0.0
    for j0 in range(0, n, SPAN):
        j1 = min(n, j0 + SPAN)
        a1 = zero
        a2 = zero
        if affine:
            for j in range(j0, j1):
                hj = g[j] * gamma[j]
                a1 += hj
                a2 += hj * ((r[j] - mu) * iv)
        else:
            for j in range(j0, j1):
                a1 += g[j]
                a2 += g[j] * ((r[j] - mu) * iv)
        s1 += np.float64(a1)
        s2 += np.float64(a2)
    return s1, s2


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _ln_colpart_nb(g, r, mu, iv, cb, cg):
    """Column partials of one row: cb += g, cg += g xhat (a loop of its own: fused
    with the row sums it was measured 4x slower, not vectorised)."""
    for j in range(r.shape[0]):
        gj = g[j]
        cb[j] += gj
        cg[j] += gj * ((r[j] - mu) * iv)


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _ln_bwd_rows_nb(
    dy, x, mean, invstd, gamma, beta, affine, code, slope, dx, part, coef, c, i0, i1
):
    """LayerNorm backward of the rows i0..i1 of chunk c: g into dx (unless
    identity), the row sums, then dx; column partials of g and g xhat into
    part[2 c] and part[2 c + 1] (dtype of x); coef: dtype scratch (chunks, 4)."""
    n = x.shape[1]
    cf = coef[c]
    cf[3] = 0.0
    zero = cf[3]  # a zero of x's dtype keeps the selects and sums in that dtype
    cb = part[2 * c]
    cg = part[2 * c + 1]
    if affine:
        for j in range(n):
            cb[j] = zero
            cg[j] = zero
    for i in range(i0, i1):
        r = x[i]
        o = dx[i]
        mu = mean[i]
        iv = invstd[i]
        if code == IDENTITY:
            g = dy[i]
        else:
            _ln_g_row_nb(dy[i], r, mu, iv, gamma, beta, affine, code, slope, o, zero)
            g = o
        s1, s2 = _ln_bwd_sums_nb(g, r, mu, iv, gamma, affine, zero)
        if affine:
            _ln_colpart_nb(g, r, mu, iv, cb, cg)
        f = np.float64(iv)
        cf[0] = f
        cf[1] = -f * s1 / n
        cf[2] = -f * s2 / n
        a = cf[0]
        c0 = cf[1]
        c1 = cf[2]
        # g may be o itself: each element is read before it is overwritten
        if affine:
            for j in range(n):
                o[j] = a * (g[j] * gamma[j]) + ((r[j] - mu) * iv * c1 + c0)
        else:
            for j in range(n):
                o[j] = a * g[j] + ((r[j] - mu) * iv * c1 + c0)


@njit(cache=True, parallel=True, error_model="numpy")
def _ln_bwd_nb(
    dy, x, mean, invstd, gamma, beta, affine, code, slope, dx, dg, db, par, part, coef
):
    """Chunks of ROW_CHUNK rows, in parallel when ``par``; then (affine) the column
    partials part (2 chunks, n) added in chunk order into dg, db (float64 sums)."""
    B, n = x.shape
    nch = (B + ROW_CHUNK - 1) // ROW_CHUNK
    args = (dy, x, mean, invstd, gamma, beta, affine, code, slope, dx, part, coef)
    if nch <= 1 or not par:
        for c in range(nch):
            _ln_bwd_rows_nb(*args, c, c * ROW_CHUNK, min(B, (c + 1) * ROW_CHUNK))
    else:
        for c in prange(nch):
            _ln_bwd_rows_nb(*args, c, c * ROW_CHUNK, min(B, (c + 1) * ROW_CHUNK))
    if affine:
        _ln_col_combine_nb(part, nch, dg, db)
    return dx


@njit(cache=True, error_model="numpy")
def _ln_col_combine_nb(part, nch, dg, db):
    """db_j = sum_c part[2 c, j], dg_j = sum_c part[2 c + 1, j], in float64 in
    chunk order (dg, db float64 scratch or outputs)."""
    n = part.shape[1]
    for j in range(n):
        db[j] = 0.0
        dg[j] = 0.0
    for c in range(nch):
        pb = part[2 * c]
        pg = part[2 * c + 1]
        for j in range(n):
            db[j] += np.float64(pb[j])
            dg[j] += np.float64(pg[j])


def _split_backward_g(dy, x, mean, invstd, gamma, beta, act, slope):
    """g = dy * act'(z) with NumPy ufuncs (the DELEGATE_BACKWARD activations)."""
    with np.errstate(invalid="ignore"):
        xhat = (x - mean[:, None]) * invstd[:, None]
    return _ln_g_numpy(dy, xhat, gamma, beta, act, slope)


def _params(x, gamma, beta):
    """(affine, gamma, beta) as the Numba kernels take them: never None (a row of x
    stands in where nothing is read; a zero bias where only beta is missing)."""
    if gamma is None:
        return False, x[0], x[0]
    return True, gamma, np.zeros_like(gamma) if beta is None else beta


def _layernorm_forward_numba(x, gamma, beta, eps, act, slope, out, mean, invstd):
    """Numba variant: fused row statistics + normalise + activation
    (DELEGATE_FORWARD activations: LayerNorm fused, then NumPy's ufunc)."""
    if act in DELEGATE_FORWARD:
        _layernorm_forward_numba(
            x, gamma, beta, eps, "identity", slope, out, mean, invstd
        )
        return _split_forward(act, slope, out)
    B, n = x.shape
    affine, ga, be = _params(x, gamma, beta)
    nt = sweep_threads(B * n, numba_threads(), COST_LN_FORWARD)
    _ln_fwd_nb(
        x,
        ga,
        be,
        affine,
        float(eps),
        ACT_CODES[act],
        float(slope),
        out,
        mean,
        invstd,
        nt > 1,
        x.dtype.type(0),
    )
    return out


def _layernorm_backward_numba(
    dy, x, mean, invstd, gamma, beta, act, slope, dx, dgamma, dbeta
):
    """Numba variant: fused activation derivative + row sums + dx, column partials
    for dgamma / dbeta."""
    if act in DELEGATE_BACKWARD:
        g = _split_backward_g(dy, x, mean, invstd, gamma, beta, act, slope)
        return _layernorm_backward_numba(
            g, x, mean, invstd, gamma, None, "identity", slope, dx, dgamma, dbeta
        )
    B, n = x.shape
    affine, ga, be = _params(x, gamma, beta)
    nt = sweep_threads(B * n, numba_threads(), COST_LN_BACKWARD)
    nch = -(-B // ROW_CHUNK)
    part = np.empty((2 * nch if affine else 2, n), x.dtype)
    coef = np.empty((nch, 4), x.dtype)
    # float64 column sums, rounded once into dgamma / dbeta
    w64 = np.empty((2, n if affine else 1))
    _ln_bwd_nb(
        dy,
        x,
        mean,
        invstd,
        ga,
        be,
        affine,
        ACT_CODES[act],
        float(slope),
        dx,
        w64[0],
        w64[1],
        nt > 1,
        part,
        coef,
    )
    if affine:
        dgamma[...] = w64[0]
        dbeta[...] = w64[1]
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- c
def _layernorm_forward_c(x, gamma, beta, eps, act, slope, out, mean, invstd):
    """C variant (idg_layernorm_forward); gamma / beta None are passed as NULL."""
    from ._c import check, fn, ptr

    if act in DELEGATE_FORWARD:
        _layernorm_forward_c(x, gamma, beta, eps, "identity", slope, out, mean, invstd)
        return _split_forward(act, slope, out)
    B, n = x.shape
    nt = sweep_threads(B * n, c_threads(), COST_LN_FORWARD)
    check(
        fn("idg_layernorm_forward", x.dtype)(
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
            nt,
        ),
        "idg_layernorm_forward",
    )
    return out


def _layernorm_backward_c(
    dy, x, mean, invstd, gamma, beta, act, slope, dx, dgamma, dbeta
):
    """C variant (idg_layernorm_backward); gamma / beta None are passed as NULL,
    and the column-partial scratch (2 chunks x n, dtype of x; 2 n doubles) from
    here, since the C core never allocates."""
    from ._c import check, fn, ptr

    if act in DELEGATE_BACKWARD:
        g = _split_backward_g(dy, x, mean, invstd, gamma, beta, act, slope)
        return _layernorm_backward_c(
            g, x, mean, invstd, gamma, None, "identity", slope, dx, dgamma, dbeta
        )
    B, n = x.shape
    nt = sweep_threads(B * n, c_threads(), COST_LN_BACKWARD)
    affine = gamma is not None
    part = np.empty((2 * -(-B // ROW_CHUNK), n), x.dtype) if affine else None
    acc = np.empty(2 * n) if affine else None
    check(
        fn("idg_layernorm_backward", x.dtype)(
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
            ptr(part),
            ptr(acc),
            nt,
        ),
        "idg_layernorm_backward",
    )
    return dx, dgamma, dbeta

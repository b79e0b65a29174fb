"""The fused passes of simulate (initdiag/kernels/fused.py) on both backends.

Each op's numpy reference and numba variant are compared with the loop references
of tests/naive.py (which share no code with either) and with each other; backward
against central finite differences of the forward.  Tolerances are error bounds
built from the dtype's eps and the magnitudes the kernel sums: inside a chunk of
``ROWS`` rows the numba passes accumulate in the working dtype (a sum of k terms
in that dtype errs by at most ~k eps times the sum of their magnitudes, Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2), a row's sum
of squares too (n terms), and everything across chunks in float64.
"""

from __future__ import annotations

import naive  # noqa: E402  (tests/ is on sys.path under pytest's rootdir layout)
import numpy as np
import pytest

import initdiag.kernels as K
from initdiag.kernels import fused

BACKENDS = ("numpy", "numba")
DTYPES = (np.float32, np.float64)
ROWS = fused._ROWS
SLOPE = 0.1
EPS64 = float(np.finfo(np.float64).eps)
# |act'| <= 1.76 (selu) and |act''| <= 2 away from the kinks, for every activation
LIP = 2.0


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def assert_within(got, ref, tol, what=""):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=what)
    fin = np.isfinite(ref)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), ref.shape)
    err = np.abs(got - ref)
    bad = fin & ~(err <= tol)
    assert not bad.any(), (
        f"{what}: max excess {np.max((err - tol)[bad]):.3e} at {np.argwhere(bad)[:3]}"
        f" got {got[bad][:3]} ref {ref[bad][:3]} tol {tol[bad][:3]}"
    )


def stats_tol(v, dtype, dv=None):
    """Bounds on |layer_stats(v + delta) - naive_layer_stats(v)| for |delta| <= dv
    elementwise (dv = 0: the kernel saw v itself): (stats (10,), colmean, colvar)."""
    v = np.asarray(v, dtype=np.float64)
    B, n = v.shape
    N = v.size
    e = eps(dtype)
    E = (ROWS + 8) * e
    dv = np.zeros_like(v) if dv is None else np.broadcast_to(dv, v.shape)
    shift = np.where(np.isfinite(v[0]), v[0], 0.0)
    d = np.abs(v - shift)
    m = v.mean(axis=0)
    tm = E * d.mean(axis=0) + e * np.abs(shift) + dv.mean(axis=0)
    tv = (
        E * (d * d).mean(axis=0)
        + 2 * d.mean(axis=0) * tm
        + tm * tm
        + (2 * np.abs(v - m) * dv + dv * dv).mean(axis=0)
    )
    amb = np.abs(v) <= dv  # entries whose sign / zero-ness rounding may change
    tol = np.zeros(10)
    tol[0] = tm.mean()
    tol[1] = (n + 8) * e * np.mean(v * v) + np.mean(2 * np.abs(v) * dv + dv * dv)
    tol[2] = tv.mean()
    tol[3] = np.mean(2 * np.abs(m) * tm + tm * tm)
    tol[4] = tol[6] = amb.sum() / N
    tol[5] = amb.any(axis=0).sum() / n
    norms = np.sqrt(np.sum(v * v, axis=1))
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    u = v * inv[:, None]
    S = u.sum(axis=0)
    dS = (E + (n + 8) * e) * np.abs(u).sum(axis=0) + np.sum(
        2 * np.sqrt(np.sum(dv * dv, axis=1)) * inv
    )
    if B > 1:
        tol[8] = np.sum(2 * np.abs(S) * dS + dS * dS) / (B * (B - 1)) + 64 * EPS64
    tol += 8 * EPS64 * np.abs(naive.naive_layer_stats(v)[0])
    return tol, tm + 8 * EPS64 * np.abs(m), tv


def data(rng, shape, dtype, scale=1.0, shift=0.0):
    return (shift + scale * rng.standard_normal(shape)).astype(dtype)


def coefficients(rng, n):
    """BatchNorm coefficients in float64 (as the fused passes take them)."""
    return (
        rng.standard_normal(n) * 0.5,
        rng.uniform(0.5, 2.0, n),
        rng.uniform(0.5, 1.5, n),
        rng.standard_normal(n) * 0.3,
    )


def unit_coefficients(rng, n, bn):
    """(mean, invstd, gamma, beta) for the references, and the same as the
    dispatcher's arguments (all None without BatchNorm: 0, 1, 1, 0)."""
    if not bn:
        return (np.zeros(n), np.ones(n), np.ones(n), np.zeros(n)), (None,) * 4
    c = coefficients(rng, n)
    return c, c


def y_tol(x, mean, invstd, gamma, beta, dtype):
    """|y_kernel - y_exact|: coefficients rounded to the dtype (3 roundings) and
    (x - mean) * s + beta evaluated in it (3 more)."""
    x = np.asarray(x, dtype=np.float64)
    s = np.abs(gamma * invstd)
    return 8 * eps(dtype) * ((np.abs(x) + np.abs(mean)) * s + np.abs(beta))


SHAPES = [(1, 1), (2, 3), (3, 1), (70, 5), (133, 4)]


# ------------------------------------------------------------------ layer_stats
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_stats_against_loops(backend, dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = data(rng, shape, dtype, scale=2.0, shift=0.7)
    x[rng.random(shape) < 0.2] = 0  # zero entries, dead columns
    if shape[1] > 2:
        x[:, 1] = -np.abs(x[:, 1])
    if shape[0] > 2:
        x[2] = 0  # a zero row counts as cosine 0
    st, cm, cv = K.layer_stats(x, column_moments=True, backend=backend)
    ref, rcm, rcv = naive.naive_layer_stats(x)
    tol, tm, tv = stats_tol(x, dtype)
    assert_within(st, ref, tol, "stats")
    assert_within(cm, rcm, tm, "colmean")
    assert_within(cv, rcv, tv, "colvar")
    if shape[0] == 1:
        assert np.isnan(st[8])
    np.testing.assert_array_equal(st[[4, 5, 6, 7, 9]], ref[[4, 5, 6, 7, 9]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_stats_numba_matches_numpy_reference(dtype):
    rng = np.random.default_rng(5)
    x = data(rng, (200, 37), dtype, shift=-0.2)
    a = K.layer_stats(x, column_moments=True, backend="numba")
    b = K.layer_stats(x, column_moments=True, backend="numpy")
    tol, tm, tv = stats_tol(x, dtype)
    for got, ref, t in zip(a, b, (tol, tm, tv), strict=True):
        assert_within(got, ref, 2 * t)


def test_layer_stats_float32_overflow_rare_path():
    """Entries near 1e19 square beyond the float32 range: the chunk (and the row
    sums of squares) are recomputed in float64, so the statistics stay finite."""
    rng = np.random.default_rng(6)
    x = data(rng, (70, 6), np.float32)
    x[3:5] *= np.float32(3e19)
    with np.errstate(over="ignore"):
        assert np.isfinite(x).all() and not np.isfinite(np.sum(x * x))
    ref, rcm, rcv = naive.naive_layer_stats(x)
    tol, tm, tv = stats_tol(x, np.float32)
    for backend in BACKENDS:
        st, cm, cv = K.layer_stats(x, column_moments=True, backend=backend)
        assert np.isfinite(st).all()
        assert st[7] == 0
        assert_within(st, ref, tol, backend)
        assert_within(cv, rcv, tv, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_stats_counts_nonfinite(backend):
    x = np.ones((9, 4), np.float32)
    x[1, 2] = np.nan
    x[5, 0] = np.inf
    x[7, 3] = -np.inf
    assert K.layer_stats(x, backend=backend)[7] == 3


# ------------------------------------------------------------------ unit_forward
UNIT_ACTS = ["relu", "identity", "tanh", "leaky_relu", "gelu", "selu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2), (70, 5)])
@pytest.mark.parametrize("act", UNIT_ACTS)
@pytest.mark.parametrize("bn", [True, False])
def test_unit_forward_against_loops(backend, dtype, shape, act, bn):
    rng = np.random.default_rng(len(act) + shape[0])
    B, n = shape
    x = data(rng, shape, dtype, shift=0.3)
    (mean, invstd, gamma, beta), args = unit_coefficients(rng, n, bn)
    h, sy, sh = K.unit_forward(
        x,
        *args,
        activation=act,
        negative_slope=SLOPE,
        record_y=bn,
        backend=backend,
    )
    assert h.dtype == dtype and h.shape == shape
    y, rh = naive.naive_unit_forward(x, mean, invstd, gamma, beta, act, SLOPE)
    ty = y_tol(x, mean, invstd, gamma, beta, dtype) if bn else np.zeros(shape)
    th = LIP * ty + 2 * eps(dtype) * np.abs(rh) + 4 * EPS64
    assert_within(h, rh, th, "h")
    if not bn and act in ("relu", "identity"):
        np.testing.assert_array_equal(h, rh.astype(dtype))  # y = x exactly
    ref_h, _, _ = naive.naive_layer_stats(h)
    assert_within(sh, ref_h, stats_tol(h, dtype)[0], "stats of h")
    if bn:
        ref_y, _, _ = naive.naive_layer_stats(y)
        assert_within(sy, ref_y, stats_tol(y, dtype, ty)[0], "stats of y")
    else:
        assert sy is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_forward_float32_overflow_rare_path(dtype):
    rng = np.random.default_rng(9)
    x = data(rng, (70, 3), dtype)
    x[10] = dtype(2e19)
    for backend in BACKENDS:
        h, _, sh = K.unit_forward(x, activation="relu", backend=backend)
        ref, _, _ = naive.naive_layer_stats(h)
        assert np.isfinite(sh).all()
        assert_within(sh, ref, stats_tol(h, dtype)[0], backend)


# ------------------------------------------------------------------ unit_backward
def backward_tol(g, x, mean, invstd, gamma, beta, act, dtype, has_bn, ref):
    """Bounds for (dx, sums, dgamma, dbeta, dxsum) against naive_unit_backward."""
    e = eps(dtype)
    E = (ROWS + 8) * e
    g = np.asarray(g, np.float64)
    B, n = g.shape
    rdx, _, rdg, rdb, _ = ref
    y, _ = naive.naive_unit_forward(x, mean, invstd, gamma, beta, act, SLOPE)
    gp = naive.naive_unit_backward(
        g, x, mean, invstd, gamma, beta, act, SLOPE, False, True
    )[0]
    ty = y_tol(x, mean, invstd, gamma, beta, dtype) if has_bn else np.zeros((B, n))
    # act' is Lipschitz (2) away from kinks; where rounding of y may cross a kink
    # (|y| <= ty) act' may jump by up to 2
    jump = np.where(np.abs(y) <= ty, 2.0, 0.0)
    tgp = np.abs(g) * (LIP * ty + jump) + 2 * e * np.abs(gp) + 4 * EPS64
    sums = np.zeros(3)
    sums[0] = (n + 8) * e * np.sum(g * g)
    sums[1] = (n + 8) * e * np.sum(gp * gp) + np.sum(2 * np.abs(gp) * tgp + tgp**2)
    if not has_bn:
        tdx = tgp
        tdg = tdb = np.zeros(n)
    else:
        xd = np.asarray(x, np.float64)
        xhat = (xd - mean) * invstd
        txh = 4 * e * (np.abs(xd) + np.abs(mean)) * invstd
        tdb = E * np.abs(gp).sum(axis=0) + tgp.sum(axis=0)
        tdg = (
            E * np.abs(gp * xhat).sum(axis=0)
            + (tgp * np.abs(xhat)).sum(axis=0)
            + (np.abs(gp) * txh).sum(axis=0)
        )
        f = np.abs(gamma * invstd)
        tdx = f * (
            tgp + tdb / B + np.abs(xhat) * tdg / B + txh * np.abs(rdg) / B
        ) + 8 * e * (f * np.abs(gp) + f * np.abs(rdb) / B + np.abs(xhat * rdg) * f / B)
    sums[2] = (n + 8) * e * np.sum(rdx * rdx) + np.sum(2 * np.abs(rdx) * tdx + tdx**2)
    tdxs = E * np.abs(rdx).sum(axis=0) + tdx.sum(axis=0)
    return tdx, sums, tdg, tdb, tdxs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2), (70, 5)])
@pytest.mark.parametrize("act", UNIT_ACTS)
@pytest.mark.parametrize("mode", ["bn", "bn_no_dx", "plain"])
def test_unit_backward_against_loops(backend, dtype, shape, act, mode):
    rng = np.random.default_rng(len(act) * 7 + shape[0])
    B, n = shape
    has_bn = mode != "plain"
    need_dx = mode != "bn_no_dx"
    x = data(rng, shape, dtype, shift=0.2)
    g = data(rng, shape, dtype)
    (mean, invstd, gamma, beta), args = unit_coefficients(rng, n, has_bn)
    got = K.unit_backward(
        g,
        x,
        *args,
        activation=act,
        negative_slope=SLOPE,
        need_dx=need_dx,
        backend=backend,
    )
    ref = naive.naive_unit_backward(
        g, x, mean, invstd, gamma, beta, act, SLOPE, has_bn, need_dx
    )
    tols = backward_tol(g, x, mean, invstd, gamma, beta, act, dtype, has_bn, ref)
    assert got[0].dtype == dtype
    for name, a, r, t in zip(
        ("dx", "sums", "dgamma", "dbeta", "dxsum"), got, ref, tols, strict=True
    ):
        assert_within(a, r, t, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["identity", "tanh", "gelu", "relu"])
def test_unit_backward_matches_finite_differences(backend, act):
    """dx, dgamma, dbeta of a BatchNorm + activation unit are the derivatives of
    sum(r * h) where the batch moments are recomputed from x (training mode)."""
    rng = np.random.default_rng(12)
    B, n = 5, 3
    x = data(rng, (B, n), np.float64)
    gamma = rng.uniform(0.5, 1.5, n)
    beta = rng.standard_normal(n) * 0.3
    r = data(rng, (B, n), np.float64)
    eps_bn = 1e-5

    def moments(x):
        return x.mean(axis=0), 1.0 / np.sqrt(x.var(axis=0) + eps_bn)

    def loss():
        m, s = moments(x)
        h, _, _ = K.unit_forward(x, m, s, gamma, beta, activation=act, backend=backend)
        return float(np.sum(r * h))

    m, s = moments(x)
    y = gamma * (x - m) * s + beta
    if act == "relu":
        assert np.abs(y).min() > 1e-3  # FD would straddle the kink otherwise
    dx, _, dgamma, dbeta, _ = K.unit_backward(
        r, x, m, s, gamma, beta, activation=act, backend=backend
    )
    step = 1e-6
    for arr, grad in ((x, dx), (gamma, dgamma), (beta, dbeta)):
        fd = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + step
            lp = loss()
            arr[idx] = old - step
            lm = loss()
            arr[idx] = old
            fd[idx] = (lp - lm) / (2 * step)
        # central difference: truncation step^2 |L'''| / 6, rounding eps |L| / step
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("has_bn", [True, False])
def test_unit_backward_float32_overflow_rare_path(has_bn):
    """Column sums of g' beyond the float32 range (64 rows of ~1e37) are summed
    again in float64; the sums of squares too."""
    rng = np.random.default_rng(13)
    B, n = 70, 3
    x = data(rng, (B, n), np.float32)
    g = (np.abs(data(rng, (B, n), np.float64)) * 1e37 + 1e37).astype(np.float32)
    assert np.isfinite(g).all()
    mean, invstd = (np.zeros(n), np.ones(n)) if has_bn else (None, None)
    ref = naive.naive_unit_backward(
        g,
        x,
        np.zeros(n),
        np.ones(n),
        np.ones(n),
        np.zeros(n),
        "identity",
        SLOPE,
        has_bn,
        False,
    )
    ga = np.abs(g.astype(np.float64))  # float64: the float32 sums would overflow
    e = (ROWS + 8) * eps(np.float32)
    for backend in BACKENDS:
        dx, sums, dgamma, dbeta, dxsum = K.unit_backward(
            g, x, mean, invstd, need_dx=False, backend=backend
        )
        np.testing.assert_array_equal(dx, g)  # identity: g' = g
        assert np.isfinite(sums[:2]).all()
        assert_within(sums[:2], ref[1][:2], e * ref[1][:2], backend)
        if has_bn:
            assert_within(dbeta, ref[3], e * ga.sum(axis=0), backend)
            xh = np.abs(x.astype(np.float64))
            assert_within(dgamma, ref[2], 2 * e * (ga * xh).sum(axis=0), backend)
        else:
            assert_within(dxsum, ref[4], e * ga.sum(axis=0), backend)
        assert np.isfinite(dbeta).all() and np.isfinite(dxsum).all()


# ------------------------------------------------------------------ gram, gram_dot
def stored(G, layout):
    """Mask of the entries a Gram in ``layout`` defines."""
    w = fused._gram_weights(G.shape[0], layout)
    return w > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2, 3, 130])
def test_gram_and_gram_dot_against_loops(backend, dtype, B):
    rng = np.random.default_rng(B)
    n = 7
    a = data(rng, (B, n), dtype)
    c = data(rng, (B, n), dtype)
    layout = K.gram_layout(B, backend=backend)
    assert layout == (0 if backend == "numpy" or B < 128 else -1)
    Ga = K.gram(a, backend=backend)
    Gc = K.gram(c, backend=backend)
    ref = naive.naive_gram(a)
    mask = stored(Ga, layout)
    tol = (n + 2) * eps(dtype) * naive.naive_gram(np.abs(a))
    assert_within(Ga[mask], ref[mask], tol[mask])
    s, t = K.gram_dot(Ga, Gc, backend=backend)
    rs, rt = naive.naive_gram_dot(ref, naive.naive_gram(c))
    # each Gram entry errs by (n + 2) eps of its magnitudes; the row pieces are
    # summed in the dtype (B terms), rows in float64
    mag = naive.naive_gram(np.abs(a)) * naive.naive_gram(np.abs(c))
    tol_s = (2 * (n + 2) + B + 4) * eps(dtype) * mag.sum()
    assert abs(s - rs) <= tol_s
    assert abs(t - rt) <= (n + 2 + B) * eps(dtype) * np.sum(a.astype(float) ** 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_blocked_layout_without_syrk(dtype, monkeypatch):
    """Without SciPy's BLAS table the numba gram writes the lower block triangle;
    gram_dot reads exactly those entries (and the numpy reference agrees)."""
    monkeypatch.setitem(fused._SYRK, "loaded", True)
    monkeypatch.setitem(fused._SYRK, "fns", {})
    rng = np.random.default_rng(2)
    B, n = 131, 5
    a = data(rng, (B, n), dtype)
    c = data(rng, (B, n), dtype)
    h = K.gram_layout(B, backend="numba")
    assert h == B // 2
    Ga, Gc = K.gram(a, backend="numba"), K.gram(c, backend="numba")
    ref_a, ref_c = naive.naive_gram(a), naive.naive_gram(c)
    mask = stored(Ga, h)
    tol = (n + 2) * eps(dtype) * naive.naive_gram(np.abs(a))
    assert_within(Ga[mask], ref_a[mask], tol[mask])
    s, t = K.gram_dot(Ga, Gc, backend="numba")
    s_np, t_np = K.gram_dot(Ga, Gc, layout=h, backend="numpy")
    rs, _ = naive.naive_gram_dot(ref_a, ref_c)
    mag = (naive.naive_gram(np.abs(a)) * naive.naive_gram(np.abs(c))).sum()
    assert abs(s - rs) <= (2 * (n + 2) + B + 4) * eps(dtype) * mag
    assert abs(s_np - rs) <= (2 * (n + 2) + 4) * eps(dtype) * mag
    assert t == pytest.approx(t_np, rel=(B + 4) * eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_gram_parts_write_the_gram_layout(dtype, parts):
    """The Gram cut into tasks (one seed on several threads) writes the entries
    the serial gram's layout defines, each within rounding of the loop Gram, and
    the same bits whatever order (or thread) the tasks run in."""
    if not fused._syrk_functions():
        pytest.skip("SciPy's Cython BLAS table is not reachable")
    rng = np.random.default_rng(parts)
    B, n = 131, 9  # 131: blocks of unequal rows
    a = data(rng, (B, n), dtype)
    layout = fused.gram_layout(B)
    assert layout == -1
    tasks = fused.gram_parts(a, np.full((B, B), np.nan, dtype), parts)
    assert len(tasks) == parts
    mask = stored(a[:, :1] * a[:, :1].T, layout)
    ref = naive.naive_gram(a)
    tol = (n + 2) * eps(dtype) * naive.naive_gram(np.abs(a))
    got = []
    for order in (list(range(parts)), list(range(parts))[::-1]):
        out = np.full((B, B), np.nan, dtype)
        for k in order:
            fused.gram_parts(a, out, parts)[k]()
        assert not np.isnan(out[mask]).any()
        assert_within(out[mask], ref[mask], tol[mask])
        got.append(out[mask])
    assert np.array_equal(got[0], got[1])


def test_gram_dot_float32_overflow_rare_path():
    """Products of float32 Gram entries near 1e20 overflow the dtype: that row
    piece is summed again in float64."""
    rng = np.random.default_rng(3)
    B = 4
    a = (data(rng, (B, B), np.float64) * 1e20).astype(np.float32)
    a = (a + a.T) / 2
    ref = naive.naive_gram_dot(a, a)
    for backend in BACKENDS:
        s, t = K.gram_dot(a, a, layout=0, backend=backend)
        assert np.isfinite(s)
        assert abs(s - ref[0]) <= (B + 4) * eps(np.float32) * ref[0]
        assert t == pytest.approx(ref[1], rel=B * eps(np.float32))


# ------------------------------------------------------------------ entry, errors
def test_resolve_returns_the_registered_raw_kernels():
    from initdiag.kernels import _registry

    for backend in BACKENDS:
        k = fused.resolve(backend)
        for op in _registry.FUSED_OPS:
            assert getattr(k, op) is _registry.resolve(op, backend)
        assert k.gram_layout(200) == K.gram_layout(200, backend=backend)
    with pytest.raises(ValueError, match="numpy"):
        fused.resolve("c")


@pytest.mark.parametrize("backend", ["c", "cuda"])
def test_fused_ops_have_no_c_or_cuda_variant(backend):
    x = np.ones((4, 3))
    if not K.available_backends()[backend]["available"]:
        pytest.skip(f"{backend} unavailable")
    for call in (
        lambda: K.layer_stats(x, backend=backend),
        lambda: K.unit_forward(x, backend=backend),
        lambda: K.unit_backward(x, x, backend=backend),
        lambda: K.gram(x, backend=backend),
        lambda: K.gram_dot(np.eye(3), np.eye(3), backend=backend),
    ):
        with pytest.raises(K.BackendUnavailableError, match="numpy"):
            call()


def test_fused_dispatchers_validate():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        K.layer_stats(x.astype(np.int32))
    with pytest.raises(ValueError, match="shape"):
        K.unit_forward(x, np.zeros(4))
    with pytest.raises(ValueError, match="both"):
        K.unit_backward(x, x, np.zeros(3))
    with pytest.raises(TypeError, match="dtype"):
        K.unit_backward(x, x.astype(np.float64))
    with pytest.raises(ValueError, match="overlap"):
        K.unit_backward(x, x, out=(x, None, None, None, None))
    with pytest.raises(ValueError, match="record_y"):
        K.unit_forward(x, out=(None, np.empty(10), None))
    with pytest.raises(ValueError, match="layout"):
        K.gram_dot(np.eye(3), np.eye(3), layout=7)
    with pytest.raises(ValueError, match="shape"):
        K.gram_dot(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="unknown activation"):
        K.unit_forward(x, activation="swish")

"""CPU kernels (numpy, numba, c) against the loop references of tests/naive.py.

Tolerances are derived from the dtype's machine epsilon and the length of the
reduction involved, using elementwise error bounds computed from absolute values
(e.g. |x| @ |w|.T for a GEMM) where that is possible.  Backward kernels are also
checked against central finite differences of the forward (float64).  Shapes stay
tiny so the file runs in seconds once Numba's cache is warm; only C-contiguous
float32 / float64 arrays ever reach the Numba kernels, which keeps the number of
compiled signatures at two per kernel.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import initdiag.kernels as K
from initdiag.kernels import stats as kstats

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import naive  # noqa: E402

CPU = [b for b in ("numpy", "numba", "c") if K.available_backends()[b]["available"]]
DTYPES = [np.float32, np.float64]
ACTS = list(K.ACTIVATIONS)
# |act'| <= 1.76 (selu: scale * alpha) for every activation: a Lipschitz bound
LIP = 2.0
# a few ulp per operation of a short formula (transcendental + a handful of flops)
C_ELEM = 32.0

HSET = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def assert_within(got, ref, atol, what=""):
    """|got - ref| <= atol elementwise; NaN / inf must sit at the same places."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=f"{what}: finiteness")
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)], err_msg=what)
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), ref.shape)
    err = np.abs(got - ref)[fin]
    bad = err > atol[fin]
    assert not bad.any(), (
        f"{what}: max error {err.max():.3e}, tolerance there "
        f"{atol[fin][np.argmax(err - atol[fin])]:.3e}"
    )


def rand(rng, shape, dtype, scale=1.0, shift=0.0):
    return (shift + scale * rng.standard_normal(shape)).astype(dtype)


def act_tol(x, dtype, extra=1.0):
    """Tolerance of one activation evaluation: relative + absolute ulp multiples."""
    return C_ELEM * eps(dtype) * (np.abs(x) * LIP + 1.0) * extra


# ------------------------------------------------------------------ activation
@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_activation_forward_backward(backend, dtype, act):
    rng = np.random.default_rng(1)
    x = rand(rng, (7, 5), dtype, scale=3.0)
    x[0, :3] = [0.0, -0.0, 40.0]
    dy = rand(rng, (7, 5), dtype)
    y = K.activation_forward(x, act, negative_slope=0.2, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    ref = naive.naive_activation_forward(x, act, 0.2)
    assert_within(y, ref, act_tol(ref, dtype), f"{act} fwd")
    g = K.activation_backward(dy, x, act, negative_slope=0.2, backend=backend)
    refg = naive.naive_activation_backward(dy, x, act, 0.2)
    assert_within(g, refg, act_tol(refg, dtype) + act_tol(dy, dtype), f"{act} bwd")


@pytest.mark.parametrize("backend", CPU)
def test_activation_forward_in_place_and_out(backend):
    rng = np.random.default_rng(2)
    x = rand(rng, (4, 6), np.float64)
    ref = naive.naive_activation_forward(x, "tanh")
    out = np.empty_like(x)
    assert K.activation_forward(x, "tanh", backend=backend, out=out) is out
    assert_within(out, ref, act_tol(ref, np.float64))
    K.activation_forward(x, "tanh", backend=backend, out=x)
    assert_within(x, ref, act_tol(ref, np.float64))


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("act", ACTS)
def test_activation_backward_matches_finite_differences(backend, act):
    rng = np.random.default_rng(3)
    x = rand(rng, (3, 4), np.float64, scale=2.0)
    x[np.abs(x) < 1e-2] = 0.5  # keep relu / leaky_relu away from their kink
    dy = rand(rng, (3, 4), np.float64)
    h = 1e-6
    fd = (
        K.activation_forward(x + h, act, negative_slope=0.1, backend=backend)
        - K.activation_forward(x - h, act, negative_slope=0.1, backend=backend)
    ) / (2 * h)
    g = K.activation_backward(dy, x, act, negative_slope=0.1, backend=backend)
    # central difference: truncation h^2 |f'''| / 6 + rounding eps |f| / h
    np.testing.assert_allclose(g, dy * fd, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ dense
@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu", "identity", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_forward(backend, dtype, act, bias):
    rng = np.random.default_rng(4)
    B, n_in, n_out = 5, 9, 3
    x = rand(rng, (B, n_in), dtype)
    w = rand(rng, (n_out, n_in), dtype)
    b = rand(rng, (n_out,), dtype) if bias else None
    y, pre = K.dense_forward(x, w, b, act, return_preactivation=True, backend=backend)
    ry, rpre = naive.naive_dense_forward(x, w, b, act)
    # GEMM error bound: n_in eps (|x| @ |w|.T + |b|)
    bound = np.abs(x.astype(float)) @ np.abs(w.astype(float)).T
    if bias:
        bound = bound + np.abs(b)
    tpre = 2 * (n_in + 1) * eps(dtype) * bound
    assert_within(pre, rpre, tpre, "pre")
    assert_within(y, ry, LIP * tpre + act_tol(ry, dtype), "out")
    y2 = K.dense_forward(x, w, b, act, backend=backend)
    assert_within(y2, ry, LIP * tpre + act_tol(ry, dtype), "out (no pre)")
    out = np.empty_like(y)
    assert K.dense_forward(x, w, b, act, backend=backend, out=out) is out


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_backward(backend, dtype, bias):
    rng = np.random.default_rng(5)
    B, n_in, n_out = 6, 4, 7
    dy = rand(rng, (B, n_out), dtype)
    x = rand(rng, (B, n_in), dtype)
    w = rand(rng, (n_out, n_in), dtype)
    dx, dw, db = K.dense_backward(dy, x, w, bias=bias, backend=backend)
    rdx, rdw, rdb = naive.naive_dense_backward(dy, x, w, bias)
    a = lambda v: np.abs(v.astype(float))  # noqa: E731
    e = eps(dtype)
    assert_within(dx, rdx, 2 * n_out * e * (a(dy) @ a(w)), "dx")
    assert_within(dw, rdw, 2 * B * e * (a(dy).T @ a(x)), "dw")
    if bias:
        assert_within(db, rdb, 2 * B * e * a(dy).sum(0), "db")
    else:
        assert db is None


@pytest.mark.parametrize("backend", CPU)
def test_dense_backward_matches_finite_differences(backend):
    rng = np.random.default_rng(6)
    B, n_in, n_out = 3, 4, 2
    x = rand(rng, (B, n_in), np.float64)
    w = rand(rng, (n_out, n_in), np.float64)
    b = rand(rng, (n_out,), np.float64)
    dy = rand(rng, (B, n_out), np.float64)

    def loss(x_, w_, b_):
        _, pre = K.dense_forward(x_, w_, b_, return_preactivation=True, backend=backend)
        return float(np.sum(dy * pre))

    dx, dw, db = K.dense_backward(dy, x, w, backend=backend)
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        fd = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + 1e-5
            lp = loss(x, w, b)
            arr[idx] = old - 1e-5
            lm = loss(x, w, b)
            arr[idx] = old
            fd[idx] = (lp - lm) / 2e-5
        np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------------ batchnorm
def bn_forward_tol(x, gamma, beta, mean, invstd, dtype, B):
    """Bound on the fused BN forward error: the float rounding of x - mean, of the
    saved (dtype) mean / invstd and of the float64 statistics, times |gamma| invstd,
    through an activation of Lipschitz constant LIP."""
    x = np.abs(x.astype(float))
    g = np.abs(gamma.astype(float)) * invstd
    z = g * (x + np.abs(mean)) + np.abs(beta.astype(float))
    return (
        LIP
        * C_ELEM
        * eps(dtype)
        * (z + 1.0)
        * (1 + B * np.finfo(float).eps / eps(dtype))
    )


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_batchnorm_forward_backward(backend, dtype, act):
    rng = np.random.default_rng(7)
    B, n = 6, 5
    x = rand(rng, (B, n), dtype, scale=2.0, shift=1.5)
    gamma = rand(rng, (n,), dtype, shift=1.0)
    beta = rand(rng, (n,), dtype)
    dy = rand(rng, (B, n), dtype)
    y, mean, invstd = K.batchnorm_forward(
        x, gamma, beta, 1e-3, activation=act, negative_slope=0.1, backend=backend
    )
    ry, rmean, rinv = naive.naive_batchnorm_forward(x, gamma, beta, 1e-3, act, 0.1)
    e = eps(dtype)
    assert_within(mean, rmean, 4 * e * (np.abs(x.astype(float)).max(0) + 1), "mean")
    assert_within(invstd, rinv, 4 * B * e * rinv, "invstd")
    assert_within(y, ry, bn_forward_tol(x, gamma, beta, rmean, rinv, dtype, B), "out")

    dx, dgamma, dbeta = K.batchnorm_backward(
        dy,
        x,
        (mean, invstd),
        gamma,
        beta,
        activation=act,
        negative_slope=0.1,
        backend=backend,
    )
    rdx, rdg, rdb = naive.naive_batchnorm_backward(
        dy, x, mean, invstd, gamma, beta, act, 0.1
    )
    # g = dy act'(z) is O(|dy|), xhat = O(1): reductions of B terms, and dx adds
    # three such terms scaled by |gamma| invstd
    gmax = np.abs(dy.astype(float)).max(0) * LIP
    xh = np.abs((x - mean).astype(float) * invstd).max(0) + 1
    cond = 1 + (np.abs(x.astype(float)).max(0) + np.abs(mean)) * invstd
    red = C_ELEM * B * e * gmax * xh * cond
    assert_within(dbeta, rdb, red, "dbeta")
    assert_within(dgamma, rdg, red * xh, "dgamma")
    assert_within(dx, rdx, 3 * np.abs(gamma) * invstd * red * xh, "dx")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("act", ["identity", "tanh", "gelu", "relu"])
def test_batchnorm_backward_matches_finite_differences(backend, act):
    rng = np.random.default_rng(8)
    B, n = 4, 3
    x = rand(rng, (B, n), np.float64)
    gamma = rand(rng, (n,), np.float64, shift=1.0)
    beta = rand(rng, (n,), np.float64, scale=0.3)
    dy = rand(rng, (B, n), np.float64)

    def loss():
        y, _, _ = K.batchnorm_forward(
            x, gamma, beta, 1e-5, activation=act, backend=backend
        )
        return float(np.sum(dy * y))

    _, mean, invstd = K.batchnorm_forward(x, gamma, beta, 1e-5, backend=backend)
    z = gamma * (x - mean) * invstd + beta
    if act == "relu":
        assert np.abs(z).min() > 1e-3  # FD would straddle the kink otherwise
    grads = K.batchnorm_backward(
        dy, x, (mean, invstd), gamma, beta, activation=act, backend=backend
    )
    h = 1e-6
    for arr, grad in zip((x, gamma, beta), grads, strict=False):
        fd = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            lp = loss()
            arr[idx] = old - h
            lm = loss()
            arr[idx] = old
            fd[idx] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU)
def test_batchnorm_batch_of_one_and_beta_none(backend):
    x = np.array([[3.0, -2.0, 0.0]])
    gamma = np.ones(3)
    beta = np.array([0.5, -1.0, 2.0])
    y, mean, invstd = K.batchnorm_forward(x, gamma, beta, 1e-5, backend=backend)
    np.testing.assert_array_equal(mean, x[0])
    np.testing.assert_allclose(invstd, 1 / np.sqrt(1e-5))
    np.testing.assert_array_equal(y, beta[None, :])
    dy = np.ones_like(x)
    dx, dg, db = K.batchnorm_backward(dy, x, (mean, invstd), gamma, backend=backend)
    rdx, rdg, rdb = naive.naive_batchnorm_backward(dy, x, mean, invstd, gamma, None)
    np.testing.assert_allclose(dx, rdx, atol=1e-12)
    np.testing.assert_allclose(db, rdb)


# ------------------------------------------------------------------ statistics
def stats_tol(x, dtype):
    """Column statistics of B values, summed in the dtype over blocks of rows and
    in float64 across blocks: B eps(dtype) relative to max |x|."""
    B = x.shape[0]
    s = np.abs(x.astype(float)).max(0) + 1e-300
    e = eps(dtype)
    return 8 * B * e * s, 8 * B * e * s * s


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_stats_and_layer_summary(backend, dtype):
    rng = np.random.default_rng(9)
    x = rand(rng, (9, 300), dtype, shift=0.3)  # 300 > one 256-column block
    x[:, 5] = 0.0  # dead and all-zero feature
    x[:, 7] = -np.abs(x[:, 7])  # dead feature
    x[2, 11] = 0.0
    mean, var, le0, eq0 = K.column_stats(x, backend=backend)
    rmean, rvar, rle0, req0 = naive.naive_column_stats(x)
    tm, tv = stats_tol(x, dtype)
    for got in (mean, var, le0, eq0):
        assert got.dtype == np.float64 and got.shape == (300,)
    assert_within(mean, rmean, tm, "mean")
    assert_within(var, rvar, tv, "var")
    np.testing.assert_allclose(le0, rle0, rtol=1e-14)
    np.testing.assert_allclose(eq0, req0, rtol=1e-14)

    s = K.layer_summary_array(x, backend=backend)
    r = naive.naive_layer_summary(x)
    assert_within(s[:4], r[:4], [tm.max(), tv.max(), tv.max(), tv.max()], "moments")
    np.testing.assert_allclose(s[4:], r[4:], rtol=1e-14)
    d = K.layer_summary(x, backend=backend)
    assert tuple(d) == kstats.SUMMARY_FIELDS and d["nonfinite_count"] == 0.0
    out = np.empty(8)
    assert K.layer_summary_array(x, out, backend=backend) is out


@pytest.mark.parametrize("backend", CPU)
def test_column_stats_variance_is_stable_under_a_large_offset(backend):
    # E[x^2] - E[x]^2 would lose every digit here; shifted sums keep them
    rng = np.random.default_rng(10)
    x = 1e8 + rng.standard_normal((50, 3))
    _, var, _, _ = K.column_stats(x, backend=backend)
    _, rvar, _, _ = naive.naive_column_stats(x)
    np.testing.assert_allclose(var, rvar, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU)
def test_float32_column_stats_are_stable_under_an_offset(backend):
    # float32 sums run in float32 per row block: the shift by the first row keeps
    # the variance of 1e4 + N(0, 1) to float32 accuracy (E[x^2] - E[x]^2 in float32
    # would have no correct digit); 300 rows span several row blocks
    rng = np.random.default_rng(15)
    x = (1e4 + rng.standard_normal((300, 40))).astype(np.float32)
    mean, var, _, _ = K.column_stats(x, backend=backend)
    rmean, rvar, _, _ = naive.naive_column_stats(x)
    np.testing.assert_allclose(var, rvar, rtol=1e-5)
    np.testing.assert_allclose(mean, rmean, rtol=1e-7)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_correlation(backend, dtype):
    rng = np.random.default_rng(11)
    x = rand(rng, (7, 300), dtype, shift=0.5)
    x[3] = 0.0  # zero row: cosine 0 with everything
    c = K.row_correlation(x, backend=backend)
    rc = naive.naive_row_correlation(x)
    assert abs(c - rc) <= 64 * 300 * np.finfo(float).eps * 7
    c2, G = K.row_correlation(x, gram=True, backend=backend)
    _, rG = naive.naive_row_correlation(x, gram=True)
    assert c2 == c
    np.testing.assert_allclose(G, rG, atol=1e-6 if dtype == np.float32 else 1e-12)
    assert np.isnan(K.row_correlation(x[:1], backend=backend))


# ------------------------------------------------------------------ hypothesis
def _arrays(dtype, max_b=6, max_n=7, elements=None):
    shape = st.tuples(st.integers(1, max_b), st.integers(1, max_n))
    if elements is None:
        elements = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    return hnp.arrays(dtype, shape, elements=elements)


_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30])
_WILD = st.one_of(st.floats(-1e6, 1e6, allow_nan=False, width=32), _SPECIAL)


@HSET
@given(data=st.data())
@pytest.mark.parametrize("backend", CPU)
def test_hypothesis_activations_shapes_and_specials(backend, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    x = data.draw(_arrays(dtype, elements=_WILD))
    act = data.draw(st.sampled_from(ACTS))
    layout = data.draw(st.sampled_from(["C", "F", "strided"]))
    xin = {
        "C": x,
        "F": np.asfortranarray(x),
        "strided": np.repeat(x, 2, axis=1)[:, ::2],
    }[layout]
    y = K.activation_forward(xin, act, backend=backend)
    ref = naive.naive_activation_forward(x, act)
    with np.errstate(all="ignore"):
        # the value of act at a float that overflows is inf in both; near
        # overflow thresholds the float32 and float64 paths may round differently
        tol = act_tol(np.where(np.isfinite(ref), ref, 0), dtype)
    ref32 = ref.astype(dtype).astype(float)  # what the dtype can represent
    assert_within(y, ref32, tol + np.abs(ref32 - np.where(np.isfinite(ref), ref, 0)))
    g = K.activation_backward(np.ones_like(xin), xin, act, backend=backend)
    rg = naive.naive_activation_backward(np.ones_like(x), x, act).astype(dtype)
    assert_within(g, rg, act_tol(np.where(np.isfinite(rg), rg, 0), dtype))
    np.testing.assert_array_equal(xin, {"C": x, "F": x, "strided": x}[layout])


@HSET
@given(data=st.data())
@pytest.mark.parametrize("backend", CPU)
def test_hypothesis_statistics(backend, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    x = data.draw(_arrays(dtype, max_b=8, max_n=9, elements=_WILD))
    if data.draw(st.booleans()):
        x = np.asfortranarray(x)
    B, n = x.shape
    s = K.layer_summary_array(x, backend=backend)
    r = naive.naive_layer_summary(x)
    # counts are exact; moments are finite exactly when the reference is
    np.testing.assert_allclose(s[4:], r[4:], rtol=1e-14)
    assert s[7] == np.count_nonzero(~np.isfinite(x))
    np.testing.assert_array_equal(np.isfinite(s[:4]), np.isfinite(r[:4]))
    with np.errstate(all="ignore"):
        big = np.where(np.isfinite(x), np.abs(x.astype(float)), 0).max()
    tol = 16 * B * eps(dtype) * np.array([big + 1, big**2 + 1, big**2 + 1, big**2 + 1])
    fin = np.isfinite(r[:4])
    assert np.all(np.abs(s[:4] - r[:4])[fin] <= tol[fin])
    mean, var, le0, eq0 = K.column_stats(x, backend=backend)
    rm, rv, rle, req = naive.naive_column_stats(x)
    np.testing.assert_allclose(le0, rle, rtol=1e-14)
    np.testing.assert_allclose(eq0, req, rtol=1e-14)
    np.testing.assert_array_equal(np.isfinite(mean), np.isfinite(rm))
    np.testing.assert_array_equal(np.isfinite(var), np.isfinite(rv))
    c = K.row_correlation(x, backend=backend)
    rc = naive.naive_row_correlation(x)
    assert np.isnan(c) == np.isnan(rc)
    if np.isfinite(rc):
        assert abs(c - rc) <= 64 * n * B * np.finfo(float).eps


@HSET
@given(data=st.data())
@pytest.mark.parametrize("backend", CPU)
def test_hypothesis_dense_and_batchnorm(backend, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    el = st.floats(-1024, 1024, allow_nan=False, width=32)
    x = data.draw(_arrays(dtype, max_b=6, max_n=6, elements=el))
    B, n = x.shape
    n_out = data.draw(st.integers(1, 5))
    w = data.draw(hnp.arrays(dtype, (n_out, n), elements=el))
    if data.draw(st.booleans()):
        w = np.asfortranarray(w)
    act = data.draw(st.sampled_from(["identity", "tanh", "silu", "selu", "leaky_relu"]))
    y, pre = K.dense_forward(
        x, w, None, act, return_preactivation=True, backend=backend
    )
    _, rpre = naive.naive_dense_forward(x, w, None, act)
    bound = np.abs(x.astype(float)) @ np.abs(w.astype(float)).T
    # + n * tiny: products that underflow to subnormals (BLAS may flush them)
    tiny = float(np.finfo(dtype).tiny)
    assert_within(pre, rpre, 2 * (n + 1) * eps(dtype) * bound + n * tiny)
    gamma = data.draw(hnp.arrays(dtype, (n,), elements=st.floats(0.125, 10, width=32)))
    beta = data.draw(hnp.arrays(dtype, (n,), elements=st.floats(-5, 5, width=32)))
    xb = np.asfortranarray(x) if data.draw(st.booleans()) else x
    yb, mean, invstd = K.batchnorm_forward(
        xb, gamma, beta, 1e-3, activation=act, backend=backend
    )
    ry, rmean, rinv = naive.naive_batchnorm_forward(x, gamma, beta, 1e-3, act)
    assert_within(yb, ry, bn_forward_tol(x, gamma, beta, rmean, rinv, dtype, B))


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate_through_fused_kernels(backend, dtype):
    rng = np.random.default_rng(12)
    x = rand(rng, (5, 4), dtype)
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    w = rand(rng, (3, 4), dtype)
    y = K.dense_forward(x, w, np.zeros(3, dtype), "relu", backend=backend)
    assert not np.isfinite(y[1]).any() or np.isnan(y[1]).any()
    gamma, beta = np.ones(4, dtype), np.zeros(4, dtype)
    yb, mean, invstd = K.batchnorm_forward(
        x, gamma, beta, activation="tanh", backend=backend
    )
    ry, _, _ = naive.naive_batchnorm_forward(x, gamma, beta, 1e-5, "tanh")
    np.testing.assert_array_equal(np.isnan(yb), np.isnan(ry))
    dx, dg, db = K.batchnorm_backward(
        np.ones_like(x),
        x,
        (mean, invstd),
        gamma,
        beta,
        activation="tanh",
        backend=backend,
    )
    assert np.isnan(dx[:, 2]).all() and np.isnan(dx[:, 0]).all()
    assert np.isfinite(dx[:, [1, 3]]).all()


# ------------------------------------------------------------------ dispatch
def test_available_backends_reports_every_backend():
    info = K.available_backends()
    assert set(info) == {"numpy", "numba", "c", "cuda"}
    for name, entry in info.items():
        assert isinstance(entry["available"], bool)
        if not entry["available"]:  # an available one may carry a note
            assert isinstance(entry["reason"], str) and entry["reason"], name
    assert info["numpy"]["available"]
    assert sum(e["auto"] for e in info.values()) == 1
    assert not info["c"]["auto"] and not info["cuda"]["auto"]


def test_backend_resolution_order(monkeypatch):
    monkeypatch.delenv("INITDIAG_BACKEND", raising=False)
    assert K.get_backend() == (
        "numba" if K.available_backends()["numba"]["available"] else "numpy"
    )
    monkeypatch.setenv("INITDIAG_BACKEND", "numpy")
    assert K.get_backend() == "numpy"
    try:
        K.set_backend("auto")
        assert K.get_backend() in ("numba", "numpy")
    finally:
        K.set_backend(None)
    monkeypatch.setenv("INITDIAG_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        K.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        K.column_stats(np.ones((2, 2)), backend="fortran")


def test_unavailable_backend_raises_without_fallback(monkeypatch):
    import initdiag.kernels._threading as thr

    monkeypatch.setattr(thr, "NUMBA_IMPORT_ERROR", "numba cannot be imported (test)")
    with pytest.raises(K.BackendUnavailableError, match="numba cannot be imported"):
        K.layer_summary(np.ones((2, 2)), backend="numba")
    assert K.get_backend() == "numpy"  # auto skips an unavailable numba
    if not K.available_backends()["cuda"]["available"]:
        with pytest.raises(K.BackendUnavailableError, match="cuda"):
            K.activation_forward(np.ones((2, 2)), "relu", backend="cuda")


def test_validation_errors():
    x = np.ones((3, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        K.activation_forward(np.ones((3, 4), dtype=np.int64), "relu")
    with pytest.raises(TypeError, match="share the dtype"):
        K.dense_forward(x, np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="must have shape"):
        K.dense_forward(x, np.ones((2, 4)), np.ones(3))
    with pytest.raises(ValueError, match=r"\(n_out, 4\)"):
        K.dense_forward(x, np.ones((2, 5)))
    with pytest.raises(ValueError, match="2-D"):
        K.column_stats(np.ones(4))
    with pytest.raises(ValueError, match=">= 1"):
        K.layer_summary(np.ones((0, 4)))
    with pytest.raises(ValueError, match="unknown activation"):
        K.activation_forward(x, "swish")
    with pytest.raises(TypeError, match="NumPy array"):
        K.activation_forward([[1.0]], "relu")
    with pytest.raises(ValueError, match="eps"):
        K.batchnorm_forward(x, np.ones(4), np.ones(4), eps=-1.0)
    with pytest.raises(TypeError, match="saved"):
        K.batchnorm_backward(x, x, None, np.ones(4))
    with pytest.raises(TypeError, match="C-contiguous"):
        K.activation_forward(x, "relu", out=np.empty((4, 3)).T)


def test_activation_spec_objects_are_accepted():
    from initdiag.network import LeakyReLU

    x = np.array([[-2.0, 3.0]])
    y = K.activation_forward(x, LeakyReLU(0.25), backend="numpy")
    np.testing.assert_array_equal(y, [[-0.5, 3.0]])


@pytest.mark.parametrize("backend", [b for b in CPU if b != "numpy"])
def test_parallel_and_serial_sweeps_agree(backend, monkeypatch):
    # at test sizes the row-sweep kernels run serially (sweep_threads); force the
    # parallel branches (several column blocks, and row chunks for activations) and
    # compare: column blocks are independent, so results must be identical
    from initdiag.kernels import _threading

    rng = np.random.default_rng(16)
    x = rand(rng, (37, 2100), np.float32)  # 2100 columns: three blocks of <= 1024
    dy = rand(rng, (37, 2100), np.float32)
    gamma = rand(rng, (2100,), np.float32, shift=1.0)
    beta = rand(rng, (2100,), np.float32)
    w = rand(rng, (40, 2100), np.float32)

    def run():
        y, m, s = K.batchnorm_forward(
            x, gamma, beta, activation="relu", backend=backend
        )
        grads = K.batchnorm_backward(
            dy, x, (m, s), gamma, beta, activation="relu", backend=backend
        )
        return [
            y,
            m,
            s,
            *grads,
            *K.column_stats(x, backend=backend),
            K.layer_summary_array(x, backend=backend),
            K.row_correlation(x, backend=backend),
            K.activation_forward(x, "gelu", backend=backend),
            K.activation_backward(dy, x, "relu", backend=backend),
            K.dense_forward(x, w, None, "relu", backend=backend),
        ]

    serial = run()
    monkeypatch.setattr(_threading, "PAR_MIN_PASSIVE", 1)
    monkeypatch.setattr(_threading, "PAR_MIN_ACTIVE", 1)
    assert _threading.sweep_threads(37 * 2100, 2) == 2
    for got, want in zip(run(), serial, strict=True):
        if backend == "c" and np.size(got) == 8:
            # layer_summary: the C core's OpenMP reduction adds the per-thread
            # partials in its own order (last-bit differences in float64)
            np.testing.assert_allclose(got, want, rtol=4 * np.finfo(float).eps)
        else:
            np.testing.assert_array_equal(got, want)


def test_kernels_are_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(13)
    xs = [rand(rng, (64, 300), np.float32) for _ in range(8)]
    refs = [K.layer_summary_array(x, backend="numpy") for x in xs]
    for backend in CPU:
        # the same backend, one call at a time: concurrent calls must match exactly
        serial = [K.layer_summary_array(x, backend=backend) for x in xs]
        with ThreadPoolExecutor(4) as pool:
            got = list(
                pool.map(lambda x, b=backend: K.layer_summary_array(x, backend=b), xs)
            )
        for g, one, r in zip(got, serial, refs, strict=True):
            np.testing.assert_array_equal(g, one)
            np.testing.assert_allclose(g, r, rtol=64 * eps(np.float32), atol=1e-12)


def test_workqueue_layer_serialises_numba_calls(monkeypatch):
    import numba

    from initdiag.kernels import _threading

    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    assert _threading.numba_serialize() is _threading.NUMBA_LOCK
    monkeypatch.setattr(numba, "threading_layer", lambda: "omp")
    assert _threading.numba_serialize() is not _threading.NUMBA_LOCK
    info = _threading.report()
    assert info["numba_threading_layer"] == "omp"


@pytest.mark.parametrize("backend", CPU)
def test_read_only_inputs_are_accepted(backend):
    rng = np.random.default_rng(14)
    x = rand(rng, (5, 6), np.float32)
    w = rand(rng, (3, 6), np.float32)
    for a in (x, w):
        a.flags.writeable = False
    y = K.dense_forward(x, w, None, "relu", backend=backend)
    ry, _ = naive.naive_dense_forward(x, w, None, "relu")
    bound = np.abs(x.astype(float)) @ np.abs(w.astype(float)).T
    assert_within(y, ry, 2 * 7 * eps(np.float32) * bound)
    np.testing.assert_allclose(
        K.layer_summary_array(x, backend=backend),
        naive.naive_layer_summary(x),
        rtol=64 * eps(np.float32),
        atol=1e-12,
    )

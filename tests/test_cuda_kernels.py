"""The numba.cuda kernels against the loop references of tests/naive.py.

Runs under numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1
before numba is imported), or on a real GPU when one is present.  Launch settings are
patched small (8 threads a block, 4 x 4 GEMM tiles, 4-column reductions, at most 2
blocks a grid dimension), so multi-block, partial-tile and grid-stride paths all run
on tiny shapes.

Tolerances come from the dtype.  Each check is |got - ref| <= 8 eps (|ref| + scale)
with eps the unit roundoff of the arithmetic that produced the result and ``scale``
the magnitude of the terms it was computed from (for a length-K sum in the array
dtype, K times the sum of absolute products: the gamma_K bound of Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 3.1).  Statistics
accumulated in float64 are held to float64 eps even for float32 input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from initdiag.kernels import _cuda_common as cc

if cc.cuda is None:
    pytest.skip(
        f"numba-cuda unavailable: {cc.cuda_status()[1]}", allow_module_level=True
    )
if not cc.simulator_active() and not cc.cuda_status()[0]:
    pytest.skip(
        "no GPU and the CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 before "
        "numba is imported; tests/conftest.py does)",
        allow_module_level=True,
    )

import naive  # noqa: E402  (tests/ is on sys.path under pytest's rootdir layout)
from numba import cuda  # noqa: E402

from initdiag.kernels import (  # noqa: E402
    _cuda_activation,
    _cuda_batchnorm,
    _cuda_dense,
    _cuda_layernorm,
    _cuda_residual,
    _cuda_stats,
)

DTYPES = (np.float32, np.float64)
ACTS = naive.ACTIVATIONS
SLOPE = 0.07
EPS64 = np.finfo(np.float64).eps


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    monkeypatch.setattr(cc, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(cc, "TILE", 4)
    monkeypatch.setattr(cc, "REDUCE_COLS", 4)
    monkeypatch.setattr(cc, "MAX_BLOCKS", 2)


def eps_of(dtype) -> float:
    return float(np.finfo(dtype).eps)


def assert_close(got, ref, eps, scale=0.0, what=""):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    tol = 8 * eps * (np.abs(ref) + scale)
    same_nan = np.isnan(got) == np.isnan(ref)
    assert same_nan.all(), (what, got, ref)
    fin = np.isfinite(ref)
    assert (got[~fin & ~np.isnan(ref)] == ref[~fin & ~np.isnan(ref)]).all(), (
        what,
        got,
        ref,
    )
    err = np.abs(got - ref)[fin]
    assert (err <= np.broadcast_to(tol, ref.shape)[fin]).all(), (
        what,
        float(err.max(initial=0)),
        got,
        ref,
    )


def data(shape, dtype, seed, scale=1.5):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(dtype)


# ----------------------------------------------------------------------- activation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_activation_forward_backward(act, dtype):
    x = data((5, 7), dtype, 1, scale=2.0)
    x[0, :3] = 0  # the kink of relu / leaky_relu
    dy = data((5, 7), dtype, 2)
    eps = eps_of(dtype)
    out = np.empty_like(x)
    assert _cuda_activation.activation_forward_cuda(x, act, SLOPE, out) is out
    # input magnitude bounds |x act'(x)|: the effect of rounding the argument
    assert_close(
        out, naive.naive_activation_forward(x, act, SLOPE), eps, np.abs(x), act
    )
    g = np.empty_like(x)
    assert _cuda_activation.activation_backward_cuda(dy, x, act, SLOPE, g) is g
    ref = naive.naive_activation_backward(dy, x, act, SLOPE)
    assert_close(g, ref, eps, np.abs(dy) * (1 + np.abs(x) ** 2), act)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (13, 3)])
def test_activation_odd_shapes(shape):
    for dtype in DTYPES:
        x = data(shape, dtype, 3)
        out = np.empty_like(x)
        _cuda_activation.activation_forward_cuda(x, "gelu", SLOPE, out)
        assert_close(
            out, naive.naive_activation_forward(x, "gelu"), eps_of(dtype), np.abs(x)
        )


# the simulator evaluates kernels with NumPy scalars, which warn on inf - inf etc.
SIM_IEEE = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@SIM_IEEE
@pytest.mark.parametrize("act", ACTS)
def test_activation_extreme_values_and_nan(act):
    # large magnitudes must neither overflow exp() nor lose NaN / inf
    v = [-1e4, -60.0, -1.0, 0.0, 1.0, 60.0, 1e4, np.inf, -np.inf, np.nan]
    for dtype in DTYPES:
        x = np.array([v], dtype=dtype)
        dy = np.ones_like(x)
        out = np.empty_like(x)
        _cuda_activation.activation_forward_cuda(x, act, SLOPE, out)
        ref = naive.naive_activation_forward(x, act, SLOPE)
        assert_close(out, ref, eps_of(dtype), np.abs(np.nan_to_num(x)), act)
        g = np.empty_like(x)
        _cuda_activation.activation_backward_cuda(dy, x, act, SLOPE, g)
        ref = naive.naive_activation_backward(dy, x, act, SLOPE)
        assert_close(g, ref, eps_of(dtype), 1.0, act)


def test_activation_in_place():
    x = data((5, 7), np.float64, 4)
    ref = naive.naive_activation_forward(x, "tanh")
    assert _cuda_activation.activation_forward_cuda(x, "tanh", SLOPE, x) is x
    assert_close(x, ref, EPS64, 1.0)


# ----------------------------------------------------------------------------- dense
DENSE_CASES = [
    # (B, n_in, n_out, act, bias, pre)
    (5, 7, 6, "identity", True, True),
    (5, 7, 6, "relu", False, False),
    (5, 7, 6, "gelu", True, True),
    (1, 1, 1, "tanh", True, False),
    (9, 13, 11, "selu", True, True),  # 3 x 3 tiles on a 2 x 2 grid: grid-stride
    (2, 3, 10, "leaky_relu", False, True),
]


def gemm_scale(a, b):
    """K * |a| @ |b|: the forward-error bound of a length-K dot product, / eps."""
    return a.shape[1] * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "n_in", "n_out", "act", "bias", "pre"), DENSE_CASES)
def test_dense_forward(B, n_in, n_out, act, bias, pre, dtype):
    x = data((B, n_in), dtype, 5)
    w = data((n_out, n_in), dtype, 6, scale=1 / math.sqrt(n_in))
    b = data(n_out, dtype, 7) if bias else None
    out = np.empty((B, n_out), dtype)
    pre_out = np.empty((B, n_out), dtype) if pre else None
    r = _cuda_dense.dense_forward_cuda(x, w, b, act, SLOPE, out, pre_out)
    assert r is out
    ref_out, ref_pre = naive.naive_dense_forward(x, w, b, act, SLOPE)
    scale = gemm_scale(x, w.T) + (0 if b is None else np.abs(b))
    # act' <= 1.76 (selu), so 2x the pre-activation bound covers the output
    assert_close(out, ref_out, eps_of(dtype), 2 * scale, "out")
    if pre:
        assert_close(pre_out, ref_pre, eps_of(dtype), scale, "pre")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "n_in", "n_out"), [(5, 7, 6), (1, 1, 1), (9, 13, 11)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_backward(B, n_in, n_out, bias, dtype):
    dy = data((B, n_out), dtype, 8)
    x = data((B, n_in), dtype, 9)
    w = data((n_out, n_in), dtype, 10)
    dx = np.empty((B, n_in), dtype)
    dw = np.empty((n_out, n_in), dtype)
    db = np.empty(n_out, dtype) if bias else None
    r = _cuda_dense.dense_backward_cuda(dy, x, w, dx, dw, db)
    assert r[0] is dx and r[1] is dw and r[2] is db
    rdx, rdw, rdb = naive.naive_dense_backward(dy, x, w, bias)
    eps = eps_of(dtype)
    assert_close(dx, rdx, eps, gemm_scale(dy, w), "dx")
    assert_close(dw, rdw, eps, gemm_scale(dy.T, x), "dw")
    if bias:
        # float64 accumulation, one rounding to the dtype on store
        assert_close(db, rdb, eps, B * EPS64 / eps * np.abs(dy).sum(0), "db")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_full_tile_fast_path(dtype, monkeypatch):
    # TILE == TILE_MAX selects the unrolled inner loop; 2 k-tiles, partial m / n tiles
    monkeypatch.setattr(cc, "TILE", cc.TILE_MAX)
    B, n_in, n_out = 3, cc.TILE_MAX + 5, 4
    x = data((B, n_in), dtype, 11)
    w = data((n_out, n_in), dtype, 12)
    b = data(n_out, dtype, 13)
    out = np.empty((B, n_out), dtype)
    _cuda_dense.dense_forward_cuda(x, w, b, "identity", SLOPE, out, None)
    ref, _ = naive.naive_dense_forward(x, w, b)
    assert_close(out, ref, eps_of(dtype), gemm_scale(x, w.T) + np.abs(b))
    dy = data((B, n_out), dtype, 14)
    dx = np.empty_like(x)
    dw = np.empty_like(w)
    _cuda_dense.dense_backward_cuda(dy, x, w, dx, dw, None)
    rdx, rdw, _ = naive.naive_dense_backward(dy, x, w, False)
    assert_close(dx, rdx, eps_of(dtype), gemm_scale(dy, w))
    assert_close(dw, rdw, eps_of(dtype), gemm_scale(dy.T, x))


# ------------------------------------------------------------------------- batchnorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["identity", "relu", "selu", "sigmoid"])
@pytest.mark.parametrize("shape", [(5, 7), (1, 3), (9, 13)])
def test_batchnorm_forward(shape, act, dtype):
    B, n = shape
    x = data(shape, dtype, 15) + dtype(3)  # an offset: the shift must handle it
    gamma = data(n, dtype, 16)
    beta = data(n, dtype, 17)
    out = np.empty_like(x)
    mean = np.empty(n, dtype)
    invstd = np.empty(n, dtype)
    r = _cuda_batchnorm.batchnorm_forward_cuda(
        x, gamma, beta, 1e-5, act, SLOPE, out, mean, invstd
    )
    assert r is out
    ro, rm, rs = naive.naive_batchnorm_forward(x, gamma, beta, 1e-5, act, SLOPE)
    eps = eps_of(dtype)
    # mean = x_0 + S1 / B: float64 sums, so the error is the rounding on store plus
    # eps64 of the entries' size (relative to |mean| it is unbounded near mean 0)
    assert_close(mean, rm, eps, np.abs(x.astype(np.float64)).max(0), "mean")
    assert_close(invstd, rs, eps, 0.0, "invstd")
    # z uses the stored (rounded) mean and invstd: |gamma| |x| invstd bounds the error
    zscale = np.abs(gamma) * (np.abs(x) + np.abs(rm)) * rs + np.abs(beta)
    assert_close(out, ro, eps, 2 * zscale, "out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["identity", "relu", "gelu", "leaky_relu"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 1), (9, 13)])
@pytest.mark.parametrize("with_beta", [True, False])
def test_batchnorm_backward(shape, act, with_beta, dtype):
    B, n = shape
    x = data(shape, dtype, 18)
    dy = data(shape, dtype, 19)
    gamma = data(n, dtype, 20)
    beta = data(n, dtype, 21) if with_beta else None
    _, rm, rs = naive.naive_batchnorm_forward(
        x, gamma, np.zeros(n) if beta is None else beta, 1e-5
    )
    mean = rm.astype(dtype)
    invstd = rs.astype(dtype)
    dx = np.empty_like(x)
    dgamma = np.empty(n, dtype)
    dbeta = np.empty(n, dtype)
    r = _cuda_batchnorm.batchnorm_backward_cuda(
        dy, x, mean, invstd, gamma, beta, act, SLOPE, dx, dgamma, dbeta
    )
    assert r[0] is dx and r[1] is dgamma and r[2] is dbeta
    rdx, rdg, rdb = naive.naive_batchnorm_backward(
        dy, x, mean, invstd, gamma, beta, act, SLOPE
    )
    eps = eps_of(dtype)
    xhat = np.abs((x.astype(np.float64) - mean) * invstd)
    g = np.abs(dy.astype(np.float64)) * 1.2  # |act'| <= 1.13 for these activations
    # float64 sums, one rounding on store; dx then uses the rounded dgamma / dbeta
    assert_close(dbeta, rdb, eps, B * EPS64 / eps * g.sum(0), "dbeta")
    assert_close(dgamma, rdg, eps, B * EPS64 / eps * (g * xhat).sum(0), "dgamma")
    dscale = np.abs(gamma) * invstd / B * (B * g + g.sum(0) + xhat * (g * xhat).sum(0))
    assert_close(dx, rdx, eps, dscale, "dx")


# ----------------------------------------------------------------------------- stats
def relu_like(shape, dtype, seed):
    x = np.maximum(data(shape, dtype, seed), 0)
    x[:, 0] = 0  # a dead feature
    if shape[1] > 2:
        x[:, 2] = -np.abs(x[:, 2]) - 1  # dead but nonzero
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (1, 9), (9, 13)])
def test_column_stats(shape, dtype):
    x = relu_like(shape, dtype, 22) + dtype(100)  # offset: shifted sums stay exact
    x[0, :] -= dtype(100)
    outs = tuple(np.empty(shape[1]) for _ in range(4))
    r = _cuda_stats.column_stats_cuda(x, *outs)
    assert all(a is b for a, b in zip(r, outs, strict=True))
    ref = naive.naive_column_stats(x)
    xs = np.abs(x.astype(np.float64))
    B = shape[0]
    assert_close(outs[0], ref[0], EPS64, B * xs.max(0), "mean")
    assert_close(outs[1], ref[1], EPS64, B * xs.max(0) ** 2, "var")
    assert_close(outs[2], ref[2], EPS64, 0.0, "frac_le0")
    assert_close(outs[3], ref[3], EPS64, 0.0, "frac_eq0")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (1, 9), (9, 13)])
def test_layer_summary(shape, dtype):
    x = relu_like(shape, dtype, 23)
    out = np.empty(8)
    assert _cuda_stats.layer_summary_cuda(x, out) is out
    ref = naive.naive_layer_summary(x)
    m = float(np.abs(x.astype(np.float64)).max())
    assert_close(out, ref, EPS64, x.size * max(m, m * m), "summary")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (1, 4), (2, 1), (9, 13)])
def test_row_correlation(shape, dtype):
    x = data(shape, dtype, 24) + dtype(0.5)
    if shape[0] > 2:
        x[1] = 0  # a zero row: cosine 0 with everything
    out = np.empty(1)
    assert _cuda_stats.row_correlation_cuda(x, out) is out
    ref = naive.naive_row_correlation(x)
    # squares of unit-vector sums: |sum u|^2 <= B^2, summed over n columns
    assert_close(out, [ref], EPS64, x.shape[0] * x.shape[1] * 4.0, "corr")


# ---------------------------------------------------------- device arrays, NaN, status
def test_device_arrays_in_device_arrays_out():
    dtype = np.float32
    x = data((5, 7), dtype, 25)
    w = data((6, 7), dtype, 26)
    b = data(6, dtype, 27)
    d_x, d_w, d_b = (cuda.to_device(a) for a in (x, w, b))
    d_out = cuda.device_array((5, 6), dtype)
    d_pre = cuda.device_array((5, 6), dtype)
    assert (
        _cuda_dense.dense_forward_cuda(d_x, d_w, d_b, "relu", SLOPE, d_out, d_pre)
        is d_out
    )
    ref, pre = naive.naive_dense_forward(x, w, b, "relu")
    scale = gemm_scale(x, w.T) + np.abs(b)
    assert_close(d_out.copy_to_host(), ref, eps_of(dtype), scale)
    assert_close(d_pre.copy_to_host(), pre, eps_of(dtype), scale)

    d_dy = cuda.to_device(data((5, 6), dtype, 28))
    d_dx = cuda.device_array((5, 7), dtype)
    d_dw = cuda.device_array((6, 7), dtype)
    d_db = cuda.device_array(6, dtype)
    r = _cuda_dense.dense_backward_cuda(d_dy, d_x, d_w, d_dx, d_dw, d_db)
    assert r == (d_dx, d_dw, d_db)
    rdx, rdw, rdb = naive.naive_dense_backward(d_dy.copy_to_host(), x, w)
    assert_close(
        d_dx.copy_to_host(), rdx, eps_of(dtype), gemm_scale(d_dy.copy_to_host(), w)
    )
    assert_close(d_db.copy_to_host(), rdb, eps_of(dtype), 5.0)

    d_a = cuda.device_array((5, 7), dtype)
    _cuda_activation.activation_forward_cuda(d_x, "silu", SLOPE, d_a)
    assert_close(
        d_a.copy_to_host(),
        naive.naive_activation_forward(x, "silu"),
        eps_of(dtype),
        np.abs(x),
    )

    gamma, beta = cuda.to_device(np.ones(7, dtype)), cuda.to_device(np.zeros(7, dtype))
    d_mean = cuda.device_array(7, dtype)
    d_inv = cuda.device_array(7, dtype)
    _cuda_batchnorm.batchnorm_forward_cuda(
        d_x, gamma, beta, 1e-5, "identity", SLOPE, d_a, d_mean, d_inv
    )
    _, rm, rs = naive.naive_batchnorm_forward(x, np.ones(7), np.zeros(7))
    assert_close(d_mean.copy_to_host(), rm, eps_of(dtype), np.abs(x).max(0))
    assert_close(d_inv.copy_to_host(), rs, eps_of(dtype))

    d_s = cuda.device_array(8, np.float64)
    _cuda_stats.layer_summary_cuda(d_x, d_s)
    m = float(np.abs(x).max())
    assert_close(
        d_s.copy_to_host(), naive.naive_layer_summary(x), EPS64, 35 * max(m, m * m)
    )
    d_c = cuda.device_array(1, np.float64)
    _cuda_stats.row_correlation_cuda(d_x, d_c)
    assert_close(d_c.copy_to_host(), [naive.naive_row_correlation(x)], EPS64, 140.0)


@SIM_IEEE
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype):
    x = data((5, 7), dtype, 29)
    x[1, 2] = np.nan
    x[3, 4] = np.inf
    w = data((6, 7), dtype, 30)
    out = np.empty((5, 6), dtype)
    _cuda_dense.dense_forward_cuda(x, w, None, "identity", SLOPE, out, None)
    ref, _ = naive.naive_dense_forward(x, w)
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2, 4]]).all()

    gamma = np.ones(7, dtype)
    beta = np.zeros(7, dtype)
    y = np.empty_like(x)
    mean = np.empty(7, dtype)
    inv = np.empty(7, dtype)
    _cuda_batchnorm.batchnorm_forward_cuda(
        x, gamma, beta, 1e-5, "relu", SLOPE, y, mean, inv
    )
    assert np.isnan(y[:, 2]).all() and not np.isfinite(y[:, 4]).any()
    assert np.isfinite(y[:, [0, 1, 3, 5, 6]]).all()

    stats = tuple(np.empty(7) for _ in range(4))
    _cuda_stats.column_stats_cuda(x, *stats)
    assert (
        np.isnan(stats[0][2]) and np.isnan(stats[1][2]) and not np.isfinite(stats[1][4])
    )
    assert np.isfinite(stats[0][[0, 1, 3, 5, 6]]).all()

    s = np.empty(8)
    _cuda_stats.layer_summary_cuda(x, s)
    assert np.isnan(s[0]) and np.isnan(s[1]) and s[7] == 2.0
    c = np.empty(1)
    _cuda_stats.row_correlation_cuda(x, c)
    assert np.isnan(c[0])


def test_row_correlation_single_row_is_nan():
    out = np.empty(1)
    _cuda_stats.row_correlation_cuda(np.ones((1, 5)), out)
    assert np.isnan(out[0])


def test_cuda_status_reports():
    ok, reason = cc.cuda_status()
    assert ok
    if cc.simulator_active():
        assert "simulator" in reason
    assert _cuda_dense.cuda_status() == (ok, reason)


def test_every_kernel_is_listed_for_ptx():
    names = [name for name, _, _ in cc.ptx_kernels()]
    mods = (
        _cuda_dense,
        _cuda_activation,
        _cuda_batchnorm,
        _cuda_layernorm,
        _cuda_stats,
        _cuda_residual,
    )
    jitted = {
        n for m in mods for n in vars(m) if n.startswith("_") and n.endswith("_kernel")
    }
    assert set(names) == jitted
    assert len(names) == len(set(names))

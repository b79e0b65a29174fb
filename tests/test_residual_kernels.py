"""Residual add, Scale, dropout masking and their fused statistics pass.

The ops of ``initdiag.kernels.residual`` on every backend (numpy, numba, c, and cuda
under numba's CUDA simulator, which tests/conftest.py switches on) against the loop
references of tests/naive.py; the fused ``residual_add_stats`` of
``initdiag.kernels.fused`` against ``layer_stats`` of the separate add and against
the loop references; the dropout keep masks of ``initdiag._rng.fill_keep_mask``
against ``fill_uniform`` and the Philox words themselves.

Tolerances: ``skip + s x`` in a dtype of unit roundoff u = eps / 2 is three
roundings (s, the product, the sum) away from the exact float64 value, so
|got - ref| <= 3 u (|skip| + |s x|) + O(u^2); the tests allow 2 eps (|skip| + |s x|).
"""

from __future__ import annotations

import math

import naive  # noqa: E402  (tests/ is on sys.path under pytest's rootdir layout)
import numpy as np
import pytest
from test_fused_kernels import assert_within, stats_tol

import initdiag.kernels as K
from initdiag import _rng
from initdiag.kernels import _cuda_common as cc
from initdiag.kernels import _registry, residual

CPU = ("numpy", "numba", "c")
ALL = (*CPU, "cuda")
DTYPES = (np.float32, np.float64)


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    # several blocks and the grid-stride loop on tiny shapes (cuda backend)
    monkeypatch.setattr(cc, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(cc, "MAX_BLOCKS", 2)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def data(rng, shape, dtype, shift=0.0):
    return (shift + rng.standard_normal(shape)).astype(dtype)


def assert_ieee(got, ref, tol):
    """Finite entries within ``tol``; NaN and +-inf exactly where ``ref`` has them."""
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    inf = np.isinf(ref)
    np.testing.assert_array_equal(got[inf], ref[inf])
    fin = np.isfinite(ref)
    tol = np.broadcast_to(tol, ref.shape)
    assert np.all(np.abs(got[fin] - ref[fin]) <= tol[fin])


def add_tol(skip, x, scale, dtype):
    a = np.abs(scale * np.asarray(x, dtype=np.float64))
    if skip is not None:
        a = a + np.abs(np.asarray(skip, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        return 2 * eps(dtype) * a


def with_nonfinite(a):
    a = a.copy()
    a[0, 0] = np.nan
    a[1, 1] = np.inf
    a[2, 2] = -np.inf
    return a


# ------------------------------------------------------------------ residual_add
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_against_loops(backend, dtype):
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (5, 7), (70, 9)):
        skip = data(rng, shape, dtype, 0.5)
        x = data(rng, shape, dtype)
        for sk, scale in ((skip, 0.37), (None, -1.3), (skip, 0.0), (None, 1.0)):
            got = K.residual_add(sk, x, scale, backend=backend)
            assert got.dtype == dtype and got.shape == shape
            assert got is not x and got is not skip
            ref = naive.naive_residual_add(sk, x, scale)
            assert_ieee(got, ref, add_tol(sk, x, scale, dtype))


# the CUDA simulator computes with NumPy scalars in its own threads, which warn
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
def test_residual_add_propagates_nan_and_inf(backend):
    rng = np.random.default_rng(2)
    skip = with_nonfinite(data(rng, (6, 5), np.float32))
    x = data(rng, (6, 5), np.float32)
    x[0, 1] = np.nan
    x[1, 1] = -np.inf  # inf + (-inf) = NaN
    x[3, 3] = np.inf
    for sk in (skip, None):
        got = K.residual_add(sk, x, 0.5, backend=backend)
        ref = naive.naive_residual_add(sk, x, 0.5)
        # NaN from x, and from skip (NaN; inf + -inf) when there is a skip
        assert np.isnan(ref).sum() == (3 if sk is not None else 1)
        assert np.isinf(ref).any()
        assert_ieee(got, ref, add_tol(sk, x, 0.5, np.float32))
    # scale 0 still propagates: 0 * inf = NaN
    got = K.residual_add(None, x, 0.0, backend=backend)
    assert np.isnan(got[3, 3]) and np.isnan(got[0, 1]) and got[2, 2] == 0


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_in_place(backend, dtype):
    rng = np.random.default_rng(3)
    skip = data(rng, (9, 4), dtype)
    x = data(rng, (9, 4), dtype)
    ref = K.residual_add(skip, x, 0.8, backend="numpy")
    for target in ("skip", "x"):
        s, xx = skip.copy(), x.copy()
        out = s if target == "skip" else xx
        got = K.residual_add(s, xx, 0.8, backend=backend, out=out)
        assert got is out
        np.testing.assert_allclose(got, ref, rtol=2 * eps(dtype), atol=0)
    s = skip.copy()
    view = s[:]  # the same memory as another array object
    assert K.residual_add(s, x, 0.8, backend=backend, out=view) is view
    np.testing.assert_allclose(s, ref, rtol=2 * eps(dtype), atol=0)
    xx = x.copy()
    assert K.residual_add(None, xx, -2.0, backend=backend, out=xx) is xx
    np.testing.assert_allclose(xx, -2.0 * x, rtol=eps(dtype), atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backends_agree_bit_for_bit_also_in_parallel(dtype, monkeypatch):
    # scale rounded to the dtype, one rounded multiply and one rounded add
    # everywhere (no FMA contraction on the CPU); 150000 elements make three
    # PAR_CHUNK chunks when the thread policy is forced to two threads
    rng = np.random.default_rng(4)
    skip = data(rng, (300, 500), dtype)
    x = data(rng, (300, 500), dtype)
    mask = (rng.random((300, 500)) < 0.7).astype(np.uint8)
    s = 1 / 0.7
    want = [
        K.residual_add(skip, x, s, backend="numpy"),
        K.residual_add(None, x, s, backend="numpy"),
        K.masked_scale(x, mask, s, backend="numpy"),
    ]
    ex = np.multiply(x, dtype(s))
    np.testing.assert_array_equal(want[0], skip + ex)
    np.testing.assert_array_equal(want[1], ex)
    for threads in (1, 2):
        monkeypatch.setattr(
            residual, "elementwise_threads", lambda N, c=False, t=threads: t
        )
        for backend in ("numba", "c"):
            got = [
                K.residual_add(skip, x, s, backend=backend),
                K.residual_add(None, x, s, backend=backend),
                K.masked_scale(x, mask, s, backend=backend),
            ]
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend", ALL)
def test_scale_one_without_skip_is_a_copy(backend):
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    got = K.residual_add(None, x, 1.0, backend=backend)
    assert got is not x and not np.shares_memory(got, x)
    np.testing.assert_array_equal(got, x)
    out = np.full_like(x, np.nan)
    assert K.residual_add(None, x, 1.0, backend=backend, out=out) is out
    np.testing.assert_array_equal(out, x)


# ------------------------------------------------------------------ masked_scale
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_scale_against_loops(backend, dtype):
    rng = np.random.default_rng(5)
    for shape in ((1, 1), (70, 9)):
        x = (
            with_nonfinite(data(rng, shape, dtype))
            if shape[0] > 2
            else data(rng, shape, dtype)
        )
        mask = (rng.random(shape) < 0.6).astype(np.uint8)
        if shape[0] > 2:
            mask[0, 0] = mask[1, 1] = 0  # dropped NaN and inf: NaN
            mask[2, 2] = 1  # kept -inf
        for scale in (1 / (1 - 0.4), 1.0, -0.5):
            got = K.masked_scale(x, mask, scale, backend=backend)
            ref = naive.naive_masked_scale(x, mask, scale)
            with np.errstate(invalid="ignore"):
                tol = eps(dtype) * np.abs(scale * x.astype(np.float64))
            assert_ieee(got, ref, tol)
            if shape[0] > 2:
                assert np.isnan(got[0, 0]) and np.isnan(got[1, 1])
                assert np.isinf(got[2, 2])
    # backward in place on the gradient, same mask and scale
    g = data(rng, (70, 9), dtype)
    ref = naive.naive_masked_scale(g, mask, 2.5)
    assert K.masked_scale(g, mask, 2.5, backend=backend, out=g) is g
    assert_ieee(g, ref, eps(dtype) * np.abs(ref))


def test_device_arrays_in_and_out():
    # numba device arrays (the simulator's fakes here) are used in place
    from numba import cuda

    rng = np.random.default_rng(12)
    x = data(rng, (5, 6), np.float32)
    skip = data(rng, (5, 6), np.float32)
    mask = (rng.random((5, 6)) < 0.5).astype(np.uint8)
    d_skip, d_x, d_m = cuda.to_device(skip), cuda.to_device(x), cuda.to_device(mask)
    got = K.residual_add(d_skip, d_x, 0.3, out=d_skip)  # auto: cuda for device input
    assert got is d_skip
    # a real GPU may fuse the multiply-add (one rounding fewer)
    ref = naive.naive_residual_add(skip, x, 0.3)
    assert_ieee(got.copy_to_host(), ref, add_tol(skip, x, 0.3, np.float32))
    y = K.masked_scale(d_x, d_m, 2.0).copy_to_host()
    np.testing.assert_array_equal(y, K.masked_scale(x, mask, 2.0))
    with pytest.raises(TypeError, match="mask must be uint8 .*got float32"):
        K.masked_scale(d_x, d_x, 2.0)


def test_masked_scale_matches_torch_dropout_bit_for_bit():
    torch = pytest.importorskip("torch")
    p = 0.3
    rng = np.random.default_rng(6)
    x = data(rng, (64, 33), np.float32)
    torch.manual_seed(11)
    y = torch.nn.functional.dropout(torch.from_numpy(x), p, training=True).numpy()
    mask = (y != 0).astype(np.uint8)  # x has no zeros: dropped iff y == 0
    assert 0.6 < mask.mean() < 0.8
    # torch divides the float32 mask by (1 - p): scale 1 / fl32(1 - p) in float32
    scale = float(np.float32(1) / np.float32(1 - p))
    for backend in CPU:
        np.testing.assert_array_equal(
            K.masked_scale(x, mask, scale, backend=backend), y
        )
    # the same mask again (same seed and shape) on x with NaN / inf where dropped
    drop = np.argwhere(mask == 0)[:2]
    xn = x.copy()
    xn[tuple(drop[0])] = np.nan
    xn[tuple(drop[1])] = np.inf
    torch.manual_seed(11)
    yn = torch.nn.functional.dropout(torch.from_numpy(xn), p, training=True).numpy()
    assert np.isnan(yn[tuple(drop[0])]) and np.isnan(yn[tuple(drop[1])])
    for backend in CPU:
        np.testing.assert_array_equal(
            K.masked_scale(xn, mask, scale, backend=backend), yn
        )


# ------------------------------------------------------------------ validation
def test_dispatchers_say_what_was_received():
    x = np.ones((4, 3), np.float32)
    m = np.ones((4, 3), np.uint8)
    with pytest.raises(
        ValueError, match=r"skip must have shape \(4, 3\); got \(4, 2\)"
    ):
        K.residual_add(np.ones((4, 2), np.float32), x, 1.0)
    with pytest.raises(TypeError, match="skip has dtype float64 but the other"):
        K.residual_add(np.ones((4, 3)), x, 1.0)
    with pytest.raises(TypeError, match="float32 or float64; got int64"):
        K.residual_add(None, np.ones((4, 3), np.int64), 1.0)
    with pytest.raises(ValueError, match="must be 2-D; got shape"):
        K.residual_add(None, np.ones(3, np.float32), 1.0)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"scale must be finite; got {bad}"):
            K.residual_add(None, x, bad)
        with pytest.raises(ValueError, match="scale must be finite"):
            K.masked_scale(x, m, bad)
    with pytest.raises(ValueError, match="overflows float32; use float64"):
        K.residual_add(None, x, 1e39)
    for bad in ("2", np.ones(1), True, None):
        with pytest.raises(TypeError, match="scale must be a real number"):
            K.residual_add(None, x, bad)
    with pytest.raises(TypeError, match="mask must be uint8.*got bool"):
        K.masked_scale(x, m.astype(bool), 2.0)
    with pytest.raises(TypeError, match="mask must be uint8.*got float32"):
        K.masked_scale(x, x, 2.0)
    with pytest.raises(TypeError, match="mask must be a NumPy uint8 array.*list"):
        K.masked_scale(x, [[1, 0, 1]] * 4, 2.0)
    with pytest.raises(
        ValueError, match=r"mask must have shape \(4, 3\); got \(3, 4\)"
    ):
        K.masked_scale(x, np.ones((3, 4), np.uint8), 2.0)
    with pytest.raises(ValueError, match="only 0 .* and 1 .*; found 2"):
        K.masked_scale(x, 2 * m, 2.0)
    with pytest.raises(TypeError, match="out must have dtype float32; got float64"):
        K.residual_add(None, x, 2.0, out=np.empty((4, 3)))
    big = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="out overlaps x without being x itself"):
        K.residual_add(None, big[:4], 2.0, out=big[1:])
    with pytest.raises(ValueError, match="out overlaps skip"):
        K.residual_add_stats(big[1:], x, 2.0, out=(big[:4], None))
    with pytest.raises(K.BackendUnavailableError, match="numpy', 'numba'"):
        K.residual_add_stats(None, x, 1.0, backend="c")


def test_registry_lists_the_ops_on_every_backend():
    for op in ("residual_add", "masked_scale"):
        assert _registry.OP_BACKENDS[op] == ("numpy", "numba", "c", "cuda")
        for b in ALL:
            assert callable(_registry.resolve(op, b))
    assert _registry.OP_BACKENDS["residual_add_stats"] == ("numpy", "numba")
    fk = K.fused.resolve("numba")
    assert fk.residual_add_stats is _registry.resolve("residual_add_stats", "numba")


# ------------------------------------------------------------------ fused pass
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_stats_equals_layer_stats_of_the_add(dtype):
    # the fused numba pass: y bit for bit as residual_add, the statistics bit for
    # bit as layer_stats(y) (same chunks, same grouping of rows)
    rng = np.random.default_rng(7)
    for shape in ((1, 3), (70, 9), (133, 4)):
        skip = data(rng, shape, dtype, 0.4)
        x = data(rng, shape, dtype)
        x[:, 0] = -np.abs(x[:, 0]) - 1  # a dead column when skip is None
        for sk, scale in ((skip, 0.6), (None, 1.7)):
            y0 = K.residual_add(sk, x, scale, backend="numba")
            want = K.layer_stats(y0, column_moments=True, backend="numba")
            y, st, cm, cv = K.residual_add_stats(
                sk, x, scale, column_moments=True, backend="numba"
            )
            np.testing.assert_array_equal(y, y0)
            for g, w in zip((st, cm, cv), want, strict=True):
                np.testing.assert_array_equal(g, w)
        # in place on skip, and on x
        for target in (0, 1):
            a, b = skip.copy(), x.copy()
            o = (a, b)[target]
            y, st = K.residual_add_stats(a, b, 0.6, backend="numba", out=(o, None))
            assert y is o
            np.testing.assert_array_equal(y, K.residual_add(skip, x, 0.6))
            np.testing.assert_array_equal(st, K.layer_stats(y, backend="numba"))


@pytest.mark.parametrize("backend", ("numpy", "numba"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_stats_against_loops(backend, dtype):
    rng = np.random.default_rng(8)
    skip = data(rng, (70, 6), dtype, 0.3)
    x = data(rng, (70, 6), dtype)
    skip[4] = 0
    x[4] = 0  # a zero row: cosine 0
    ref_y = naive.naive_residual_add(skip, x, -0.9)
    dv = add_tol(skip, x, -0.9, dtype)
    y, st, cm, cv = K.residual_add_stats(
        skip, x, -0.9, column_moments=True, backend=backend
    )
    assert_ieee(y, ref_y, dv)
    ref, rcm, rcv = naive.naive_layer_stats(ref_y)
    tol, tm, tv = stats_tol(ref_y, dtype, dv)
    assert_within(st, ref, tol, "stats")
    assert_within(cm, rcm, tm, "colmean")
    assert_within(cv, rcv, tv, "colvar")


def test_residual_add_stats_counts_nonfinite():
    skip = with_nonfinite(np.ones((9, 4), np.float32))
    for backend in ("numpy", "numba"):
        y, st = K.residual_add_stats(
            skip, np.ones((9, 4), np.float32), 1.0, backend=backend
        )
        assert st[7] == 3 and np.isnan(y[0, 0])


# ------------------------------------------------------------------ keep masks
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999])
def test_keep_mask_is_fill_uniform_compared_with_p(p):
    n = 3 * (1 << 15) + 7  # several chunks, the last one partial, a partial counter
    m = _rng.fill_keep_mask(np.empty(n, np.uint8), (3, 4), 2, p)
    u = _rng.fill_uniform(np.empty(n), (3, 4), 2)
    np.testing.assert_array_equal(m, (u >= p).astype(np.uint8))
    if p == 0.0:
        assert m.all()
    # Bernoulli(1 - p): the kept fraction within 5 standard errors
    se = math.sqrt(p * (1 - p) / n)
    assert abs(m.mean() - (1 - p)) <= 5 * se + 2.0**-24


def test_keep_mask_from_the_philox_words():
    # entry 4j + k under (key, stream): kept iff ((w_k >> 8) + 0.5) / 2^24 >= p,
    # w the Philox4x32-10 words of counter (j, 0, stream, 0)
    key, stream, p = (0xA4093822, 0x299F31D0), 9, 0.35
    m = _rng.fill_keep_mask(np.empty((25, 8), np.uint8), key, stream, p)
    flat = m.reshape(-1)
    for j in range(flat.size // 4):
        w = _rng.philox4x32(
            np.array([j, 0, stream, 0], np.uint32), np.array(key, np.uint32)
        )
        for k in range(4):
            u = ((int(w[k]) >> 8) + 0.5) / 2.0**24
            assert flat[4 * j + k] == (1 if u >= p else 0)


def test_keep_mask_is_thread_independent():
    numba = pytest.importorskip("numba")
    old = numba.get_num_threads()
    masks = []
    try:
        for nt in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(nt)
            masks.append(
                _rng.fill_keep_mask(np.empty((512, 300), np.uint8), (1, 2), 5, 0.2)
            )
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(masks[0], masks[1])
    other = _rng.fill_keep_mask(np.empty((512, 300), np.uint8), (1, 2), 6, 0.2)
    assert not np.array_equal(masks[0], other)


def test_keep_mask_validates():
    with pytest.raises(ValueError, match=r"\[0, 1\); got 1.0"):
        _rng.fill_keep_mask(np.empty(4, np.uint8), (1, 2), 0, 1.0)
    with pytest.raises(ValueError, match=r"got -0.1"):
        _rng.fill_keep_mask(np.empty(4, np.uint8), (1, 2), 0, -0.1)
    with pytest.raises(ValueError, match=r"got nan"):
        _rng.fill_keep_mask(np.empty(4, np.uint8), (1, 2), 0, math.nan)
    with pytest.raises(TypeError, match="p must be a real number"):
        _rng.fill_keep_mask(np.empty(4, np.uint8), (1, 2), 0, "0.5")
    with pytest.raises(TypeError, match="uint8 array; got float64"):
        _rng.fill_keep_mask(np.empty(4), (1, 2), 0, 0.5)
    with pytest.raises(TypeError, match="C-contiguous"):
        _rng.fill_keep_mask(np.empty((4, 4), np.uint8)[:, ::2], (1, 2), 0, 0.5)

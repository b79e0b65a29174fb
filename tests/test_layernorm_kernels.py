"""LayerNorm kernels of every backend against tests/naive.py, finite differences and
PyTorch.

Backends: numpy, numba, c and cuda (under the CUDA simulator, launch sizes patched
small so grid-stride and multi-block paths run).  Tolerances are worst-case
rounding bounds computed from the data (``fwd_tol``, ``bwd_tol``), in units of the
dtype's machine epsilon, never a bare constant: the row sums of n terms may lose
n eps of the sum of their magnitudes, the variance is bounded through the shifted
magnitudes D = max_j |x_j - x_0| (not |x|, which is what the shift buys), and every
short formula (an activation, a product, a store) costs at most C_ELEM eps of its
terms.  Shapes stay tiny: Numba compiles two signatures per kernel, the simulator
runs one Python thread per CUDA thread.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import initdiag.kernels as K

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import naive  # noqa: E402
from test_kernels import C_ELEM, LIP, assert_within, eps, rand  # noqa: E402

_AVAIL = K.available_backends()
BACKENDS = [b for b in ("numpy", "numba", "c", "cuda") if _AVAIL[b]["available"]]
DTYPES = [np.float32, np.float64]
SLOPE = 0.1
# (gamma, beta) present: affine, no parameters, gamma without a bias
AFFINE = ["affine", "none"]


@pytest.fixture(autouse=True)
def small_cuda_launch(monkeypatch):
    """8 threads a block, 2 blocks a grid, 4-column reductions: with B, n > 8 the
    grid-stride loops over rows and features and the tree sums all run."""
    if not _AVAIL["cuda"]["available"]:
        return
    from initdiag.kernels import _cuda_common as cc

    monkeypatch.setattr(cc, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(cc, "REDUCE_COLS", 4)
    monkeypatch.setattr(cc, "MAX_BLOCKS", 2)


def params(rng, n, dtype, kind):
    if kind == "none":
        return None, None
    gamma = rand(rng, (n,), dtype, shift=1.0)
    return gamma, (rand(rng, (n,), dtype) if kind == "affine" else None)


def _abs(a, like=None):
    if a is None:
        return np.ones(like) if like is not None else 0.0
    return np.abs(np.asarray(a, dtype=np.float64))


def fwd_tol(x, gamma, beta, rmean, rinv, ry, eps_ln, dtype):
    """Bounds on the errors of (mean, invstd, y) against the float64 loops.

    Per row with D = max_j |x_j - x_0|: mean = x_0 + sum_j (x_j - x_0) / n loses
    n eps D in the sum and eps |mean| on store; var = S2 / n - (S1 / n)^2 loses
    3 (n + 1) eps D^2, which 1 / sqrt(var + eps) halves relatively, plus a few
    roundings; y = act((x - mean) invstd gamma + beta) inherits those through
    |gamma| and the activation's Lipschitz bound, plus C_ELEM eps of its terms.
    """
    e = eps(dtype)
    xd = x.astype(np.float64)
    n = x.shape[1]
    D = np.abs(xd - xd[:, :1]).max(axis=1)
    tm = 2 * n * e * D + 2 * e * np.abs(rmean)
    var = 1.0 / rinv**2 - eps_ln
    ev = 3 * (n + 1) * e * D**2 + tm**2
    ti = rinv * (0.5 * ev / (var + eps_ln) + 4 * e)
    g = _abs(gamma, n)
    dev = np.abs(xd - rmean[:, None])
    z = g * dev * rinv[:, None] + _abs(beta)
    ty = LIP * (g * (dev * ti[:, None] + tm[:, None] * rinv[:, None]))
    ty = ty + C_ELEM * e * (LIP * z + np.abs(ry) + 1.0)
    return tm, ti, ty


def bwd_tol(dy, x, mean, invstd, gamma, dtype):
    """Bounds on the errors of (dx, dgamma, dbeta) given the same saved statistics.

    |g| <= LIP |dy|, |h| <= |g| |gamma|; the row sums of h and h xhat (n terms) and
    the column sums of g and g xhat (B terms) lose n eps and B eps of their
    magnitudes, and dx = invstd (h - sum h / n - xhat sum h xhat / n) adds C_ELEM
    eps of each term."""
    e = eps(dtype)
    B, n = x.shape
    xh = np.abs((x.astype(np.float64) - mean[:, None]) * invstd[:, None])
    gb = LIP * np.abs(dy.astype(np.float64)) * (1 + xh)  # act' also sees xhat's error
    hb = gb * _abs(gamma, n)
    H = hb.sum(axis=1, keepdims=True)
    H2 = (hb * xh).sum(axis=1, keepdims=True)
    tdx = C_ELEM * e * invstd[:, None] * (hb * (1 + xh) + H + xh * H2)
    tdb = C_ELEM * e * B * gb.sum(axis=0)
    tdg = C_ELEM * e * B * (gb * (1 + xh)).sum(axis=0)
    return tdx, tdg, tdb


def check_backend_against_naive(backend, x, gamma, beta, dy, act, eps_ln=1e-5):
    dtype = x.dtype.type
    y, mean, invstd = K.layernorm_forward(
        x, gamma, beta, eps_ln, activation=act, negative_slope=SLOPE, backend=backend
    )
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == dtype and mean.shape == (x.shape[0],) == invstd.shape
    ry, rmean, rinv = naive.naive_layernorm_forward(x, gamma, beta, eps_ln, act, SLOPE)
    tm, ti, ty = fwd_tol(x, gamma, beta, rmean, rinv, ry, eps_ln, dtype)
    assert_within(mean, rmean, tm, f"{backend} mean")
    assert_within(invstd, rinv, ti, f"{backend} invstd")
    assert_within(y, ry, ty, f"{backend} y")

    dx, dgamma, dbeta = K.layernorm_backward(
        dy,
        x,
        (mean, invstd),
        gamma,
        beta,
        activation=act,
        negative_slope=SLOPE,
        backend=backend,
    )
    rdx, rdg, rdb = naive.naive_layernorm_backward(
        dy, x, mean, invstd, gamma, beta, act, SLOPE
    )
    tdx, tdg, tdb = bwd_tol(dy, x, mean, invstd, gamma, dtype)
    assert_within(dx, rdx, tdx, f"{backend} dx")
    if gamma is None:
        assert dgamma is None and dbeta is None
    else:
        assert dgamma.dtype == dtype and dgamma.shape == gamma.shape
        assert_within(dgamma, rdg, tdg, f"{backend} dgamma")
        assert_within(dbeta, rdb, tdb, f"{backend} dbeta")
    return y, dx


# ------------------------------------------------------------------ loops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["identity", "relu", "tanh"])
@pytest.mark.parametrize("kind", AFFINE)
def test_forward_backward_against_loops(backend, dtype, act, kind):
    rng = np.random.default_rng(1)
    B, n = 10, 19  # > 8 threads and > 2 blocks of 8 under the simulator
    x = rand(rng, (B, n), dtype, scale=2.0, shift=1.5)
    dy = rand(rng, (B, n), dtype)
    gamma, beta = params(rng, n, dtype, kind)
    check_backend_against_naive(backend, x, gamma, beta, dy, act)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_without_bias_and_more_activations(backend):
    # gamma alone is torch's bias=False: beta counts as zero, dbeta is still the
    # gradient of that zero bias; gelu and leaky_relu run the generic fused branch
    rng = np.random.default_rng(2)
    x = rand(rng, (9, 11), np.float64, shift=-0.5)
    dy = rand(rng, (9, 11), np.float64)
    gamma, _ = params(rng, 11, np.float64, "gamma")
    for act in ("gelu", "leaky_relu", "relu"):
        check_backend_against_naive(backend, x, gamma, None, dy, act)
    beta = rand(rng, (11,), np.float64)
    check_backend_against_naive(backend, x, gamma, beta, dy, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (3, 3), (2, 2)])
def test_odd_shapes(backend, shape):
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        x = rand(rng, shape, dtype, shift=0.7)
        dy = rand(rng, shape, dtype)
        gamma, beta = params(rng, shape[1], dtype, "affine")
        y, dx = check_backend_against_naive(backend, x, gamma, beta, dy, "relu")
        if shape[1] == 1:
            # one feature: var = 0, xhat = 0, y = act(beta) exactly (dx = 0 up to
            # the rounding bound, checked against the loops above)
            np.testing.assert_array_equal(
                y, np.broadcast_to(np.maximum(beta, 0), shape)
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_variance_is_stable_under_a_large_offset(backend):
    # E[x^2] - E[x]^2 in float32 of 1e4 + N(0, 1) has no correct digit (1e8 eps32 =
    # 12 against a variance of 1); the shifted sums keep float32 accuracy, checked
    # by the tolerance built from D = max |x - x_0| (not |x|).  1500 features span
    # two row-sum spans of the CPU kernels.
    rng = np.random.default_rng(4)
    n = 1500 if backend != "cuda" else 40
    for dtype, offset in ((np.float32, 1e4), (np.float64, 1e8)):
        x = (offset + rng.standard_normal((3, n))).astype(dtype)
        dy = rand(rng, (3, n), dtype)
        gamma, beta = params(rng, n, dtype, "affine")
        check_backend_against_naive(backend, x, gamma, beta, dy, "identity")
        # the invstd bound that held is far below the O(1) relative error of a
        # one-pass variance, so the check could not pass without the shift
        ry, rmean, rinv = naive.naive_layernorm_forward(x)
        _, ti, _ = fwd_tol(x, None, None, rmean, rinv, ry, 1e-5, dtype)
        assert (ti / rinv).max() < 1e-2


# ------------------------------------------------------------------ derivatives
# the simulator needs ~0.3 s a forward call: one activation for cuda (the formula
# is shared; its act' is held to the loops above)
FD_CASES = [
    (b, a) for b in BACKENDS for a in ("identity", "tanh", "relu") if b != "cuda"
] + [("cuda", "tanh")] * ("cuda" in BACKENDS)


@pytest.mark.parametrize(("backend", "act"), FD_CASES)
def test_backward_matches_finite_differences(backend, act):
    rng = np.random.default_rng(5)
    B, n = 3, 4
    x = rand(rng, (B, n), np.float64)
    gamma = rand(rng, (n,), np.float64, shift=1.0)
    beta = rand(rng, (n,), np.float64, scale=0.3)
    dy = rand(rng, (B, n), np.float64)

    # the finite differences of the numpy forward, which every backend's forward
    # equals (tests above); the simulator's ~0.3 s per call would make cuda's own
    # forward cost 40 calls here
    fwd = "numpy" if backend == "cuda" else backend

    def loss():
        y, _, _ = K.layernorm_forward(x, gamma, beta, activation=act, backend=fwd)
        return float(np.sum(dy * y))

    _, mean, invstd = K.layernorm_forward(x, gamma, beta, backend=backend)
    if act == "relu":
        z = gamma * (x - mean[:, None]) * invstd[:, None] + beta
        assert np.abs(z).min() > 1e-3  # FD would straddle the kink otherwise
    grads = K.layernorm_backward(
        dy, x, (mean, invstd), gamma, beta, activation=act, backend=backend
    )
    h = 1e-6
    names = ("dx", "dgamma", "dbeta")
    for arr, grad, name in zip((x, gamma, beta), grads, names, strict=True):
        fd = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            lp = loss()
            arr[idx] = old - h
            lm = loss()
            arr[idx] = old
            fd[idx] = (lp - lm) / (2 * h)
        # central difference: truncation h^2 |f'''| / 6 ~ 1e-12, rounding
        # eps |loss| / h ~ 1e-10 for a loss of O(1)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_matches_torch_layer_norm_in_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    B, n = 7, 33
    x = rand(rng, (B, n), np.float64, scale=3.0, shift=2.0)
    gamma, beta = params(rng, n, np.float64, "affine")
    dy = rand(rng, (B, n), np.float64)
    e = eps(np.float64)
    for affine in (True, False):
        tx = torch.tensor(x, requires_grad=True)
        tw = torch.tensor(gamma, requires_grad=True) if affine else None
        tb = torch.tensor(beta, requires_grad=True) if affine else None
        ty = torch.nn.functional.layer_norm(tx, (n,), tw, tb, 1e-5)
        ty.backward(torch.tensor(dy))
        for backend in [b for b in BACKENDS if b != "cuda"]:
            y, m, s = K.layernorm_forward(
                x, gamma if affine else None, beta if affine else None, backend=backend
            )
            dx, dg, db = K.layernorm_backward(
                dy,
                x,
                (m, s),
                gamma if affine else None,
                beta if affine else None,
                backend=backend,
            )
            # two float64 evaluations of O(n)-term sums: n eps of the magnitudes
            sc = n * e * (np.abs(y).max() + 1)
            np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=8 * sc)
            gsc = n * e * np.abs(dy).sum(axis=1, keepdims=True) * s[:, None]
            assert_within(dx, tx.grad.numpy(), 8 * gsc, f"{backend} dx vs torch")
            if affine:
                bsc = B * e * np.abs(dy).sum(axis=0) * (1 + np.abs(y).max())
                assert_within(dg, tw.grad.numpy(), 8 * bsc, f"{backend} dgamma")
                assert_within(db, tb.grad.numpy(), 8 * bsc, f"{backend} dbeta")
            else:
                assert dg is None and db is None


# ------------------------------------------------------------------ specials
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(backend, dtype):
    rng = np.random.default_rng(7)
    x = rand(rng, (5, 4), dtype)
    x[1, 2] = np.nan
    x[3, 1] = np.inf
    gamma, beta = params(rng, 4, dtype, "affine")
    y, mean, invstd = K.layernorm_forward(
        x, gamma, beta, activation="tanh", backend=backend
    )
    ry, _, _ = naive.naive_layernorm_forward(x, gamma, beta, 1e-5, "tanh")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ry))
    assert np.isnan(y[[1, 3]]).all() and np.isfinite(y[[0, 2, 4]]).all()
    dx, dg, db = K.layernorm_backward(
        np.ones_like(x),
        x,
        (mean, invstd),
        gamma,
        beta,
        activation="tanh",
        backend=backend,
    )
    assert np.isnan(dx[[1, 3]]).all() and np.isfinite(dx[[0, 2, 4]]).all()
    # every column sum meets the NaN rows
    assert np.isnan(dg).all() and np.isnan(db).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_row_with_eps_zero_gives_nan_like_torch(backend):
    # var = 0 and eps = 0: invstd = inf and xhat = 0 * inf = NaN (torch: the same)
    x = np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]])
    y, _, invstd = K.layernorm_forward(x, eps=0.0, backend=backend)
    assert invstd[0] == np.inf and np.isnan(y[0]).all() and np.isfinite(y[1]).all()


def test_out_arrays_are_written_and_returned():
    rng = np.random.default_rng(8)
    x = rand(rng, (4, 6), np.float32)
    dy = rand(rng, (4, 6), np.float32)
    ref = K.layernorm_forward(x, backend="numpy")
    rdx = K.layernorm_backward(dy, x, ref[1:], backend="numpy")[0]
    for backend in BACKENDS:
        out = np.full_like(x, np.nan)
        om = np.full(4, np.nan, np.float32)
        y, m, s = K.layernorm_forward(x, backend=backend, out=(out, om, None))
        assert y is out and m is om
        np.testing.assert_allclose(y, ref[0], rtol=0, atol=64 * eps(np.float32))
        dout = np.full_like(x, np.nan)
        dx = K.layernorm_backward(dy, x, (m, s), backend=backend, out=(dout, None, None))[0]
        assert dx is dout
        np.testing.assert_allclose(dx, rdx, rtol=0, atol=256 * eps(np.float32))


def test_validation_errors():
    x = np.ones((3, 4))
    g = np.ones(4)
    saved = (np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        K.layernorm_forward(x.astype(np.int64))
    with pytest.raises(TypeError, match="share the dtype"):
        K.layernorm_forward(x, g.astype(np.float32))
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\)"):
        K.layernorm_forward(x, np.ones(3))
    with pytest.raises(ValueError, match="beta was given without gamma"):
        K.layernorm_forward(x, None, g)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        K.layernorm_forward(x, eps=-1e-5)
    with pytest.raises(ValueError, match="2-D"):
        K.layernorm_forward(np.ones(4))
    with pytest.raises(TypeError, match="must have dtype float64"):
        K.layernorm_forward(x, out=(np.empty((3, 4), np.float32), None, None))
    with pytest.raises(ValueError, match=r"out y must have shape \(3, 4\)"):
        K.layernorm_forward(x, out=(np.empty((4, 3)), None, None))
    with pytest.raises(TypeError, match="C-contiguous"):
        K.layernorm_forward(x, out=(np.empty((4, 3)).T, None, None))
    with pytest.raises(TypeError, match="tuple of 3"):
        K.layernorm_forward(x, out=np.empty((3, 4)))
    with pytest.raises(TypeError, match="no affine"):
        K.layernorm_backward(x, x, saved, out=(None, np.empty(4), None))
    with pytest.raises(TypeError, match="saved must be the"):
        K.layernorm_backward(x, x, None)
    with pytest.raises(ValueError, match=r"saved mean must have shape \(3,\)"):
        K.layernorm_backward(x, x, (np.zeros(4), np.ones(4)))  # BatchNorm's (n,)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 4\)"):
        K.layernorm_backward(x, np.ones((3, 5)), saved)
    with pytest.raises(ValueError, match="unknown activation"):
        K.layernorm_backward(x, x, saved, activation="swish")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("numba", "c")])
def test_parallel_and_serial_sweeps_agree(backend, monkeypatch):
    # the sizes here run serially (sweep_threads); force the parallel branch: rows
    # are independent and the column partials are per fixed chunk of rows, added in
    # chunk order, so every output must be bit-identical
    from initdiag.kernels import _threading

    rng = np.random.default_rng(9)
    B, n = 150, 1100  # three row chunks, two row-sum spans
    x = rand(rng, (B, n), np.float32, shift=0.5)
    dy = rand(rng, (B, n), np.float32)
    gamma, beta = params(rng, n, np.float32, "affine")

    def run():
        res = []
        for act in ("relu", "gelu"):
            y, m, s = K.layernorm_forward(
                x, gamma, beta, activation=act, backend=backend
            )
            res += [y, m, s]
            res += K.layernorm_backward(
                dy, x, (m, s), gamma, beta, activation=act, backend=backend
            )
        return res

    serial = run()
    monkeypatch.setattr(_threading, "PAR_MIN_PASSIVE", 1)
    monkeypatch.setattr(_threading, "PAR_MIN_ACTIVE", 1)
    assert _threading.sweep_threads(B * n, 2) == 2
    for got, want in zip(run(), serial, strict=True):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ cuda
@pytest.mark.skipif(not _AVAIL["cuda"]["available"], reason="no CUDA / simulator")
def test_cuda_device_arrays_in_device_arrays_out():
    from numba import cuda

    rng = np.random.default_rng(10)
    x = rand(rng, (5, 9), np.float32)
    dy = rand(rng, (5, 9), np.float32)
    gamma, beta = params(rng, 9, np.float32, "affine")
    d = [cuda.to_device(a) for a in (x, dy, gamma, beta)]
    y, m, s = K.layernorm_forward(d[0], d[2], d[3], activation="relu")  # auto: cuda
    assert all(hasattr(a, "copy_to_host") for a in (y, m, s))
    ry, rm, rs = naive.naive_layernorm_forward(x, gamma, beta, 1e-5, "relu")
    tm, ti, ty = fwd_tol(x, gamma, beta, rm, rs, ry, 1e-5, np.float32)
    assert_within(y.copy_to_host(), ry, ty)
    dx, dg, db = K.layernorm_backward(d[1], d[0], (m, s), d[2], d[3], activation="relu")
    assert all(hasattr(a, "copy_to_host") for a in (dx, dg, db))
    mh, sh = m.copy_to_host(), s.copy_to_host()
    rdx, rdg, rdb = naive.naive_layernorm_backward(dy, x, mh, sh, gamma, beta, "relu")
    tdx, tdg, tdb = bwd_tol(dy, x, mh, sh, gamma, np.float32)
    assert_within(dx.copy_to_host(), rdx, tdx)
    assert_within(dg.copy_to_host(), rdg, tdg)


def test_cuda_kernels_are_listed_for_ptx():
    # tests/test_cuda_ptx.py compiles and assembles every kernel of ptx_kernels()
    cc = pytest.importorskip("initdiag.kernels._cuda_common")
    if cc.cuda is None:
        pytest.skip("numba-cuda unavailable")
    from initdiag.kernels import _cuda_layernorm

    names = {name for name, _, _ in cc.ptx_kernels()}
    jitted = {
        k for k in vars(_cuda_layernorm) if k.startswith("_") and k.endswith("_kernel")
    }
    assert jitted == {"_layernorm_forward_kernel", "_layernorm_backward_kernel"}
    # dgamma / dbeta: BatchNorm's column reduction, compiled with per-row statistics
    assert jitted | {"_batchnorm_backward_reduce_kernel"} <= names

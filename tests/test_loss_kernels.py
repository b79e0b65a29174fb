"""The loss heads (``initdiag.kernels.mse_loss_grad`` / ``softmax_xent_grad``).

numpy, numba, c and cuda (under numba's CUDA simulator, which tests/conftest.py
switches on), both dtypes, against the float64 loops of tests/naive.py;
the gradients against central finite differences of the loss in float64; the
losses and gradients against torch.nn.functional; the stable log-sum-exp at
logits ~ 1e4, argmax ties, non-finite logits, thread-count independence and the
error messages.

Tolerances (u = eps / 2 of the array dtype, e64 = float64 eps).  MSE: d = y - t
is one rounding in the dtype, so d^2 is within 2 u relative and the float64 sum
of N terms adds N e64: |loss - ref| <= (2 eps + N e64) loss; the gradient is
three roundings (d, 2 / N, the product): 2 eps |ref|.  Softmax: everything
runs in float64 from exactly converted logits; a row sums C exponentials
(C e64 relative), the row loss M + log S - z_y adds a few e64 of |M| + |z_y|,
and the mean over B rows B e64: 4 (B + C) e64 (1 + max |M| + |z_y|).  Each
gradient entry is a float64 value within (C + 4) e64 / B of the exact one,
rounded once to the dtype: u |ref| + 4 (C + 4) e64 / B (the exponentials' argument
z - M is the same correctly rounded float64 difference in every implementation,
so its rounding cancels out of the comparison).
"""

from __future__ import annotations

import naive  # noqa: E402  (tests/ is on sys.path under pytest's rootdir layout)
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import initdiag.kernels as K
from initdiag.kernels import _cuda_common as cc
from initdiag.kernels import loss

CPU = ("numpy", "numba", "c")
ALL = (*CPU, "cuda")
DTYPES = (np.float32, np.float64)
SHAPES = ((1, 1), (7, 5), (13, 10))
E64 = float(np.finfo(np.float64).eps)


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    # several rows a block's grid-stride loop, partial blocks (cuda backend)
    monkeypatch.setattr(cc, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(cc, "MAX_BLOCKS", 2)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def mse_tols(ref_loss, ref_grad, dtype):
    return (2 * eps(dtype) + ref_grad.size * E64) * ref_loss, 2 * eps(dtype) * np.abs(
        ref_grad
    )


def xent_tols(z, labels, ref_grad, dtype):
    z = np.asarray(z, np.float64)
    B, C = z.shape
    mag = 1 + np.max(np.abs(z.max(axis=1)) + np.abs(z[np.arange(B), labels]))
    t_loss = 4 * (B + C) * E64 * mag
    t_grad = eps(dtype) / 2 * np.abs(ref_grad) + 4 * (C + 4) * E64 / B
    return t_loss, t_grad


def assert_grad(got, ref, tol):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    fin = np.isfinite(ref)
    err = np.abs(got - ref)[fin]
    tol = np.broadcast_to(tol, ref.shape)[fin]
    assert (err <= tol).all(), (err.max(), err[err > tol][:5], tol[err > tol][:5])


# ------------------------------------------------------------------ vs loops
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_against_loops(backend, dtype):
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        y = rng.standard_normal(shape).astype(dtype)
        t = rng.standard_normal(shape).astype(dtype)
        got_loss, grad = K.mse_loss_grad(y, t, backend=backend)
        assert isinstance(got_loss, float)
        assert grad.dtype == dtype and grad.shape == shape
        ref_loss, ref_grad = naive.naive_mse_loss_grad(y, t)
        t_loss, t_grad = mse_tols(ref_loss, ref_grad, dtype)
        assert abs(got_loss - ref_loss) <= t_loss
        assert_grad(grad, ref_grad, t_grad)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_against_loops(backend, dtype):
    rng = np.random.default_rng(2)
    for B, C in SHAPES:
        z = (3 * rng.standard_normal((B, C))).astype(dtype)
        labels = rng.integers(0, C, B).astype(np.int32)
        got_loss, n_correct, grad = K.softmax_xent_grad(z, labels, backend=backend)
        assert isinstance(got_loss, float) and isinstance(n_correct, int)
        assert grad.dtype == dtype and grad.shape == (B, C)
        ref_loss, ref_correct, ref_grad = naive.naive_softmax_xent_grad(z, labels)
        t_loss, t_grad = xent_tols(z, labels, ref_grad, dtype)
        assert abs(got_loss - ref_loss) <= t_loss
        assert n_correct == ref_correct
        assert_grad(grad, ref_grad, t_grad)


@pytest.mark.parametrize("backend", ALL)
def test_out_is_written_and_returned(backend):
    rng = np.random.default_rng(3)
    y = rng.standard_normal((4, 3))
    t = rng.standard_normal((4, 3))
    out = np.empty((4, 3))
    _, g = K.mse_loss_grad(y, t, out=out, backend=backend)
    assert g is out
    ref = naive.naive_mse_loss_grad(y, t)[1]
    y_copy = y.copy()
    _, g = K.mse_loss_grad(y_copy, t, out=y_copy, backend=backend)  # in place
    assert g is y_copy
    assert_grad(g, ref, 2 * E64 * np.abs(ref))
    labels = np.array([0, 2, 1, 1])
    out = np.empty((4, 3))
    assert K.softmax_xent_grad(y, labels, out=out, backend=backend)[2] is out


# ------------------------------------------------------------------ finite differences
def _central_differences(f, x, h):
    g = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("backend", CPU)
def test_gradients_against_finite_differences(backend):
    # central differences: truncation h^2 / 6 |L'''| (0 for the quadratic MSE;
    # for log-sum-exp |d^3/dz^3| = |p (1 - p)(1 - 2 p)| <= 0.1, divided by B) and
    # cancellation ~ 2 e64 |L| / h
    rng = np.random.default_rng(4)
    h = 1e-5
    B, C = 4, 5
    y = rng.standard_normal((B, C))
    t = rng.standard_normal((B, C))
    loss_mse, g = K.mse_loss_grad(y, t, backend=backend)
    fd = _central_differences(lambda a: K.mse_loss_grad(a, t, backend=backend)[0], y, h)
    assert np.abs(g - fd).max() <= 4 * E64 * loss_mse / h
    z = 2 * rng.standard_normal((B, C))
    labels = rng.integers(0, C, B)
    loss_x, _, g = K.softmax_xent_grad(z, labels, backend=backend)
    fd = _central_differences(
        lambda a: K.softmax_xent_grad(a, labels, backend=backend)[0], z, h
    )
    assert np.abs(g - fd).max() <= 4 * E64 * loss_x / h + h**2 / 6 * 0.1 / B


# ------------------------------------------------------------------ vs torch
@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_torch(backend, dtype):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    B, C = 16, 10
    # torch reduces in the dtype (float32 sums of B C terms: about log2(B C) u
    # relative with its pairwise / vectorised order) where we reduce in float64
    e = eps(dtype) * np.log2(B * C)
    y = rng.standard_normal((B, C)).astype(dtype)
    t = rng.standard_normal((B, C)).astype(dtype)
    ty = torch.from_numpy(y.copy()).requires_grad_()
    ref = F.mse_loss(ty, torch.from_numpy(t))
    ref.backward()
    got, g = K.mse_loss_grad(y, t, backend=backend)
    assert abs(got - ref.item()) <= 2 * e * ref.item()
    assert_grad(g, ty.grad.numpy().astype(np.float64), 2 * eps(dtype) * np.abs(g))
    z = (3 * rng.standard_normal((B, C))).astype(dtype)
    labels = rng.integers(0, C, B)
    tz = torch.from_numpy(z.copy()).requires_grad_()
    ref = F.cross_entropy(tz, torch.from_numpy(labels))
    ref.backward()
    got, n_correct, g = K.softmax_xent_grad(z, labels, backend=backend)
    mag = 1 + np.abs(z).max()
    assert abs(got - ref.item()) <= 4 * e * mag
    assert n_correct == int((tz.argmax(dim=1).numpy() == labels).sum())
    # torch's softmax runs in the dtype: a few u of each probability, over B
    assert_grad(g, tz.grad.numpy().astype(np.float64), 4 * eps(dtype) / B)


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_is_stable_for_huge_logits(backend, dtype):
    rng = np.random.default_rng(6)
    B, C = 6, 7
    z = (1e4 + 3 * rng.standard_normal((B, C))).astype(dtype)
    z[1] = -z[1]
    labels = rng.integers(0, C, B)
    got_loss, n_correct, grad = K.softmax_xent_grad(z, labels, backend=backend)
    assert np.isfinite(got_loss) and np.isfinite(grad).all()
    ref_loss, ref_correct, ref_grad = naive.naive_softmax_xent_grad(z, labels)
    t_loss, t_grad = xent_tols(z, labels, ref_grad, dtype)
    assert abs(got_loss - ref_loss) <= t_loss
    assert n_correct == ref_correct
    assert_grad(grad, ref_grad, t_grad)
    # shifting every logit of a row leaves softmax unchanged: the same loss as the
    # row minus its maximum (exact in float64 for these float32 / float64 values)
    shifted = (z.astype(np.float64) - z.max(axis=1, keepdims=True)).astype(dtype)
    loss2, _, _ = K.softmax_xent_grad(shifted, labels, backend=backend)
    assert abs(got_loss - loss2) <= t_loss


@pytest.mark.parametrize("backend", ALL)
def test_equal_logits_tie_to_the_first_class(backend):
    B, C = 3, 4
    z = np.full((B, C), 0.25, np.float32)
    labels = np.array([0, 1, 3])
    got_loss, n_correct, grad = K.softmax_xent_grad(z, labels, backend=backend)
    assert n_correct == 1  # argmax of a tie is the first class (np / torch.argmax)
    assert abs(got_loss - np.log(C)) <= 4 * (B + C) * E64 * 2
    ref = np.full((B, C), 1 / C) - np.eye(C)[labels]
    assert_grad(grad, ref / B, eps(np.float32) / 2 * np.abs(ref / B) + 1e-15)


# the CUDA simulator runs the kernel on NumPy scalars, which warn on inf - inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_logits_do_not_crash(backend):
    rng = np.random.default_rng(7)
    z = rng.standard_normal((4, 5))
    z[1, 2] = np.nan
    z[2, 3] = np.inf
    labels = np.array([0, 2, 1, 4])
    got_loss, n_correct, grad = K.softmax_xent_grad(z, labels, backend=backend)
    assert np.isnan(got_loss)
    assert np.isnan(grad[1]).all() and np.isnan(grad[2]).all()
    ref_loss, ref_correct, ref_grad = naive.naive_softmax_xent_grad(z, labels)
    assert n_correct == ref_correct  # the NaN of row 1 is its argmax (label 2)
    assert_grad(grad[[0, 3]], ref_grad[[0, 3]], 4 * 9 * E64 / 4)
    # a label whose logit alone is -inf: an infinite loss, finite gradients
    z1 = np.array([[0.0, -np.inf, 1.0]])
    inf_loss, _, g1 = K.softmax_xent_grad(z1, np.array([1]), backend=backend)
    assert inf_loss == np.inf and np.isfinite(g1).all()
    y = np.ones((2, 2))
    y[0, 1] = np.inf
    assert K.mse_loss_grad(y, np.zeros((2, 2)), backend=backend)[0] == np.inf


@pytest.mark.parametrize("backend", ("c",))  # numba's loss heads are serial
def test_losses_do_not_depend_on_the_thread_count(backend, monkeypatch):
    rng = np.random.default_rng(8)
    z = rng.standard_normal((257, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 257)
    t = rng.standard_normal((257, 10)).astype(np.float32)
    res = []
    for nt in (1, 2):
        monkeypatch.setattr(loss, "loss_threads", lambda *a, _n=nt, **k: _n)
        res.append((K.softmax_xent_grad(z, labels, backend=backend),
                    K.mse_loss_grad(z, t, backend=backend)))  # fmt: skip
    (x1, m1), (x2, m2) = res
    assert x1[0] == x2[0] and x1[1] == x2[1] and m1[0] == m2[0]
    np.testing.assert_array_equal(x1[2], x2[2])
    np.testing.assert_array_equal(m1[1], m2[1])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "labels, exc, match",
    [
        (np.array([0, 12, 1]), ValueError, r"labels\[1\] = 12 is outside \[0, 4\)"),
        (np.array([0, 1, -1]), ValueError, r"labels\[2\] = -1 is outside"),
        (np.array([0.0, 1.0, 2.0]), TypeError, "integer class indices .* float64"),
        (np.eye(3, 4), TypeError, "not one-hot"),
        (np.array([0, 1]), ValueError, r"shape \(3,\), one class index per row"),
        ([0, 1, 2], TypeError, "labels must be a NumPy integer array"),
    ],
)  # fmt: skip
def test_softmax_bad_labels(labels, exc, match):
    with pytest.raises(exc, match=match):
        K.softmax_xent_grad(np.zeros((3, 4)), labels, backend="numpy")


def test_bad_logits_and_targets():
    with pytest.raises(TypeError, match="logits must be float32 or float64; got int64"):
        K.softmax_xent_grad(np.zeros((3, 4), np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        K.softmax_xent_grad(np.zeros(4), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="target must have shape"):
        K.mse_loss_grad(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(TypeError, match="target has dtype float32"):
        K.mse_loss_grad(np.zeros((3, 4)), np.zeros((3, 4), np.float32))
    z = np.zeros((3, 4))
    with pytest.raises(ValueError, match="logits and out share memory"):
        K.softmax_xent_grad(z, np.zeros(3, np.int64), out=z)


def test_cuda_takes_device_arrays():
    from numba import cuda

    rng = np.random.default_rng(9)
    z = rng.standard_normal((9, 6)).astype(np.float32)
    labels = rng.integers(0, 6, 9)
    d_z, d_lab = cuda.to_device(z), cuda.to_device(labels)
    got_loss, n_correct, d_g = K.softmax_xent_grad(d_z, d_lab)  # auto: cuda
    assert hasattr(d_g, "copy_to_host")
    ref_loss, ref_correct, ref_grad = naive.naive_softmax_xent_grad(z, labels)
    t_loss, t_grad = xent_tols(z, labels, ref_grad, np.float32)
    assert abs(got_loss - ref_loss) <= t_loss and n_correct == ref_correct
    assert_grad(d_g.copy_to_host(), ref_grad, t_grad)
    bad = cuda.to_device(np.array([0, 1, 2, 3, 4, 5, 6, 0, 0]))
    with pytest.raises(ValueError, match=r"labels\[6\] = 6 is outside \[0, 6\)"):
        K.softmax_xent_grad(d_z, bad)


# ------------------------------------------------------------------ hypothesis
_HSET = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_HSET
@given(data=st.data())
@pytest.mark.parametrize("backend", CPU)
def test_hypothesis_shapes_and_magnitudes(backend, data):
    # batch 1, one class, odd sizes, logits up to 1e30 in magnitude; layouts that
    # the dispatcher copies once (Fortran order, strided)
    dtype = data.draw(st.sampled_from(DTYPES))
    B = data.draw(st.integers(1, 9))
    C = data.draw(st.integers(1, 11))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal((B, C))).astype(dtype)
    if data.draw(st.booleans()):
        z = np.asfortranarray(z)
    labels = rng.integers(0, C, B).astype(
        data.draw(st.sampled_from(["i1", "u2", "i8"]))
    )
    got_loss, n_correct, grad = K.softmax_xent_grad(z, labels, backend=backend)
    ref_loss, ref_correct, ref_grad = naive.naive_softmax_xent_grad(z, labels)
    t_loss, t_grad = xent_tols(z, labels, ref_grad, dtype)
    assert abs(got_loss - ref_loss) <= t_loss
    assert n_correct == ref_correct
    assert_grad(grad, ref_grad, t_grad)
    y = z[:, ::-1] if C > 1 else z
    t = (rng.standard_normal((B, C))).astype(dtype)
    got_loss, grad = K.mse_loss_grad(y, t, backend=backend)
    ref_loss, ref_grad = naive.naive_mse_loss_grad(y, t)
    t_loss, t_grad = mse_tols(ref_loss, ref_grad, dtype)
    assert abs(got_loss - ref_loss) <= t_loss
    assert_grad(grad, ref_grad, t_grad)

"""``out=`` on every public kernel op and every backend (CUDA under the simulator).

The convention (``initdiag.kernels`` docstring): ``out`` mirrors the op's array
results, one array or a tuple in the order returned; the returned arrays are the
given ones and hold what a call without ``out`` returns; ops returning numbers
write them into the float64 buffer given as ``out``.  Bad buffers raise TypeError
(dtype, contiguity, tuple length) or ValueError (shape).  The kernels are
deterministic (fixed reduction orders), so the two calls agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import initdiag.kernels as K

AVAILABLE = K.available_backends()
BACKENDS = [b for b in ("numpy", "numba", "c", "cuda") if AVAILABLE[b]["available"]]
FUSED_BACKENDS = [b for b in ("numpy", "numba") if b in BACKENDS]

rng = np.random.default_rng(0)
X = rng.standard_normal((6, 5))
W = rng.standard_normal((3, 5))
BIAS = rng.standard_normal(3)
DY = rng.standard_normal((6, 3))
G5 = rng.standard_normal((6, 5))
GAMMA = rng.uniform(0.5, 1.5, 5)
BETA = rng.standard_normal(5) * 0.3


def _arrays(r):
    return r if isinstance(r, tuple) else (r,)


def _like(r):
    """An out= structure of fresh buffers shaped as the result ``r``."""
    bufs = tuple(None if a is None else np.full_like(a, np.nan) for a in _arrays(r))
    return bufs if isinstance(r, tuple) else bufs[0]


def _ops(dt):
    """(name, call(backend, out)) for every op that returns arrays."""
    x, w, b, dy, g5 = (a.astype(dt) for a in (X, W, BIAS, DY, G5))
    gamma, beta = GAMMA.astype(dt), BETA.astype(dt)
    y, mean, invstd = K.batchnorm_forward(x, gamma, beta, backend="numpy")
    return [
        (
            "dense_forward",
            lambda be, out: K.dense_forward(
                x, w, b, activation="tanh", backend=be, out=out
            ),
        ),
        (
            "dense_forward_pre",
            lambda be, out: K.dense_forward(
                x,
                w,
                b,
                activation="relu",
                return_preactivation=True,
                backend=be,
                out=out,
            ),
        ),
        (
            "dense_backward",
            lambda be, out: K.dense_backward(dy, x, w, backend=be, out=out),
        ),
        (
            "dense_backward_nobias",
            lambda be, out: K.dense_backward(dy, x, w, bias=False, backend=be, out=out),
        ),
        (
            "activation_forward",
            lambda be, out: K.activation_forward(x, "gelu", backend=be, out=out),
        ),
        (
            "activation_backward",
            lambda be, out: K.activation_backward(
                g5, x, activation="relu", backend=be, out=out
            ),
        ),
        (
            "batchnorm_forward",
            lambda be, out: K.batchnorm_forward(
                x, gamma, beta, activation="relu", backend=be, out=out
            ),
        ),
        (
            "batchnorm_backward",
            lambda be, out: K.batchnorm_backward(
                g5,
                x,
                (mean, invstd),
                gamma,
                beta,
                activation="relu",
                backend=be,
                out=out,
            ),
        ),
        ("column_stats", lambda be, out: K.column_stats(x, backend=be, out=out)),
        (
            "layer_summary_array",
            lambda be, out: K.layer_summary_array(x, out, backend=be),
        ),
    ]


def _fused_ops(dt):
    x, g5 = X.astype(dt), G5.astype(dt)
    m, s = X.mean(axis=0), 1 / X.std(axis=0)
    a = X.astype(dt)
    return [
        (
            "layer_stats",
            lambda be, out: K.layer_stats(x, column_moments=True, backend=be, out=out),
        ),
        (
            "unit_forward",
            lambda be, out: K.unit_forward(
                x,
                m,
                s,
                GAMMA,
                BETA,
                activation="relu",
                record_y=True,
                backend=be,
                out=out,
            ),
        ),
        (
            "unit_backward",
            lambda be, out: K.unit_backward(
                g5, x, m, s, GAMMA, BETA, activation="tanh", backend=be, out=out
            ),
        ),
        ("gram", lambda be, out: K.gram(a, backend=be, out=out)),
    ]


def _check_out(call, backend):
    ref = call(backend, None)
    out = _like(ref)
    got = call(backend, out)
    for g, o, r in zip(_arrays(got), _arrays(out), _arrays(ref), strict=True):
        if r is None:
            assert g is None and o is None
            continue
        assert g is o
        np.testing.assert_array_equal(g, r)


CASES = [(b, False) for b in BACKENDS] + [(b, True) for b in FUSED_BACKENDS]


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize(("backend", "fused_ops"), CASES)
def test_out_is_returned_and_equals_allocated_result(backend, fused_ops, dt):
    for name, call in (_fused_ops if fused_ops else _ops)(dt):
        try:
            _check_out(call, backend)
        except AssertionError as exc:
            raise AssertionError(f"{name} on {backend}: {exc}") from exc


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_the_number_valued_ops(backend):
    x = X.astype(np.float32)
    buf = np.full(8, np.nan)
    d = K.layer_summary(x, backend=backend, out=buf)
    assert (
        list(d.values())
        == buf.tolist()
        == list(K.layer_summary(x, backend=backend).values())
    )
    cell = np.full(1, np.nan)
    c = K.row_correlation(x, backend=backend, out=cell)
    assert c == cell[0] == K.row_correlation(x, backend=backend)
    c2, G = K.row_correlation(x, gram=True, backend=backend, out=cell)
    assert c2 == cell[0] and G.shape == (6, 6)
    if backend in FUSED_BACKENDS:
        Gm = K.gram(x, backend=backend)
        two = np.full(2, np.nan)
        s, t = K.gram_dot(Gm, Gm, backend=backend, out=two)
        assert (s, t) == tuple(two) == K.gram_dot(Gm, Gm, backend=backend)


def test_cuda_device_arrays_with_device_out():
    if "cuda" not in BACKENDS:
        pytest.skip("cuda backend unavailable")
    from numba import cuda

    x = X.astype(np.float32)
    w = W.astype(np.float32)
    gamma, beta = GAMMA.astype(np.float32), BETA.astype(np.float32)
    dx, dw = cuda.to_device(x), cuda.to_device(w)
    out = cuda.device_array((6, 3), np.float32)
    y = K.dense_forward(dx, dw, activation="relu", out=out)
    assert y is out
    np.testing.assert_array_equal(
        y.copy_to_host(), K.dense_forward(x, w, activation="relu", backend="cuda")
    )
    outs = (
        cuda.device_array((6, 5), np.float32),
        cuda.device_array(5, np.float32),
        cuda.device_array(5, np.float32),
    )
    res = K.batchnorm_forward(dx, cuda.to_device(gamma), cuda.to_device(beta), out=outs)
    assert all(r is o for r, o in zip(res, outs, strict=True))
    host = K.batchnorm_forward(x, gamma, beta, backend="cuda")
    for r, h in zip(res, host, strict=True):
        np.testing.assert_array_equal(r.copy_to_host(), h)
    with pytest.raises(TypeError, match="device"):
        K.dense_forward(dx, dw, out=np.empty((6, 3), np.float32))


def _bad_outs(r):
    """(bad out, exception, message) variants of the good out structure of r."""
    arrs = _arrays(r)
    k = next(i for i, a in enumerate(arrs) if a is not None)
    a = arrs[k]

    def swap(bad):
        lst = list(arrs)
        lst[k] = bad
        return tuple(lst) if isinstance(r, tuple) else bad

    other = np.float32 if a.dtype == np.float64 else np.float64
    wide = np.empty((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
    yield swap(np.empty((a.shape[0] + 1, *a.shape[1:]), a.dtype)), ValueError, "shape"
    yield swap(np.empty(a.shape, other)), TypeError, "dtype"
    yield swap(wide[..., ::2]), TypeError, "C-contiguous"
    if isinstance(r, tuple):
        yield tuple(arrs[:-1]), TypeError, "tuple"
        yield a.copy(), TypeError, "tuple"
    else:
        yield (a.copy(),), TypeError, "one array"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_raises_a_clear_error(backend):
    dt = np.float32
    ops = _ops(dt) + (_fused_ops(dt) if backend in FUSED_BACKENDS else [])
    for name, call in ops:
        ref = call(backend, None)
        for bad, exc, msg in _bad_outs(ref):
            with pytest.raises(exc, match=msg):
                call(backend, bad)
                pytest.fail(f"{name} on {backend} accepted a bad out")
    with pytest.raises(ValueError, match="bias=False"):
        K.dense_backward(
            DY, X, W, bias=False, backend=backend, out=(None, None, np.empty(3))
        )

"""The optimizer updates (``initdiag.kernels.sgd_update`` / ``adam_update``).

Every backend (numpy, numba, c, and cuda under numba's CUDA simulator, which
tests/conftest.py switches on) and both dtypes against the element-by-element
float64 loops of tests/naive.py, step by step over several steps; the CPU
variants against each other bit for bit (serial and in parallel chunks); and
five float32 steps against torch.optim.SGD / Adam / AdamW.

Tolerances (u = eps / 2, the unit roundoff of the array dtype).  Each step is
checked from the kernel's own state before that step, so the bound is that of
one update.  SGD: the new velocity is at most 4 roundings (wd p, +, mu v, +)
away from the exact value, each bounded by u times a term of S_v = mu |v| +
|g| + wd |p|; the parameter at most 4 more (mu v', +, lr d, -), plus the
rounding of the three hyper-parameters to the dtype: 11 u < 8 eps times the
magnitudes |p| + lr S_d.  Adam: m' and v' are 3-4 roundings of terms of S_m =
|m| + (1 - beta1)(|g'| + |m|) and of v' itself (8 eps); the step (ss m') /
denom inherits m's error and about 4 eps relative from the denominator (the
square root halves v's relative error), so 16 eps (|p| + ss S_m / denom).
"""

from __future__ import annotations

import naive  # noqa: E402  (tests/ is on sys.path under pytest's rootdir layout)
import numpy as np
import pytest

import initdiag.kernels as K
from initdiag.kernels import _cuda_common as cc
from initdiag.kernels import optim

ALL = ("numpy", "numba", "c", "cuda")
DTYPES = (np.float32, np.float64)
SHAPES = ((37,), (5, 13))
STEPS = 4

SGD_CASES = (
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.05),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
)
ADAM_CASES = (
    dict(lr=1e-2),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.1, decoupled=True),
)


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    # several blocks and the grid-stride loop on tiny shapes (cuda backend)
    monkeypatch.setattr(cc, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(cc, "MAX_BLOCKS", 2)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_within(got, ref, tol, what):
    err = np.abs(f64(got) - ref)
    bad = err > tol
    assert not bad.any(), (what, err[bad][:5], tol[bad][:5])


# ------------------------------------------------------------------ vs loops
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_against_loops_step_by_step(backend, dtype):
    rng = np.random.default_rng(3)
    e = eps(dtype)
    for shape in SHAPES:
        for case in SGD_CASES:
            mu = case.get("momentum", 0.0)
            wd = case.get("weight_decay", 0.0)
            p = rng.standard_normal(shape).astype(dtype)
            v = np.zeros(shape, dtype) if mu else None
            for _ in range(STEPS):
                g = rng.standard_normal(shape).astype(dtype)
                p0, v0 = p.copy(), None if v is None else v.copy()
                K.sgd_update(p, g, v, backend=backend, **case)
                ref_p, ref_v = naive.naive_sgd_update(
                    p0, g, v0, case["lr"], mu, wd, case.get("nesterov", False)
                )
                s_g = np.abs(f64(g)) + wd * np.abs(f64(p0))
                s_v = s_g + (mu * np.abs(f64(v0)) if mu else 0.0)
                if not mu:
                    s_d = s_g
                else:
                    s_d = s_g + mu * s_v if case.get("nesterov") else s_v
                    assert_within(v, ref_v, 8 * e * s_v, (case, "velocity"))
                tol = 8 * e * (np.abs(f64(p0)) + case["lr"] * s_d)
                assert_within(p, ref_p, tol, (case, "param"))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_against_loops_step_by_step(backend, dtype):
    rng = np.random.default_rng(4)
    e = eps(dtype)
    for shape in SHAPES:
        for case in ADAM_CASES:
            kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
            kw.update(case)
            p = rng.standard_normal(shape).astype(dtype)
            m = np.zeros(shape, dtype)
            v = np.zeros(shape, dtype)
            for step in range(1, STEPS + 1):
                g = rng.standard_normal(shape).astype(dtype)
                p0, m0, v0 = p.copy(), m.copy(), v.copy()
                K.adam_update(p, g, m, v, step=step, backend=backend, **case)
                ref_p, ref_m, ref_v = naive.naive_adam_update(
                    p0, g, m0, v0, step, kw["lr"], kw["beta1"], kw["beta2"],
                    kw["eps"], kw["weight_decay"], kw.get("decoupled", False),
                )  # fmt: skip
                wd = 0.0 if kw.get("decoupled") else kw["weight_decay"]
                s_g = np.abs(f64(g)) + wd * np.abs(f64(p0))
                s_m = np.abs(f64(m0)) + (1 - kw["beta1"]) * (s_g + np.abs(f64(m0)))
                assert_within(m, ref_m, 8 * e * s_m, (case, step, "m"))
                assert_within(v, ref_v, 8 * e * ref_v, (case, step, "v"))
                ss = kw["lr"] / (1 - kw["beta1"] ** step)
                denom = np.sqrt(ref_v / (1 - kw["beta2"] ** step)) + kw["eps"]
                tol = 16 * e * (np.abs(f64(p0)) + ss * s_m / denom)
                assert_within(p, ref_p, tol, (case, step, "param"))


@pytest.mark.parametrize("backend", ("numba", "c"))
def test_cpu_variants_equal_the_reference_bit_for_bit_in_parallel(backend, monkeypatch):
    # more than one PAR_CHUNK, on two threads: the chunked loops compute each
    # element exactly as the serial NumPy reference does
    monkeypatch.setattr(optim, "update_threads", lambda *a, **k: 2)
    rng = np.random.default_rng(5)
    shape = (3, optim.PAR_CHUNK + 7)
    for dtype in DTYPES:
        p0 = rng.standard_normal(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        res = {}
        for b in ("numpy", backend):
            p, v = p0.copy(), np.zeros(shape, dtype)
            q, m, w = p0.copy(), np.zeros(shape, dtype), np.zeros(shape, dtype)
            for step in (1, 2):
                K.sgd_update(p, g, v, lr=0.1, momentum=0.9, nesterov=True, backend=b)
                K.adam_update(q, g, m, w, step=step, lr=1e-3, weight_decay=0.1,
                              decoupled=step == 2, backend=b)  # fmt: skip
            res[b] = (p, v, q, m, w)
        for a, b in zip(res["numpy"], res[backend], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ("numpy", "c"))
def test_nonfinite_values_propagate(backend):
    p = np.array([1.0, np.nan, 2.0, 3.0], np.float32)
    g = np.array([np.inf, 1.0, np.nan, 1.0], np.float32)
    v = np.zeros(4, np.float32)
    K.sgd_update(p, g, v, lr=0.1, momentum=0.9, backend=backend)
    assert np.isinf(p[0]) and np.isnan(p[1]) and np.isnan(p[2]) and np.isfinite(p[3])
    q = np.ones(4, np.float32)
    m, w = np.zeros(4, np.float32), np.zeros(4, np.float32)
    K.adam_update(q, g, m, w, step=1, lr=0.1, backend=backend)
    # inf / sqrt(inf) is NaN: a diverged gradient poisons its parameter
    assert np.isnan(q[0]) and np.isnan(q[2]) and np.isfinite(q[[1, 3]]).all()


def test_momentum_zero_leaves_a_given_velocity_untouched():
    p = np.ones(3)
    v = np.full(3, 7.0)
    K.sgd_update(p, np.ones(3), v, lr=0.5, backend="numpy")
    np.testing.assert_array_equal(p, 0.5)
    np.testing.assert_array_equal(v, 7.0)


# ------------------------------------------------------------------ vs torch
def _torch():
    return pytest.importorskip("torch", reason="torch is not installed")


TORCH_STEPS = 5


def _torch_trajectory(torch, cls, p0, grads, **kw):
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = cls([tp], foreach=False, **kw)
    path = [p0.astype(np.float64)]
    for g in grads:
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        path.append(tp.detach().numpy().astype(np.float64))
    return np.array(path)


def _torch_tol(path):
    # Both sides round each step's few operations (torch fuses some into FMAs),
    # a few u of |p| or of the step |dp|; a difference made at step t is carried
    # by the state (momentum, m, v) into the later steps, so over T steps the
    # bound grows linearly: 4 T eps (max |p_t| + sum_t |dp_t|).
    e = eps(np.float32)
    steps = np.abs(np.diff(path, axis=0)).sum(axis=0)
    return 4 * TORCH_STEPS * e * (np.abs(path).max(axis=0) + steps)


@pytest.mark.parametrize("backend", ALL)
def test_against_torch_sgd(backend):
    torch = _torch()
    rng = np.random.default_rng(6)
    shape = (6, 11)
    p0 = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(TORCH_STEPS)]
    for case in SGD_CASES:
        path = _torch_trajectory(torch, torch.optim.SGD, p0, grads, **case)
        p = p0.copy()
        v = np.zeros(shape, np.float32) if case.get("momentum") else None
        for g in grads:
            K.sgd_update(p, g, v, backend=backend, **case)
        assert_within(p, path[-1], _torch_tol(path), case)


@pytest.mark.parametrize("backend", ALL)
def test_against_torch_adam_and_adamw(backend):
    torch = _torch()
    rng = np.random.default_rng(7)
    shape = (6, 11)
    p0 = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(TORCH_STEPS)]
    for case in ADAM_CASES:
        kw = dict(case)
        decoupled = kw.pop("decoupled", False)
        if "beta1" in kw:
            kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        kw.setdefault("weight_decay", 0.0)  # AdamW's default is 0.01
        path = _torch_trajectory(torch, cls, p0, grads, **kw)
        p, m, v = p0.copy(), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        for step, g in enumerate(grads, 1):
            K.adam_update(p, g, m, v, step=step, backend=backend, **case)
        assert_within(p, path[-1], _torch_tol(path), case)


# ------------------------------------------------------------------ bad input
def _arrays(shape=(3, 4), dtype=np.float64):
    return np.ones(shape, dtype), np.ones(shape, dtype), np.zeros(shape, dtype)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
        (dict(momentum=0.9, velocity=None), ValueError, "needs a velocity array"),
        (dict(lr=-1.0), ValueError, r"lr must be >= 0; got -1.0"),
        (dict(lr="0.1"), TypeError, "lr must be a real number"),
        (dict(momentum=float("nan")), ValueError, "momentum must be finite"),
        (dict(nesterov=1, momentum=0.9), TypeError, "nesterov must be True or False"),
        (dict(grad=np.ones((4, 3))), ValueError, r"grad must have shape \(3, 4\)"),
        (dict(grad=np.ones((3, 4), np.float32)), TypeError, "grad has dtype float32"),
        (dict(param=np.ones((3, 4), np.int64)), TypeError, "got int64"),
        (dict(param=np.ones((2, 3, 4))), ValueError, r"or 2-D .* \(2, 3, 4\)"),
        (dict(param=np.ones((3, 8))[:, ::2]), TypeError, "must be C-contiguous"),
        (dict(param=[1.0, 2.0]), TypeError, "param must be a NumPy array"),
        (dict(momentum=0.9, velocity=np.zeros((3, 5))), ValueError, "velocity must"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)  # fmt: skip
def test_sgd_bad_input(change, exc, match):
    p, g, v = _arrays()
    kw = dict(param=p, grad=g, velocity=v, lr=0.1)
    kw.update(change)
    with pytest.raises(exc, match=match):
        K.sgd_update(kw.pop("param"), kw.pop("grad"), kw.pop("velocity"), **kw)


def test_sgd_rejects_aliased_state():
    p, g, _ = _arrays()
    with pytest.raises(ValueError, match="param and velocity share memory"):
        K.sgd_update(p, g, p, lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(step=0), ValueError, r"step must be >= 1 .*got 0"),
        (dict(step=1.0), TypeError, "step must be an integer"),
        (dict(step=True), TypeError, "step must be an integer"),
        (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1.0\); got 1.0"),
        (dict(beta2=-0.1), ValueError, r"beta2 must be in \[0, 1.0\)"),
        (dict(eps=float("inf")), ValueError, "eps must be finite"),
        (dict(lr=1e39), ValueError, "overflows float32"),
        (dict(decoupled="yes"), TypeError, "decoupled must be True or False"),
        (dict(m=np.zeros((3, 4), np.float64)), TypeError, "m has dtype float64"),
        (dict(v=np.zeros(12, np.float32)), ValueError, "v must be 2-D"),
    ],
)  # fmt: skip
def test_adam_bad_input(change, exc, match):
    p, g, m = _arrays(dtype=np.float32)
    kw = dict(param=p, grad=g, m=m, v=np.zeros_like(p), step=1, lr=1e-3)
    kw.update(change)
    args = [kw.pop(k) for k in ("param", "grad", "m", "v")]
    with pytest.raises(exc, match=match):
        K.adam_update(*args, **kw)


def test_adam_rejects_aliased_moments():
    p, g, m = _arrays()
    with pytest.raises(ValueError, match="m and v share memory"):
        K.adam_update(p, g, m, m, step=1, lr=1e-3)


def test_cuda_updates_device_arrays_in_place():
    from numba import cuda

    rng = np.random.default_rng(8)
    p0 = rng.standard_normal((5, 9)).astype(np.float32)
    g = rng.standard_normal((5, 9)).astype(np.float32)
    d_p, d_g, d_v = cuda.to_device(p0), cuda.to_device(g), cuda.to_device(0 * p0)
    K.sgd_update(d_p, d_g, d_v, lr=0.1, momentum=0.9)  # auto: cuda for device input
    ref_p, ref_v = naive.naive_sgd_update(p0, g, 0 * p0, 0.1, 0.9)
    e = eps(np.float32)
    tol = 8 * e * (np.abs(f64(p0)) + 0.1 * np.abs(f64(g)))
    assert_within(d_p.copy_to_host(), ref_p, tol, "param")
    assert_within(d_v.copy_to_host(), ref_v, 8 * e * np.abs(f64(g)), "velocity")
    d_m, d_w = cuda.to_device(0 * p0), cuda.to_device(0 * p0)
    K.adam_update(d_p, d_g, d_m, d_w, step=1, lr=1e-3)
    assert np.isfinite(d_p.copy_to_host()).all()
    ref = naive.naive_adam_update(ref_p, g, 0 * p0, 0 * p0, 1, 1e-3)
    assert_within(d_m.copy_to_host(), ref[1], 8 * e * 0.1 * np.abs(f64(g)), "m")


def test_registered_on_every_backend():
    from initdiag.kernels import _registry

    for op in ("sgd_update", "adam_update", "mse_loss_grad", "softmax_xent_grad"):
        assert op in K.__all__
        assert _registry.OP_BACKENDS[op] == ("numpy", "numba", "c", "cuda")
        for b in _registry.OP_BACKENDS[op]:
            assert callable(_registry.resolve(op, b))

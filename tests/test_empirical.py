"""Tests of the empirical engine ``simulate`` and its sampler ``initdiag._rng``.

Monte Carlo checks compare with ``analyze`` (the analytic engine) within 4 standard
errors plus a finite-size term that is derived in each test, never a loose constant.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import initdiag as idg
from initdiag import _rng, empirical

# -- sampler --------------------------------------------------------------------------


def test_philox_known_answers():
    # Random123 known-answer vectors for philox4x32-10 (kat_vectors)
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        (
            [0xFFFFFFFF] * 4,
            [0xFFFFFFFF] * 2,
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        ),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for ctr, key, want in cases:
        got = _rng.philox4x32(np.array(ctr, np.uint32), np.array(key, np.uint32))
        assert got.tolist() == want


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fill_normal_is_standard_normal(dtype):
    # float32 outputs use float32 Box-Muller (24-bit u1): a different sample
    n = 1 << 18
    x = _rng.fill_normal(np.empty(n, dtype), (12345, 678)).astype(np.float64)
    # moments within 5 standard errors of N(0, 1): se(mean)=1/sqrt(n), se(var)=sqrt(2/n)
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((x**4).mean() - 3) < 5 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov against the normal CDF, written here with math.erf
    xs = np.sort(x[: 1 << 14])
    n = xs.size
    cdf = 0.5 * (1 + np.vectorize(math.erf)(xs / math.sqrt(2)))
    d = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
    assert d < 1.63 / math.sqrt(n)  # 1% critical value of the KS statistic


def test_float32_normals_follow_the_float64_ones():
    # same Philox words; float32 Box-Muller rounds u1 to 24 bits (so the far tail,
    # u1 < ~2^-16, moves) and works in float32: the bulk agrees to float32 rounding
    n = 1 << 16
    a = _rng.fill_normal(np.empty(n, np.float32), (5, 6), 1).astype(np.float64)
    b = _rng.fill_normal(np.empty(n), (5, 6), 1)
    d = np.abs(a - b)
    assert np.quantile(d, 0.999) < 2e-5
    assert np.median(d) < 4 * np.finfo(np.float32).eps


def test_kept_workspace_gives_identical_results():
    # buffers kept between calls (empirical.fused._POOL) must not leak state into a call
    net = idg.mlp(depth=3, width=24, activation="relu", batchnorm=True)
    other = idg.mlp(depth=2, width=16, activation="tanh")
    empirical.clear_workspace()
    a = _stats(idg.simulate(net, batch_size=10, seeds=3, rng=7, backend="numba"))
    assert empirical.fused._POOL  # kept
    b = _stats(idg.simulate(net, batch_size=10, seeds=3, rng=7, backend="numba"))
    idg.simulate(other, batch_size=10, seeds=2, backend="numba")
    assert list(empirical.fused._POOL) == [empirical.fused.plan_key(other, 10, np.dtype("f4"))]
    c = _stats(idg.simulate(net, batch_size=10, seeds=3, rng=7, backend="numba"))
    empirical.clear_workspace()
    assert not empirical.fused._POOL
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_fill_is_reproducible_and_thread_independent():
    numba = pytest.importorskip("numba")
    old = numba.get_num_threads()
    try:
        outs = []
        for nt in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(nt)
            a = _rng.fill_normal(np.empty(100_003, np.float32), (1, 2), 3)
            b = _rng.fill_uniform(np.empty(100_003), (1, 2), 4, -2.0, 5.0)
            outs.append((a, b))
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(outs[0][0], outs[1][0])
    assert np.array_equal(outs[0][1], outs[1][1])
    u = outs[0][1]
    assert u.min() > -2 and u.max() < 5
    assert abs(u.mean() - 1.5) < 5 * 7 / math.sqrt(12 * u.size)
    # distinct streams and keys differ
    c = _rng.fill_normal(np.empty(1000, np.float32), (1, 2), 4)
    assert not np.array_equal(outs[0][0][:1000], c)


# -- validation, memory ---------------------------------------------------------------


def test_validation_messages():
    net = idg.mlp(depth=2, width=8)
    with pytest.raises(TypeError, match="Network"):
        idg.simulate("mlp")
    with pytest.raises(ValueError, match="input_correlation"):
        idg.simulate(net, input_correlation=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        idg.simulate(net, batch_size=1)
    with pytest.raises(ValueError, match="dtype"):
        idg.simulate(net, dtype="float16")
    with pytest.raises(ValueError, match="shape"):
        idg.simulate(net, inputs=np.ones((4, 3)))
    with pytest.raises(ValueError, match="memory_limit"):
        idg.simulate(net, memory_limit="lots")


def test_oversized_request_is_refused_before_allocating():
    net = idg.mlp(depth=50, width=200_000)  # 50 x 160 GB of float32 weights
    with pytest.raises(ValueError, match=r"batch_size.*float32|smaller batch"):
        idg.simulate(net, batch_size=4096, seeds=1)
    small = idg.mlp(depth=3, width=64)
    est = empirical.estimate_memory(small, 32)["total"]
    with pytest.raises(ValueError, match="memory_limit"):
        idg.simulate(small, batch_size=32, memory_limit=est // 2)
    assert empirical.parse_bytes("2GB") == 2 * 10**9
    assert empirical.parse_bytes("1.5 MiB") == 3 * 2**19


# -- reproducibility, backends ---------------------------------------------------------


def _stats(p):
    return np.stack([p.columns[c] for c in idg.profile.STAT_COLUMNS])


def test_same_seed_identical_and_thread_count_independent():
    numba = pytest.importorskip("numba")
    net = idg.mlp(depth=3, width=48, activation="tanh", batchnorm=True)
    a = idg.simulate(net, batch_size=16, seeds=3, rng=7)
    b = idg.simulate(net, batch_size=16, seeds=3, rng=7)
    assert np.array_equal(_stats(a), _stats(b), equal_nan=True)
    c = idg.simulate(net, batch_size=16, seeds=3, rng=8)
    assert not np.array_equal(_stats(a), _stats(c), equal_nan=True)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        d = idg.simulate(net, batch_size=16, seeds=3, rng=7)
    finally:
        numba.set_num_threads(old)
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(_stats(d), _stats(a), rtol=200 * eps, atol=200 * eps)


def test_one_seed_cuts_its_blas_calls_over_the_threads():
    # seeds=1 with 2 Numba threads: GEMMs by row blocks and Grams by block
    # triangles on 2 threads (B = 160 >= 128: the syrk layout, Gram path for the
    # 256-wide layers); equal to the serial path (1 thread) to float32 rounding,
    # the same bits on every repeat
    numba = pytest.importorskip("numba")
    pytest.importorskip("threadpoolctl")
    if numba.get_num_threads() < 2:
        pytest.skip("needs 2 Numba threads")
    net = idg.mlp(depth=3, width=256, activation="relu", batchnorm=True)
    kw = dict(batch_size=160, seeds=1, rng=3, backend="numba")
    a = idg.simulate(net, **kw)
    b = idg.simulate(net, **kw)
    assert (a.meta["workers"], a.meta["threads_per_seed"]) == (1, numba.get_num_threads())
    assert np.array_equal(_stats(a), _stats(b), equal_nan=True)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = idg.simulate(net, **kw)
    finally:
        numba.set_num_threads(old)
    assert serial.meta["threads_per_seed"] == 1
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(_stats(a), _stats(serial), rtol=200 * eps, atol=200 * eps)


def test_guided_blocks_cover_the_rows():
    from initdiag.empirical.fused import guided_blocks

    assert guided_blocks(512, 2) == [0, 256, 384, 448, 512]
    assert guided_blocks(160, 2) == [0, 80, 160]
    assert guided_blocks(100, 2) == [0, 100]  # too few rows to cut
    assert guided_blocks(512, 1) == [0, 512]
    for rows in (1, 63, 64, 129, 500, 1000, 4096):
        for lanes in (2, 3, 4):
            e = guided_blocks(rows, lanes)
            sizes = np.diff(e)
            assert e[0] == 0 and e[-1] == rows and np.all(sizes > 0)
            assert len(sizes) == 1 or np.all(sizes >= 64)
            assert np.all(np.diff(sizes[:-1]) <= 0)  # shrinking, for the lanes' ends


def _two_numba_threads():
    numba = pytest.importorskip("numba")
    pytest.importorskip("threadpoolctl")
    if numba.get_num_threads() < 2:
        pytest.skip("needs 2 Numba threads")
    return numba


def test_one_seed_on_lanes_matches_one_thread_on_a_residual_network():
    # a lone seed on 2 lanes draws the next layer's parameters on a lane and
    # defers each weight-gradient norm to a lane (recorded when the pass ends):
    # the same numbers as one thread (float rounding), blocks and all
    numba = _two_numba_threads()
    net = idg.resnet_mlp(3, 96, norm="batchnorm", norm_position="post")
    kw = dict(batch_size=160, seeds=1, rng=5, backend="numba")
    a = _stats(idg.simulate(net, **kw))
    assert np.array_equal(a, _stats(idg.simulate(net, **kw)), equal_nan=True)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = _stats(idg.simulate(net, **kw))
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(np.isnan(a), np.isnan(serial))  # deferred norms recorded
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(a, serial, rtol=200 * eps, atol=200 * eps)


def test_a_lone_seed_after_an_aborted_pass_draws_its_own_parameters():
    # an overflowing pass stops with draws still pending on a lane; the next call
    # (same layers, so the same kept workspace) must not use those draws
    _two_numba_threads()
    wild = idg.InitScheme(weight="variance_scaling(9.0, 'fan_in', 'normal')")
    kw = dict(batch_size=8, seeds=1, rng=2, backend="numba")
    sane = idg.mlp(depth=200, width=32, activation="relu")
    empirical.clear_workspace()
    fresh = _stats(idg.simulate(sane, **kw))
    p = idg.simulate(idg.mlp(depth=200, width=32, activation="relu", init=wild), **kw)
    assert [f["kind"] for f in p.findings] == ["overflow"]
    assert np.array_equal(_stats(idg.simulate(sane, **kw)), fresh, equal_nan=True)


def test_thread_plan_shares_the_threads_between_seeds(monkeypatch):
    # T threads: min(seeds, T) seeds at once, T // workers threads each; one seed
    # for a callable output_grad (user code need not be thread-safe) or when two
    # would not fit in memory
    numba = pytest.importorskip("numba")
    pytest.importorskip("threadpoolctl")
    plan = empirical._thread_plan
    monkeypatch.setattr(numba, "get_num_threads", lambda: 8)
    assert plan(1, True, False, 10, []) == (1, 8)
    assert plan(3, True, False, 10, []) == (3, 2)
    assert plan(16, True, False, 10, []) == (8, 1)
    assert plan(4, True, True, 10, []) == (1, 8)
    assert plan(8, True, False, 10, [35]) == (3, 2)
    assert plan(8, False, False, 10, []) == (1, 1)


def test_backends_agree():
    from initdiag import kernels

    avail = [
        b
        for b, s in kernels.available_backends().items()
        if b in ("numpy", "numba", "c") and s["available"]
    ]
    if len(avail) < 2:
        pytest.skip(f"fewer than two CPU backends available: {avail}")
    net = idg.mlp(depth=3, width=40, activation="tanh", batchnorm=True)
    ref = _stats(idg.simulate(net, batch_size=12, seeds=2, backend="numpy"))
    eps = np.finfo(np.float32).eps
    for b in avail:
        got = _stats(idg.simulate(net, batch_size=12, seeds=2, backend=b))
        np.testing.assert_allclose(got, ref, rtol=500 * eps, atol=500 * eps, err_msg=b)


def test_gram_identity_matches_forming_dw(monkeypatch):
    net = idg.mlp(
        depth=2, width=32, output_dim=5, init=idg.InitScheme(bias="normal(0, 0.1)")
    )
    a = idg.simulate(net, batch_size=8, seeds=2, dtype="float64")
    from initdiag.layers import dense as dense_layer

    for mod in (dense_layer, empirical.fused):
        monkeypatch.setattr(mod, "use_gram", lambda *a: False)
    b = idg.simulate(net, batch_size=8, seeds=2, dtype="float64")
    for be in ("numpy", "numba"):  # both executors formed dW
        c = idg.simulate(net, batch_size=8, seeds=2, dtype="float64", backend=be)
        np.testing.assert_allclose(
            a["weight_grad_norm2"], c["weight_grad_norm2"], rtol=1e-10
        )
    np.testing.assert_allclose(
        a["weight_grad_norm2"], b["weight_grad_norm2"], rtol=1e-12
    )
    # the reference formula of profile.py: E = fan_out fan_in q~ E[x^2] for dense1
    # (its input has E[x^2] = 1): weight_grad_norm2 / (N_out N_in grad_second_moment)
    r = a["weight_grad_norm2"][0] / (32 * 32 * a["grad_second_moment"][0])
    assert abs(r - 1) < 0.5


def test_user_inputs_and_output_grad():
    net = idg.mlp(depth=2, width=16, output_dim=3)
    x = np.random.default_rng(0).normal(size=(10, 16))
    p = idg.simulate(net, inputs=x, seeds=2, output_grad=lambda y: 2 * y)
    assert p.meta["batch_size"] == 10 and p.meta["output_grad"] == "callable"
    assert p["grad_second_moment"][-1] == pytest.approx(1.0)
    g = np.ones((10, 3))
    q = idg.simulate(net, inputs=x, seeds=2, output_grad=g)
    assert np.all(np.isfinite(q["weight_grad_norm2"][q.rows_of("dense")]))


def test_overflow_is_reported_not_nan():
    init = idg.InitScheme(weight="variance_scaling(9.0, 'fan_in', 'normal')")
    net = idg.mlp(depth=200, width=32, activation="relu", init=init)
    p = idg.simulate(net, batch_size=8, seeds=2)
    over = [f for f in p.findings if f["kind"] == "overflow"]
    assert len(over) == 2 and {f["seed"] for f in over} == {0, 1}
    first = min(f["index"] for f in over)
    q = p["second_moment"]
    assert np.all(np.isfinite(q[:first])) and np.all(q[:first] > 0)
    assert np.all(np.isnan(q[max(f["index"] for f in over) :]))
    # (9/2)^l growth of q: float32 overflows h near l = log(3.4e38^2)/log(4.5)
    assert 80 < over[0]["block"] < 160
    assert "overflow" in over[0]["message"]


def test_jacobian_linear_network_moments():
    # Linear net, Gaussian W with variance 1/N: J J^T moments known in closed form
    # for L layers of width N: m1 = 1, m2 = 1 + L * N / N (free Wishart product,
    # Pennington et al. 2017: sigma^2 = L for linear Gaussian at criticality).
    L, N = 3, 64
    init = idg.InitScheme(weight="kaiming_normal(nonlinearity='linear')")
    net = idg.mlp(depth=L, width=N, activation="identity", init=init, bias=False)
    p = idg.simulate(net, batch_size=32, seeds=4, jacobian=True)
    jac = p.extra["jacobian"]
    assert abs(jac["m1"] - 1) < 4 * jac["m1_se"] + 0.05
    assert abs(jac["m1_exact"] - 1) < 4 * jac["m1_exact_se"] + 0.05
    # finite N: m2 = 1 + L + O(L^2 / N)
    assert abs(jac["m2_exact"] - (1 + L)) < 4 * jac["m2_exact_se"] + L * L / N + 0.1


# -- against the analytic engine --------------------------------------------------


def _against_analyze(net, B, seeds, columns, rel_fw, rng=0):
    analytic = pytest.importorskip("initdiag.analytic")
    a = analytic.analyze(net)
    e = idg.simulate(net, batch_size=B, seeds=seeds, rng=rng)
    for c in columns:
        av, ev, se = a[c], e[c], e[f"{c}_se"]
        ok = np.isfinite(av) & np.isfinite(ev)
        assert ok.any(), c
        tol = 4 * se[ok] + rel_fw * np.maximum(np.abs(av[ok]), 1e-3)
        bad = np.abs(ev[ok] - av[ok]) > tol
        assert not bad.any(), (c, np.array(e.name)[ok][bad], ev[ok][bad], av[ok][bad])
    return a, e


def test_relu_tanh_and_bias_match_analyze():
    N, L = 1024, 4
    # finite width: each layer's empirical q has relative fluctuation sqrt(2/N), whose
    # nonlinear propagation biases means by O(2/N) per layer: L * 2/N in all.
    fw = L * 2.0 / N
    cols = ("second_moment", "mean", "correlation", "grad_second_moment")
    _against_analyze(idg.mlp(depth=L, width=N, activation="relu"), 32, 4, cols, fw)
    tanh_init = idg.InitScheme(weight="xavier_normal(gain=1.2)", bias="normal(0, 0.3)")
    _against_analyze(
        idg.mlp(depth=L, width=N, activation="tanh", init=tanh_init), 32, 4, cols, fw
    )
    # non-zero bias with Kaiming weights: q grows linearly, q^l = q^0 + l sigma_b^2
    bias_init = idg.InitScheme(bias="normal(0, 0.5)")
    a, e = _against_analyze(
        idg.mlp(depth=L, width=N, activation="relu", init=bias_init), 32, 4, cols, fw
    )
    dense = e.rows_of("dense")
    steps = np.diff(e["second_moment"][dense])
    assert np.all(
        np.abs(steps - 0.25)
        < 4 * np.sqrt(2) * e["second_moment_se"][dense][1:]
        + fw * e["second_moment"][dense][1:]
    )


def test_batchnorm_relu_gradient_gain():
    # Yang et al. (2019): with BatchNorm -> ReLU the squared gradient grows by
    # pi/(pi-1) per block in the large-batch limit.  The first block is excluded (its
    # BN input is the data, with a different batch variance).  At finite B the gain is
    # lambda(B) = lambda_inf + a/B + O(1/B^2) (for the identity activation exactly
    # (B-2)/(B-3) = 1 + 1/B + ...), so two batch sizes remove the 1/B term.
    N, L = 1024, 5
    net = idg.mlp(depth=L, width=N, activation="relu", batchnorm=True)
    gains, ses = [], []
    for B in (128, 512):
        e = idg.simulate(net, batch_size=B, seeds=3)
        g = e["grad_second_moment"][e.rows_of("dense")]
        se = e["grad_second_moment_se"][e.rows_of("dense")]
        k = L - 2
        gain = (g[1] / g[-1]) ** (1 / k)
        gains.append(gain)
        ses.append(gain / k * math.hypot(se[1] / g[1], se[-1] / g[-1]))  # delta method
        # BatchNorm standardises every unit exactly: second moment 1 up to eps
        assert np.allclose(e["second_moment"][e.rows_of("batchnorm")], 1, atol=1e-3)
    target = math.pi / (math.pi - 1)
    lam_inf = (512 * gains[1] - 128 * gains[0]) / (512 - 128)
    se_inf = math.hypot(512 * ses[1], 128 * ses[0]) / (512 - 128)
    # the neglected O(1/B^2) term: (a/B)^2-sized, a ~ 1-5 -> < 1e-3 at B = 128
    assert abs(lam_inf - target) < 4 * se_inf + 1e-3, (gains, lam_inf)
    # the finite-batch gain approaches the limit from above
    assert gains[1] > target - 4 * ses[1]


# -- sampler transform and the fused numba path -----------------------------------


def test_normal_transform_matches_box_muller_formula():
    # entries 4j..4j+3 of stream s under key k are Box-Muller of the Philox words of
    # counter (j, 0, s, 0): z = sqrt(-2 ln((w0 + 1) / 2^32)) (cos, sin)(a + q pi / 2)
    # with q = w1 >> 30, a = (((w1 & (2^30 - 1)) + 0.5) / 2^30 - 0.5) pi / 2
    key, stream, n = (0xA4093822, 0x299F31D0), 5, 4 * 300
    z = _rng.fill_normal(np.empty(n), key, stream)
    ref = np.empty(n)
    for j in range(n // 4):
        w = _rng.philox4x32(
            np.array([j, 0, stream, 0], np.uint32), np.array(key, np.uint32)
        ).astype(np.float64)
        for k in (0, 2):
            r = math.sqrt(-2.0 * math.log((w[k] + 1.0) / 2.0**32))
            q = int(w[k + 1]) >> 30
            f = ((int(w[k + 1]) & (2**30 - 1)) + 0.5) / 2.0**30
            t = (f - 0.5) * math.pi / 2 + q * math.pi / 2
            ref[4 * j + k] = r * math.cos(t)
            ref[4 * j + k + 1] = r * math.sin(t)
    np.testing.assert_allclose(z, ref, rtol=0, atol=1e-9)


def _fused_inputs(B, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, n)).astype(np.float32) + 0.3
    x[:, 3] = -np.abs(x[:, 3])  # a dead column
    x[5] = 0.0  # a zero row (cosine 0 by convention)
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_col_stats_against_loops(dtype):
    from initdiag.kernels import fused as _fused

    B, n = 71, 9  # two row chunks of 64 rows, the second one partial, odd length
    x = _fused_inputs(B, n).astype(dtype)
    # sums run in the dtype over chunks of 64 rows, then in float64: 64 eps of the
    # dtype relative to the O(1) magnitudes here
    tol = 64 * np.finfo(dtype).eps if dtype == np.float32 else 1e-12
    nch = _fused.row_chunks(B)
    out, cm, cv = np.empty(10), np.empty(n), np.empty(n)
    _fused.resolve().layer_stats(x, np.empty((nch, 4, n)), np.empty((nch, 4)), out, cm, cv)
    x64 = x.astype(np.float64)
    cos = []
    for a in range(B):
        for b in range(B):
            if a != b:
                na, nb = np.linalg.norm(x64[a]), np.linalg.norm(x64[b])
                cos.append(x64[a] @ x64[b] / (na * nb) if na > 0 and nb > 0 else 0.0)
    want = [
        x64.mean(),
        (x64**2).mean(),
        x64.var(axis=0).mean(),
        (x64.mean(axis=0) ** 2).mean(),
        (x64 > 0).mean(),
        np.all(x64 <= 0, axis=0).mean(),
        (x64 == 0).mean(),
        0,
        np.mean(cos),
        1,
    ]
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol / 100)
    np.testing.assert_allclose(cm, x64.mean(axis=0), rtol=tol, atol=tol / 100)
    np.testing.assert_allclose(cv, x64.var(axis=0), rtol=tol, atol=tol / 100)
    x[2, 1], x[9, 4] = np.inf, np.nan
    _fused.resolve().layer_stats(x, np.empty((nch, 4, n)), np.empty((nch, 4)), out, cm, cv)
    assert out[7] == 2


def test_fused_col_stats_fall_back_to_float64_where_float32_sums_overflow():
    # finite float32 entries whose squares exceed float32: the chunk's float32 sums
    # overflow, the statistics must come from the float64 rare path, not be inf
    from initdiag.kernels import fused as _fused

    B, n = 70, 5
    x = _fused_inputs(B, n, 4)
    x[:, 2] *= np.float32(3e19)
    x[7] = np.float32(-2e20)
    nch = _fused.row_chunks(B)
    out, cm, cv = np.empty(10), np.empty(n), np.empty(n)
    _fused.resolve().layer_stats(x, np.empty((nch, 4, n)), np.empty((nch, 4)), out, cm, cv)
    x64 = x.astype(np.float64)
    assert out[7] == 0 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], (x64**2).mean(), rtol=1e-6)
    np.testing.assert_allclose(cv, x64.var(axis=0), rtol=1e-6)
    np.testing.assert_allclose(cm, x64.mean(axis=0), rtol=1e-6, atol=1e-6 * 3e19)


def test_fused_batchnorm_relu_against_loops():
    # forward y = gamma (x - mean) invstd + beta, h = relu(y); backward written out
    # with explicit loops over the batch (Ioffe & Szegedy 2015)
    from initdiag.kernels import fused as _fused

    B, n = 69, 6  # a partial, odd-length second row chunk
    x = _fused_inputs(B, n, 1)
    g = np.random.default_rng(2).standard_normal((B, n)).astype(np.float32)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    mean, var = x64.mean(axis=0), x64.var(axis=0)
    invstd = 1 / np.sqrt(var + 1e-5)
    gamma, beta = np.linspace(0.5, 1.5, n), np.linspace(-0.2, 0.2, n)
    nch = _fused.row_chunks(B)
    sc = [np.empty((nch, 4)) for _ in range(2)]
    acc = [np.empty((nch, 4, n)) for _ in range(2)]
    h = np.empty_like(x)
    st_y, st_h = np.empty(10), np.empty(10)
    _fused.resolve().unit_forward(
        x,
        mean,
        invstd,
        gamma,
        beta,
        _fused.RELU,
        0.0,
        True,
        h,
        acc[0],
        sc[0],
        acc[1],
        sc[1],
        st_y,
        st_h,
    )
    y = gamma * (x64 - mean) * invstd + beta
    np.testing.assert_allclose(h, np.maximum(y, 0), rtol=1e-6, atol=1e-6)
    assert st_y[1] == pytest.approx((y**2).mean(), rel=1e-6)
    assert st_h[4] == pytest.approx((y > 0).mean())
    dx = np.empty_like(x)
    sums, dgam, dbet, dxs = np.empty(3), np.empty(n), np.empty(n), np.empty(n)
    _fused.resolve().unit_backward(
        g,
        x,
        mean,
        invstd,
        gamma,
        beta,
        _fused.RELU,
        0.0,
        True,
        True,
        dx,
        acc[0],
        sums,
        dgam,
        dbet,
        dxs,
    )
    gp = g64 * (y > 0)
    xhat = (x64 - mean) * invstd
    ref_dbeta = sum(gp[b] for b in range(B))
    ref_dgamma = sum(gp[b] * xhat[b] for b in range(B))
    ref_dx = np.array(
        [
            gamma * invstd / B * (B * gp[b] - ref_dbeta - xhat[b] * ref_dgamma)
            for b in range(B)
        ]
    )
    np.testing.assert_allclose(dbet, ref_dbeta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dgam, ref_dgamma, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        sums, [(g64**2).sum(), (gp**2).sum(), (ref_dx**2).sum()], rtol=1e-5
    )
    np.testing.assert_allclose(dxs, ref_dx.sum(axis=0), atol=1e-4)


def test_fused_passes_are_thread_count_independent():
    numba = pytest.importorskip("numba")
    from initdiag.kernels import fused as _fused

    B, n = 300, 33
    x = _fused_inputs(B, n, 3)
    mean, invstd, gamma, beta = np.zeros(n), np.full(n, 1.3), np.ones(n), np.zeros(n)
    nch = _fused.row_chunks(B)
    outs = []
    old = numba.get_num_threads()
    try:
        for nt in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(nt)
            st = np.empty(10)
            _fused.resolve().layer_stats(
                x,
                np.empty((nch, 4, n)),
                np.empty((nch, 4)),
                st,
                np.empty(n),
                np.empty(n),
            )
            h, dx = np.empty_like(x), np.empty_like(x)
            sy, sh = np.empty(10), np.empty(10)
            acc = np.empty((nch, 4, n))
            _fused.resolve().unit_forward(
                x,
                mean,
                invstd,
                gamma,
                beta,
                _fused.ACT_CODES["tanh"],
                0.0,
                True,
                h,
                np.empty((nch, 4, n)),
                np.empty((nch, 4)),
                acc,
                np.empty((nch, 4)),
                sy,
                sh,
            )
            sums, v = np.empty(3), [np.empty(n) for _ in range(3)]
            _fused.resolve().unit_backward(
                x,
                x,
                mean,
                invstd,
                gamma,
                beta,
                _fused.ACT_CODES["tanh"],
                0.0,
                True,
                True,
                dx,
                acc,
                sums,
                *v,
            )
            outs.append(np.concatenate([st, sy, sh, sums, *v, h.ravel(), dx.ravel()]))
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "net",
    [
        dict(
            depth=3,
            width=24,
            activation="gelu",
            batchnorm=True,
            bn_position="after_activation",
            output_dim=5,
        ),
        dict(
            depth=2,
            width=20,
            activation="leaky_relu",
            batchnorm=False,
            init=idg.InitScheme(bias="normal(0, 0.2)"),
            output_dim=3,
        ),
        dict(depth=2, width=20, activation="identity", batchnorm=True),
        dict(
            depth=3,
            width=24,
            activation="tanh",
            norm="layernorm",
            init=idg.InitScheme(extra={"ln_weight": "normal(1, 0.3)", "ln_bias": "normal(0, 0.2)"}),
            output_dim=5,
        ),
        dict(
            depth=2,
            width=20,
            activation="relu",
            norm="layernorm",
            bn_position="after_activation",
        ),
    ],
    ids=[
        "bn_after_gelu_readout",
        "leaky_bias_readout",
        "identity_bn",
        "ln_tanh_random_affine_readout",
        "ln_after_relu",
    ],
)
def test_fused_path_matches_numpy_backend(net):
    from initdiag import kernels

    if not kernels.available_backends()["numba"]["available"]:
        pytest.skip("numba backend unavailable")
    net = idg.mlp(**net)
    assert empirical.fused.fused_ok(net, "numba") and not empirical.fused.fused_ok(net, "numpy")
    # every layer runs a fused unit (no generic step inside the plan)
    units = empirical.fused.FusedExecutor(net, 12, np.dtype(np.float32)).units
    assert all(u[0] != "step" for u in units)
    got = _stats(idg.simulate(net, batch_size=12, seeds=2, backend="numba"))
    ref = _stats(idg.simulate(net, batch_size=12, seeds=2, backend="numpy"))
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(got, ref, rtol=500 * eps, atol=500 * eps)


def test_fused_layernorm_units_match_numpy_backend():
    # a LayerNorm without affine parameters feeding a Dense directly (lone
    # row_affine unit), one with an activation, a LayerNorm as the output layer;
    # B = 160 >= 128 and one seed: the syrk Grams, cut over the threads
    from initdiag import kernels

    if not kernels.available_backends()["numba"]["available"]:
        pytest.skip("numba backend unavailable")
    net = idg.Network(
        40,
        [
            idg.Dense(48),
            idg.LayerNorm(affine=False),
            idg.Dense(48),
            idg.LayerNorm(eps=1e-3),
            idg.ReLU(),
            idg.Dense(32),
            idg.LayerNorm(),
        ],
        init=idg.InitScheme(extra={"ln_weight": "normal(1, 0.3)"}),
    )
    units = empirical.fused.FusedExecutor(net, 160, np.dtype(np.float32)).units
    assert [u[0] for u in units] == ["dense", "ln", "dense", "ln", "dense", "ln"]
    eps = np.finfo(np.float32).eps
    for seeds in (1, 3):
        got = _stats(idg.simulate(net, batch_size=160, seeds=seeds, backend="numba"))
        ref = _stats(idg.simulate(net, batch_size=160, seeds=seeds, backend="numpy"))
        np.testing.assert_allclose(got, ref, rtol=500 * eps, atol=500 * eps)


@pytest.mark.parametrize("syrk", [True, False])
@pytest.mark.parametrize("B", [12, 131, 600])
def test_blocked_gram_identity(B, syrk, monkeypatch):
    # ||G^T X||_F^2 = <G G^T, X X^T> (B x B Grams: full below B = 128, else one
    # BLAS syrk (upper triangle by rows) or, without SciPy's BLAS table, blocked
    # GEMMs (131: a shorter last block row))
    from initdiag.kernels import fused as _fused

    if not syrk:
        monkeypatch.setattr(_fused, "_syrk_functions", lambda: {})
    elif not _fused._syrk_functions():
        pytest.skip("SciPy's Cython BLAS table is not reachable")
    assert _fused.gram_layout(B) == (0 if B < 128 else (-1 if syrk else B // 2))
    rng = np.random.default_rng(B)
    g, x = rng.standard_normal((2, B, 40))
    ga, xa = np.full((B, B), np.nan), np.full((B, B), np.nan)
    _fused.resolve().gram(g, ga)
    _fused.resolve().gram(x, xa)
    s, tr = _fused.resolve().gram_dot(ga, xa, _fused.gram_layout(B))
    assert s == pytest.approx(np.sum((g.T @ x) ** 2), rel=1e-12)
    assert tr == pytest.approx(np.sum(g * g), rel=1e-12)
    # the float64 fallback's full matrix from the stored layout
    np.testing.assert_allclose(empirical.fused._full64(_fused.resolve(), ga), g @ g.T, rtol=1e-12)
    # float32 (ssyrk / float32 GEMMs, row pieces summed in float32)
    g32, x32 = g.astype(np.float32), x.astype(np.float32)
    ga32, xa32 = (
        np.full((B, B), np.nan, np.float32),
        np.full((B, B), np.nan, np.float32),
    )
    _fused.resolve().gram(g32, ga32)
    _fused.resolve().gram(x32, xa32)
    s32, tr32 = _fused.resolve().gram_dot(ga32, xa32, _fused.gram_layout(B))
    g64, x64 = g32.astype(np.float64), x32.astype(np.float64)
    assert s32 == pytest.approx(np.sum((g64.T @ x64) ** 2), rel=1e-4)
    assert tr32 == pytest.approx(np.sum(g64 * g64), rel=1e-5)


def test_gradients_near_float32_range_are_not_overflow():
    # (9/2)^l growth both ways: by the top layers the B x B Gram matrices of the
    # gradient exceed float32 while the gradient itself stays finite; the fused path
    # must fall back to float64 Grams, not report an overflow
    init = idg.InitScheme(weight="variance_scaling(9.0, 'fan_in', 'normal')")
    net = idg.mlp(depth=120, width=16, activation="relu", init=init)
    a = idg.simulate(net, batch_size=8, seeds=2, backend="numba")
    b = idg.simulate(net, batch_size=8, seeds=2, backend="numpy")
    assert not a.findings and not b.findings
    assert np.nanmax(a["grad_second_moment"]) > 1e38  # the regime this test is for
    dense = a.rows_of("dense")
    assert np.all(np.isfinite(a["weight_grad_norm2"][dense]))
    eps = np.finfo(np.float32).eps
    for c in ("grad_second_moment", "weight_grad_norm2"):
        np.testing.assert_allclose(a[c], b[c], rtol=500 * eps, err_msg=c)

"""Tests of initdiag.analyze against a plain numpy Monte Carlo of wide random
networks written here, and against published values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

import initdiag as idg
from initdiag.analytic import bn_gradient_gain

N = 2048  # width of the Monte Carlo networks


def _scheme(sw2, sb2, fan_in=N):
    bias = "zeros" if sb2 == 0 else f"normal(std={math.sqrt(sb2)!r})"
    return idg.InitScheme(weight=f"normal(std={math.sqrt(sw2 / fan_in)!r})", bias=bias)


def _act(name, x):
    return np.maximum(x, 0) if name == "relu" else np.tanh(x)


def _dact(name, x):
    return (x > 0).astype(x.dtype) if name == "relu" else 1 - np.tanh(x) ** 2


def _mc(layers, x, sw2, sb2, seed, eps=1e-5):
    """One random network: per row (second moment, correlation, grad second
    moment), plain numpy, float64.  layers: list of "dense", "bn", "relu"/"tanh"."""
    rng = np.random.default_rng(seed)
    h = x
    cache = []
    stats = []
    for kind in layers:
        if kind == "dense":
            W = rng.standard_normal((h.shape[1], N)) * math.sqrt(sw2 / h.shape[1])
            b = rng.standard_normal(N) * math.sqrt(sb2)
            cache.append((kind, W, h))
            h = h @ W + b
        elif kind == "bn":
            mu = h.mean(axis=0)
            var = h.var(axis=0)
            n = (h - mu) / np.sqrt(var + eps)
            cache.append((kind, np.sqrt(var + eps), n))
            h = n
        else:
            cache.append((kind, None, h))
            h = _act(kind, h)
        nrm = np.linalg.norm(h, axis=1)
        cos = (h @ h.T) / np.outer(nrm, nrm)
        B = h.shape[0]
        stats.append([np.mean(h * h), (cos.sum() - np.trace(cos)) / (B * (B - 1))])
    g = rng.standard_normal(h.shape)
    g0 = np.mean(g * g)
    grads = []
    for kind, a, inp in reversed(cache):
        grads.append(np.mean(g * g) / g0)
        if kind == "dense":
            g = g @ a.T
        elif kind == "bn":
            n, sd = inp, a
            g = (g - g.mean(axis=0) - n * (g * n).mean(axis=0)) / sd
        else:
            g = g * _dact(kind, inp)
    return np.column_stack([np.array(stats), np.array(grads[::-1])])


def _check(layers, act, sw2, sb2, B, seeds, bn=False):
    rng = np.random.default_rng(1234)
    # inputs with unit second moment and pairwise correlation ~0.3
    u = rng.standard_normal(N)
    x = math.sqrt(0.3) * u + math.sqrt(0.7) * rng.standard_normal((B, N))
    runs = np.array([_mc(layers, x, sw2, sb2, s) for s in range(seeds)])
    mean = runs.mean(axis=0)
    se = runs.std(axis=0, ddof=1) / math.sqrt(seeds)
    net = idg.Network(
        N,
        [
            idg.Dense(N)
            if k == "dense"
            else idg.BatchNorm()
            if k == "bn"
            else idg.ReLU()
            if k == "relu"
            else idg.Tanh()
            for k in layers
        ],
        init=_scheme(sw2, sb2),
    )
    prof = idg.analyze(net, inputs=x)
    ana = np.column_stack(
        [prof["second_moment"], prof["correlation"], prof["grad_second_moment"]]
    )
    # Finite-width term: the infinite-width kernel gets O(1/N) corrections per
    # layer that accumulate linearly in depth (Yaida 2019; Roberts & Yaida 2022),
    # so we allow 3 l / N relative at row depth l (l counted in dense blocks,
    # from the top for gradients).  With BatchNorm the per-unit batch variance
    # fluctuates (a chi^2_{B-1} law), a relative O(1/B) effect per BN layer on
    # the gradient (E[1/sigma^2] = (B-1)/(B-3) / s2, THEORY section 4) that the
    # large-batch rule leaves out: 3/B per BN layer traversed.
    blocks = np.cumsum([k == "dense" for k in layers])
    nb = blocks[-1]
    nbn_above = np.array(
        [sum(k == "bn" for k in layers[i + 1 :]) for i in range(len(layers))]
    )
    fw = np.column_stack(
        [3 * blocks / N, 3 * blocks / N, 3 * (nb - blocks + 1) / N + 3 * nbn_above / B]
    )
    tol = 4 * se + fw * np.abs(ana)
    err = np.abs(mean - ana)
    assert np.all(err <= tol), (err / np.maximum(tol, 1e-300), ana, mean, se)
    return prof


def test_relu_network_forward_and_backward_vs_monte_carlo():
    layers = ["dense", "relu"] * 4
    _check(layers, "relu", 2.0, 0.05, B=32, seeds=5)


def test_tanh_network_forward_and_backward_vs_monte_carlo():
    layers = ["dense", "tanh"] * 4
    _check(layers, "tanh", 1.8, 0.1, B=24, seeds=5)


def test_relu_batchnorm_network_vs_monte_carlo():
    layers = ["dense", "bn", "relu"] * 3
    prof = _check(layers, "relu", 2.0, 0.3, B=64, seeds=6, bn=True)
    # the dense bias before a BatchNorm is cancelled exactly
    assert np.all(prof["bias_grad_norm2"][prof.rows_of("dense")] == 0)


# -- published values ------------------------------------------------------------------


def test_bn_relu_gain_is_pi_over_pi_minus_1():
    assert bn_gradient_gain("relu") == pytest.approx(math.pi / (math.pi - 1), rel=1e-12)
    # gamma only rescales for ReLU
    assert bn_gradient_gain("relu", gamma=0.3) == pytest.approx(
        math.pi / (math.pi - 1), rel=1e-12
    )


def test_bn_tanh_gain():
    g = 1 / math.sqrt(2 * math.pi)
    num = integrate.quad(
        lambda z: (1 - math.tanh(z) ** 2) ** 2 * g * math.exp(-z * z / 2),
        -30,
        30,
        epsabs=1e-15,
    )[0]
    den = integrate.quad(
        lambda z: math.tanh(z) ** 2 * g * math.exp(-z * z / 2), -30, 30, epsabs=1e-15
    )[0]
    assert bn_gradient_gain("tanh") == pytest.approx(num / den, rel=1e-10)
    assert bn_gradient_gain("tanh") == pytest.approx(1.1778, abs=1e-4)


@pytest.mark.parametrize("B", [8, 32])
def test_linear_bn_finite_batch_gain(B):
    assert bn_gradient_gain("identity", batch_size=B) == pytest.approx(
        (B - 2) / (B - 3), rel=1e-13
    )
    net = idg.mlp(6, 64, "identity", batchnorm=True)
    prof = idg.analyze(net, batch_size=B)
    g = prof["grad_second_moment"][prof.rows_of("bn")]
    ratios = g[:-1] / g[1:]
    # below the top the gradient is centred by the BatchNorm above: (B-2)/(B-3);
    # the top BatchNorm sees independent output gradients (the identity kernel),
    # one centred direction fewer: (B-2)(B-1)/(B(B-3)) (docs/theory.md,
    # "Finite-batch BatchNorm").  BatchNorm's eps = 1e-5 enters as a ~1e-5
    # relative effect (the exact chi-square integrals).
    assert np.allclose(ratios[:-1], (B - 2) / (B - 3), rtol=1e-5)
    assert ratios[-1] == pytest.approx((B - 2) * (B - 1) / (B * (B - 3)), rel=1e-5)
    # other activations at a finite batch: the sphere law (docs/theory.md)
    assert bn_gradient_gain("relu", batch_size=8) == pytest.approx(1.7882, rel=1e-4)
    with pytest.raises(ValueError, match="> 3"):
        bn_gradient_gain("relu", batch_size=3)


def test_analyze_relu_bn_gain_large_batch():
    net = idg.mlp(5, 64, "relu", batchnorm=True)
    prof = idg.analyze(net)
    g = prof["grad_second_moment"][prof.rows_of("dense")]
    # from the second block on (the first BN sees the raw input's variance, not a
    # ReLU output's); eps = 1e-5 enters as s2 / (s2 + eps)
    assert np.allclose(g[1:-1] / g[2:], math.pi / (math.pi - 1), rtol=1e-5)
    assert prof.summary["regime"] == "chaotic"


def test_torch_default_summary():
    net = idg.mlp(
        4,
        1024,
        "relu",
        init=idg.InitScheme(weight="torch_default", bias="torch_default"),
    )
    s = idg.analyze(net).summary
    assert s["chi1"] == pytest.approx(1 / 6, rel=1e-12)
    assert s["regime"] == "ordered"
    assert s["q_star"] == pytest.approx(2 / (5 * 1024), rel=1e-10)


def test_first_layer_kernel_and_relu_kaiming_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16))
    net = idg.Network(
        16,
        [idg.Dense(8), idg.ReLU()],
        init=idg.InitScheme(weight="normal(std=0.5)", bias="normal(std=0.1)"),
    )
    prof = idg.analyze(net, inputs=x)
    K1 = 16 * 0.25 * (x @ x.T) / 16 + 0.01
    np.testing.assert_allclose(prof.kernels[0], K1, rtol=1e-14)
    d = np.diag(K1)
    np.testing.assert_allclose(np.diag(prof.kernels[1]), d / 2, rtol=1e-12)


def test_dead_fraction_single_input_and_full_correlation():
    net = idg.mlp(2, 32, "relu")
    prof = idg.analyze(net, input_correlation=1.0, batch_size=16)
    # identical inputs: a unit is dead iff its one pre-activation is <= 0
    assert prof["dead_fraction"][0] == pytest.approx(0.5, abs=1e-12)
    prof = idg.analyze(net, input_correlation=0.0, batch_size=3)
    # three uncorrelated zero-mean inputs: orthant probability 1/8
    assert prof["dead_fraction"][0] == pytest.approx(1 / 8, abs=1e-10)


def test_overflow_is_a_finding():
    net = idg.mlp(400, 16, "relu", init=idg.InitScheme(weight="normal(std=2.0)"))
    prof = idg.analyze(net)
    assert prof.findings and prof.findings[0]["kind"] == "overflow"
    assert prof.findings[0]["pass"] == "forward"


def test_activation_after_activation_has_no_rule():
    net = idg.Network(8, [idg.Dense(8), idg.ReLU(), idg.Tanh()])
    with pytest.raises(NotImplementedError, match="tanh"):
        idg.analyze(net)


def test_batchnorm_rows_have_no_dead_units_at_finite_batch():
    # After BatchNorm the batch is centred per unit, so with beta = 0 no unit can
    # be <= 0 for the whole batch: exactly 0 at every batch size (the sphere law,
    # docs/theory.md "Dead fractions"), not NaN
    net = idg.mlp(4, 64, batchnorm=True)
    for B in (8, 256):
        p = idg.analyze(net, batch_size=B)
        rows = [i for i, n in enumerate(p.name) if n.startswith(("bn", "relu"))]
        assert np.all(p["dead_fraction"][rows] == 0.0)
        assert np.all(np.isfinite(p["dead_fraction"]))
    # a batch of 3 through BatchNorm has no mean-field answer: refused
    with pytest.raises(NotImplementedError, match="batch size 3"):
        idg.analyze(net, batch_size=3)


def test_tanh_without_bias_has_q_star_zero_and_exact_chi1():
    # Poole et al. (2016): for odd tanh with sigma_b2 = 0, q* = 0 is stable for
    # sigma_w2 <= 1, where chi1 = sigma_w2 * tanh'(0)^2 = sigma_w2 exactly; the
    # critical point (1, 0) must read "critical", not "ordered" from a q* that
    # only creeps toward 0 like 1/(2l).
    for sw2, regime in [(1.0, "critical"), (0.5, "ordered")]:
        net = idg.mlp(
            5,
            64,
            activation="tanh",
            init=idg.InitScheme(
                weight=f"normal(0, {math.sqrt(sw2 / 64)!r})", bias="zeros"
            ),
        )
        s = idg.analyze(net).summary
        assert s["q_star"] == 0.0 and s["regime"] == regime
        assert s["chi1"] == pytest.approx(sw2, rel=1e-12)
        assert s["xi_c"] == math.inf
    assert s["xi_q"] == pytest.approx(-1 / math.log(0.5))


def test_torch_default_bias_law_relu_mean_vs_monte_carlo():
    """torch-default W and b (both U(+-1/sqrt(fan_in))): the bias is one uniform draw
    per unit, shared by the batch, so its law (not a Gaussian of its variance) sets
    the ReLU mean once the bias dominates the pre-activation (issue 12: 5.6 %)."""
    depth, width, B, seeds = 8, 512, 32, 64
    init = idg.InitScheme("torch_default", "torch_default")
    net = idg.mlp(depth, width, "relu", init=init)
    a = idg.analyze(net, batch_size=B)
    rows = [i for i, k in enumerate(a.kind) if k == "activation"]
    means = np.empty((seeds, len(rows)))
    bound = 1 / math.sqrt(width)
    for s in range(seeds):
        rng = np.random.default_rng(100 + s)
        h = rng.standard_normal((B, width))
        for r in range(depth):
            W = rng.uniform(-bound, bound, (width, width))
            b = rng.uniform(-bound, bound, width)
            h = np.maximum(h @ W + b, 0.0)
            means[s, r] = h.mean()
    mc = means.mean(axis=0)
    se = means.std(axis=0, ddof=1) / math.sqrt(seeds)
    pred = a["mean"][rows]
    assert np.all(np.abs(pred - mc) <= 4 * se), (pred, mc, se)
    # the Gaussian of the same variance misses the deep rows by far more than that
    gauss = idg.mlp(
        depth,
        width,
        "relu",
        init=idg.InitScheme("torch_default", f"normal(std={bound / math.sqrt(3)!r})"),
    )
    g = idg.analyze(gauss, batch_size=B)["mean"][rows]
    assert abs(g[-1] - mc[-1]) > 4 * se[-1]
    assert g[-1] / pred[-1] - 1 == pytest.approx(-0.054, abs=0.01)


def test_truncated_normal_beta_enters_through_its_law():
    # large batch: the BatchNorm output is N(0, 1) per unit, so the ReLU mean is
    # E[relu(z + beta)] with beta ~ N(0.1, 0.3^2) restricted to [-0.2, 0.5]
    init = idg.InitScheme(
        "kaiming_normal(nonlinearity='relu')",
        "zeros",
        bn_bias="trunc_normal(mean=0.1, std=0.3, a=-0.2, b=0.5)",
    )
    a = idg.analyze(idg.mlp(2, 64, "relu", batchnorm=True, init=init))
    rng = np.random.default_rng(3)
    n = 4_000_000
    beta = rng.normal(0.1, 0.3, 3 * n)
    beta = beta[(beta >= -0.2) & (beta <= 0.5)][:n]
    x = np.maximum(rng.standard_normal(n) + beta, 0.0)
    relu_row = list(a.kind).index("activation")
    assert abs(a["mean"][relu_row] - x.mean()) <= 4 * x.std() / math.sqrt(n)


@pytest.mark.parametrize("weight", ["uniform(0, 1)", "constant(5)"])
def test_weight_mean_is_refused_naming_the_layer(weight):
    net = idg.mlp(4, 128, "relu", init=idg.InitScheme(weight, "zeros"))
    with pytest.raises(NotImplementedError, match=r"dense1: .* mean .*rank-one"):
        idg.analyze(net)
    # the report keeps the measurement and says why the prediction is missing
    from initdiag.report.study import run_study

    res = run_study(
        [net],
        simulate_kw={"batch_size": 16, "seeds": 1, "dtype": "float64", "rng": 0},
    )
    (entry,) = res.entries
    assert entry.analytic is None and entry.empirical is not None
    assert "dense1" in entry.errors["analytic"]
    (first,) = [x.text for x in res.explanation() if x.id == "reference"]
    assert "measured only, no prediction: dense1" in first


@pytest.mark.parametrize("B", [2, 3])
def test_batchnorm_at_batch_2_and_3_is_refused(B):
    net = idg.mlp(3, 32, "relu", batchnorm=True)
    with pytest.raises(NotImplementedError, match=f"batch size {B}"):
        idg.analyze(net, batch_size=B)
    with pytest.raises(NotImplementedError, match=f"batch size {B}"):
        idg.analyze(net, inputs=np.random.default_rng(0).standard_normal((B, 32)))
    # without BatchNorm a batch of 2 or 3 is fine
    idg.analyze(idg.mlp(3, 32, "relu"), batch_size=B)


def test_simulate_refuses_batchnorm_at_batch_2_and_3():
    net = idg.mlp(3, 32, "relu", batchnorm=True)
    for B in (2, 3):
        with pytest.raises(ValueError, match=f"batch size {B}.*at least 4"):
            idg.simulate(net, batch_size=B, seeds=1)
        with pytest.raises(ValueError, match=f"batch size {B}"):
            idg.simulate(net, inputs=np.ones((B, 32)) * np.arange(B)[:, None], seeds=1)
    # the rare units behind the refusal at B = 2: the factor eps/(s2 + eps) / (s2 +
    # eps) per unit, s2 = ((a - b)/2)^2 with a - b ~ N(0, 2): its Monte Carlo mean is
    # dominated by the few draws below eps
    rng = np.random.default_rng(0)
    eps = 1e-5
    s2 = (rng.standard_normal(10**6) * math.sqrt(2) / 2) ** 2
    f = (eps / (s2 + eps)) ** 2 / (s2 + eps)
    rare = s2 < eps
    assert rare.mean() < 0.01 and f[rare].sum() > 0.5 * f.sum()


def test_float64_precision_limit_is_a_finding_not_a_silent_jump():
    # q grows x11.5 per block: the correlation must not jump to the independent-input
    # value 1/pi where q^2 leaves float64 (q ~ 1e154); the engine stops at 1e150
    net = idg.mlp(
        200, 64, "relu", init=idg.InitScheme("normal(0, 0.6)", "normal(0, 0.1)")
    )
    a = idg.analyze(net, input_correlation=0.5)
    c = a["correlation"]
    dense = [i for i, k in enumerate(a.kind) if k == "dense" and np.isfinite(c[i])]
    assert np.all(np.diff(c[dense]) > 0)  # monotone up to the last finite row
    assert a["second_moment"][dense[-1]] < 1e150
    (f,) = a.findings
    assert f["kind"] == "overflow" and "float64" in f["message"]
    assert a["second_moment"][dense[-1]] * 11.5 > 1e150  # stopped at the next block

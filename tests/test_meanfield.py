"""Tests of initdiag.meanfield against independent references: published values,
scipy quadrature written here, and exact identities of the recursions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, special

import initdiag as idg
from initdiag import meanfield as mf

SQ2PI = math.sqrt(2 * math.pi)


def _relu(x):
    return max(x, 0.0)


def _quad1(f, mu, var):
    """E[f(u)], u ~ N(mu, var), by scipy.quad split at the kink u = 0."""
    s = math.sqrt(var)

    def g(z):
        return f(mu + s * z) * math.exp(-0.5 * z * z) / SQ2PI

    k = -mu / s
    pts = sorted({-30.0, min(max(k, -30.0), 30.0), 30.0})
    return sum(
        integrate.quad(g, a, b, epsabs=1e-15, epsrel=1e-12, limit=200)[0]
        for a, b in zip(pts[:-1], pts[1:], strict=True)
        if b > a
    )


def _quad2(f, g, v1, v2, rho, m1=0.0, m2=0.0):
    """E[f(u) g(v)] by nested scipy.quad in the Cholesky coordinates (z1, z2)."""
    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    sc = s2 * math.sqrt(1 - rho * rho)

    def inner(z1):
        m = m2 + rho * s2 * z1
        k = min(max(-m / sc, -30.0), 30.0)

        def h(z2):
            return g(m + sc * z2) * math.exp(-0.5 * z2 * z2) / SQ2PI

        return sum(
            integrate.quad(h, a, b, epsabs=1e-15, epsrel=1e-12, limit=200)[0]
            for a, b in ((-30.0, k), (k, 30.0))
            if b > a
        )

    def outer(z1):
        return f(m1 + s1 * z1) * inner(z1) * math.exp(-0.5 * z1 * z1) / SQ2PI

    k = min(max(-m1 / s1, -12.0), 12.0)
    return sum(
        integrate.quad(outer, a, b, epsabs=1e-14, epsrel=1e-11, limit=200)[0]
        for a, b in ((-12.0, k), (k, 12.0))
        if b > a
    )


# -- published results ------------------------------------------------------------


def test_relu_edge_of_chaos_is_the_point_0_2():
    assert mf.critical_sigma_w2("relu", 0.0) == 2.0
    with pytest.warns(mf.NoEdgeOfChaosWarning, match="no edge of chaos"):
        out = mf.critical_sigma_w2("relu", [0.0, 0.1, 1.0])
    assert out[0] == 2.0 and np.all(np.isnan(out[1:]))


def test_relu_linear_growth_of_q_at_sigma_w2_2():
    q0, sb2 = 0.7, 0.13
    q = q0
    for layer in range(1, 51):
        q = mf.qmap("relu", q, 2.0, sb2)
        assert q == pytest.approx(q0 + layer * sb2, rel=1e-13)
    assert mf.fixed_point_q("relu", 2.0, sb2) == math.inf


@pytest.mark.parametrize("sw2", [0.3, 1.0, 1.9])
def test_relu_chi1_is_half_sigma_w2(sw2):
    assert mf.chi1("relu", sw2, 0.2) == pytest.approx(sw2 / 2, rel=1e-14)
    # and E[relu'(sqrt(q) z)^2] = 1/2 at any q, by direct quadrature
    assert mf.expect_dphi2("relu", 0.0, 3.0) == pytest.approx(
        _quad1(lambda x: float(x > 0), 0.0, 3.0), rel=1e-10
    )


def test_relu_eoc_correlation_approaches_9pi2_over_2():
    target = 9 * math.pi**2 / 2
    c, q = 0.0, 1.0
    vals = []
    for _ in range(1000):
        c = mf.cmap("relu", c, q, 2.0, 0.0)
        vals.append(c)
    ls = np.arange(1, 1001)
    prod = ls**2 * (1 - np.array(vals))
    assert np.all(np.diff(prod[1:]) > 0)  # rises monotonically
    assert prod[-1] < target
    assert abs(prod[-1] - target) / target < 0.05


def test_tanh_and_erf_critical_points():
    assert mf.critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, abs=1e-12)
    assert mf.critical_sigma_w2("erf", 0.0) == pytest.approx(math.pi / 4, abs=1e-12)
    crit = mf.critical_sigma_w2("tanh", [0.01, 0.05, 0.2])
    assert np.all(np.diff(crit) > 0) and crit[0] > 1.0
    # chi1 at the returned value is 1 (checked with q* from the length map and an
    # independent quadrature of E[sech^4])
    q = mf.fixed_point_q("tanh", crit[1], 0.05)
    e = _quad1(lambda x: (1 - math.tanh(x) ** 2) ** 2, 0.0, q)
    assert crit[1] * e == pytest.approx(1.0, abs=1e-9)
    q2 = crit[1] * _quad1(lambda x: math.tanh(x) ** 2, 0.0, q) + 0.05
    assert q2 == pytest.approx(q, rel=1e-10)


def test_torch_default_linear_is_deeply_ordered_for_relu():
    init = idg.initializers.parse("torch_default")
    fan_in = 1024
    sw2 = fan_in * init.variance(fan_in, 512)
    assert sw2 == pytest.approx(1 / 3, rel=1e-14)
    sb2 = init.variance(fan_in, 512)
    assert mf.chi1("relu", sw2, sb2) == pytest.approx(1 / 6, rel=1e-14)
    # q* = sb2 / (1 - 1/6) = 2/(5 fan_in) (THEORY section 3)
    assert mf.fixed_point_q("relu", sw2, sb2) == pytest.approx(
        2 / (5 * fan_in), rel=1e-12
    )


# -- closed forms and quadrature against scipy ----------------------------------------


@pytest.mark.parametrize(
    "v1,v2,rho", [(1.0, 1.0, 0.3), (2.0, 0.5, -0.8), (0.3, 4.0, 0.97)]
)
def test_relu_arccos_closed_form(v1, v2, rho):
    ref = _quad2(_relu, _relu, v1, v2, rho)
    assert mf.expect_phi_phi("relu", v1, v2, rho) == pytest.approx(ref, rel=1e-9)
    step = lambda x: float(x > 0)  # noqa: E731
    ref_d = _quad2(step, step, v1, v2, rho)
    assert mf.expect_dphi_dphi("relu", v1, v2, rho) == pytest.approx(ref_d, rel=1e-9)


def test_leaky_relu_and_erf_closed_forms():
    a = 0.2
    act = idg.LeakyReLU(a)

    def lk(x):
        return x if x > 0 else a * x

    ref = _quad2(lk, lk, 1.5, 0.7, 0.4)
    assert mf.expect_phi_phi(act, 1.5, 0.7, 0.4) == pytest.approx(ref, rel=1e-9)
    ref = _quad2(math.erf, math.erf, 1.5, 0.7, 0.4)
    assert mf.expect_phi_phi("erf", 1.5, 0.7, 0.4) == pytest.approx(ref, rel=1e-9)

    def de(x):
        return 2 / math.sqrt(math.pi) * math.exp(-x * x)

    ref = _quad2(de, de, 1.5, 0.7, 0.4)
    assert mf.expect_dphi_dphi("erf", 1.5, 0.7, 0.4) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (0.7, 2.0), (-1.3, 0.4)])
def test_one_d_expectations_with_means(mu, var):
    for name, f, df in [
        ("relu", _relu, lambda x: float(x > 0)),
        ("tanh", math.tanh, lambda x: 1 - math.tanh(x) ** 2),
        (
            "selu",
            lambda x: mf._SELU_SCALE * (x if x > 0 else mf._SELU_ALPHA * math.expm1(x)),
            lambda x: mf._SELU_SCALE * (1.0 if x > 0 else mf._SELU_ALPHA * math.exp(x)),
        ),
        (
            "gelu",
            lambda x: x * special.ndtr(x),
            lambda x: special.ndtr(x) + x * math.exp(-x * x / 2) / SQ2PI,
        ),
        ("erf", math.erf, lambda x: 2 / math.sqrt(math.pi) * math.exp(-x * x)),
    ]:
        assert mf.expect_phi(name, mu, var) == pytest.approx(
            _quad1(f, mu, var), rel=1e-9, abs=1e-14
        )
        assert mf.expect_phi2(name, mu, var) == pytest.approx(
            _quad1(lambda x, f=f: f(x) ** 2, mu, var), rel=1e-9
        )
        assert mf.expect_dphi2(name, mu, var) == pytest.approx(
            _quad1(lambda x, df=df: df(x) ** 2, mu, var), rel=1e-9
        )


def test_d2phi_phi_tanh():
    def f(x):
        t = math.tanh(x)
        return -2 * t * (1 - t * t) * t

    assert mf.expect_d2phi_phi("tanh", 0.2, 1.7) == pytest.approx(
        _quad1(f, 0.2, 1.7), rel=1e-9
    )
    assert mf.expect_d2phi_phi("relu", 0.2, 1.7) == 0.0


@pytest.mark.parametrize(
    "name,f", [("tanh", math.tanh), ("relu", _relu), ("sigmoid", special.expit)]
)
def test_two_d_with_means_against_scipy(name, f):
    ref = _quad2(f, f, 1.2, 0.8, 0.6, 0.3, -0.5)
    got = mf.expect_phi_phi(name, 1.2, 0.8, 0.6, 0.3, -0.5)
    assert got == pytest.approx(ref, rel=1e-9)


def test_tanh_large_variance_is_resolved():
    # a near step at q = 400: the kink-centred refinement keeps full accuracy
    assert mf.expect_dphi2("tanh", 0.0, 400.0) == pytest.approx(
        _quad1(lambda x: (1 - math.tanh(x) ** 2) ** 2, 0.0, 400.0), rel=1e-9
    )


def test_vectorised_broadcasting():
    out = mf.expect_phi_phi(
        "tanh", np.array([1.0, 2.0])[:, None], 1.0, np.array([0.1, 0.5])
    )
    assert out.shape == (2, 2)
    ref = mf.expect_phi_phi("tanh", 2.0, 1.0, 0.5)
    assert out[1, 1] == pytest.approx(ref, rel=1e-15)


# -- fixed points, depth scales, phase diagram -----------------------------------------


def test_depth_scales_ordered_relu():
    xq, xc = mf.depth_scales("relu", 1.0, 0.1)
    assert xc == pytest.approx(-1 / math.log(0.5), rel=1e-12)
    assert xq == pytest.approx(-1 / math.log(0.5), rel=1e-12)


def test_tanh_chaotic_fixed_point_c_is_zero_without_bias():
    assert mf.fixed_point_c("tanh", 2.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert mf.fixed_point_c("tanh", 0.5, 0.1) == 1.0


def test_phase_diagram_agrees_with_pointwise_functions():
    w = np.array([0.5, 1.5, 3.0])
    b = np.array([0.0, 0.05, 0.3])
    for name in ("tanh", "relu", "erf"):
        pd = mf.phase_diagram(name, w, b, depth=7)
        assert pd.chi1.shape == (3, 3)
        for i, bb in enumerate(b):
            for j, ww in enumerate(w):
                q = mf.fixed_point_q(name, ww, bb)
                if math.isfinite(q):
                    assert pd.q_star[i, j] == pytest.approx(q, rel=1e-7, abs=1e-12)
                    assert pd.chi1[i, j] == pytest.approx(
                        mf.chi1(name, ww, bb), rel=1e-7
                    )
                # correlation after 7 layers from (q0, c0) = (1, 0.5)
                qq, c = 1.0, 0.5
                for _ in range(7):
                    c = mf.cmap(name, c, qq, ww, bb)
                    qq = mf.qmap(name, qq, ww, bb)
                assert pd.correlation[i, j] == pytest.approx(c, abs=1e-7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        mf.chi1("nope", 1.0)
    with pytest.raises(TypeError):
        mf.chi1(3, 1.0)
    with pytest.raises(ValueError, match="corr"):
        mf.expect_phi_phi("tanh", 1.0, 1.0, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mf.critical_sigma_w2("erf", 0.0) == pytest.approx(math.pi / 4)


# -- the edge of chaos of every smooth activation -------------------------------------

_SELU_A, _SELU_L = 1.6732632423543772, 1.0507009873554805


def _ncdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _sig(x):
    return 1 / (1 + math.exp(-x)) if x > -700 else 0.0


# phi and phi' written here from their textbook definitions
_SMOOTH = {
    "tanh": (math.tanh, lambda x: 1 - math.tanh(x) ** 2),
    "erf": (math.erf, lambda x: 2 / math.sqrt(math.pi) * math.exp(-x * x)),
    "sigmoid": (_sig, lambda x: _sig(x) * (1 - _sig(x))),
    "selu": (
        lambda x: _SELU_L * (x if x > 0 else _SELU_A * math.expm1(x)),
        lambda x: _SELU_L * (1.0 if x > 0 else _SELU_A * math.exp(x)),
    ),
    "gelu": (
        lambda x: x * _ncdf(x),
        lambda x: _ncdf(x) + x * math.exp(-0.5 * x * x) / SQ2PI,
    ),
    "silu": (
        lambda x: x * _sig(x),
        lambda x: _sig(x) + x * _sig(x) * (1 - _sig(x)),
    ),
}


@pytest.mark.parametrize("name", sorted(_SMOOTH))
def test_edge_of_chaos_of_every_smooth_activation(name):
    phi, dphi = _SMOOTH[name]
    # GELU and SiLU have a stable edge only above sigma_b2 ~ 0.17 (GELU) and ~ 0.57
    # (SiLU): below, chi1 = 1 only at a repelling fixed point (docstring)
    bs = [1.0, 2.0] if name in ("gelu", "silu") else [0.01, 0.1, 0.5, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w, q = mf.critical_sigma_w2(name, bs, return_q_star=True)
    for wi, qi, bi in zip(w, q, bs, strict=True):
        # the edge's fixed point attracts inputs on both sides of it
        for q0 in (0.8 * qi, 1.25 * qi):
            qr = mf.fixed_point_q(name, wi, bi, q0=q0)
            assert qr == pytest.approx(qi, rel=1e-10)
            assert abs(mf.chi1(name, wi, bi, q=qr) - 1.0) <= 1e-9
        # independent quadrature: chi1 = 1 and q* is the fixed point of the length map
        assert abs(wi * _quad1(lambda x: dphi(x) ** 2, 0.0, qi) - 1.0) <= 1e-9
        assert wi * _quad1(lambda x: phi(x) ** 2, 0.0, qi) + bi == pytest.approx(
            qi, rel=1e-9
        )


def test_edge_without_bias_is_exact():
    # tanh, erf, SELU: q* = 0 exactly, chi1 = sigma_w2 lim E[phi'^2] = 1 exactly
    for name, w0 in (
        ("tanh", 1.0),
        ("erf", math.pi / 4),
        ("selu", 2 / (_SELU_L**2 * (1 + _SELU_A**2))),
    ):
        assert mf.critical_sigma_w2(name, 0.0) == pytest.approx(w0, rel=1e-15)
        assert mf.fixed_point_q(name, w0, 0.0) == 0.0
        assert abs(mf.chi1(name, w0, 0.0) - 1.0) <= 1e-12
        # just below the edge the network is ordered and q* is still 0
        assert mf.chi1(name, 0.9 * w0, 0.0) == pytest.approx(0.9, rel=1e-14)
    # sigmoid (phi(0) != 0) has an edge at sigma_b2 = 0 with q* > 0
    w, q = mf.critical_sigma_w2("sigmoid", 0.0, return_q_star=True)
    assert q > 1 and abs(mf.chi1("sigmoid", w, 0.0) - 1.0) <= 1e-9


def test_gelu_edge_at_small_bias_is_refused_because_it_repels():
    with pytest.warns(mf.NoEdgeOfChaosWarning, match="stable fixed point"):
        w = mf.critical_sigma_w2("gelu", [0.0, 0.1])
    assert np.all(np.isnan(w))
    # the chi1 = 1 point at sigma_b2 = 0.1 exists but the length map leaves it
    q = np.geomspace(0.05, 5.0, 400)
    wq, bq = mf._edge_parts(mf._act("gelu"), q)
    k = int(np.argmin(np.abs(bq - 0.1)))
    qn = mf.qmap("gelu", 1.01 * q[k], wq[k], bq[k])
    assert qn - q[k] > 1.01 * (1.01 * q[k] - q[k])


# -- a bias of a given law ------------------------------------------------------------


def _draw(law, n, rng):
    kind = law[0]
    if kind == "uniform":
        return rng.uniform(law[1], law[2], n)
    if kind == "constant":
        return np.full(n, law[1])
    mean, std, a, b = law[1:]
    out = np.empty(0)
    while out.size < n:  # rejection sampling, written independently of the package
        x = rng.normal(mean, std, 2 * n)
        out = np.concatenate([out, x[(x >= a) & (x <= b)]])
    return out[:n]


@pytest.mark.parametrize(
    "law",
    [
        ("uniform", -0.3, 0.3),
        ("uniform", 0.0, 2.0),
        ("constant", -0.4, 0.0),
        ("truncated_normal", 0.1, 0.5, -0.2, 0.6),
    ],
)
@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_expectations_with_a_bias_law_vs_monte_carlo(law, name):
    rng = np.random.default_rng(7)
    n = 2_000_000
    mean, var, var2, rho = 0.05, 0.04, 0.09, 0.6
    f = (lambda x: np.maximum(x, 0)) if name == "relu" else np.tanh
    b = _draw(law, n, rng)
    z1, z2 = rng.standard_normal((2, n))
    u = mean + math.sqrt(var) * z1 + b
    v = -mean + math.sqrt(var2) * (rho * z1 + math.sqrt(1 - rho * rho) * z2) + b
    for which, vals in (("phi", f(u)), ("phi2", f(u) ** 2)):
        got = mf.expect_with_bias(name, law, which, mean, var)
        se = vals.std() / math.sqrt(n)
        assert abs(got - vals.mean()) <= 4 * se, (which, got, vals.mean(), se)
    pp = f(u) * f(v)
    got = mf.expect_phi_phi_with_bias(name, law, var, var2, rho, mean, -mean)
    assert abs(got - pp.mean()) <= 4 * pp.std() / math.sqrt(n)


def test_uniform_bias_relu_mean_against_nested_quadrature():
    # E[relu(g + b)], b ~ U(lo, hi): scipy quad over b of the closed-form Gaussian
    # ReLU mean, at a resolution where the kink matters (sd 0.01, width 0.2)
    lo, hi, m, s = -0.1, 0.1, 0.003, 0.01

    def relu_mean(mu):
        return mu * _ncdf(mu / s) + s * math.exp(-0.5 * (mu / s) ** 2) / SQ2PI

    ref = integrate.quad(lambda b: relu_mean(m + b), lo, hi, points=[-m])[0] / (hi - lo)
    got = mf.expect_with_bias("relu", ("uniform", lo, hi), "phi", m, s * s)
    assert got == pytest.approx(ref, rel=1e-12)
    x, w = mf.law_nodes(("truncated_normal", 0.0, 1.0, -2.0, 2.0))
    # the variance of N(0, 1) truncated to +-2 (jax's truncated_normal constant)
    assert w @ x**2 == pytest.approx(0.87962566103423978**2, rel=1e-12)
    with pytest.raises(ValueError, match="law must be"):
        mf.law_nodes(("laplace", 0.0, 1.0))


def test_regime_labels_and_reasons():
    assert mf.regime(0.5).label == "ordered"
    assert mf.regime(1.0 + 1e-7).label == "critical"
    assert mf.regime(1.2).label == "chaotic"
    assert mf.regime(math.nan).label is None
    # no fixed point: correlations still go to 1, whatever chi1 says
    for chi in (1.0, 1.5):
        r = mf.regime(chi, q_star=math.inf, activation="relu")
        assert r.label == "ordered" and "no fixed point" in r.reason
    # a linear network keeps its correlations: chi1 decides
    assert mf.regime(1.5, q_star=math.inf, activation="identity").label == "chaotic"
    # ReLU with a bias at sigma_w2 = 2: q* infinite, the rounding of 2 not "chaotic"
    assert mf.fixed_point_q("relu", 2.0 + 4e-16, 0.0, q0=0.7) == 0.7
    assert math.isinf(mf.fixed_point_q("relu", 2.0, 0.1))
    # the length map with a constant bias: no fixed point at Kaiming, one below it
    act = mf._act("relu")
    assert math.isinf(mf._fixed_point_v_mean(act, 2.0, 0.1, 0.0, 1.0))
    v = mf._fixed_point_v_mean(act, 1.0, 0.1, 0.0, 1.0)
    assert v == pytest.approx(mf.expect_phi2("relu", 0.1, v), rel=1e-10)

"""The Affine layer kind (``y = gamma x + beta`` per feature; eval-mode
BatchNorm's map): the rule against a NumPy Monte Carlo written here, simulate
against analyze, the spec's round trip."""

from __future__ import annotations

import numpy as np
import pytest

import initdiag as idg
from initdiag import initializers as I
from initdiag import layers as L

W, D, B, SEEDS = 512, 32, 128, 6
GAMMA, BETA = I.Normal(1.2, 0.3), I.Constant(-0.2)


def _net():
    net = idg.Network(
        input_dim=D,
        layers=(L.Dense(W), L.Affine(), L.activation("tanh"), L.Dense(W)),
    )
    return net.with_init(
        idg.InitScheme(overrides={"affine1": {"weight": GAMMA, "bias": BETA}})
    )


def _numpy_mc():
    """Forward and hand-written backward in float64, the Profile's definitions:
    E[h^2] per row, the input gradient's second moment over E[g_out^2], and
    ||dL/dgamma||^2 / (B E[g_out^2]) (nn.Linear-style N(0, 1/fan_in) weights,
    no bias: LeCun-normal Dense layers)."""
    out = {"m2": [], "g2": [], "dgamma": []}
    for s in range(SEEDS):
        r = np.random.default_rng(100 + s)
        x = r.standard_normal((B, D))
        W1 = r.standard_normal((W, D)) / np.sqrt(D)
        W2 = r.standard_normal((W, W)) / np.sqrt(W)
        gam = r.normal(1.2, 0.3, W)
        bet = np.full(W, -0.2)
        h = x @ W1.T
        y = h * gam + bet
        t = np.tanh(y)
        o = t @ W2.T
        g = r.standard_normal(o.shape)
        gt = g @ W2
        gy = gt * (1 - t * t)
        gh = gy * gam
        m = np.mean(g * g)
        out["m2"].append([np.mean(h * h), np.mean(y * y), np.mean(t * t)])
        out["g2"].append([np.mean(gh * gh) / m, np.mean(gy * gy) / m])
        dgam = (gy * h).sum(0)
        out["dgamma"].append(dgam @ dgam / (B * m))
    return {k: np.array(v) for k, v in out.items()}


def test_affine_rule_against_a_numpy_monte_carlo():
    net = idg.Network(
        input_dim=D,
        layers=(
            L.Dense(W, bias=False),
            L.Affine(),
            L.activation("tanh"),
            L.Dense(W, bias=False),
        ),
    ).with_init(
        idg.InitScheme(
            weight=I.lecun_normal(),
            overrides={"affine1": {"weight": GAMMA, "bias": BETA}},
        )
    )
    a = idg.analyze(net)  # no BatchNorm: the batch size does not enter
    mc = _numpy_mc()
    # 5 standard errors over seeds + the finite-width term 5 / W of the
    # products of random matrices (Hanin & Nica 2019), as tests/test_residual.py
    fw = 5 / W
    for col, rows, k in (
        ("second_moment", [0, 1, 2], "m2"),
        ("grad_second_moment", [0, 1], "g2"),
    ):
        v = mc[k]
        mean, se = v.mean(0), v.std(0, ddof=1) / np.sqrt(SEEDS)
        got = a.columns[col][rows]
        assert np.all(np.abs(got - mean) <= 5 * se + fw * np.abs(got) + 1e-12), (
            col,
            got,
            mean,
            se,
        )
    v = mc["dgamma"]
    got = a.columns["gamma_grad_norm2"][1]
    assert abs(got - v.mean()) <= 5 * v.std(ddof=1) / np.sqrt(SEEDS) + 0.04 * got


def test_affine_simulate_agrees_with_analyze():
    net = _net()
    a = idg.analyze(net)
    e = idg.simulate(net, batch_size=B, seeds=SEEDS, backend="numpy", rng=3)
    for c in ("second_moment", "mean", "grad_second_moment", "beta_grad_norm2"):
        ok = np.isfinite(a.columns[c])
        d = np.abs(e.columns[c] - a.columns[c])[ok]
        tol = 5 * e.columns[f"{c}_se"][ok] + 0.04 * np.abs(a.columns[c][ok]) + 1e-9
        assert np.all(d <= tol), (c, d, tol)


def test_affine_spec_round_trip_and_zero_by_design():
    layer = L.layer_from_dict(L.Affine().to_dict())
    assert layer == L.Affine() and layer.kind == "affine"
    assert [s.name for s in layer.slots()] == ["weight", "bias"]
    net = idg.Network(
        input_dim=8, layers=(L.Dense(16), L.Affine(), L.activation("relu"), L.Dense(4))
    )
    assert net.names == ["dense1", "affine1", "relu1", "dense2"]
    zero = net.with_init(
        idg.InitScheme(overrides={"affine1": {"weight": I.zeros(), "bias": I.zeros()}})
    )
    a = idg.analyze(zero)
    assert a.columns["second_moment"][1] == 0.0
    assert a.columns["grad_second_moment"][0] == 0.0
    with pytest.raises(TypeError):
        L.Affine(eps=1e-5)  # no normalisation: no eps

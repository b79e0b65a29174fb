"""Acceptance of the finite-batch BatchNorm theory through ``analyze`` itself:
``compare(analyze(net, batch_size=B), simulate(net, batch_size=B))`` at width 1024
flags no row beyond 5 standard errors, for BatchNorm before and after the
activation, gamma / beta constant and random; dead and active fractions are
finite; gradient growth per block matches (docs/theory.md, "Finite-batch
BatchNorm")."""

from __future__ import annotations

import math

import numpy as np
import pytest

import initdiag as idg

N = 1024
# 16 seeds: with the standard error estimated from the seeds, |z| follows a
# Student t with SEEDS - 1 degrees of freedom; at 8 seeds a 5-se excursion is
# expected about once in the ~1000 comparisons below
SEEDS = 16

CONFIGS = [
    # (activation, position, B, bn_weight, bn_bias)
    ("relu", "before_activation", 8, "ones", "zeros"),
    # (gamma ~ U(0, 1) with beta = -0.5 has a finite-width excess of ~1.3/N in the
    # ReLU rows' variance, measured at N = 256, 1024, 2048: 5 se at N = 1024 with
    # 8 seeds; the per-unit law itself is checked in test_finite_batch.py)
    ("relu", "before_activation", 32, "uniform(0, 1)", "zeros"),
    ("relu", "before_activation", 16, "ones", "constant(-0.5)"),
    ("tanh", "before_activation", 16, "constant(0.5)", "normal(0, 0.5)"),
    ("identity", "before_activation", 8, "ones", "constant(0.5)"),
    ("relu", "after_activation", 32, "ones", "zeros"),
    ("tanh", "after_activation", 64, "uniform(0.5, 1.5)", "constant(0.5)"),
]


def _net(act, pos, gw, gb, depth=4):
    return idg.mlp(
        depth,
        N,
        act,
        batchnorm=True,
        bn_position=pos,
        init=idg.InitScheme(bn_weight=gw, bn_bias=gb),
    )


@pytest.mark.parametrize(
    "act,pos,B,gw,gb",
    [
        pytest.param(*c, marks=() if i == 0 else pytest.mark.slow)
        for i, c in enumerate(CONFIGS)
    ],
)
def test_compare_analyze_simulate_finite_batch(act, pos, B, gw, gb):
    net = _net(act, pos, gw, gb)
    a = idg.analyze(net, batch_size=B)
    e = idg.simulate(net, batch_size=B, seeds=SEEDS, backend="numpy", rng=5)
    cmp = idg.compare(a, e)
    # the finite-width term of tests/test_analytic.py (Yaida 2019): O(1/N) kernel
    # corrections per layer accumulate with depth, 3 l / N relative at block l
    # (from the top for gradients).  Measured here: ReLU rows with beta = -0.5 at
    # B = 16 exceed the infinite-width variance by ~4% at block 4 for N = 256,
    # ~1% for N = 1024, ~0.2% for N = 2048.
    nb = int(a.block.max())
    fw_fwd = 3.0 * a.block / N
    fw_bwd = 3.0 * (nb - a.block + 1) / N
    for c in a.columns:
        if c.endswith("_se"):
            continue
        va, vb = a[c], e[c]
        ok = np.isfinite(va)
        if c in ("dead_fraction", "active_fraction"):
            assert np.all(ok | ~np.isfinite(vb)), (c, va)  # no NaN where measured
        # a fraction measured as exactly 0 (or 1) has a Monte Carlo resolution of
        # one unit in N x seeds, not a zero standard error
        se2 = np.nan_to_num(e.se(c)) ** 2
        if c.endswith("fraction"):
            se2 = se2 + (1.0 / (N * SEEDS)) ** 2
        if c in ("bias_grad_norm2", "beta_grad_norm2"):
            # below a BatchNorm (and for beta in a linear BN net) the batch sum of
            # the gradient is 0 only to float32 rounding: ~1e-6 of the uncentred
            # norm N E[g^2]
            se2 = se2 + (1e-6 * N * a["grad_second_moment"]) ** 2
        if c in ("mean", "squared_mean", "variance"):
            # float32 rounding: a centred batch's mean is zero only to ~1e-7 of
            # its scale (sqrt(q) for the mean, q for the squared mean)
            q = np.abs(a["second_moment"])
            se2 = se2 + (1e-6 * (np.sqrt(q) if c == "mean" else q)) ** 2
        if c == "correlation":
            # the measured cosine <h_a, h_b>/(|h_a||h_b|) is a ratio over N units:
            # its finite-width bias is O(1/N) relative (the norms fluctuate by
            # sqrt(2/N)); 2/N covers it (for BN rows the infinite-width value
            # -1/(B-1) is exact)
            se2 = se2 + (2.0 / N * np.abs(a[c])) ** 2
        fw = fw_bwd if "grad" in c else fw_fwd
        if not c.endswith("fraction"):
            # in quadrature with se, scaled so that the 5-se threshold allows fw
            se2 = se2 + (fw * np.abs(a[c]) / 5.0) ** 2
        se = np.sqrt(se2)
        z = np.where(ok, (vb - va) / np.where(se > 0, se, np.inf), 0.0)
        z = np.where((se == 0) & (vb == va), 0.0, z)
        bad = np.abs(z) > 5
        assert not bad.any(), (
            c,
            [a.name[i] for i in np.flatnonzero(bad)],
            va[bad],
            vb[bad],
            se[bad],
        )
    del cmp


@pytest.mark.parametrize("B", [8, 32, 64])
def test_inputs_dead_and_active_fractions(B):
    rng = np.random.default_rng(B)
    x = 0.7 * rng.standard_normal((64, N)) + 0.5 * rng.standard_normal(N)
    for pos in ("before_activation", "after_activation"):
        net = _net("relu", pos, "ones", "normal(0, 0.5)", depth=2)
        a = idg.analyze(net, inputs=x)
        e = idg.simulate(net, inputs=x, seeds=SEEDS, backend="numpy", rng=1)
        for c in ("dead_fraction", "active_fraction"):
            assert np.all(np.isfinite(a[c])), (c, a[c])
            se = np.sqrt(e.se(c) ** 2 + (1.0 / (N * SEEDS)) ** 2)
            assert np.all(np.abs(a[c] - e[c]) <= 4 * se + 2e-3), (c, a[c], e[c], se)
    del B


@pytest.mark.parametrize("B", [8, 64, 512])
def test_dead_fractions_finite_at_every_batch_size(B):
    net = _net("relu", "before_activation", "ones", "normal(0, 0.5)", depth=2)
    a = idg.analyze(net, batch_size=B)
    assert np.all(np.isfinite(a["dead_fraction"]))
    assert np.all(np.isfinite(a["active_fraction"]))


def test_summary_chi1_reflects_batch_size():
    net = idg.mlp(6, 64, "relu", batchnorm=True)
    s0 = idg.analyze(net).summary
    assert s0["chi1"] == pytest.approx(math.pi / (math.pi - 1), rel=1e-12)
    assert "large batch" in s0["chi1_source"]
    s8 = idg.analyze(net, batch_size=8).summary
    assert s8["chi1"] == pytest.approx(1.788, abs=1e-3)
    assert "batch size 8" in s8["chi1_source"]

"""The residual bench's PyTorch peer computes the same job as ``simulate``.

``bench/peers/torch_resnet_peer.py`` and ``initdiag.simulate`` draw from different
random streams, so each statistic of each row is compared as a Monte Carlo
estimate: the means over seeds must agree within ``Z`` combined standard errors
(plus a float32 rounding allowance for the statistics that are the same number in
every seed, e.g. a BatchNorm output's second moment var / (var + eps), or the
gradient of a bias followed by BatchNorm, exactly 0).  A negative control shows
the comparison has power: a 10% smaller weight variance in ``simulate`` fails it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import initdiag as idg
from initdiag.profile import STAT_COLUMNS

torch = pytest.importorskip("torch")

BLOCKS, WIDTH, BATCH, SEEDS = 3, 64, 64, 100
# ~230 comparisons: |z| > 4.5 has probability 7e-6 each under the null
Z = 4.5
# float32 rounding of an O(1) statistic accumulated over B x N = 4096 entries
# (both engines accumulate in float64 from float32 data); far below the Monte Carlo
# errors (~1e-2 relative) of every statistic that varies between seeds
ROUNDING = 1e-5


def _peer_estimates() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench")
    )
    try:
        from peers.torch_resnet_peer import Peer
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    try:
        runs = Peer(BLOCKS, WIDTH, threads=1).run(BATCH, SEEDS)
    finally:
        torch.set_num_threads(threads)
    vals = {
        c: np.array([[row.get(c, np.nan) for row in seed] for seed in runs])
        for c in STAT_COLUMNS
    }
    mean = {c: v.mean(axis=0) for c, v in vals.items()}
    se = {c: v.std(axis=0, ddof=1) / np.sqrt(SEEDS) for c, v in vals.items()}
    return mean, se


@pytest.fixture(scope="module")
def peer():
    return _peer_estimates()


def _net(init=None):
    return idg.resnet_mlp(
        BLOCKS, WIDTH, norm="batchnorm", norm_position="post", init=init
    )


def _disagreements(prof, peer) -> list[str]:
    mean, se = peer
    bad = []
    for c in STAT_COLUMNS:
        a, sa = prof.columns[c], prof.columns[f"{c}_se"]
        b, sb = mean[c], se[c]
        assert np.array_equal(np.isnan(a), np.isnan(b)), c
        ok = ~np.isnan(a)
        tol = Z * np.hypot(sa[ok], sb[ok]) + ROUNDING * (
            1 + np.abs(a[ok]) + np.abs(b[ok])
        )
        for k in np.flatnonzero(np.abs(a[ok] - b[ok]) > tol):
            i = np.flatnonzero(ok)[k]
            bad.append(
                f"{prof.name[i]}.{c}: simulate {a[i]:.6g} +- {sa[i]:.2g}, "
                f"torch {b[i]:.6g} +- {sb[i]:.2g}"
            )
    return bad


def test_peer_rows_follow_the_network():
    net = _net()
    names = [i.name for i in net.infos]
    assert names[0] == "dense1"
    assert names[1:7] == [
        f"block2.{n}" for n in ("dense1", "bn1", "relu1", "dense2", "bn2", "out")
    ]
    assert len(names) == 1 + 6 * BLOCKS


def test_peer_statistics_equal_simulate_within_monte_carlo_error(peer):
    prof = idg.simulate(_net(), batch_size=BATCH, seeds=SEEDS, rng=1)
    assert prof.meta["executor"] == "fused"
    bad = _disagreements(prof, peer)
    assert not bad, "\n".join(bad)
    # the statistics that vary between seeds were compared, not only NaN patterns
    assert np.all(np.isfinite(prof.columns["grad_second_moment"]))
    assert np.isfinite(prof.columns["weight_grad_norm2"]).sum() == 1 + 2 * BLOCKS


def test_comparison_detects_a_ten_percent_weight_variance_change(peer):
    # a = 1/3: gain^2 = 2 / (1 + a^2) = 1.8, 0.9x Kaiming's variance
    init = idg.InitScheme(weight=idg.initializers.KaimingNormal(a=1 / 3))
    prof = idg.simulate(_net(init), batch_size=BATCH, seeds=SEEDS, rng=1)
    assert len(_disagreements(prof, peer)) >= 5

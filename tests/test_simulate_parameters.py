"""simulate(parameters=...): the user's own tensors instead of draws, and one
output gradient per seed."""

from __future__ import annotations

import numpy as np
import pytest

import initdiag as idg
from initdiag.training import Trainer, make_optimizer


def _drawn(net, seeds):
    """Each seed's parameters as simulate draws them (the trainer draws from the
    same streams)."""
    out = []
    for s in range(seeds):
        tr = Trainer(
            net, "mse", make_optimizer("sgd"), 0.1, np.dtype("float32"), "numpy", 0, s
        )
        out.append(tr.named_params())
    return out


def test_given_parameters_reproduce_the_drawn_profile():
    net = idg.resnet_mlp(
        blocks=2, width=32, input_dim=16, norm="batchnorm", norm_position="post"
    )
    ref = idg.simulate(net, batch_size=32, seeds=2, backend="numpy")
    got = idg.simulate(
        net, batch_size=32, seeds=2, backend="numpy", parameters=_drawn(net, 2)
    )
    for c, v in ref.columns.items():
        np.testing.assert_array_equal(got.columns[c], v, err_msg=c)
    assert got.meta["executor"] == "generic"


def test_parameters_and_per_seed_output_gradients_are_used():
    net = idg.mlp(depth=2, width=8, input_dim=4, bias=False)
    gen = np.random.default_rng(0)
    params = [
        {
            "dense1": {"weight": gen.standard_normal((8, 4))},
            "dense2": {"weight": gen.standard_normal((8, 8))},
        }
        for _ in range(2)
    ]
    x = gen.standard_normal((5, 4))
    gs = [gen.standard_normal((5, 8)) for _ in range(2)]
    prof = idg.simulate(
        net, inputs=x, parameters=params, output_grad=gs, seeds=2, dtype="float64"
    )
    # a loop-level reference: relu(x W1^T) then W2, gradient of sum <g, y>
    q, gw = [], []
    for p, g in zip(params, gs, strict=True):
        h1 = x @ p["dense1"]["weight"].T
        a1 = np.maximum(h1, 0)
        h2 = a1 @ p["dense2"]["weight"].T
        a2 = np.maximum(h2, 0)
        q.append((a2**2).mean())
        d2 = g * (h2 > 0)
        dw2 = d2.T @ a1
        gw.append((dw2**2).sum() / (5 * (g**2).mean()))
    r = net.names.index("relu2")
    assert prof.columns["second_moment"][r] == pytest.approx(np.mean(q), rel=1e-12)
    d = net.names.index("dense2")
    assert prof.columns["weight_grad_norm2"][d] == pytest.approx(np.mean(gw), rel=1e-10)


def test_bad_parameters_say_what_is_wrong():
    net = idg.mlp(depth=1, width=4, input_dim=3)
    ok = {"dense1": {"weight": np.zeros((4, 3)), "bias": np.zeros(4)}}
    with pytest.raises(ValueError, match="one mapping per seed"):
        idg.simulate(net, seeds=2, parameters=[ok])
    with pytest.raises(
        ValueError, match=r"needs \['bias', 'weight'\], missing \['bias'\]"
    ):
        idg.simulate(
            net, seeds=1, parameters=[{"dense1": {"weight": np.zeros((4, 3))}}]
        )
    bad = {"dense1": {"weight": np.zeros((3, 4)), "bias": np.zeros(4)}}
    with pytest.raises(ValueError, match=r"must have shape \(4, 3\), got \(3, 4\)"):
        idg.simulate(net, seeds=1, parameters=[bad])
    with pytest.raises(ValueError, match="does not have: \\['dense9'\\]"):
        idg.simulate(net, seeds=1, parameters=[{**ok, "dense9": {}}])
    with pytest.raises(ValueError, match="2 per-seed arrays for 1 seeds"):
        idg.simulate(net, seeds=1, batch_size=4, output_grad=[np.ones((4, 4))] * 2)

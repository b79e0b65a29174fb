"""initdiag.train: parameter gradients against finite differences for every
trainable layer kind, divergence as a finding, reproducibility, the learning-rate
search, the data sources and the result's exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import initdiag as idg
from initdiag.layers import Affine
from initdiag.training import (
    Trainer,
    TrainResult,
    from_arrays,
    make_optimizer,
    subspace_mixture,
    with_readout,
)

F64 = np.dtype("float64")


def _every_kind() -> idg.Network:
    """Dense, BatchNorm (random gamma / beta), LayerNorm, tanh, GELU, a residual
    block with a learnable Scale and a projection shortcut, dropout."""
    block = idg.Residual(
        (idg.Dense(12), idg.LayerNorm(), idg.GELU(), idg.Dense(10), idg.Scale()),
        shortcut=(idg.Dense(10),),
    )
    layers = (
        idg.Dense(12),
        idg.BatchNorm(),
        idg.Tanh(),
        block,
        idg.Dropout(0.2),
        idg.ReLU(),
        Affine(),
        idg.Dense(4),
    )
    init = idg.InitScheme(
        bias="normal(0, 0.2)",
        bn_weight="uniform(0.5, 1.5)",
        bn_bias="normal(0, 0.3)",
        extra={
            "ln_weight": "uniform(0.5, 1.5)",
            "ln_bias": "normal(0, 0.3)",
            "scale": "constant(0.7)",
            "affine_weight": "uniform(0.5, 1.5)",
            "affine_bias": "normal(0, 0.3)",
        },
    )
    return idg.Network(6, layers, init, "every-kind")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_parameter_gradients_match_finite_differences(loss):
    net = _every_kind()
    tr = Trainer(net, loss, make_optimizer("sgd"), 0.1, F64, "numpy", 5, 1)
    gen = np.random.default_rng(0)
    x = gen.standard_normal((16, 6))
    y = (
        gen.integers(0, 4, 16)
        if loss == "cross_entropy"
        else gen.standard_normal((16, 4))
    )
    tr.gradients(x, y)
    grads = [{k: v.copy() for k, v in g.items()} for g in tr.grads]
    h = 1e-6
    checked = set()
    for i, p in enumerate(tr.params):
        for k, v in p.items():
            flat = v.reshape(-1)
            for j in gen.choice(flat.size, min(4, flat.size), replace=False):
                old = flat[j]
                flat[j] = old + h
                lp = tr.gradients(x, y)[0]
                flat[j] = old - h
                lm = tr.gradients(x, y)[0]
                flat[j] = old
                fd = (lp - lm) / (2 * h)
                got = grads[i][k].reshape(-1)[j]
                assert got == pytest.approx(fd, rel=1e-5, abs=1e-8), (
                    net.infos[i].name,
                    k,
                    j,
                )
            checked.add(net.infos[i].kind)
    assert {"dense", "batchnorm", "layernorm", "scale", "affine"} <= checked


def test_divergence_is_a_finding_with_its_step():
    net = idg.mlp(depth=3, width=32, input_dim=16)
    r = idg.train(net, steps=30, seeds=2, lr=1e3, batch_size=32, eval_every=5)
    assert len(r.findings) == 2
    for f in r.findings:
        assert f["kind"] == "divergence" and f["lr"] == 1e3
        k = f["step"]
        assert 0 <= k < 30
        # every batch before it had a finite loss, none from it on
        s = r.step_loss[f["seed"]]
        assert np.all(np.isfinite(s[:k])) and np.all(np.isnan(s[k:]))
        assert f"step {k}" in f["message"]
    assert r.final_loss()[0] == math.inf


def test_same_rng_same_curves_and_other_rng_differs():
    net = idg.mlp(depth=2, width=32, input_dim=16, batchnorm=True)
    kw = dict(steps=20, seeds=2, lr=0.05, batch_size=32, eval_every=5)
    a = idg.train(net, rng=3, **kw)
    b = idg.train(net, rng=3, **kw)
    c = idg.train(net, rng=4, **kw)
    np.testing.assert_array_equal(a.step_loss, b.step_loss)
    np.testing.assert_array_equal(a.test_loss, b.test_loss)
    assert not np.array_equal(a.step_loss, c.step_loss)
    # seeds are fresh initialisations and fresh data orders
    assert not np.array_equal(a.step_loss[0], a.step_loss[1])


def test_curves_do_not_depend_on_the_thread_count():
    numba = pytest.importorskip("numba")
    from threadpoolctl import threadpool_limits

    net = idg.mlp(depth=2, width=64, input_dim=16, batchnorm=True)
    kw = dict(steps=10, seeds=1, lr=0.05, batch_size=64, eval_every=5, backend="numba")
    n0 = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        with threadpool_limits(1):
            one = idg.train(net, **kw)
    finally:
        numba.set_num_threads(n0)
    many = idg.train(net, **kw)
    np.testing.assert_array_equal(one.step_loss, many.step_loss)


def test_the_learning_rate_search_keeps_the_best_final_loss():
    net = idg.mlp(depth=2, width=32, input_dim=16)
    grid = (1e-4, 0.05, 1e3)
    r = idg.train(net, steps=20, seeds=2, lr_grid=grid, batch_size=32)
    by_lr = {row["lr"]: row for row in r.lr_search}
    assert set(by_lr) == set(grid)
    assert by_lr[1e3]["diverged"] == 2 and by_lr[1e3]["final_loss"] == math.inf
    best = min(grid, key=lambda lr: by_lr[lr]["final_loss"])
    assert r.lr == best
    assert r.final_loss()[0] == pytest.approx(by_lr[best]["final_loss"])
    single = idg.train(net, steps=20, seeds=2, lr=best, batch_size=32)
    np.testing.assert_array_equal(single.step_loss, r.step_loss)


def test_final_loss_and_steps_to_target_from_the_curves():
    net = idg.mlp(depth=2, width=32, input_dim=16)
    r = idg.train(net, steps=40, seeds=3, lr=0.05, batch_size=32, eval_every=10)
    w = 4  # the last tenth of 40 steps
    per_seed = r.step_loss[:, -w:].mean(axis=1)
    m, se = r.final_loss()
    assert m == pytest.approx(per_seed.mean())
    assert se == pytest.approx(per_seed.std(ddof=1) / math.sqrt(3))
    t = float(np.median(r.step_loss[:, 20:]))
    got = r.steps_to(t)
    for s in range(3):
        run = np.array([r.step_loss[s, max(0, k - w) : k].mean() for k in range(1, 41)])
        hit = np.flatnonzero(run <= t)
        assert (got[s] != got[s] and hit.size == 0) or got[s] == hit[0] + 1
    # the training curve at an evaluation step is the mean of the batches before
    tc = r.train_curve()
    assert tc[0, 2] == pytest.approx(r.step_loss[0, 10:20].mean())
    assert r.eval_steps.tolist() == [0, 10, 20, 30, 40]


def test_training_reduces_the_loss_on_the_synthetic_task():
    net = idg.mlp(depth=3, width=64, batchnorm=True)
    r = idg.train(net, steps=150, seeds=2, lr=0.05, batch_size=64, eval_every=50)
    assert r.data["name"] == "synthetic" and r.data["input_dim"] == 64
    assert r.meta["readout"] is not None  # 64 outputs -> 10 classes
    lm, _, acc, _ = r.final_test()
    assert lm < 0.6 * r.test_loss[:, 0].mean()
    assert acc > 0.5  # chance is 0.1
    assert r.layer_stats and {"grad_norm", "weight_norm", "update_ratio"} <= set(
        r.layer_stats[0]
    )


def test_residual_and_dropout_networks_train():
    net = idg.resnet_mlp(blocks=2, width=32, input_dim=16, norm="layernorm")
    r = idg.train(net, steps=10, seeds=1, lr=0.02, batch_size=32)
    assert np.all(np.isfinite(r.step_loss))
    net = idg.Network(16, (idg.Dense(32), idg.ReLU(), idg.Dropout(0.5), idg.Dense(3)))
    X = np.random.default_rng(0).standard_normal((200, 16))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    r = idg.train(net, (X, y), steps=10, seeds=1, lr=0.05, batch_size=32)
    assert r.data["n_classes"] == 3 and r.meta["readout"] is None


def test_user_regression_targets_use_squared_error():
    gen = np.random.default_rng(1)
    X = gen.standard_normal((300, 8))
    y = X[:, :2] @ np.array([[1.0, -1.0], [0.5, 2.0]])
    net = idg.mlp(depth=2, width=16, input_dim=8, output_dim=2)
    r = idg.train(net, (X, y), steps=60, seeds=1, lr=0.02, batch_size=32)
    assert r.loss == "mse" and np.all(np.isnan(r.test_acc))
    assert r.step_loss[0, -5:].mean() < 0.5 * r.step_loss[0, :5].mean()


def test_digits_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn", reason="data='digits' needs scikit-learn")
    net = idg.mlp(depth=2, width=64, input_dim=64)
    r = idg.train(net, "digits", steps=60, seeds=1, lr=0.05, batch_size=64)
    assert r.data["name"] == "digits" and r.data["n_train"] + r.data["n_test"] == 1797
    assert r.final_test()[2] > 0.6


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"lr": 0.1, "lr_grid": (0.1,)}, "not both"),
        ({"lr": -1.0}, "> 0"),
        ({"batch_size": 10**6}, "exceeds the 4096 training examples"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"data": "mnist"}, "unknown data 'mnist'"),
        ({"loss": "hinge"}, "unknown loss"),
        ({"momentum": 1.5}, "momentum must be finite and >= 0.0 and < 1.0"),
    ],
)
def test_bad_arguments_say_what_was_wrong(kw, match):
    net = idg.mlp(depth=1, width=8)
    with pytest.raises((ValueError, TypeError), match=match):
        idg.train(net, **kw)


def test_data_that_does_not_fit_the_network_is_refused():
    net = idg.mlp(depth=1, width=8)
    with pytest.raises(ValueError, match="the data has 5 features but the network"):
        idg.train(net, (np.zeros((50, 5)), np.zeros(50, int)))
    with pytest.raises(ValueError, match="float targets: use loss='mse'"):
        idg.train(
            idg.mlp(depth=1, width=8, input_dim=5),
            (np.zeros((50, 5)), np.zeros(50)),
            loss="cross_entropy",
        )
    with pytest.raises(TypeError, match="needs an initdiag.Network"):
        idg.train("mlp")


def test_result_exports(tmp_path):
    net = idg.mlp(depth=2, width=16, input_dim=16)
    r = idg.train(net, steps=20, seeds=2, lr=1e3, batch_size=16, eval_every=10)
    assert isinstance(r, TrainResult)
    d = json.loads(r.to_json(str(tmp_path / "r.json")))
    assert d == json.loads((tmp_path / "r.json").read_text())
    assert d["steps"] == 20 and len(d["test_loss"]) == 2
    assert d["findings"] and d["final_loss"] is None  # diverged: inf -> null
    fig = r.plot()
    assert fig.axes and fig.axes[0].get_ylabel() == "cross_entropy loss"
    pd = pytest.importorskip("pandas", reason="to_frame needs pandas")
    df = r.to_frame()
    assert isinstance(df, pd.DataFrame) and len(df) == 2 * 3


def test_readout_and_split_helpers():
    net = idg.mlp(depth=1, width=8)
    out, name = with_readout(net, 10)
    assert out.output_dim == 10 and name == out.infos[-1].name
    same, none = with_readout(out, 10)
    assert same is out and none is None
    ds = from_arrays((np.zeros((10, 3)), np.arange(10) % 2), seed=0)
    assert ds.X_train.shape == (8, 3) and ds.X_test.shape == (2, 3)
    task = subspace_mixture(32, n_train=2000, n_test=10)
    np.testing.assert_allclose(np.mean(task.X_train**2), 1.0, rtol=0.05)
    assert task.chance_loss() == pytest.approx(math.log(10), rel=0.02)


def test_the_pilot_falls_back_when_its_rate_diverges_on_another_seed():
    from initdiag.training.run import _search

    class Run:  # what _search reads of a TrainResult
        def __init__(self, lr, seeds, steps, loss, diverged=()):
            self.lr, self.seeds, self.steps = lr, seeds, steps
            self.loss, self.diverged = loss, list(diverged)

        def final_loss(self):
            return self.loss, 0.01

    # the pilot (1 seed) ranks 0.3 first; over 3 seeds 0.3 diverges on seed 2, so
    # the pilot's second choice 0.03 runs in full and is kept
    pilot = {0.003: 2.0, 0.03: 1.0, 0.3: 0.5}
    full = {0.3: (math.inf, [2]), 0.03: (0.8, [])}
    calls = []

    def run(lr, seeds, steps):
        calls.append((lr, seeds, steps))
        if seeds == 1:
            return Run(lr, 1, steps, pilot[lr])
        return Run(lr, seeds, steps, *full[lr])

    total = [3 * 5 + 3 * 20]
    r = _search(run, (0.003, 0.03, 0.3), True, 3, 20, 5, total)
    assert r.lr == 0.03
    assert calls == [
        (0.003, 1, 5),
        (0.03, 1, 5),
        (0.3, 1, 5),
        (0.3, 3, 20),
        (0.03, 3, 20),
    ]
    assert total == [3 * 5 + 2 * 3 * 20]  # the progress total grew by the rerun
    rows = [(x["lr"], x["full"], x["diverged"]) for x in r.lr_search]
    assert rows[-2:] == [(0.3, True, 1), (0.03, True, 0)]
    # no divergence: no rerun
    calls.clear()
    full[0.3] = (0.4, [])
    r = _search(run, (0.003, 0.03, 0.3), True, 3, 20, 5, [0])
    assert r.lr == 0.3 and len(calls) == 4

"""initdiag.train against a plain PyTorch loop: the same network, the same initial
parameters, the same batches and optimizer give the same loss curve to float32
tolerance over the first 20 steps (SGD with momentum and Adam, with and without
BatchNorm)."""

from __future__ import annotations

import numpy as np
import pytest

import initdiag as idg
from initdiag.training import Trainer, make_optimizer, subspace_mixture, with_readout

torch = pytest.importorskip("torch", reason="the PyTorch cross-check needs torch")

STEPS = 20


def _torch_model(net, params):
    """nn.Sequential of the network's rows with initdiag's initial parameters."""
    mods = []
    for info, p in zip(net.infos, params, strict=True):
        kind = info.kind
        if kind == "dense":
            m = torch.nn.Linear(info.fan_in, info.width, bias="bias" in p)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(p["weight"]))
                if "bias" in p:
                    m.bias.copy_(torch.from_numpy(p["bias"]))
        elif kind == "batchnorm":
            m = torch.nn.BatchNorm1d(info.width, eps=info.layer.eps, momentum=0.1)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(p["weight"]))
                m.bias.copy_(torch.from_numpy(p["bias"]))
        elif kind == "activation":
            m = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[info.layer.name]()
        else:  # pragma: no cover - the networks below have no other rows
            raise AssertionError(kind)
        mods.append(m)
    return torch.nn.Sequential(*mods)


@pytest.mark.parametrize(
    "optimizer,lr,batchnorm",
    [
        ("sgd", 0.05, False),
        ("sgd", 0.05, True),
        ("adam", 1e-3, False),
        ("adam", 1e-3, True),
    ],
)
def test_loss_curve_matches_pytorch(optimizer, lr, batchnorm):
    torch.manual_seed(0)
    base = idg.mlp(
        depth=3,
        width=48,
        activation="tanh" if optimizer == "adam" else "relu",
        batchnorm=batchnorm,
        input_dim=24,
        init=idg.InitScheme(bias="normal(0, 0.1)", bn_weight="uniform(0.5, 1.5)"),
    )
    ds = subspace_mixture(24, n_train=512, n_test=64, seed=3)
    net, _ = with_readout(base, ds.n_classes)
    opt = make_optimizer(optimizer, momentum=0.9)
    tr = Trainer(net, "cross_entropy", opt, lr, np.dtype("float32"), None, 7, 0)
    model = _torch_model(net, tr.params)
    model.train()
    topt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    lossf = torch.nn.CrossEntropyLoss()
    X = ds.X_train.astype(np.float32)
    order = np.random.default_rng(11)
    ours, theirs = [], []
    for _ in range(STEPS):
        idx = order.choice(len(X), 64, replace=False)
        ours.append(tr.step(X[idx], ds.y_train[idx])[0])
        topt.zero_grad()
        out = lossf(model(torch.from_numpy(X[idx])), torch.from_numpy(ds.y_train[idx]))
        out.backward()
        topt.step()
        theirs.append(float(out.detach()))
    ours, theirs = np.array(ours), np.array(theirs)
    # float32 rounding of ~1e-7 per op, amplified by 20 steps of a small
    # network's dynamics: 1e-4 relative is ~100x the first step's difference and
    # ~1000x below any change of the loss from one step to the next
    np.testing.assert_allclose(ours[0], theirs[0], rtol=2e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert abs(theirs[-1] - theirs[0]) > 1e-2  # the networks really trained
    # the parameters after 20 steps agree too
    w_ours = tr.params[0]["weight"]
    w_theirs = model[0].weight.detach().numpy()
    np.testing.assert_allclose(w_ours, w_theirs, rtol=1e-3, atol=1e-5)
    if batchnorm:
        bn = model[1]
        np.testing.assert_allclose(
            tr.ex.ctx[1].extra["running"][1], bn.running_var.numpy(), rtol=1e-4
        )
    if batchnorm and optimizer == "sgd":
        # (under Adam the bias of the Dense before a BatchNorm has an exactly zero
        # gradient in exact arithmetic, so Adam's normalised step follows the sign
        # of rounding noise and moves it by ~lr per step differently in the two
        # loops; BatchNorm cancels it in the loss, not in its running mean)
        np.testing.assert_allclose(
            tr.ex.ctx[1].extra["running"][0], bn.running_mean.numpy(), atol=1e-5
        )
        # evaluation mode on the running statistics gives torch's eval output
        model.eval()
        Xt = ds.X_test.astype(np.float32)
        with torch.no_grad():
            ref = float(lossf(model(torch.from_numpy(Xt)), torch.from_numpy(ds.y_test)))
        np.testing.assert_allclose(tr.evaluate(Xt, ds.y_test)[0], ref, rtol=1e-4)

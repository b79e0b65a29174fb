"""initdiag.integrations.torch: reading, auditing, diagnosing and fixing real
PyTorch models (skipped without torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
nn = torch.nn
F = torch.nn.functional

import initdiag as idg  # noqa: E402
from initdiag.integrations import torch as itorch  # noqa: E402


# -- models written in the test --------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock on features: ``out += identity``, an in-place ReLU
    module used twice, a Linear + BN downsample when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, cout, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(cout, cout, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.downsample = None
        if cin != cout:
            self.downsample = nn.Sequential(
                nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.fc1(x)))
        out = self.bn2(self.fc2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, d: int = 16, w: int = 32):
        super().__init__()
        self.stem = nn.Linear(d, w)
        self.bn = nn.BatchNorm1d(w)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w))
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(x, 1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.a = nn.Linear(w, w)
        self.b = nn.Linear(w, w)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.abs().mean() >= 0:  # always true, but only a real forward knows it
            h = h + self.b(h)
        return h


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


def mlp(width=32, depth=3, act=nn.ReLU):
    layers = [nn.Linear(16, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


def _rows(cov):
    return {r.name: r for r in cov.rows}


# -- the import guard ---------------------------------------------------------------
def test_import_initdiag_does_not_import_torch():
    code = "import sys, initdiag, initdiag.integrations; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_without_torch_the_module_says_what_to_install():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import initdiag.integrations.torch\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert 'pip install "initdiag[torch]"' in out.stdout, out.stderr


# -- read -----------------------------------------------------------------------------
def test_read_sequential_mlp():
    model = mlp(act=nn.Tanh)
    net, cov = itorch.read(model, torch.randn(8, 16))
    assert cov.method == "fx"
    assert [i.kind for i in net.infos] == ["dense", "activation"] * 3 + ["dense"]
    assert net.names == [
        "dense1",
        "tanh1",
        "dense2",
        "tanh2",
        "dense3",
        "tanh3",
        "dense4",
    ]
    r = _rows(cov)
    assert (r["0"].type, r["0"].status, r["0"].row) == ("Linear", "mapped", "dense1")
    assert r["5"].row == "tanh3"
    # every row's law is the model's: nn.Linear's default, U(+-1/sqrt(fan_in))
    p = net.param_inits()
    w, b = p[2]["weight"], p[2]["bias"]
    assert w.variance(32, 32) == pytest.approx(1 / (3 * 32), rel=1e-12)
    assert (b.a, b.b) == pytest.approx((-(32**-0.5), 32**-0.5))


def test_read_torchvision_style_resnet():
    net, cov = itorch.read(ResNet(), torch.randn(8, 16))
    assert cov.method == "fx"
    res = [i for i in net.infos if i.kind == "residual"]
    assert [i.name for i in res] == ["block2.out", "block3.out", "block4.out"]
    # the branch is fc1 bn1 relu fc2 bn2; the shortcut is empty (identity) except
    # for the downsample block, whose projection is the shortcut
    names = net.names
    b2 = [names[k] for k in res[0].branch]
    assert b2 == [
        "block2.dense1",
        "block2.bn1",
        "block2.relu1",
        "block2.dense2",
        "block2.bn2",
    ]
    assert res[0].shortcut == ()
    assert [names[k] for k in res[2].shortcut] == [
        "block4.shortcut.dense1",
        "block4.shortcut.bn1",
    ]
    r = _rows(cov)
    # the in-place ReLU module is called in the branch and after the add
    assert r["layer1.0.relu"].row == "block2.relu1, relu2"
    assert r["layer2.0.downsample.0"].row == "block4.shortcut.dense1"
    assert r["fc"].row == "dense5"
    assert not cov.unsupported()


def test_read_falls_back_to_a_recorded_forward():
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        net, cov = itorch.read(Branchy(), torch.randn(8, 8))
    assert cov.method == "recorded forward"
    assert net.describe().endswith("Dense(8->8) tanh Residual[Dense(8->8)]")
    # the branch's condition (abs, mean, >=) is not on the data path
    assert not cov.unsupported()
    assert _rows(cov)["b"].row == "block2.dense1"


def test_read_unsupported_module_warns_and_strict_names_it():
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ELU(), nn.Linear(32, 32), nn.Softplus(), nn.Linear(32, 4)
    )
    with pytest.warns(UserWarning, match=r"1 \(ELU\), 3 \(Softplus\)"):
        net, cov = itorch.read(model, torch.randn(8, 16))
    assert [r.name for r in cov.unsupported()] == ["1", "3"]
    assert net.describe().endswith("Dense(16->32) Dense(32->32) Dense(32->4)")
    with pytest.raises(itorch.UnsupportedModuleError, match=r"1 \(ELU.*3 \(Softplus"):
        itorch.read(model, torch.randn(8, 16), strict=True)


def test_read_conv_is_a_labelled_dense_on_channels():
    net, cov = itorch.read(SmallCNN(), torch.randn(4, 3, 8, 8))
    r = _rows(cov)
    assert r["conv"].row == "dense1" and "approximation" in r["conv"].note
    assert r["pool"].status == "passed through"
    # fan_in E[W^2] of the equivalent dense is the conv's: C_in k = 27 inputs of
    # variance 1/(3 * 27)
    w = net.param_inits()[0]["weight"]
    assert 3 * w.second_moment(3, 8) == pytest.approx(27 / (3 * 27), rel=1e-12)


def test_read_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        itorch.read("model", torch.randn(4, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        itorch.read(mlp(), np.zeros((4, 16)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        itorch.read(mlp(), torch.randn(1, 16))


# -- audit ----------------------------------------------------------------------------
def _audit_model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.Tanh(),
        nn.Conv1d(128, 96, 3),
        nn.Tanh(),
        nn.Linear(96, 10),
    )
    nn.init.kaiming_normal_(m[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.trunc_normal_(m[2].weight, std=0.02)
    nn.init.zeros_(m[3].weight)
    return m


def test_audit_measures_every_tensor_and_names_its_law():
    m = _audit_model()
    table = itorch.audit(m)
    by = {r.name: r for r in table.rows}
    assert list(by) == [n for n, _ in m.named_parameters()]
    for name, p in m.named_parameters():
        law = by[name].law
        x = p.detach().double()
        assert law.mean == pytest.approx(float(x.mean()), rel=1e-12, abs=1e-15)
        assert law.var == pytest.approx(float(x.var(unbiased=False)), rel=1e-12)
    for k in ("0.weight", "2.weight", "5.weight", "7.weight"):
        fi, fo = nn.init._calculate_fan_in_and_fan_out(dict(m.named_parameters())[k])
        assert (by[k].law.fan_in, by[k].law.fan_out) == (fi, fo)
    assert "fan_out" in by["0.weight"].law.source
    assert by["0.weight"].law.implied_var == pytest.approx(2 / 128)
    assert "trunc_normal(std=0.02)" in by["2.weight"].law.source
    assert by["3.weight"].law.source == "zeros" and by["3.bias"].law.source == "zeros"
    assert "kaiming_uniform(a=sqrt(5))" in by["5.weight"].law.source
    assert by["5.weight"].law.fan_in == 128 * 3
    assert by["5.bias"].law.implied_var == pytest.approx(1 / (3 * 384))
    assert "default bias" in by["7.bias"].law.source
    assert "zero-gamma" in by["3.weight"].verdict
    assert "BatchNorm1d follows" in by["2.weight"].verdict
    assert "readout" in by["7.weight"].verdict
    text = str(table)
    assert "0.weight" in text and "apparent initializer" in text


def test_audit_verdict_numbers_come_from_meanfield():
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )
    by = {r.name: r for r in itorch.audit(m).rows}
    # nn.Linear's default: sigma_w2 = fan_in / (3 fan_in) = 1/3, chi1 = 1/6 for ReLU
    assert "sigma_w2 = fan_in E[W^2] = 0.333" in by["2.weight"].verdict
    assert "chi1 = 0.167 for relu" in by["2.weight"].verdict
    chi = idg.meanfield.chi1("tanh", 1 / 3, 1 / (3 * 64))
    assert f"chi1 = {chi:.3g} for tanh" in by["0.weight"].verdict
    edge = idg.meanfield.critical_sigma_w2("tanh", 1 / (3 * 64))
    assert f"sigma_w2 = {edge:.3g}" in by["0.weight"].verdict


def test_audit_unrecognised_law_is_its_measured_moments():
    m = nn.Linear(100, 200)
    with torch.no_grad():
        m.weight.normal_(0.3, 0.7)
    law = {r.name: r for r in itorch.audit(m).rows}["weight"].law
    assert law.source == ""
    assert law.law.mean(1, 1) == pytest.approx(law.mean)
    assert law.law.variance(1, 1) == pytest.approx(law.var)

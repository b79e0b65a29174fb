"""initdiag.integrations.torch: reading, auditing, diagnosing and fixing real
PyTorch models (skipped without torch)."""

from __future__ import annotations

import copy
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


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models here are tiny: torch's intra-op threads only contend (on a
    loaded 2-core machine a (64, 32) BatchNorm took 87 ms at 2 threads, 0.23 ms
    at 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# -- diagnose -------------------------------------------------------------------------
def _stats(h, g, m_out):
    """The Profile columns of one row, from its tensors, with plain torch ops."""
    h = h.detach().double()
    if h.dim() > 2:
        h = h.movedim(1, -1).reshape(-1, h.shape[1])
    u = h / h.norm(dim=1, keepdim=True)
    cos = u @ u.T
    B = h.shape[0]
    out = {
        "mean": h.mean(),
        "second_moment": (h * h).mean(),
        "variance": h.var(dim=0, unbiased=False).mean(),
        "squared_mean": (h.mean(dim=0) ** 2).mean(),
        "correlation": (cos.sum() - cos.diagonal().sum()) / (B * (B - 1)),
        "active_fraction": (h > 0).double().mean(),
        "dead_fraction": (h <= 0).all(dim=0).double().mean(),
        "grad_second_moment": (g.double() ** 2).mean() / m_out,
    }
    return {k: float(v) for k, v in out.items()}


def _direct_resnet(model, x, seed):
    """Every row of ResNet by hand, as diagnose re-initialises and runs it for
    seed ``seed`` (torch.manual_seed(seed), reset_parameters in module order, g_out
    from Generator().manual_seed(seed)); non-in-place ops, retain_grad."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    rows, mods = [], []

    def keep(t, name, mod=None):
        t.retain_grad()
        rows.append((name, t))
        mods.append(mod)
        return t

    h = keep(model.stem(x), "dense1", model.stem)
    h = keep(model.bn(h), "bn1", model.bn)
    h = keep(F.relu(h), "relu1")
    k = 2
    for blk in [*model.layer1, *model.layer2]:
        p = f"block{k}."
        a = keep(blk.fc1(h), p + "dense1", blk.fc1)
        a = keep(blk.bn1(a), p + "bn1", blk.bn1)
        a = keep(F.relu(a), p + "relu1")
        a = keep(blk.fc2(a), p + "dense2", blk.fc2)
        a = keep(blk.bn2(a), p + "bn2", blk.bn2)
        s = h
        if blk.downsample is not None:
            s = keep(blk.downsample[0](h), p + "shortcut.dense1", blk.downsample[0])
            s = keep(blk.downsample[1](s), p + "shortcut.bn1", blk.downsample[1])
        h = keep(a + s, p + "out")
        h = keep(F.relu(h), f"relu{k}")
        k += 1
    y = keep(model.fc(h), f"dense{k}", model.fc)
    g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(g_out)
    m_out = float((g_out.double() ** 2).mean())
    out = {}
    for (name, t), mod in zip(rows, mods, strict=True):
        st = _stats(t, t.grad, m_out)
        if mod is not None:
            w, b = (
                ("weight", "bias") if isinstance(mod, nn.Linear) else ("gamma", "beta")
            )
            st[f"{w}_grad_norm2"] = float(mod.weight.grad.double().pow(2).sum()) / (
                x.shape[0] * m_out
            )
            if mod.bias is not None:
                st[f"{b}_grad_norm2"] = float(mod.bias.grad.double().pow(2).sum()) / (
                    x.shape[0] * m_out
                )
        out[name] = st
    model.zero_grad(set_to_none=True)
    return out


def test_diagnose_measured_column_equals_direct_statistics():
    torch.manual_seed(3)
    model = ResNet()
    x = torch.randn(16, 16)
    d = itorch.diagnose(model, x, seeds=2, rng=10, kernels=False)
    assert d.analytic is None and "no mean-field rule" in d.notes["analytic"]
    direct = [_direct_resnet(model, x, 10 + s) for s in range(2)]
    e = d.measured
    assert e.name == list(direct[0])
    checked = 0
    for i, name in enumerate(e.name):
        for c, v0 in direct[0][name].items():
            want = (v0 + direct[1][name][c]) / 2
            # the same float32 forward and backward; statistics in float64
            assert e.columns[c][i] == pytest.approx(want, rel=1e-6, abs=1e-12), (
                name,
                c,
            )
            checked += 1
    assert checked >= 240  # 28 rows x 8 columns + the parameter-gradient cells


def _snapshot_of(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        torch.get_rng_state(),
    )


def test_diagnose_leaves_the_model_as_it_was():
    torch.manual_seed(4)
    model = ResNet()
    model.layer1[0].bn1.eval()  # a mixed mode, to see it restored
    model(torch.randn(8, 16)).sum().backward()  # .grad set, running stats moved
    x = torch.randn(16, 16)
    before = _snapshot_of(model)
    d = itorch.diagnose(model, x, seeds=2, kernels=False)
    # the eval-mode BatchNorm is read as the affine map of its running statistics
    assert _rows(d.coverage)["layer1.0.bn1"].row == "block2.affine1"
    after = _snapshot_of(model)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1] == after[1]
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(before[2], after[2], strict=True)
    )
    assert before[3] == after[3] == 0
    assert torch.equal(before[4], after[4])


def _init_mlp(model):
    # LeCun-normal weights (sigma_w2 = 1) and nn.Linear's default bias: laws the
    # audit recognises exactly, so the analytic column uses the laws themselves
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            bound = m.in_features**-0.5
            nn.init.uniform_(m.bias, -bound, bound)


class PlainBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc1 = nn.Linear(w, w)
        self.fc2 = nn.Linear(w, w)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


def _residual_mlp(w=256, blocks=3):
    return nn.Sequential(
        nn.Linear(32, w),
        *[PlainBlock(w) for _ in range(blocks)],
        nn.ReLU(),
        nn.Linear(w, 10),
    )


@pytest.mark.parametrize("which", ["tanh_mlp", "residual_mlp"])
def test_diagnose_analytic_and_kernels_agree_with_the_measurement(which):
    torch.manual_seed(5)
    if which == "tanh_mlp":
        model = mlp(width=256, depth=3, act=nn.Tanh)
        x = torch.randn(64, 16)
    else:
        model = _residual_mlp()
        x = torch.randn(64, 32)
    _init_mlp(model)
    d = itorch.diagnose(model, x, seeds=8, init_fn=_init_mlp, rng=1)
    a, e, k = d.analytic, d.measured, d.kernels
    assert "resample" not in d.notes
    # finite width: the mean-field value is the N -> infinity limit; the leading
    # correction of squared activations and gradients is of relative order
    # beta = 5 sum_l 1/n_l over the hidden layers the signal has passed (Hanin &
    # Nica 2019, "Products of many large random matrices and gradients in deep
    # neural networks": log-variance 5 sum 1/n_l; a ratio estimator's bias is of
    # that order): forward, the dense layers strictly below the row (E[h^2] of a
    # dense row given its input is exact); backward, the hidden dense layers
    # strictly above it (the linear readout's gradient W^T g_out has the exact
    # mean n_out Var[W] E[g_out^2]: its small width adds variance, in se, no
    # bias); plus float32 rounding of the measured statistic.  And the input:
    # the analytic column sees the batch as exchangeable, every example with the
    # batch's mean second moment, while q_b = |x_b|^2 / d spreads (relative
    # variance v, about 2/d); phi being nonlinear in q, E[f(q_b)] - f(E q_b) is
    # f'' Var(q_b) / 2 to leading order, a relative v / 2 for |q f''/f| <= 1
    qb = (x.double() ** 2).mean(dim=1)
    v = float(qb.var(unbiased=False) / qb.mean() ** 2)
    infos = d.network.infos
    inv = np.array([1 / i.width if i.kind == "dense" else 0.0 for i in infos])
    inv_hidden = inv.copy()
    inv_hidden[-1] = 0.0
    beta = {
        "second_moment": 5 * (np.cumsum(inv) - inv),
        "grad_second_moment": 5 * (inv_hidden[::-1].cumsum()[::-1] - inv_hidden),
    }
    assert sum(i.kind == "dense" for i in infos) >= 4
    for c in ("second_moment", "grad_second_moment"):
        ana, mea, se = a.columns[c], e.columns[c], e.columns[f"{c}_se"]
        ok = np.isfinite(ana)
        tol = 4 * np.nan_to_num(se) + (beta[c] + v / 2 + 1e-6) * np.abs(ana)
        assert np.all(np.abs(mea - ana)[ok] <= tol[ok]), (c, mea - ana, tol)
    # initdiag's kernels ran the model's own tensors, inputs and output gradients
    # seed by seed: every column equals the PyTorch measurement to float32
    # rounding (a float32 forward agrees with torch's to ~1e-6 relative; squared
    # and summed statistics to a few 1e-6; 1e-4 leaves room for the depth)
    assert "own tensors" in d.notes["kernels"]
    _same_columns(k, e)


def _same_columns(k, e):
    from initdiag.profile import STAT_COLUMNS

    checked = 0
    for c in STAT_COLUMNS:
        both = np.isfinite(k.columns[c]) & np.isfinite(e.columns[c])
        if not both.any():
            continue
        kv, ev = k.columns[c][both], e.columns[c][both]
        # a fraction can move by one unit of the batch when a pre-activation
        # within rounding of 0 changes sign
        atol = 1e-3 if c.endswith("_fraction") else 1e-7 * np.max(np.abs(ev))
        np.testing.assert_allclose(kv, ev, rtol=1e-4, atol=atol, err_msg=c)
        checked += 1
    assert checked >= 8


def test_the_kernel_column_runs_the_models_own_batchnorm_networks():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(16, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    x = torch.randn(32, 16)
    d = itorch.diagnose(model, x, seeds=3, rng=2)
    assert "own tensors" in d.notes["kernels"]
    _same_columns(d.kernels, d.measured)
    # a model with dropout cannot share its masks: fresh draws, and a note saying so
    drop = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)
    )
    d = itorch.diagnose(drop, x, seeds=2)
    assert "fresh draws" in d.notes["kernels"]


def test_diagnose_bad_input():
    with pytest.raises(ValueError, match="seeds must be an integer >= 2"):
        itorch.diagnose(mlp(), torch.randn(8, 16), seeds=1)
    with pytest.raises(ValueError, match="batch_size"):
        itorch.diagnose(mlp(), torch.randn(8, 16), batch_size=1)


# -- fix ------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fix_tanh_mlp_to_the_edge_of_chaos():
    torch.manual_seed(0)
    model = mlp(width=256, depth=5, act=nn.Tanh)  # nn.Linear's default init
    x = torch.randn(128, 16)
    before = _state(model)
    res = itorch.fix(model, x, seeds=8, rng=0)
    assert _same(before, _state(model))  # dry run: a no-op
    assert not res.applied
    c = res.chi1
    # nn.Linear's default is deep in the ordered phase: chi1 about 1/3
    assert c["analytic_before"] < 0.4 and c["measured_before"] < 0.4
    assert abs(c["analytic_after"] - 1) <= 0.01
    assert abs(c["measured_after"] - 1) <= 0.01
    assert abs(c["measured_after"] - 1) <= 4 * c["measured_after_se"] + 1e-3
    # the patched hidden weights have sigma_w2 = 1 / E[tanh'(z)^2] exactly
    w2 = 1 / idg.meanfield.expect_dphi2("tanh", 0.0, 1.0)
    hidden = [r for r in res.rows if r.tensor == "2.weight"]
    assert hidden[0].after == pytest.approx(w2, rel=1e-9)
    assert "edge of chaos" in str(res)
    applied = itorch.fix(model, x, seeds=2, dry_run=False)
    assert applied.applied
    state = model.state_dict()
    for k, v in applied.patch.items():
        assert torch.equal(state[k], v)
    fi = 256
    assert fi * float(state["2.weight"].double().pow(2).mean()) == pytest.approx(
        w2, rel=1e-5
    )


def test_fix_relu_resnet_with_zero_init_branches():
    torch.manual_seed(1)
    model = _residual_mlp(w=128, blocks=3)
    x = torch.randn(64, 32)
    before = _state(model)
    res = itorch.fix(model, x, residual="zero_gamma", seeds=4, rng=2)
    assert _same(before, _state(model))
    c = res.chi1
    assert abs(c["analytic_before"] - 1) > 0.01
    assert abs(c["analytic_after"] - 1) <= 0.01
    assert abs(c["measured_after"] - 1) <= 0.01
    zeroed = {r.tensor for r in res.rows if r.scale == 0.0}
    assert {"1.fc2.weight", "2.fc2.weight", "3.fc2.weight"} <= zeroed
    relu_w = [r for r in res.rows if r.tensor == "1.fc1.weight"][0]
    assert relu_w.after == pytest.approx(2.0, rel=1e-9)  # ReLU's edge: Kaiming


def test_fix_unit_variance_puts_pre_activations_at_one():
    torch.manual_seed(2)
    model = mlp(width=128, depth=3, act=nn.Tanh)
    x = torch.randn(64, 16)
    res = itorch.fix(model, x, target="unit_variance", seeds=2)
    a = res.analytic["after"]
    pre = [i for i, n in enumerate(a.name) if n.startswith("dense")][:-1]
    assert np.allclose(a.columns["second_moment"][pre], 1.0, rtol=1e-9)


def test_fix_bad_input():
    with pytest.raises(ValueError, match="target must be"):
        itorch.fix(mlp(), torch.randn(8, 16), target="lsuv")
    with pytest.raises(ValueError, match="residual must be"):
        itorch.fix(mlp(), torch.randn(8, 16), residual="skip")


# -- the command line -----------------------------------------------------------------
def test_cli_torch_reports_a_model(tmp_path, capsys):
    from initdiag.cli import main

    rc = main(
        [
            "torch",
            f"{__name__}:mlp",
            "--input-shape",
            "16",
            "--seeds",
            "2",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "coverage (graph: fx)" in out and "dense1" in out
    assert "apparent initializer" in out and "chi1 = " in out
    assert (tmp_path / "report.json").exists() and (tmp_path / "signal.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nomodule_xyz:f", "--input-shape", "3"], "cannot import module"),
        ([f"{__name__}:nope", "--input-shape", "3"], "has no attribute"),
        ([f"{__name__}:mlp", "--input-shape", "3,x"], "--input-shape"),
        ([f"{__name__}:mlp", "--input-shape", "7"], "mlp"),
        ([f"{__name__}", "--input-shape", "7"], "MODULE:FACTORY"),
    ],
)
def test_cli_torch_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    from initdiag.cli import main

    assert main(["torch", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


class Concat(nn.Module):
    """Control flow and a concatenation: neither fx nor the residual fold reads it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if x.abs().sum() >= 0:
            x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(x)


def test_read_last_fallback_is_module_order_with_a_warning():
    with pytest.warns(UserWarning, match="residual structure is unknown"):
        net, cov = itorch.read(Concat(), torch.randn(8, 8))
    assert cov.method == "module order"
    # the branch's condition is off the data path; the concatenation is flagged
    assert [r.name for r in cov.unsupported()] == ["cat@n7"]
    assert [r.row for r in cov.rows if r.type == "Linear"] == [
        "dense1",
        "dense2",
        "dense3",
    ]
    # the last Linear's law keeps its real fan_in (8), not the chain's width (4)
    w = net.param_inits()[2]["weight"]
    assert 4 * w.second_moment(4, 2) == pytest.approx(8 / (3 * 8), rel=1e-12)


def test_diagnose_labels_the_convolution_approximation():
    torch.manual_seed(6)
    d = itorch.diagnose(SmallCNN(), torch.randn(4, 3, 8, 8), seeds=2)
    assert d.kernels is None and "subset" in d.notes["kernels"]
    assert "conv (dense1)" in d.notes["approximation"]
    assert d.measured.name == d.network.names


# -- fix's data route (issue 16, deliverable 4) ----------------------------------
class Shift(nn.Module):
    """A module initdiag cannot map: it moves the pre-activation's mean."""

    def forward(self, x):
        return x + 0.5


def _unsupported_mlp(w=128):
    return nn.Sequential(
        nn.Linear(16, w),
        nn.Tanh(),
        nn.Linear(w, w),
        Shift(),
        nn.Tanh(),
        nn.Linear(w, w),
        nn.Mish(),
        nn.Linear(w, 4),
    )


def _jacobian_gain(lin, pre_fn, h):
    """The exact per-unit Jacobian gain of ``h -> pre_fn(lin(h))`` for an
    elementwise ``pre_fn``: ``(fan_in/fan_out) ||J||_F^2 / fan_in`` per example =
    mean over examples and units of ``phi'(z_i)^2 |w_i|^2`` (written out here, by
    autograd of the elementwise function alone)."""
    W = lin.weight.detach().double()
    z = (h.double() @ W.T + lin.bias.detach().double()).requires_grad_(True)
    (d,) = torch.autograd.grad(pre_fn(z).sum(), z)
    return float((d**2 * (W**2).sum(1)).mean()), pre_fn(z).detach().float()


def test_fix_data_route_hits_chi1_through_unsupported_modules():
    torch.manual_seed(7)
    model = _unsupported_mlp()
    x = torch.randn(128, 16)
    before = _state(model)
    with pytest.warns(UserWarning, match=r"3 \(Shift\)"):
        res = itorch.fix(model, x, seeds=2, dry_run=True)
    assert _same(before, _state(model))  # dry run: bit-identical
    assert res.route.startswith("data: unsupported modules")
    assert {r.route for r in res.rows} == {"data"}
    assert [r.tensor for r in res.rows] == ["0.weight", "2.weight", "5.weight"]
    assert "tanh after 3 (unsupported, measured)" in res.rows[1].reason
    applied = itorch.fix(model, x, seeds=2, dry_run=False)
    for k, v in applied.patch.items():
        assert torch.equal(model.state_dict()[k], v)
    # the gains of the fixed model, computed here layer by layer: 1 within the
    # probe estimate's standard error (the solve is exact on the probes; the
    # Jacobian is the batch's own, so no finite-width term enters)
    h = x
    for i, fn in ((0, torch.tanh), (2, lambda z: torch.tanh(z + 0.5)), (5, F.mish)):
        gain, h = _jacobian_gain(model[i], fn, h)
        se = applied.gains[str(i)]["chi1_se"]
        assert abs(gain - 1) <= 4 * se + 1e-4, (i, gain, se)


class Reversed(nn.Module):
    """Modules registered in the opposite order to the one the forward runs."""

    def __init__(self, w=128):
        super().__init__()
        self.c = nn.Linear(w, 4)
        self.b = nn.Linear(w, w)
        self.a = nn.Linear(16, w)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_fix_data_route_runs_in_execution_order():
    from initdiag.integrations import _torch_lsuv as LS

    torch.manual_seed(8)
    model = Reversed()
    x = torch.randn(128, 16)
    assert [q for q, _ in model.named_children()] == ["c", "b", "a"]
    units, _, skipped, _ = LS.find_units(model, x)
    assert [u.module for u in units] == ["a", "b"] and skipped == {"c": "a readout"}
    res = itorch.fix(model, x, method="data", seeds=2, dry_run=False)
    assert [r.tensor for r in res.rows] == ["a.weight", "b.weight"]
    # b measured after a was rescaled: both gains hold on the final model
    g_a, h = _jacobian_gain(model.a, torch.tanh, x)
    g_b, _ = _jacobian_gain(model.b, torch.tanh, h)
    for g, k in ((g_a, "a"), (g_b, "b")):
        assert abs(g - 1) <= 4 * res.gains[k]["chi1_se"] + 1e-4, (k, g)


def test_fix_data_route_beats_unit_variance_lsuv_on_tanh():
    torch.manual_seed(9)
    model = mlp(width=256, depth=4, act=nn.Tanh)
    x = torch.randn(128, 16)
    # LSUV as published: every Linear before an activation to unit variance of
    # its output, in registration order (written here, independent of initdiag)
    lsuv = copy.deepcopy(model)
    h = x
    gains = []
    lin = [m for m in lsuv if isinstance(m, nn.Linear)][:-1]
    for m in lin:
        with torch.no_grad():
            z = m(h)
            m.weight /= float(z.pow(2).mean()) ** 0.5
            m.bias /= float(z.pow(2).mean()) ** 0.5
        g, h = _jacobian_gain(m, torch.tanh, h)
        gains.append(g)
    # unit variance for tanh is in the chaotic phase: chi1 about 1.1-1.2
    assert min(gains[1:]) > 1.08
    res = itorch.fix(model, x, method="data", seeds=2, dry_run=False)
    h = x
    for i, m in enumerate([m for m in model if isinstance(m, nn.Linear)][:-1]):
        g, h = _jacobian_gain(m, torch.tanh, h)
        se = res.gains[str(2 * i)]["chi1_se"]
        assert abs(g - 1) <= 4 * se + 1e-4, (i, g, se)


def test_fix_data_route_bounds_the_stream_of_a_basicblock_resnet():
    torch.manual_seed(10)
    model = ResNet()
    x = torch.randn(64, 16)
    res = itorch.fix(model, x, seeds=2, dry_run=False)
    assert res.route.startswith("data: no mean-field rule")
    knobs = {r.tensor for r in res.rows}
    assert {"layer1.0.bn2.weight", "layer1.0.bn2.bias", "layer2.0.bn2.weight"} <= knobs
    assert all("bounded stream growth" in r.reason for r in res.rows)

    # every block adds 1/L of its shortcut's second moment (L = 3), measured
    # here with the blocks written out (BatchNorm in training mode: the batch's
    # statistics, as fix measured them): exact on the example batch up to the
    # solve's tolerance, and on fresh batches of the same law within their Monte
    # Carlo error plus the example batch's own (the scales were fitted on it:
    # one batch's standard deviation)
    def gains(xb):
        h = F.relu(model.bn(model.stem(xb)))
        out = []
        with torch.no_grad():
            for blk in [*model.layer1, *model.layer2]:
                b = blk.bn2(blk.fc2(F.relu(blk.bn1(blk.fc1(h)))))
                s = h if blk.downsample is None else blk.downsample(h)
                out.append(float((s + b).pow(2).mean() / s.pow(2).mean()))
                h = F.relu(s + b)
        return np.array(out)

    assert gains(x) == pytest.approx(np.full(3, 1 + 1 / 3), rel=1e-3)
    fresh = np.array(
        [
            gains(torch.randn(64, 16, generator=torch.Generator().manual_seed(100 + k)))
            for k in range(8)
        ]
    )
    sd = fresh.std(axis=0, ddof=1)
    tol = 4 * np.hypot(sd / np.sqrt(len(fresh)), sd)
    assert np.all(np.abs(fresh.mean(axis=0) - (1 + 1 / 3)) <= tol), (fresh.mean(0), tol)


def test_fix_method_bad_input():
    with pytest.raises(ValueError, match="method must be 'auto', 'analytic' or 'data'"):
        itorch.fix(mlp(), torch.randn(8, 16), method="lsuv")


# -- GroupNorm and eval-mode BatchNorm ------------------------------------------
def test_read_groupnorm_and_eval_batchnorm():
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Linear(16, 256),
        nn.GroupNorm(1, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.GroupNorm(8, 256),
        nn.Tanh(),
        nn.Linear(256, 256),
        nn.BatchNorm1d(256),
        nn.Tanh(),
        nn.Linear(256, 4),
    )
    model[7].eval()
    x = torch.randn(64, 16)
    net, cov = itorch.read(model, x)
    kinds = [i.kind for i in net.infos]
    assert kinds[1] == kinds[4] == "layernorm" and kinds[7] == "affine"
    rows = _rows(cov)
    assert "approximation" not in rows["1"].note
    assert rows["4"].note.startswith("approximation: GroupNorm(8, 256)")
    # fresh running statistics: a = 1/sqrt(1 + eps), b = 0, exactly (no label)
    assert "eval mode" in rows["7"].note and "approximation" not in rows["7"].note
    law = net.param_inits()[7]["weight"]
    assert law.mean(1, 1) == pytest.approx((1 + 1e-5) ** -0.5, rel=1e-12)
    d = itorch.diagnose(model, x, seeds=4, kernels=False)
    assert not model[7].training and model[1].training  # modes as left
    a, e = d.analytic.columns, d.measured.columns
    for r in (1, 2, 7, 8):
        # GroupNorm(1, C) is LayerNorm: after it the second moment is 1 up to
        # eps; the affine rows follow their input within the width-256 term
        tol = 4 * e["second_moment_se"][r] + 5 * 3 / 256 * a["second_moment"][r]
        assert abs(e["second_moment"][r] - a["second_moment"][r]) <= tol, r


def test_eval_batchnorm_reads_its_running_statistics():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(16, 256), nn.BatchNorm1d(256), nn.Tanh())
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(4.0)
        bn.weight.fill_(1.5)
        bn.bias.fill_(0.2)
    model.eval()
    x = torch.randn(64, 16)
    net, cov = itorch.read(model, x)
    p = net.param_inits()[1]
    a = 1.5 / (4 + 1e-5) ** 0.5
    # the module's float32 buffers and parameters: 0.2 and 0.3 to float32
    assert p["weight"].mean(1, 1) == pytest.approx(a, rel=1e-7)
    assert p["bias"].mean(1, 1) == pytest.approx(0.2 - 0.3 * a, rel=1e-6)
    with pytest.warns(UserWarning, match="another law"):
        # reset_parameters resets the running statistics: diagnose says so
        itorch.diagnose(model, x, seeds=2, kernels=False)
    d = itorch.diagnose(model, x, seeds=2, resample=False, kernels=False)
    h = model[0](x).detach().double()
    y = a * h + (0.2 - 0.3 * a)
    assert d.measured.columns["second_moment"][1] == pytest.approx(
        float(y.pow(2).mean()), rel=1e-6
    )
    # the analytic row: E[(a h + b)^2] = a^2 E[h^2] + b^2 for the dense output h
    an = d.analytic.columns["second_moment"]
    ga, gb = p["weight"].mean(1, 1), p["bias"].mean(1, 1)
    assert an[1] == pytest.approx(ga * ga * an[0] + gb * gb, rel=1e-9)
    assert not model.training

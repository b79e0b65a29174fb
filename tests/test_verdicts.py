"""Verdict rules on hand-built profiles (numbers chosen in the test, not computed by
the engines), and the suggestions' numbers against known theory values."""

from __future__ import annotations

import math

import numpy as np
import pytest

import initdiag as idg
from initdiag.profile import Profile
from initdiag.verdicts import (
    THRESHOLDS,
    diagnose,
    network_parameters,
    signal_gradient_ratio,
    signal_rows,
)


def _fill(
    net,
    *,
    q=lambda block: 1.0,
    corr=lambda block: 0.3,
    grad=lambda block: 1.0,
    dead=lambda block: 0.0,
) -> Profile:
    """A profile whose pre-activation rows follow the given per-block functions;
    activation rows get half the second moment (ReLU) and the same correlation."""
    p = Profile.empty(net, "analytic")
    for i, (k, b) in enumerate(zip(p.kind, p.block, strict=True)):
        b = int(b)
        p.columns["second_moment"][i] = q(b) if k != "activation" else q(b) / 2
        p.columns["correlation"][i] = corr(b)
        p.columns["grad_second_moment"][i] = grad(b)
        p.columns["dead_fraction"][i] = dead(b) if k == "activation" else math.nan
    return p


def relu_net(depth=10, width=64, bias="zeros", weight=None, **kw):
    init = idg.InitScheme(
        weight=weight or "kaiming_normal(nonlinearity='relu')", bias=bias, **kw
    )
    return idg.mlp(depth, width, "relu", init=init)


def kinds(vs):
    return sorted(v.kind for v in vs)


def test_healthy_profile_has_no_verdict():
    net = relu_net()
    assert diagnose(_fill(net), net) == []


def test_thresholds_table_is_documented():
    doc = idg.verdicts.__doc__
    for key, value in THRESHOLDS.items():
        assert key in doc, key
        assert value > 0


def test_network_parameters_from_the_init_scheme():
    net = relu_net(width=64, bias="normal(0, 0.1)")
    p = network_parameters(net)
    assert p["activation"] == "relu"
    assert p["sigma_w2"] == pytest.approx(2.0)  # Kaiming: Var W = 2 / fan_in
    assert p["sigma_b2"] == pytest.approx(0.01)
    torch_default = idg.mlp(
        5, 64, "relu", init=idg.InitScheme(weight="torch_default", bias="torch_default")
    )
    p = network_parameters(torch_default)
    assert p["sigma_w2"] == pytest.approx(1 / 3)  # U(+-1/sqrt(n)): variance 1/(3n)
    assert p["sigma_b2"] == pytest.approx(1 / (3 * 64))


def test_forward_explosion_and_vanishing():
    net = relu_net(depth=10, weight="normal(0, 0.08)")
    up = diagnose(_fill(net, q=lambda b: 1.3**b), net)
    assert "forward_explosion" in kinds(up)
    v = next(v for v in up if v.kind == "forward_explosion")
    assert v.severity == "problem"
    assert v.evidence["rate_per_block"] == pytest.approx(1.3)
    down = diagnose(_fill(net, q=lambda b: 0.99**b), net)
    assert kinds(down) == []  # 0.99 per block is inside the 1.02 band
    down = diagnose(_fill(net, q=lambda b: 0.95**b), net)
    assert kinds(down) == ["forward_vanishing"]
    assert down[0].severity == "warning"


def test_relu_with_bias_is_told_to_drop_the_bias():
    net = relu_net(bias="normal(0, 0.3)")
    vs = diagnose(_fill(net, q=lambda b: 1.3**b), net)
    assert "set the bias to zero" in vs[0].suggestion
    assert "no edge of chaos" in vs[0].suggestion


def test_tanh_suggestion_is_the_critical_weight_variance():
    # tanh at sigma_b2 = 0: the edge of chaos is sigma_w2 = 1 / phi'(0)^2 = 1
    net = idg.mlp(10, 64, "tanh", init=idg.InitScheme(weight="normal(0, 0.05)"))
    vs = diagnose(_fill(net, q=lambda b: 0.5**b), net)
    v = next(v for v in vs if v.kind == "forward_vanishing")
    assert "sigma_w2 = 1 / fan_in" in v.suggestion
    # erf: pi / 4
    net = idg.mlp(10, 64, "erf", init=idg.InitScheme(weight="normal(0, 0.05)"))
    vs = diagnose(_fill(net, q=lambda b: 0.5**b), net)
    assert f"sigma_w2 = {math.pi / 4:.3g} / fan_in" in vs[0].suggestion


def test_critical_network_is_told_it_is_critical():
    net = relu_net()
    vs = diagnose(_fill(net, corr=lambda b: min(0.5 + 0.1 * b, 1.0)), net)
    v = next(v for v in vs if v.kind == "correlation_collapse")
    assert v.evidence["correlation_depth"] == 5  # 0.5 + 0.1 * 5 = 1.0 >= 0.99
    assert v.severity == "problem"  # block 5 of 10 is within half of the depth
    assert "edge of chaos" in v.suggestion


def test_correlation_collapse_late_is_a_warning():
    net = relu_net(depth=10)
    vs = diagnose(_fill(net, corr=lambda b: 0.995 if b >= 8 else 0.5), net)
    v = next(v for v in vs if v.kind == "correlation_collapse")
    assert v.severity == "warning"
    assert v.layer == "dense8"


def test_gradient_rules_use_like_for_like_rows():
    net = relu_net(depth=10)
    # gradient halves through each ReLU row but is 1 on every pre-activation row
    p = _fill(net)
    acts = [i for i, k in enumerate(p.kind) if k == "activation"]
    p.columns["grad_second_moment"][acts] = 0.5
    assert signal_gradient_ratio(p) == pytest.approx(1.0)
    assert diagnose(p, net) == []
    vs = diagnose(_fill(net, grad=lambda b: 2.0 ** (10 - b)), net)
    assert kinds(vs) == ["gradient_explosion"]
    assert vs[0].evidence["gradient_ratio"] == pytest.approx(2.0**9)
    vs = diagnose(_fill(net, grad=lambda b: 0.5 ** (10 - b)), net)
    assert kinds(vs) == ["gradient_vanishing"]


def test_batchnorm_gradient_explosion_counts_affordable_layers():
    net = idg.mlp(20, 64, "relu", batchnorm=True)
    lam = math.pi / (math.pi - 1)
    vs = diagnose(_fill(net, grad=lambda b: lam ** (20 - b)), net)
    v = next(v for v in vs if v.kind == "batchnorm_gradient_explosion")
    assert v.evidence["rate_per_batchnorm"] == pytest.approx(lam)
    # growth lam^(k-1) <= 1e3  <=>  k <= 1 + log(1e3)/log(lam)
    afford = int(math.log(THRESHOLDS["bn_growth_budget"]) / math.log(lam)) + 1
    assert v.evidence["affordable_batchnorm_layers"] == afford
    assert f"at most {afford} BatchNorm" in v.suggestion
    # the pre-activation rows of a BN network are the BN rows
    assert all(net.infos[i].kind == "batchnorm" for i in signal_rows(_fill(net)))


def test_dying_units():
    net = relu_net(depth=10)
    vs = diagnose(_fill(net, dead=lambda b: 0.1 * b), net)
    v = next(v for v in vs if v.kind == "dying_units")
    assert v.severity == "problem"  # 100% at block 10
    assert v.layer == "relu10"
    assert v.evidence["first_layer"] == "relu1"  # 0.1 > 0.05 already
    net = relu_net(depth=10, bias="constant(-0.5)")
    vs = diagnose(_fill(net, dead=lambda b: 0.2), net)
    v = next(v for v in vs if v.kind == "dying_units")
    assert "set the bias to zero (its mean is -0.5)" in v.suggestion


def test_overflow_finding_names_the_layer():
    net = relu_net(depth=10)
    p = _fill(net)
    p.findings.append(
        {
            "kind": "overflow",
            "layer": "dense7",
            "index": 12,
            "block": 7,
            "pass": "forward",
            "seed": 0,
            "message": "the signal overflowed at layer 13 (dense7), seed 0",
        }
    )
    vs = diagnose(p, net)
    assert kinds(vs) == ["overflow"]
    assert vs[0].layer == "dense7"
    assert "dense7" in vs[0].message


def test_bad_arguments():
    with pytest.raises(TypeError, match="Profile"):
        diagnose({"not": "a profile"})
    net = relu_net()
    p = _fill(net)
    p.network = None
    with pytest.raises(TypeError, match="network"):
        diagnose(p)
    assert diagnose(p, net) == []


def test_nan_columns_are_ignored():
    net = relu_net()
    p = Profile.empty(net, "analytic")
    assert diagnose(p, net) == []
    np.testing.assert_equal(signal_gradient_ratio(p), math.nan)


def test_one_regime_for_every_command(tmp_path, capsys):
    import json

    from initdiag.cli import main
    from initdiag.configfile import load_study
    from initdiag.report.study import Entry, summarize
    from initdiag.verdicts import network_regime

    toml = tmp_path / "regimes.toml"
    toml.write_text(
        '[network]\ndepth = 6\nwidth = 64\nactivation = "relu"\n'
        "[init]\nweight = \"kaiming_normal(nonlinearity='relu')\"\nbias = \"zeros\"\n"
        '[[variants]]\nname = "zero bias"\n'
        '[[variants]]\nname = "random bias"\ninit = { bias = "normal(0, 0.1)" }\n'
        '[[variants]]\nname = "bn"\nnetwork = { batchnorm = true }\n',
        encoding="utf-8",
    )
    code = main(
        ["phase", str(toml), "--sigma-w2", "1:3:3", "--sigma-b2", "0:0.1:2"]
        + ["--format", "json"]
    )
    assert code == 0
    marks = json.loads(capsys.readouterr().out)["networks"]
    nets = load_study(str(toml)).networks
    got = []
    for net, mark in zip(nets, marks, strict=True):
        a = idg.analyze(net)
        reg = a.summary["regime"]
        assert mark["regime"] == reg == network_regime(net)["regime"]
        assert summarize(Entry(net, a, None))["regime"] == reg
        assert mark["chi1"] == pytest.approx(a.summary["chi1"])
        got.append(reg)
    # Kaiming without bias is critical; a bias leaves no fixed point (ordered, not
    # "critical (1.000)"); BatchNorm's gain pi/(pi-1) is chaotic, not "critical"
    assert got == ["critical", "ordered", "chaotic"]
    assert "no fixed point" in marks[1]["regime_reason"]


def test_xavier_tanh_without_bias_is_critical_everywhere():
    net = idg.mlp(8, 64, "tanh", init=idg.InitScheme("xavier_normal", "zeros"))
    s = idg.analyze(net).summary
    assert s["regime"] == "critical" and abs(s["chi1"] - 1) < 1e-12
    p = network_parameters(net)
    assert abs(idg.meanfield.chi1("tanh", p["sigma_w2"], 0.0) - 1) < 1e-12

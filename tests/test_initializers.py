"""Initializers: declared moments vs large samples, torch's conventions, parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from initdiag import initializers as I

FAN_IN, FAN_OUT = 500, 400
N = FAN_IN * FAN_OUT  # one (fan_out, fan_in) weight: 200k entries

ALL = [
    "normal(0.3, 2.0)",
    "uniform(-1.5, 0.5)",
    "constant(0.25)",
    "zeros",
    "ones",
    "trunc_normal(mean=0.5, std=1.0, a=-1.0, b=3.0)",
    "trunc_normal(std=0.02)",
    "kaiming_normal(nonlinearity='relu')",
    "kaiming_normal(a=0.2, mode='fan_out')",
    "kaiming_uniform(a=2.23606797749979, mode='fan_in')",
    "kaiming_uniform(nonlinearity='tanh', mode='fan_out')",
    "xavier_normal(gain=1.5)",
    "xavier_uniform()",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal(gain=1.3)",
    "torch_default",
    "variance_scaling(2.0, 'fan_avg', 'truncated_normal')",
    "variance_scaling(0.5, 'fan_out', 'normal')",
    "variance_scaling(1.0, 'fan_in', 'uniform')",
]


@pytest.mark.parametrize("spec", ALL)
def test_sample_moments_match_declared(spec):
    init = I.parse(spec)
    rng = np.random.default_rng(1234)
    x = init.sample((FAN_OUT, FAN_IN), FAN_IN, FAN_OUT, rng, np.float64)
    assert x.shape == (FAN_OUT, FAN_IN) and x.dtype == np.float64
    m, v = init.mean(FAN_IN, FAN_OUT), init.variance(FAN_IN, FAN_OUT)
    if v == 0.0:
        assert np.all(x == m)
        return
    # standard errors of the sample mean and the sample variance (from the sample's
    # own fourth moment); 5 SE leaves a ~1e-6 false-alarm rate per check
    se_mean = math.sqrt(v / N)
    m4 = np.mean((x - x.mean()) ** 4)
    se_var = math.sqrt(max(m4 - v * v, 1e-300) / N)
    if isinstance(init, I.Orthogonal):
        # rows of an orthogonal matrix are not independent; its entries' second moment
        # is exact: sum of squares = gain^2 * min(fan_in, fan_out)
        assert np.sum(x**2) == pytest.approx(
            init.gain**2 * min(FAN_IN, FAN_OUT), rel=1e-10
        )
        assert abs(x.mean()) < 5 * se_mean
        return
    assert abs(x.mean() - m) < 5 * se_mean, (x.mean(), m)
    assert abs(x.var() - v) < 5 * se_var + 1e-12, (x.var(), v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", ALL)
def test_shapes_and_dtypes(spec, dtype):
    init = I.parse(spec)
    rng = np.random.default_rng(0)
    for shape in [(7,), (3, 5), (5, 3)]:
        x = init.sample(shape, 5, 3, rng, dtype)
        assert x.shape == shape
        assert x.dtype == np.dtype(dtype)
        assert np.all(np.isfinite(x))


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (6, 6)])
def test_orthogonal_is_orthogonal(shape):
    w = I.orthogonal(gain=2.0).sample(
        shape, shape[1], shape[0], np.random.default_rng(3), np.float64
    )
    rows, cols = shape
    gram = w @ w.T if rows <= cols else w.T @ w
    np.testing.assert_allclose(gram, 4.0 * np.eye(min(shape)), atol=1e-12)


def test_trunc_normal_variance_against_scipy():
    for mean, std, a, b in [
        (0, 1, -2, 2),
        (0.5, 1.0, -1.0, 3.0),
        (0, 0.02, -2, 2),
        (3.0, 1.0, 4.0, 6.0),
    ]:
        init = I.trunc_normal(mean, std, a, b)
        ref = stats.truncnorm((a - mean) / std, (b - mean) / std, loc=mean, scale=std)
        assert init.mean(1, 1) == pytest.approx(ref.mean(), rel=1e-10, abs=1e-14)
        assert init.variance(1, 1) == pytest.approx(ref.var(), rel=1e-9)


def test_calculate_gain_matches_torch_documented_table():
    documented = {
        "linear": 1.0,
        "conv1d": 1.0,
        "conv2d": 1.0,
        "conv3d": 1.0,
        "conv_transpose2d": 1.0,
        "sigmoid": 1.0,
        "tanh": 5.0 / 3.0,
        "relu": math.sqrt(2.0),
        "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)),
        "selu": 0.75,
    }
    for name, gain in documented.items():
        assert I.calculate_gain(name) == pytest.approx(gain, rel=1e-15)
    assert I.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    with pytest.raises(ValueError, match="valid"):
        I.calculate_gain("gelu")


def test_calculate_gain_matches_torch_itself():
    torch = pytest.importorskip("torch")
    for name in ["linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu", "conv2d"]:
        assert I.calculate_gain(name) == pytest.approx(
            torch.nn.init.calculate_gain(name)
        )
    assert I.calculate_gain("leaky_relu", 0.3) == pytest.approx(
        torch.nn.init.calculate_gain("leaky_relu", 0.3)
    )


@pytest.mark.parametrize("fan_in", [1, 7, 256, 1024])
def test_torch_default_variance_is_one_third_over_fan_in(fan_in):
    init = I.torch_default()
    assert init.variance(fan_in, 3) == pytest.approx(1.0 / (3.0 * fan_in), rel=1e-14)
    assert init.mean(fan_in, 3) == 0.0
    # kaiming_uniform(a=sqrt(5)) is the same distribution, as torch's comment says
    ku = I.kaiming_uniform(a=math.sqrt(5.0))
    assert ku.variance(fan_in, 3) == pytest.approx(1.0 / (3.0 * fan_in), rel=1e-12)


def test_torch_default_matches_nn_linear():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 2000)
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    init = I.torch_default()
    bound = 1 / math.sqrt(300)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    se = math.sqrt((bound**4 / 5 - (bound**2 / 3) ** 2) / w.size)  # SE of E[w^2]
    assert abs(np.mean(w**2) - init.variance(300, 2000)) < 5 * se


def test_kaiming_and_xavier_formulas():
    assert I.kaiming_normal(nonlinearity="relu").variance(100, 50) == pytest.approx(
        0.02
    )
    assert I.kaiming_normal(mode="fan_out", nonlinearity="relu").variance(100, 50) == (
        pytest.approx(0.04)
    )
    assert I.kaiming_uniform(nonlinearity="relu").variance(100, 50) == pytest.approx(
        0.02
    )
    assert I.xavier_normal().variance(100, 50) == pytest.approx(2 / 150)
    assert I.xavier_uniform(gain=2.0).variance(100, 50) == pytest.approx(8 / 150)
    assert I.lecun_normal().variance(100, 50) == pytest.approx(0.01, rel=1e-6)
    assert I.orthogonal(1.0).variance(100, 50) == pytest.approx(0.01)


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL)
def test_str_round_trips(spec):
    init = I.parse(spec)
    assert I.parse(str(init)) == init
    assert I.parse(init.to_dict()) == init


def test_parse_forms():
    assert I.parse("normal(0, 0.01)") == I.normal(0.0, 0.01)
    assert I.parse({"name": "normal", "std": 0.01}) == I.normal(0.0, 0.01)
    assert I.parse(0.1) == I.constant(0.1)
    assert I.parse("-0.5") == I.constant(-0.5)
    assert I.parse("kaiming_normal_(mode='fan_out')") == I.kaiming_normal(
        mode="fan_out"
    )
    assert I.parse("he_normal") == I.kaiming_normal()


def test_unknown_initializer_lists_valid_names():
    with pytest.raises(ValueError, match="kaiming_normal.*xavier_uniform|valid names"):
        I.parse("kaimin_normal")
    with pytest.raises(ValueError, match="valid names"):
        I.parse({"name": "gaussian", "std": 1})


@pytest.mark.parametrize(
    "spec",
    [
        "normal(std=float('nan'))",
        "normal(0, -1)",
        "trunc_normal(std=-0.1)",
        {"name": "normal", "std": float("nan")},
        {"name": "normal", "std": -2.0},
    ],
)
def test_bad_std_is_rejected(spec):
    with pytest.raises((ValueError, TypeError)):
        I.parse(spec)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        I.parse("kaiming_normal(mode='fan_sideways')")
    with pytest.raises(ValueError, match="mode"):
        I.variance_scaling(1.0, "fan_up")


def test_code_is_rejected_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    for spec in [
        "__import__('os')",
        f"__import__('os').system('touch {marker}')",
        f"normal(std=__import__('os').system('touch {marker}'))",
        "normal(std=(lambda: 1)())",
        "().__class__.__bases__[0].__subclasses__()",
        "normal(**{'std': 1})",
    ]:
        with pytest.raises(ValueError):
            I.parse(spec)
    assert not marker.exists()


def test_init_scheme_defaults_and_overrides():
    import initdiag as idg

    s = idg.InitScheme()
    assert s.weight == I.kaiming_normal(nonlinearity="relu")
    assert s.bias == I.zeros() and s.bn_weight == I.ones() and s.bn_bias == I.zeros()
    net = idg.mlp(
        3,
        8,
        batchnorm=True,
        init=idg.InitScheme(
            overrides={
                "dense[-1]": {"weight": "zeros"},
                "bn[0]": {"gamma": "uniform(0, 1)"},
            }
        ),
    )
    inits = net.param_inits()
    assert inits[net.names.index("dense3")]["weight"] == I.zeros()
    assert inits[net.names.index("dense1")]["weight"] == s.weight
    assert inits[net.names.index("bn1")]["weight"] == I.uniform(0, 1)
    assert inits[net.names.index("bn2")]["weight"] == I.ones()
    with pytest.raises(ValueError, match="matches no layer with parameters"):
        idg.mlp(2, 4, init=idg.InitScheme(overrides={"dense9": {"weight": "zeros"}}))
    with pytest.raises(ValueError, match="unknown key"):
        idg.InitScheme(overrides={"dense1": {"wieght": "zeros"}})

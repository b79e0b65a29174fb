"""TOML / dict studies: loading, round trip, errors that name file and key."""

from __future__ import annotations

import os

import pytest

import initdiag as idg
from initdiag.configfile import ConfigError, load_study

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")


def test_default_study_example_loads():
    study = load_study(os.path.join(EXAMPLES, "bias_question.toml"))
    assert len(study.networks) == 12
    names = [n.name for n in study.networks]
    assert names[0] == "bias = 0" and len(set(names)) == 8
    for net in study.networks:
        assert net.depth == 30 and net.widths[0] == 512
    torch_bias = study.networks[2].param_inits()[0]["bias"]
    assert torch_bias.variance(512, 512) == pytest.approx(1 / (3 * 512))
    assert study.networks[6].param_inits()[1]["weight"] == idg.initializers.uniform(
        0, 1
    )
    assert study.simulate["seeds"] >= 1


def test_every_example_loads():
    for f in os.listdir(EXAMPLES):
        if f.endswith(".toml"):
            load_study(os.path.join(EXAMPLES, f))


def test_toml_round_trip(tmp_path):
    net = idg.mlp(
        4,
        32,
        activation="tanh",
        batchnorm=True,
        output_dim=3,
        init=idg.InitScheme(
            weight="kaiming_uniform(a=2.23606797749979, mode='fan_in')",
            bias={"name": "normal", "std": 0.01},
            bn_weight="uniform(0, 1)",
            overrides={"dense[-1]": {"weight": "zeros"}},
        ),
    )
    path = tmp_path / "net.toml"
    idg.save_config(net, path)
    back = idg.load_config(path)
    assert back == net
    nets = [net, net.with_name("other").with_init(idg.InitScheme(bias="ones"))]
    idg.save_config(nets, tmp_path / "two.toml")
    assert idg.load_config(tmp_path / "two.toml") == nets


def test_dict_config():
    net = idg.load_config(
        {
            "network": {"depth": 2, "width": 8, "activation": "gelu"},
            "init": {"bias": "constant(0.1)"},
        }
    )
    assert net.names == ["dense1", "gelu1", "dense2", "gelu2"]
    assert net.param_inits()[0]["bias"] == idg.initializers.constant(0.1)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        idg.load_config("nope.toml")


def test_malformed_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[network\ndepth = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: malformed TOML"):
        idg.load_config(p)


@pytest.mark.parametrize(
    "body, key, what",
    [
        ("[network]\ndepth = 3\nwidth = -4\n", "network", "positive"),
        (
            '[network]\ndepth = 3\nwidth = 4\nactivation = "relu7"\n',
            "network",
            "valid names",
        ),
        (
            '[network]\ndepth = 3\nwidth = 4\n[init]\nbias = "gauss(1)"\n',
            "init",
            "valid names",
        ),
        (
            "[network]\ndepth = 3\nwidth = 4\n[init]\nbias = \"__import__('os')\"\n",
            "init",
            "",
        ),
        ("[network]\ndepth = 3\nwidht = 4\n", "network", "unknown keys"),
        (
            "[network]\ndepth = 3\nwidth = 4\n[init]\n"
            "weight = \"kaiming_normal(mode='x')\"\n",
            "init",
            "mode",
        ),
        (
            '[network]\ndepth = 3\nwidth = 4\n[[variants]]\nname = "a"\n'
            "network = {width = 0}\n",
            "variants[0].network",
            "positive",
        ),
        (
            "[network]\ndepth = 3\nwidth = 4\n[simulate]\nseedz = 3\n",
            "simulate",
            "unknown",
        ),
    ],
)
def test_errors_name_file_and_key(tmp_path, body, key, what):
    p = tmp_path / "study.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as exc:
        idg.load_config(p)
    msg = str(exc.value)
    assert "study.toml" in msg and f"[{key}]" in msg and what in msg

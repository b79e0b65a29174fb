"""The network description: specs, names, fans, validation."""

from __future__ import annotations

import pytest

import initdiag as idg


def test_mlp_layout_names_and_fans():
    net = idg.mlp(3, 16, activation="tanh", batchnorm=True, input_dim=10, output_dim=2)
    assert net.names == [
        "dense1",
        "bn1",
        "tanh1",
        "dense2",
        "bn2",
        "tanh2",
        "dense3",
        "bn3",
        "tanh3",
        "dense4",
    ]
    dense = [i for i in net.infos if i.kind == "dense"]
    assert [(d.fan_in, d.width) for d in dense] == [
        (10, 16),
        (16, 16),
        (16, 16),
        (16, 2),
    ]
    assert net.depth == 4 and net.output_dim == 2
    after = idg.mlp(2, 4, batchnorm=True, bn_position="after_activation")
    assert after.names == ["dense1", "relu1", "bn1", "dense2", "relu2", "bn2"]


def test_explicit_network_and_activations():
    net = idg.Network(
        5,
        [
            idg.Dense(3),
            idg.LeakyReLU(0.2),
            idg.Dense(4, bias=False),
            idg.GELU(),
            idg.Dense(2),
            idg.SELU(),
            idg.Dense(2),
            idg.Erf(),
            idg.Dense(2),
            idg.SiLU(),
            idg.Dense(2),
            idg.Sigmoid(),
            idg.Dense(2),
            idg.Identity(),
        ],
    )
    assert net.widths[:3] == [3, 3, 4]
    assert net.param_inits()[2]["bias"] is None
    assert idg.network.activation("leaky_relu", negative_slope=0.1) == idg.LeakyReLU(
        0.1
    )
    assert idg.network.activation("swish") == idg.SiLU()


@pytest.mark.parametrize("width", [0, -3])
def test_bad_width(width):
    with pytest.raises(ValueError, match="positive"):
        idg.Dense(width)
    with pytest.raises(ValueError, match="positive"):
        idg.mlp(3, width)


def test_bad_types():
    with pytest.raises(TypeError):
        idg.Dense(3.5)
    with pytest.raises(TypeError, match="Layer"):
        idg.Network(3, [idg.Dense(3), "relu"])
    with pytest.raises(ValueError, match="at least one layer"):
        idg.Network(3, [])
    with pytest.raises(ValueError, match="bn_position"):
        idg.mlp(2, 3, batchnorm=True, bn_position="middle")
    with pytest.raises(ValueError, match="eps"):
        idg.BatchNorm(eps=float("nan"))


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="relu.*tanh|valid names"):
        idg.mlp(2, 3, activation="relu6")


def test_specs_are_frozen_and_hashable():
    d = idg.Dense(3)
    with pytest.raises(AttributeError):
        d.width = 4
    net = idg.mlp(2, 3)
    assert hash(net) == hash(idg.mlp(2, 3))
    assert net == idg.mlp(2, 3)
    assert net != idg.mlp(2, 3, init=idg.InitScheme(bias="ones"))


def test_dict_round_trip():
    net = idg.mlp(
        2,
        5,
        batchnorm=True,
        init=idg.InitScheme(
            bias="normal(0, 0.1)", overrides={"bn[-1]": {"gamma": "zeros"}}
        ),
    )
    assert idg.Network.from_dict(net.to_dict()) == net

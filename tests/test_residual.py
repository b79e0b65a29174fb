"""Residual networks (issue 11): closed forms, every rule against a plain NumPy Monte
Carlo written here, simulate against analyze, presets, selectors, TOML round trip.

The Monte Carlo below knows nothing of initdiag's engines: it reads the network's
layer list (the spec) and the initializers' laws, samples every parameter with
NumPy, and runs the forward pass and a hand-written backward pass in float64.
"""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest

import initdiag as idg
from initdiag import analyze, simulate
from initdiag.configfile import load_config, save_config

WIDTH, BATCH, SEEDS = 1024, 64, 6


# -- the independent NumPy Monte Carlo ----------------------------------------------
def _sample(init, shape, fi, fo, rng):
    kind, p, q = init.distribution(fi, fo)
    if kind == "constant":
        return np.full(shape, p)
    if kind == "normal":
        return rng.normal(p, q, shape)
    assert kind == "uniform"
    return rng.uniform(p, q, shape)


class _Tape:
    """Forward values of every row and a backward closure per row."""

    def __init__(self, net, rng):
        self.net, self.rng = net, rng
        self.inits = net.param_inits()
        self.h: dict[int, np.ndarray] = {}
        self.back: dict[int, object] = {}
        self.pnorm: dict[int, dict[str, float]] = {}

    def run(self, rows, x):
        for i in rows:
            info = self.net.infos[i]
            if info.branch:
                xb = self.run(info.branch, x)
                xs = self.run(info.shortcut, x) if info.shortcut else x
                c = info.layer.multiplier
                y = xs + c * xb
                self.back[i] = ("block", c)
            else:
                y = self._layer(i, info, x)
            self.h[i] = y
            x = y
        return x

    def _layer(self, i, info, x):
        la, p, rng = info.layer, self.inits[i], self.rng
        fi, fo = info.fan_in, info.width
        if la.kind == "dense":
            W = _sample(p["weight"], (fo, fi), fi, fo, rng)
            has_b = p.get("bias") is not None
            b = _sample(p["bias"], (fo,), fi, fo, rng) if has_b else 0.0

            def back(g, x=x, W=W, has_b=has_b):
                n = {"weight_grad_norm2": float(np.sum((g.T @ x) ** 2))}
                if has_b:
                    n["bias_grad_norm2"] = float(np.sum(g.sum(0) ** 2))
                return g @ W, n

            self.back[i] = back
            return x @ W.T + b
        if la.kind == "activation":
            assert la.name == "relu"
            self.back[i] = lambda g, x=x: (g * (x > 0), {})
            return np.maximum(x, 0.0)
        if la.kind in ("batchnorm", "layernorm"):
            n = info.width
            gam = _sample(p["weight"], (n,), n, n, rng)
            bet = _sample(p["bias"], (n,), n, n, rng)
            ax = 0 if la.kind == "batchnorm" else 1
            mu = x.mean(ax, keepdims=True)
            inv = 1.0 / np.sqrt(x.var(ax, keepdims=True) + la.eps)
            xh = (x - mu) * inv

            def back(g, xh=xh, inv=inv, gam=gam, ax=ax):
                dxh = g * gam
                dx = inv * (
                    dxh
                    - dxh.mean(ax, keepdims=True)
                    - xh * (dxh * xh).mean(ax, keepdims=True)
                )
                return dx, {
                    "gamma_grad_norm2": float(np.sum((g * xh).sum(0) ** 2)),
                    "beta_grad_norm2": float(np.sum(g.sum(0) ** 2)),
                }

            self.back[i] = back
            return gam * xh + bet
        if la.kind == "scale":
            a = float(_sample(p["weight"], (1,), 1, 1, rng)[0])
            self.back[i] = lambda g, x=x, a=a: (
                a * g,
                {"gamma_grad_norm2": float(np.sum(g * x)) ** 2},
            )
            return a * x
        if la.kind == "dropout":
            keep = rng.random(x.shape) >= la.p
            s = 1.0 / (1.0 - la.p)
            self.back[i] = lambda g, keep=keep, s=s: (g * keep * s, {})
            return x * keep * s
        raise AssertionError(la.kind)

    def backward(self, rows, g, out):
        for i in reversed(rows):
            info = self.net.infos[i]
            out[i]["grad_second_moment"] = float(np.mean(g * g))
            if info.branch:
                c = info.layer.multiplier
                gb = self.backward(info.branch, c * g, out)
                gs = self.backward(info.shortcut, g, out) if info.shortcut else g
                g = gb + gs
            else:
                g, norms = self.back[i](g)
                out[i].update(norms)
        return g


def _mc(net, seeds=SEEDS, B=BATCH, seed=0):
    """Per row and column: (mean over seeds, standard error)."""
    rng = np.random.default_rng(seed)
    per: list[list[dict[str, float]]] = []
    for _ in range(seeds):
        t = _Tape(net, rng)
        x = rng.normal(size=(B, net.input_dim))
        y = t.run(net.top, x)
        out = [dict() for _ in net.infos]
        for i, h in t.h.items():
            d = np.sqrt((h * h).sum(1))
            with np.errstate(invalid="ignore"):
                cos = (h @ h.T) / np.outer(d, d)
            out[i].update(
                mean=float(h.mean()),
                second_moment=float(np.mean(h * h)),
                variance=float(h.var(0).mean()),
                correlation=float((cos.sum() - np.trace(cos)) / (B * (B - 1))),
            )
        g = rng.normal(size=y.shape)
        m_out = float(np.mean(g * g))
        t.backward(net.top, g, out)
        for o in out:
            for k in list(o):
                if k == "grad_second_moment":
                    o[k] /= m_out
                elif k.endswith("_norm2"):
                    o[k] /= B * m_out
        per.append(out)
    res = []
    for i in range(len(net.infos)):
        cols = {}
        for k in per[0][i]:
            v = np.array([p[i][k] for p in per])
            cols[k] = (v.mean(), v.std(ddof=1) / math.sqrt(seeds))
        res.append(cols)
    return res


def _check_against_mc(net, prof, mc, cols, rel):
    """|analytic - MC| <= 5 se + rel |MC|: ``rel`` the finite-width (O(1/N)) and
    finite-seed slack named by each test."""
    bad = []
    for i, info in enumerate(net.infos):
        for c in cols:
            if c not in mc[i]:
                continue
            m, se = mc[i][c]
            a = prof.columns[c][i]
            if np.isnan(a) and np.isnan(m):
                continue  # undefined in both (the cosine of an all-zero output)
            if not abs(a - m) <= 5 * se + rel * abs(m) + 1e-12:
                bad.append(
                    f"{info.name}.{c}: analytic {a:.5g} vs MC {m:.5g} +- {se:.2g}"
                )
    assert not bad, "\n".join(bad)


FWD = ("mean", "second_moment", "variance", "correlation")
BWD = (
    "grad_second_moment",
    "weight_grad_norm2",
    "bias_grad_norm2",
    "gamma_grad_norm2",
    "beta_grad_norm2",
)

NETS = {
    "plain-pre": dict(norm=None),
    "bn-pre": dict(norm="batchnorm"),
    "bn-post": dict(norm="batchnorm", norm_position="post"),
    "ln-pre": dict(norm="layernorm"),
    "zero-gamma": dict(norm="batchnorm", norm_position="post", zero_init_residual=True),
    "skipinit": dict(norm=None, skipinit=True),
    "fixup": dict(norm=None, init="fixup"),
}


@pytest.mark.parametrize("key", list(NETS))
def test_rules_against_numpy_monte_carlo(key):
    net = idg.resnet_mlp(3, WIDTH, **NETS[key])
    prof = analyze(net, batch_size=BATCH)
    mc = _mc(net)
    # finite width 1024: O(1/N) relative corrections to every moment; the
    # correlation of independent inputs is O(1/sqrt(N)) itself (absolute term)
    _check_against_mc(net, prof, mc, ("second_moment", "variance"), 0.02)
    _check_against_mc(net, prof, mc, BWD, 0.04)
    for c, slack in (("mean", 0.01), ("correlation", 0.02)):
        for i, info in enumerate(net.infos):
            m, se = mc[i][c]
            a = prof.columns[c][i]
            assert (np.isnan(a) and np.isnan(m)) or abs(a - m) <= 5 * se + slack, (
                info.name,
                c,
                a,
                m,
                se,
            )


def test_dropout_and_projection_against_numpy_monte_carlo():
    net = idg.Network(
        256,
        (
            idg.Dense(WIDTH),
            idg.Residual(
                (
                    idg.ReLU(),
                    idg.Dense(WIDTH),
                    idg.ReLU(),
                    idg.Dropout(0.3),
                    idg.Dense(WIDTH),
                ),
            ),  # fmt: skip
            idg.Residual(
                (idg.ReLU(), idg.Dense(512)), shortcut=idg.Dense(512), scale=0.5
            ),
            idg.Dense(10),
        ),
    )
    prof = analyze(net, batch_size=BATCH)
    mc = _mc(net)
    _check_against_mc(net, prof, mc, ("second_moment", "variance"), 0.02)
    _check_against_mc(net, prof, mc, BWD, 0.04)


def test_biased_residual_with_means_against_monte_carlo():
    """Non-zero means (a constant bias) create the cross terms of the add."""
    net = idg.resnet_mlp(
        3, WIDTH, norm=None, init={"bias": "constant(0.3)"}, norm_position="pre"
    )
    prof = analyze(net, batch_size=BATCH)
    mc = _mc(net)
    _check_against_mc(net, prof, mc, FWD[:3], 0.02)
    _check_against_mc(net, prof, mc, BWD, 0.04)


# -- closed forms ---------------------------------------------------------------------
def _stream(prof, net, col="second_moment"):
    rows = [i.index for i in net.infos if i.kind == "residual"]
    return prof.columns[col][rows]


def test_closed_forms_of_the_stream():
    L = 8
    q0 = 2.0  # the stem: Kaiming weights on unit-second-moment inputs
    # plain pre-activation He ResNet doubles q per block (De & Smith 2020)
    net = idg.resnet_mlp(L, 64, norm=None)
    np.testing.assert_allclose(
        _stream(analyze(net), net), q0 * 2.0 ** np.arange(1, L + 1)
    )
    # BatchNorm in the branch: q grows by 1 per block (linear)
    for pos in ("pre", "post"):
        net = idg.resnet_mlp(L, 64, norm="batchnorm", norm_position=pos)
        np.testing.assert_allclose(
            _stream(analyze(net), net), q0 + np.arange(1, L + 1), rtol=1e-4
        )
    # zero last-BN gamma, SkipInit alpha = 0 and full Fixup keep q constant
    for kw in (
        dict(norm="batchnorm", zero_init_residual=True),
        dict(norm="batchnorm", norm_position="post", zero_init_residual=True),
        dict(norm=None, skipinit=True),
        dict(norm=None, init="fixup"),
    ):
        net = idg.resnet_mlp(L, 64, **kw)
        prof = analyze(net)
        np.testing.assert_allclose(_stream(prof, net), q0, rtol=1e-12)
        # ... and the gradient too: every block is the identity
        g = _stream(prof, net, "grad_second_moment")
        np.testing.assert_allclose(g, g[-1], rtol=1e-12)
    # Fixup scaling alone: q_0 (1 + 1/L^2)^l
    net = idg.resnet_mlp(L, 64, norm=None, init=idg.fixup(L, 2, zero_last=False))
    np.testing.assert_allclose(
        _stream(analyze(net), net), q0 * (1 + 1 / L**2) ** np.arange(1, L + 1)
    )
    # a fixed branch scale alpha = 1/sqrt(L) stays bounded: q_0 prod(1 + alpha^2)
    a = 1 / math.sqrt(L)
    blocks = tuple(
        idg.Residual((idg.ReLU(), idg.Dense(64), idg.ReLU(), idg.Dense(64)), scale=a)
        for _ in range(L)
    )
    net = idg.Network(64, (idg.Dense(64), *blocks))
    q = _stream(analyze(net), net)
    np.testing.assert_allclose(q, q0 * (1 + a * a) ** np.arange(1, L + 1))
    assert q[-1] < q0 * math.e


def test_plain_resnet_gradient_doubles_down_the_blocks():
    L = 6
    net = idg.resnet_mlp(L, 64, norm=None)
    g = _stream(analyze(net), net, "grad_second_moment")
    np.testing.assert_allclose(g[:-1] / g[1:], 2.0)


# -- simulate against analyze --------------------------------------------------------
@pytest.mark.parametrize(
    "key", ["bn-pre", "bn-post", "zero-gamma", "skipinit", "fixup"]
)
def test_simulate_agrees_with_analyze(key):
    net = idg.resnet_mlp(3, 512, **NETS[key])
    a = analyze(net, batch_size=BATCH)
    e = simulate(net, batch_size=BATCH, seeds=4, backend="numba", rng=1)
    assert not e.findings
    for c in ("second_moment", "grad_second_moment", "weight_grad_norm2"):
        m, se, want = e.columns[c], e.columns[f"{c}_se"], a.columns[c]
        ok = np.isnan(want) | (np.abs(m - want) <= 5 * se + 0.04 * np.abs(want))
        assert ok.all(), (c, [n for n, k in zip(net.names, ok, strict=True) if not k])


def test_fused_and_generic_executors_agree_on_residual_networks():
    net = idg.Network(
        32,
        (
            idg.Dense(64),
            idg.Residual(
                (
                    idg.BatchNorm(),
                    idg.ReLU(),
                    idg.Dense(48),
                    idg.LayerNorm(),
                    idg.ReLU(),
                    idg.Dense(48),
                    idg.Dropout(0.25),
                ),
                shortcut=(idg.Dense(48), idg.BatchNorm()),
                scale=idg.Scale("constant(0.5)"),
            ),  # fmt: skip
            idg.Residual((idg.Dense(48), idg.BatchNorm()), scale=0.7),
            idg.ReLU(),
            idg.Dense(8),
        ),
    )
    f = simulate(net, batch_size=16, seeds=2, backend="numba", rng=3, dtype="float64")
    g = simulate(net, batch_size=16, seeds=2, backend="numpy", rng=3, dtype="float64")
    for c in f.columns:
        if c.endswith("_se"):
            continue
        np.testing.assert_allclose(f.columns[c], g.columns[c], rtol=1e-9, atol=1e-12)


def test_zero_initialised_branch_is_by_design_not_an_underflow():
    net = idg.resnet_mlp(4, 64, norm="batchnorm", norm_position="post",
                         zero_init_residual=True)  # fmt: skip
    e = simulate(net, batch_size=32, seeds=2)
    assert not e.findings
    rows = [i.index for i in net.infos if i.name.endswith(".dense1")]
    # upstream of the zero gamma the gradient is exactly 0 at step 0
    assert np.all(e.columns["weight_grad_norm2"][rows] == 0.0)
    a = analyze(net)
    assert np.all(a.columns["weight_grad_norm2"][rows] == 0.0)


def test_dropout_masks_do_not_depend_on_the_thread_count():
    import numba

    net = idg.Network(64, (idg.Dense(64), idg.ReLU(), idg.Dropout(0.5), idg.Dense(64)))
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = simulate(net, batch_size=32, seeds=2, rng=5)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        b = simulate(net, batch_size=32, seeds=2, rng=5)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(
        a.columns["second_moment"], b.columns["second_moment"]
    )


# -- spec: names, selectors, presets, TOML --------------------------------------------
def test_rows_are_named_by_position():
    net = idg.resnet_mlp(2, 16, norm="batchnorm", norm_position="post", output_dim=3)
    assert net.names == [
        "dense1",
        "block2.dense1", "block2.bn1", "block2.relu1", "block2.dense2", "block2.bn2",
        "block2.out",
        "block3.dense1", "block3.bn1", "block3.relu1", "block3.dense2", "block3.bn2",
        "block3.out",
        "dense4",
    ]  # fmt: skip


def test_selectors_address_layers_inside_blocks():
    net = idg.resnet_mlp(
        3, 16, norm="batchnorm",
        init={"overrides": {"block*.bn[-1]": {"gamma": "constant(0.5)"},
                            "block3.dense1": {"weight": "zeros"}}},
    )  # fmt: skip
    inits = dict(zip(net.names, net.param_inits(), strict=True))
    for k in (2, 3, 4):
        assert str(inits[f"block{k}.bn1"]["weight"]) == "constant(val=0.5)"
        assert str(inits[f"block{k}.bn0"]["weight"]) == "ones"
    assert str(inits["block3.dense1"]["weight"]) == "zeros"
    assert str(inits["block2.dense1"]["weight"]) != "zeros"
    with pytest.raises(ValueError, match="block\\*.bn\\[-1\\]"):
        idg.resnet_mlp(2, 16, init={"overrides": {"block*.ln[0]": {"weight": "ones"}}})


def test_fixup_preset_scales_and_zeroes():
    net = idg.resnet_mlp(4, 16, norm=None, branch_depth=3, init="fixup")
    inits = dict(zip(net.names, net.param_inits(), strict=True))
    w = inits["block2.dense1"]["weight"]
    assert math.isclose(16 * w.variance(16, 16), 2.0 * 4 ** (-1 / 2))
    assert inits["block2.dense3"]["weight"].variance(16, 16) == 0.0
    assert str(inits["dense1"]["weight"]).startswith("kaiming_normal")


def test_toml_round_trip_of_every_preset():
    presets = [idg.resnet_mlp(3, 32, **kw) for kw in NETS.values()]
    presets.append(idg.resnet_mlp(2, 32, norm="layernorm", input_dim=20, output_dim=4))
    presets.append(
        idg.Network(
            8,
            (
                idg.Dense(16),
                idg.Residual(
                    (
                        idg.ReLU(),
                        idg.Dense(32),
                        idg.Dropout(0.2),
                        idg.Residual((idg.Dense(32), idg.ReLU()), scale=0.5),
                    ),
                    shortcut=idg.Dense(32),
                    scale=idg.Scale("normal(0, 0.1)"),
                ),  # fmt: skip
            ),
        )
    )
    for net in presets:
        back = load_config(tomllib.loads(save_config(net)))
        assert back.layers == net.layers
        assert back.names == net.names
        assert back.param_inits() == net.param_inits()


def test_resnet_table_in_a_study_file():
    net = load_config(
        tomllib.loads(
            '[network]\nblocks = 4\nwidth = 32\nnorm = "batchnorm"\n'
            'norm_position = "post"\nfixup = true\n'
        )  # fmt: skip
    )
    assert net.names[-1] == "block5.out"
    inits = dict(zip(net.names, net.param_inits(), strict=True))
    assert inits["block5.dense2"]["weight"].variance(32, 32) == 0.0


def test_bad_residual_specs_say_what_would_work():
    with pytest.raises(ValueError, match="shortcut=Dense\\(32\\)"):
        idg.Network(16, (idg.Residual((idg.Dense(32),)),))
    with pytest.raises(TypeError, match="Residual branch"):
        idg.Residual("relu")
    with pytest.raises(ValueError, match="at least one layer"):
        idg.Residual(())
    with pytest.raises(ValueError, match="Dropout p"):
        idg.Dropout(1.0)
    with pytest.raises(ValueError, match="zero_init_residual"):
        idg.resnet_mlp(2, 16, norm=None, zero_init_residual=True)
    # a branch without a Dense, and a random alpha: simulate only, said so
    net = idg.Network(16, (idg.Dense(16), idg.Residual((idg.ReLU(),))))
    with pytest.raises(NotImplementedError, match="no Dense"):
        analyze(net)
    net = idg.Network(
        16, (idg.Dense(16), idg.Residual((idg.Dense(16),), scale=idg.Scale("normal")))
    )
    with pytest.raises(NotImplementedError, match="constant alpha"):
        analyze(net)
    assert not simulate(net, batch_size=8, seeds=2).findings

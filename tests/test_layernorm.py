"""LayerNorm's mean-field rule against a plain NumPy Monte Carlo written here
(width 1024, several seeds, tolerance from the standard error), forward and
backward, before and after the activation, with random gain and bias; and
``simulate`` against ``analyze`` on the same networks."""

from __future__ import annotations

import numpy as np
import pytest

import initdiag as idg

N = 1024  # width
B = 8  # batch
SEEDS = 12
C_IN = 0.5  # input correlation


def _phi(name, x):
    return {
        "relu": lambda v: np.maximum(v, 0),
        "tanh": np.tanh,
        "identity": lambda v: v,
    }[name](x)


def _dphi(name, x):
    return {
        "relu": lambda v: (v > 0).astype(float),
        "tanh": lambda v: 1 - np.tanh(v) ** 2,
        "identity": np.ones_like,
    }[name](x)


def _mc(order, act, depth, gamma_law, beta_law, rng):
    """Rows of ``Dense -> LN -> act`` (order "pre") or ``Dense -> act -> LN``
    ("post"): per seed the row statistics of simulate's definitions (float64),
    computed with plain NumPy."""
    rows = {
        k: [] for k in ("second_moment", "mean", "correlation", "grad", "gamma", "beta")
    }
    for _ in range(SEEDS):
        z0 = rng.standard_normal(N)
        x = np.sqrt(C_IN) * z0 + np.sqrt(1 - C_IN) * rng.standard_normal((B, N))
        tape = []
        out = []
        h = x
        for _ in range(depth):
            W = rng.standard_normal((N, N)) * np.sqrt(2.0 / N)
            h = h @ W.T
            tape.append(("dense", W, None))
            out.append(h)
            seq = ("ln", "act") if order == "pre" else ("act", "ln")
            for op in seq:
                if op == "ln":
                    g = gamma_law(rng, N)
                    b = beta_law(rng, N)
                    mu = h.mean(axis=1, keepdims=True)
                    iv = 1 / np.sqrt(h.var(axis=1, keepdims=True) + 1e-5)
                    xhat = (h - mu) * iv
                    tape.append(("ln", (xhat, iv, g), None))
                    h = g * xhat + b
                else:
                    tape.append(("act", h, None))
                    h = _phi(act, h)
                out.append(h)
        st = {k: [] for k in rows}
        for y in out:
            st["second_moment"].append(np.mean(y * y))
            st["mean"].append(np.mean(y))
            u = y / np.linalg.norm(y, axis=1, keepdims=True)
            s = u.sum(axis=0)
            st["correlation"].append((s @ s - B) / (B * (B - 1)))
        gy = rng.standard_normal(h.shape)
        m_out = np.mean(gy * gy)
        grads, gam, bet = [], [], []
        for kind, a, _ in reversed(tape):
            grads.append(np.mean(gy * gy) / m_out)
            if kind == "dense":
                gam.append(np.nan)
                bet.append(np.nan)
                gy = gy @ a
            elif kind == "act":
                gam.append(np.nan)
                bet.append(np.nan)
                gy = gy * _dphi(act, a)
            else:
                xhat, iv, g = a
                dg = (gy * xhat).sum(axis=0)
                db = gy.sum(axis=0)
                gam.append(dg @ dg / (B * m_out))
                bet.append(db @ db / (B * m_out))
                gh = gy * g
                gy = iv * (
                    gh
                    - gh.mean(axis=1, keepdims=True)
                    - xhat * (gh * xhat).mean(axis=1, keepdims=True)
                )
        st["grad"] = grads[::-1]
        st["gamma"] = gam[::-1]
        st["beta"] = bet[::-1]
        for k in rows:
            rows[k].append(st[k])
    return {k: np.array(v) for k, v in rows.items()}


def _laws(kind):
    if kind == "unit":
        return (lambda r, n: np.ones(n), lambda r, n: np.zeros(n), "ones", "zeros")
    return (
        lambda r, n: r.uniform(0.5, 1.5, n),
        lambda r, n: r.normal(0.0, 0.2, n),
        "uniform(0.5, 1.5)",
        "normal(0, 0.2)",
    )


CASES = [("pre", "tanh", "random"), ("post", "relu", "random"), ("pre", "relu", "unit")]


@pytest.mark.parametrize("order,act,law", CASES)
def test_layernorm_rule_against_numpy_monte_carlo(order, act, law):
    depth = 3
    g_law, b_law, g_spec, b_spec = _laws(law)
    mc = _mc(order, act, depth, g_law, b_law, np.random.default_rng(7))
    net = idg.mlp(
        depth,
        N,
        act,
        norm="layernorm",
        bn_position="before_activation" if order == "pre" else "after_activation",
        bias=False,
        init=idg.InitScheme(extra={"ln_weight": g_spec, "ln_bias": b_spec}),
    )
    a = idg.analyze(net, batch_size=B, input_correlation=C_IN)
    for col, key in (
        ("second_moment", "second_moment"),
        ("mean", "mean"),
        ("correlation", "correlation"),
        ("grad_second_moment", "grad"),
        ("gamma_grad_norm2", "gamma"),
        ("beta_grad_norm2", "beta"),
    ):
        v = mc[key]
        m = np.nanmean(v, axis=0)
        se = np.nanstd(v, axis=0, ddof=1) / np.sqrt(SEEDS)
        pred = a[col]
        ok = ~np.isnan(pred)
        assert np.array_equal(ok, ~np.isnan(m)), col
        # finite width: LayerNorm's projection removes 2 of N directions (4/N
        # relative); the parameter-gradient norms also see E[g^2 n^2] / (E[g^2]
        # E[n^2]) - 1 at the same unit, which measures -0.02 at N = 256 and -0.01
        # at N = 1024 (an O(1/sqrt(N)) correlation the mean-field rule drops):
        # 0.5/sqrt(N) relative for those columns
        fw = 0.5 / np.sqrt(N) if col.endswith("grad_norm2") else 4.0 / N
        tol = 4 * se[ok] + fw * np.abs(pred[ok]) + 1e-12
        bad = np.abs(m[ok] - pred[ok]) > tol
        assert not bad.any(), (col, m[ok], pred[ok], se[ok])


def test_layernorm_output_unit_second_moment_and_near_identity_jacobian():
    net = idg.Network(
        64, [idg.Dense(64), idg.LayerNorm()], init=idg.InitScheme(bias="normal(0, 1)")
    )
    a = idg.analyze(net, input_second_moment=3.0)
    assert a["second_moment"][1] == pytest.approx(1.0, rel=1e-4)
    # backward divides by the per-example feature variance q (sigma_w2 q0 + sigma_b2)
    q = a["second_moment"][0]
    assert a["grad_second_moment"][0] == pytest.approx(1.0 / (q + 1e-5), rel=1e-9)


def test_batchnorm_affine_false_really_has_no_gamma_beta():
    net = idg.mlp(
        3, 32, batchnorm=False, init=idg.InitScheme(bn_weight="constant(3.0)")
    )
    net = idg.Network(
        32, [idg.Dense(32), idg.BatchNorm(affine=False), idg.ReLU()], init=net.init
    )
    assert net.param_inits()[1] == {"weight": None, "bias": None}
    a = idg.analyze(net)
    assert np.isnan(a["gamma_grad_norm2"][1]) and np.isnan(a["beta_grad_norm2"][1])
    assert a["second_moment"][1] == pytest.approx(1.0, rel=1e-4)  # gamma = 1, not 3
    for be in ("numpy", "numba"):
        e = idg.simulate(net, batch_size=32, seeds=2, backend=be)
        assert np.isnan(e["gamma_grad_norm2"][1])
        assert e["second_moment"][1] == pytest.approx(1.0, rel=1e-3)

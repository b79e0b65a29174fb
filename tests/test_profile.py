"""Profile: construction, serialisation, summary helpers, compare()."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import initdiag as idg
from initdiag.profile import STAT_COLUMNS, Profile, compare


def _filled(source="analytic", se=False):
    net = idg.mlp(3, 8, batchnorm=True)
    p = Profile.empty(net, source, with_se=se)
    n = len(p)
    for k, c in enumerate(STAT_COLUMNS):
        p.columns[c][:] = np.linspace(0.1, 1.0, n) * (k + 1)
        if se:
            p.columns[f"{c}_se"][:] = 0.01 * (k + 1)
    p.summary.update(
        chi1=1.0,
        regime="critical",
        q_star=math.inf,
        c_star=1.0,
        xi_q=math.nan,
        xi_c=math.inf,
        correlation_depth=None,
        gradient_ratio=2.0,
    )
    return p


def test_rows_follow_the_network():
    p = _filled()
    assert p.name == [
        "dense1",
        "bn1",
        "relu1",
        "dense2",
        "bn2",
        "relu2",
        "dense3",
        "bn3",
        "relu3",
    ]
    assert list(p.block) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(p.rows_of("dense")) == [0, 3, 6]
    assert list(p.rows_of("relu")) == [2, 5, 8]
    assert p["second_moment"].shape == (9,)
    with pytest.raises(KeyError, match="columns"):
        p["nope"]


def test_json_round_trip_keeps_nan_and_inf(tmp_path):
    p = _filled(se=True)
    p.columns["mean"][2] = np.nan
    p.columns["mean"][3] = np.inf
    p.findings.append(
        {
            "kind": "overflow",
            "layer": "dense2",
            "index": 3,
            "block": 2,
            "pass": "forward",
            "seed": 0,
            "message": "overflowed",
        }
    )
    text = p.to_json(tmp_path / "p.json")
    json.loads(text)  # strict JSON: no NaN literals
    assert "NaN" not in text
    q = Profile.from_json(str(tmp_path / "p.json"))
    for c in p.columns:
        np.testing.assert_array_equal(q.columns[c], p.columns[c])
    assert q.summary["regime"] == "critical" and math.isinf(q.summary["q_star"])
    assert math.isnan(q.summary["xi_q"]) and q.summary["correlation_depth"] is None
    assert q.findings == p.findings and q.network == p.network


def test_summary_helpers():
    p = _filled()
    p.columns["correlation"][:] = [0.1, 0.2, 0.5, 0.9, 0.95, 0.991, 0.995, 0.999, 1.0]
    assert p.correlation_depth() == 2  # row bn2... relu2 (block 2) first >= 0.99
    p.columns["grad_second_moment"][:] = np.arange(9, 0, -1)
    # dense rows 0, 3, 6 hold 9, 6, 3: like for like, first over last dense row
    assert p.gradient_ratio() == pytest.approx(3.0)


def test_csv_and_table():
    p = _filled(se=True)
    csv = p.to_csv()
    assert csv.splitlines()[0].startswith("index,name,kind,block,width,mean")
    assert len(csv.splitlines()) == 10
    assert "+-" in p.table()
    long = Profile.empty(idg.mlp(30, 4), "analytic")
    assert "..." in long.table(max_rows=10)


def test_compare_in_standard_errors():
    a = _filled()
    b = _filled("empirical", se=True)
    b.columns["second_moment"] = a.columns["second_moment"] + 0.02  # se 0.02 -> z = 1
    cmp = compare(a, b)
    np.testing.assert_allclose(cmp.z["second_moment"], 1.0)
    np.testing.assert_allclose(cmp.diff["second_moment"], 0.02)
    np.testing.assert_allclose(cmp.z["mean"], 0.0)
    assert cmp.max_abs_z(["second_moment"]) == pytest.approx(1.0)
    assert "z" in cmp.table()
    # two analytic profiles: no z, only relative differences
    c2 = compare(a, _filled())
    assert np.all(np.isnan(c2.z["mean"])) and np.all(c2.rel["mean"] == 0)


def test_compare_rejects_other_layouts():
    with pytest.raises(ValueError, match="different layers"):
        compare(_filled(), Profile.empty(idg.mlp(2, 8), "analytic"))
    with pytest.raises(TypeError):
        compare(_filled(), {"a": 1})

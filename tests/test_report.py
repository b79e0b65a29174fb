"""The report package: the shipped default study, the explanation (computed, not
canned), plots (not blank, the expected artists), tables, writers, progress."""

from __future__ import annotations

import io
import json
import math
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

import initdiag as idg
from initdiag.configfile import load_study
from initdiag.profile import Profile
from initdiag.report import plots, text
from initdiag.report.default_study import DEFAULT_STUDY_TOML, default_study_dict
from initdiag.report.progress import Progress
from initdiag.report.study import Entry, explain, run_study, summarize
from initdiag.report.writers import study_to_csv, study_to_dict
from initdiag.analytic import bn_gradient_gain
from initdiag.verdicts import signal_rows

ROOT = Path(__file__).resolve().parents[1]


# -- the default study ----------------------------------------------------------------


def test_default_study_is_examples_bias_question():
    shipped = (ROOT / "examples" / "bias_question.toml").read_text(encoding="utf-8")
    assert DEFAULT_STUDY_TOML == shipped
    assert default_study_dict() == tomllib.loads(shipped)


@pytest.fixture(scope="module")
def default_analytic():
    """The default study, theory only (fast), plus synthetic 'measured' numbers so
    that every clause of the explanation appears."""
    study = load_study(default_study_dict())
    result = run_study(
        study.networks, name=study.name, simulate_kw=study.simulate, empirical=False
    )
    return study, result


def _with_measured(summaries):
    out = []
    for k, s in enumerate(summaries):
        s = dict(s)
        # arbitrary but distinct values: the test only needs them to be shown
        s["q_last_meas"] = s["q_last"] * (1.01 + 0.001 * k)
        s["q_last_se_meas"] = 0.02
        s["corr_last_se_meas"] = 1e-4 * (1 + k)
        s["bn_rate_meas"] = (
            s["bn_rate"] * 1.02 if s["bn_rate"] == s["bn_rate"] else math.nan
        )
        s["dead_last_meas"] = (
            s["dead_last"] * 0.97 if s["dead_last"] == s["dead_last"] else math.nan
        )
        out.append(s)
    return out


def _perturb(value):
    if value is None:
        return 5
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return "chaotic" if value != "chaotic" else "ordered"
    if isinstance(value, (int, np.integer)):
        return int(value) + 3
    value = float(value)
    if math.isnan(value) or value == 0:
        return 0.37
    return value * 1.37


def test_every_sentence_changes_with_the_numbers_behind_it(default_analytic):
    study, result = default_analytic
    summaries = _with_measured(result.summaries())
    settings = result.settings
    sentences = explain(summaries, settings)
    assert len(sentences) >= len(study.networks) + 2
    checked = 0
    for sent in sentences:
        assert sent.keys, f"sentence without numbers behind it: {sent.text}"
        for pos, key in sent.keys:
            mod = [dict(s) for s in summaries]
            mod[pos][key] = _perturb(mod[pos][key])
            after = {s.id: s.text for s in explain(mod, settings)}
            assert after.get(sent.id) != sent.text, (
                f"sentence {sent.id!r} did not change when {key} of variant "
                f"{summaries[pos]['name']!r} changed: {sent.text}"
            )
            checked += 1
    assert checked > 3 * len(sentences)


def test_explanation_quotes_the_computed_numbers(default_analytic):
    _, result = default_analytic
    sents = {s.id: s.text for s in result.explanation()}
    by_name = {e.name: e for e in result.entries}
    # the N(0, 0.1^2) bias: q grows linearly by sigma_b2 = 0.01 per block
    e = by_name["bias ~ N(0, 0.1^2)"]
    rows = signal_rows(e.analytic)
    q = e.analytic.columns["second_moment"][rows]
    s = sents["variant:bias ~ N(0, 0.1^2)"]
    assert "linearly" in s
    assert f"from {q[0]:.2f} to {q[-1]:.2f}" in s
    # BatchNorm's per-block gradient growth is quoted from the profile
    bn = by_name["BN gamma=1, beta=0"].analytic
    rows = signal_rows(bn)
    g = bn.columns["grad_second_moment"][rows]
    per = (g[0] / g[-1]) ** (1 / (len(rows) - 1))
    assert f"x{per:.2f} per block" in sents["batchnorm"]


def test_summary_matches_profile(default_analytic):
    _, result = default_analytic
    e = result.entries[3]
    s = summarize(e)
    rows = signal_rows(e.analytic)
    assert s["q_last"] == e.analytic.columns["second_moment"][rows[-1]]
    assert s["q_first"] == e.analytic.columns["second_moment"][rows[0]]
    assert s["corr_depth"] == e.analytic.correlation_depth()
    g = e.analytic.columns["grad_second_moment"][rows]
    assert s["grad_ratio"] == pytest.approx(g[0] / g[-1])
    assert s["sigma_b2"] == pytest.approx(0.01)


def test_comparison_table_has_one_row_per_variant(default_analytic):
    study, result = default_analytic
    table = text.comparison_table(result.summaries())
    for net in study.networks:
        assert re.search(rf"^{re.escape(net.name)}\s", table, re.M), net.name
    assert "\033[" not in table
    assert "\033[" in text.comparison_table(result.summaries(), color=True)


# -- fake profiles for plots and tables -----------------------------------------------


def _fake(net, source: str, seed: int = 0) -> Profile:
    rng = np.random.default_rng(seed)
    p = Profile.empty(net, source, with_se=source == "empirical")
    n = len(p)
    for c in (
        "second_moment",
        "mean",
        "correlation",
        "dead_fraction",
        "grad_second_moment",
        "weight_grad_norm2",
        "bias_grad_norm2",
    ):
        p.columns[c][:] = 1.0 + 0.1 * np.arange(n) + 0.01 * rng.random(n)
        if source == "empirical":
            p.columns[f"{c}_se"][:] = 0.05
    return p


@pytest.fixture
def small_net():
    return idg.mlp(6, 16, "relu")


def _pixels(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def test_signal_plot_is_not_blank_and_has_the_expected_artists(small_net):
    from matplotlib.container import ErrorbarContainer

    a = _fake(small_net, "analytic")
    e = _fake(small_net, "empirical", 1)
    fig = plots.plot_profiles([a, e], columns=("second_moment",))
    (ax,) = fig.axes
    n_rows = len(signal_rows(a))  # 6 pre-activation rows
    assert n_rows == 6
    theory = [ln for ln in ax.get_lines() if ln.get_label().endswith("(theory)")]
    assert len(theory) == 1
    assert len(theory[0].get_xdata()) == n_rows
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    data_line = bars[0].lines[0]
    assert len(data_line.get_xdata()) == n_rows
    np.testing.assert_array_equal(
        data_line.get_ydata(), e.columns["second_moment"][signal_rows(e)]
    )
    px = _pixels(fig)
    assert px.std() > 5
    assert len(np.unique(px.reshape(-1, 4), axis=0)) > 20


def test_plot_profiles_on_given_axes_and_bad_columns(small_net):
    from matplotlib.figure import Figure

    a = _fake(small_net, "analytic")
    fig = Figure()
    axes = fig.subplots(1, 2)
    out = a.plot(ax=list(axes), columns=("dead_fraction", "weight_grad_norm2"))
    assert out is fig
    # dead fraction on the 6 activation rows, gradient norms on the 6 dense rows
    assert len(axes[0].get_lines()[0].get_xdata()) == 6
    assert axes[1].get_yscale() == "log"
    with pytest.raises(ValueError, match="no column"):
        plots.plot_profiles(a, columns=("nope",))
    with pytest.raises(TypeError):
        plots.plot_profiles([])


def test_write_plots_and_phase_plot(tmp_path, small_net):
    a = _fake(small_net, "analytic")
    e = _fake(small_net, "empirical", 2)
    e.extra["jacobian"] = {
        "m1": 1.0,
        "m2": 2.0,
        "singular_values": np.abs(np.random.default_rng(0).normal(size=(2, 16))),
    }
    paths = plots.write_plots([a, e], tmp_path)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["dead.png", "gradients.png", "jacobian.png", "signal.png"]
    for p in paths:
        assert os.path.getsize(p) > 1000
    w = np.linspace(0.5, 3, 10)
    b = np.linspace(0, 0.2, 5)
    vals = np.outer(np.ones(5), w)  # chi1 = sigma_w2, crossing 1
    fig = plots.phase_plot(
        w,
        b,
        vals,
        activation="tanh",
        critical=(np.linspace(1, 2, 5), b),
        marks=[(2.0, 0.1, "mine")],
    )
    ax = fig.axes[0]
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert "mine" in labels and "edge of chaos (chi1 = 1)" in labels
    assert _pixels(fig).std() > 5


# -- tables ---------------------------------------------------------------------------


def test_layer_table_elides_the_middle(small_net):
    a = _fake(small_net, "analytic")
    e = _fake(small_net, "empirical", 3)
    out = text.layer_table(a, e, max_rows=7, width=1000)  # one block: no wrapping
    lines = out.splitlines()
    assert len(lines) == 1 + 7
    assert lines[4].startswith("...")
    assert lines[1].startswith(a.name[0]) and lines[-1].startswith(a.name[-1])
    assert "+-" in out  # measured values carry their standard error
    full = text.layer_table(a, None, max_rows=100)
    assert len(full.splitlines()) == 1 + len(a)


def test_elide():
    assert text.elide(5, 10) == [0, 1, 2, 3, 4]
    rows = text.elide(100, 9)
    assert rows[:4] == [0, 1, 2, 3] and rows[4] is None and rows[5:] == [96, 97, 98, 99]


def test_colour_only_on_a_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert text.use_color(Tty()) is True
    assert text.use_color(io.StringIO()) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert text.use_color(Tty()) is False


# -- writers --------------------------------------------------------------------------


def test_writers_round_trip(small_net):
    a = _fake(small_net, "analytic")
    e = _fake(small_net, "empirical", 4)
    from initdiag.report.study import StudyResult

    res = StudyResult("s", "", [Entry(small_net, a, e, [])], {"simulate": {}})
    d = json.loads(json.dumps(study_to_dict(res)))
    (v,) = d["variants"]
    back = Profile.from_dict(v["empirical"])
    np.testing.assert_array_equal(
        back.columns["second_moment_se"], e.columns["second_moment_se"]
    )
    assert v["network"]["name"] == small_net.name
    csv = study_to_csv(res).splitlines()
    assert len(csv) == 1 + 2 * len(a)
    assert csv[0].startswith("variant,source,index,name")


# -- progress -------------------------------------------------------------------------


def test_progress_only_on_a_tty():
    s = io.StringIO()
    p = Progress(3, stream=s)
    p.update("a")
    p.close()
    assert s.getvalue() == ""  # StringIO is not a TTY
    s = io.StringIO()
    p = Progress(2, stream=s, enabled=True)
    p.update("step one")
    assert "1/2" in s.getvalue() and "step one" in s.getvalue()
    p = Progress(2, stream=s, enabled=False)
    n = len(s.getvalue())
    p.update("x")
    assert len(s.getvalue()) == n


# -- the report says only what is true, and answers first -----------------------------


def test_explanation_answers_first_and_names_what_each_number_is(default_analytic):
    _, result = default_analytic
    sents = result.explanation()
    ids = [s.id for s in sents]
    # the short answer leads: biases, the constant bias, BatchNorm, residual nets
    assert ids[0] == "answer:bias" and ids[1].startswith("answer:constant")
    assert ids[2] == "answer:batchnorm" and ids[3] == "answer:residual"
    assert ids[4] == "reference"
    by = {s.id: s.text for s in sents}
    const = by["variant:bias = 0.1"]
    # a constant bias is a mean: no "sigma_b2 = 0.01" (its square) in its sentence
    assert "constant bias 0.100" in const and "sigma_b2" not in const
    # its growth is quadratic (sqrt(q) linear), not exponential
    assert "quadratically" in const and "exponential" not in const
    s = {e.name: summarize(e) for e in result.entries}
    q = np.sqrt(
        result.entries[4].analytic.columns["second_moment"][
            signal_rows(result.entries[4].analytic)
        ]
    )
    assert s["bias = 0.1"]["q_rate"] == pytest.approx(np.mean(np.diff(q)), rel=0.05)
    # no fixed point with a bias at Kaiming ReLU weights: ordered, never critical
    for name in ("bias ~ N(0, 0.1^2)", "bias ~ Kaiming", "bias = 0.1"):
        assert s[name]["regime"] == "ordered", name
    assert s["bias = 0"]["regime"] == "critical"


def test_batchnorm_sentences_compare_like_with_like(default_analytic):
    _, result = default_analytic
    by = {s.id: s.text for s in result.explanation()}
    bn = by["batchnorm"]
    ref = result.entries[0].analytic
    bnp = result.entries[5].analytic
    dense = [i for i, k in enumerate(bnp.kind) if k == "dense"]
    # the uncentred dense-row cosines on both sides, and -1/(B-1) named as forced
    c_bn = bnp.columns["correlation"][dense[-1]]
    c_ref = ref.columns["correlation"][signal_rows(ref)[-1]]
    assert f"{c_bn:.3f} against {c_ref:.3f}" in bn
    assert "-1/(B-1) = -3.92e-03" in bn and "forces" in bn
    gb = by["batchnorm_gamma_beta"]
    assert "does not depend on gamma" in gb
    assert "+0.5 lowers" in gb and "-0.5 raises" in gb and "kills units" in gb
    lo = bn_gradient_gain("relu", 1.0, 0.5)
    assert f"{lo:.2f}" in gb
    assert "cancelled" in by["batchnorm_dense_bias"]
    # beta ~ N(0, 0.1^2): its output correlation is explained, not called forced
    v = by["variant:BN beta ~ N(0, 0.1^2)"]
    assert "beta adds E[beta^2] = 0.01" in v


def test_dead_units_cause_is_alignment_not_width_or_bias(default_analytic):
    _, result = default_analytic
    by = {s.id: s.text for s in result.explanation()}
    assert "not a finite-width effect" in by["dead"]
    assert "the bias is not what kills them" in by["dead"]
    # the verdict on the zero-mean-bias network does not offer "set the bias to zero"
    e = result.entries[3]
    vs = idg.diagnose(e.analytic, e.network)
    dead = [v for v in vs if v.kind == "dying_units"]
    assert dead and "bias to zero" not in dead[0].suggestion
    assert "infinite-width theory" in dead[0].suggestion

"""The ``initdiag`` command, run as a subprocess (what a user runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import initdiag as idg
from initdiag.profile import Profile

ROOT = Path(__file__).resolve().parents[1]

SMALL = """\
[study]
name = "small"

[network]
depth = 4
width = 32
activation = "relu"

[simulate]
batch_size = 16
seeds = 2

[[variants]]
name = "zero bias"

[[variants]]
name = "N(0, 0.3^2) bias"
init = { bias = "normal(0, 0.3)" }
"""

TANH = """\
[network]
depth = 5
width = 24
activation = "tanh"

[init]
weight = "xavier_normal()"
bias = "normal(0, 0.1)"
"""


def run(*args, timeout=300):
    env = dict(os.environ, MPLBACKEND="Agg", NO_COLOR="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run(
        [sys.executable, "-m", "initdiag.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def small_toml(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "small.toml").write_text(SMALL)
    (d / "tanh.toml").write_text(TANH)
    return d


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default study, once per session (fewer seeds and a smaller batch than the
    shipped [simulate] table, to keep CI short)."""
    out = tmp_path_factory.mktemp("default")
    r = run("report", "--seeds", 2, "--batch-size", 64, "--out", out, "--quiet")
    return r, out


def assert_ok(r):
    assert r.returncode == 0, (
        f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    )
    assert "Traceback" not in r.stderr


def test_default_study(default_run):
    r, out = default_run
    assert_ok(r)
    study = idg.configfile.load_study(ROOT / "examples" / "bias_question.toml")
    names = [n.name for n in study.networks]
    table = r.stdout.split("What the numbers say")[0]
    for n in names:
        assert f"\n{n} " in table, n
    expl = r.stdout.split("What the numbers say")[1].split("Verdicts")[0]
    assert expl.count("\n- ") >= len(names) + 2
    assert "BatchNorm gradient explosion" in r.stdout
    for png in ("signal.png", "gradients.png", "dead.png"):
        assert (out / png).stat().st_size > 1000
    d = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in d["variants"]] == names
    assert d["config"]["toml"] == (ROOT / "examples" / "bias_question.toml").read_text()
    v = d["variants"][3]
    assert (
        v["analytic"]["source"] == "analytic"
        and v["empirical"]["source"] == "empirical"
    )
    assert "second_moment_se" in v["empirical"]["columns"]
    assert len(d["explanation"]) >= len(names) + 2


def test_toml_study_and_json_against_the_engines(small_toml):
    path = small_toml / "small.toml"
    r = run("report", path, "--format", "json")
    assert_ok(r)
    d = json.loads(r.stdout)
    nets = idg.load_config(path)
    assert [v["name"] for v in d["variants"]] == [n.name for n in nets]
    for v, net in zip(d["variants"], nets, strict=True):
        a = idg.analyze(net, batch_size=16)
        e = idg.simulate(net, batch_size=16, seeds=2)
        ja, je = Profile.from_dict(v["analytic"]), Profile.from_dict(v["empirical"])
        assert ja.name == a.name
        for c in a.columns:
            np.testing.assert_allclose(
                ja.columns[c], a.columns[c], rtol=1e-15, equal_nan=True, err_msg=c
            )
        for c in e.columns:
            np.testing.assert_allclose(
                je.columns[c], e.columns[c], rtol=1e-15, equal_nan=True, err_msg=c
            )
        assert v["summary"]["q_last"] == pytest.approx(
            a.columns["second_moment"][-2]
        )  # dense4 feeds relu4, the last row
    assert d["settings"]["simulate"] == {"batch_size": 16, "seeds": 2}


def test_text_report_of_one_network(small_toml):
    r = run(
        "report",
        small_toml / "tanh.toml",
        "--seeds",
        2,
        "--batch-size",
        8,
        "--max-rows",
        7,
    )
    assert_ok(r)
    assert "q pred" in r.stdout and "q meas" in r.stdout
    assert "\n...  " in r.stdout or "\n..." in r.stdout  # 10 rows elided to 7
    assert "verdicts" in r.stdout and "What the numbers say" in r.stdout
    assert "\033[" not in r.stdout  # not a TTY: no colour


def test_network_options_without_config():
    r = run(
        "report",
        "--depth",
        3,
        "--width",
        16,
        "--activation",
        "leaky_relu",
        "--bias",
        "normal(0, 0.2)",
        "--seeds",
        2,
        "--batch-size",
        8,
        "--format",
        "csv",
    )
    assert_ok(r)
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("variant,source,index,name")
    assert len(lines) == 1 + 2 * 6  # 3 x (dense, leaky_relu), analytic and empirical
    assert {ln.split(",")[1] for ln in lines[1:]} == {"analytic", "empirical"}


def test_compare(small_toml, tmp_path):
    out = tmp_path / "cmp"
    r = run(
        "compare",
        small_toml / "small.toml",
        small_toml / "tanh.toml",
        "--seeds",
        2,
        "--batch-size",
        8,
        "--out",
        out,
    )
    assert_ok(r)
    for name in ("zero bias", "N(0, 0.3^2) bias", "tanh"):
        assert name in r.stdout
    d = json.loads((out / "report.json").read_text())
    assert len(d["variants"]) == 3
    assert (out / "signal.png").stat().st_size > 1000


def test_phase(small_toml, tmp_path):
    out = tmp_path / "ph"
    r = run(
        "phase",
        "--activation",
        "tanh",
        "--sigma-w2",
        "0.5:3:12",
        "--sigma-b2",
        "0:0.2:6",
        "--out",
        out,
    )
    assert_ok(r)
    # the tanh edge of chaos at sigma_b2 = 0 is sigma_w2 = 1 (Poole et al. 2016)
    assert "sigma_b2 =        0: sigma_w2 = 1.00" in r.stdout
    assert (out / "phase.png").stat().st_size > 1000
    d = json.loads((out / "phase.json").read_text())
    assert np.asarray(d["values"], dtype=float).shape == (6, 12)
    # with a config, its network is marked and located
    r = run(
        "phase",
        small_toml / "tanh.toml",
        "--sigma-w2",
        "0.5:3:8",
        "--sigma-b2",
        "0:0.2:4",
        "--format",
        "json",
    )
    assert_ok(r)
    d = json.loads(r.stdout)
    (mark,) = d["networks"]
    assert mark["sigma_w2"] == pytest.approx(1.0)  # Xavier at fan_in = fan_out
    assert mark["sigma_b2"] == pytest.approx(0.01)
    assert mark["regime"] == "ordered"  # sigma_w2 = 1 < critical for sigma_b2 > 0


def test_relu_phase_has_only_the_zero_bias_critical_point():
    r = run(
        "phase", "--activation", "relu", "--sigma-w2", "1:3:5", "--sigma-b2", "0:0.1:3"
    )
    assert_ok(r)
    assert "sigma_b2 =        0: sigma_w2 = 2.00" in r.stdout
    assert "sigma_b2 =     0.05: none" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["report", "no/such/file.toml"], "no such file"),
        (["report", "--activation", "relux"], "--activation"),
        (["report", "--width", "-3"], "--width"),
        (["report", "--weight", "__import__('os')"], "--weight"),
        (["phase", "--sigma-w2", "3:1:10"], "--sigma-w2"),
        (["report", "--format", "xml"], "--format"),
        (["frobnicate"], "invalid choice"),
        (["report", "--out", "/proc/no/such/dir"], "--out"),
    ],
)
def test_bad_input_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert r.stdout == ""


def test_bad_toml_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[network\ndepth = 3\n")
    r = run("report", bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(bad) in r.stderr and "malformed TOML" in r.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[network]\ndepth = 3\nwidth = 8\nactivation = 'relux'\n")
    r = run("report", unknown)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(unknown) in r.stderr and "network" in r.stderr
    neg = tmp_path / "neg.toml"
    neg.write_text("[network]\ndepth = 3\nwidth = -8\n")
    r = run("report", neg)
    assert r.returncode == 2 and "width" in r.stderr and "Traceback" not in r.stderr


def test_internal_error_exit_1(monkeypatch, capsys):
    from initdiag import cli

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "cmd_report", boom)
    monkeypatch.delenv("INITDIAG_DEBUG", raising=False)
    # the parser binds the function at build time
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _rebind(parser(), boom))
    assert cli.main(["report"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "kaboom" in err


def _rebind(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["report"].set_defaults(func=func)
    return parser

"""Regression tests of issue 13: sizes checked first, bad input named, Ctrl-C keeps
what is done, the compiled-kernel cache outside the package, and the smaller items
(tail-safe trunc_normal, progress, per-file settings, rendering)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import initdiag as idg
from initdiag import _interrupt, _limits, cli
from initdiag.configfile import ConfigError, load_study
from initdiag.initializers import InitScheme, _truncnorm_moments, parse, trunc_normal

ROOT = Path(__file__).resolve().parents[1]


def run_main(*argv: str) -> tuple[int, str, str]:
    """``initdiag`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def bad(*argv: str) -> str:
    """The one-line message of a command that must exit 2."""
    rc, _, err = run_main(*argv)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1, err
    return err


# -- item 3: sizes ----------------------------------------------------------------


def test_mlp_refuses_a_huge_depth_before_building():
    with pytest.raises(
        ValueError, match=r"depth 1,000,000 would give 2,000,000 layers"
    ):
        idg.mlp(depth=10**6, width=16)
    with pytest.raises(ValueError, match="width .* above the limit"):
        idg.mlp(depth=2, width=2**40)
    with pytest.raises(ValueError, match="weights but the limit"):
        idg.mlp(depth=10_000, width=10**6)
    # the limits themselves are reachable
    assert len(idg.mlp(depth=_limits.MAX_LAYERS // 2, width=4).layers) == 100_000


def test_network_refuses_too_many_layers():
    layers = [idg.Dense(4), idg.ReLU()] * (_limits.MAX_LAYERS // 2 + 1)
    with pytest.raises(ValueError, match="above the limit of 100,000 layers"):
        idg.Network(4, layers)


def test_simulate_refuses_seeds_and_work_beyond_reach():
    net = idg.mlp(depth=2, width=8)
    with pytest.raises(_limits.LimitError, match="seeds 1,000,000,000") as ei:
        idg.simulate(net, seeds=10**9)
    assert ei.value.key == "seeds"
    big = idg.mlp(depth=1000, width=30_000)
    with pytest.raises(_limits.LimitError, match="floating-point operations") as ei:
        idg.simulate(big, batch_size=256, seeds=8)
    assert ei.value.key in ("seeds", "batch_size")


@pytest.mark.parametrize(
    "argv, where",
    [
        (["report", "--depth", "1000000000", "--width", "16", "-q"], "--depth"),
        (
            ["report", "--depth", "2", "--width", "8", "--seeds", "1000000000"],
            "--seeds",
        ),
        (["phase", "--depth", "1000000000", "-q"], "--depth"),
        (["phase", "--depth", "90000", "--quantity", "corr", "-q"], "--depth"),
    ],
)
def test_cli_sizes_are_refused_and_blamed_on_the_option(argv, where):
    err = bad(*argv)
    assert where in err and "limit" in err


def test_file_seeds_are_blamed_on_the_file_key(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[network]\ndepth = 2\nwidth = 8\n[simulate]\nseeds = 2000000\n")
    err = bad("report", str(f), "-q")
    assert f"{f}: [simulate] seeds" in err


# -- item 5: bad input -------------------------------------------------------------


def test_huge_numbers_in_initializers_are_value_errors():
    with pytest.raises(ValueError, match="beyond the float64 range"):
        parse("normal(std=1" + "0" * 400 + ")")
    with pytest.raises(ValueError, match="beyond the float64 range"):
        InitScheme(bias=10**400)
    with pytest.raises(ValueError, match="longer than the limit"):
        parse("normal(std=" + "1" * 100_000 + ")")
    with pytest.raises(ValueError):
        parse("-" * 50_000 + "1")
    assert idg.initializers.calculate_gain("leaky_relu", 1e200) == pytest.approx(
        math.sqrt(2.0) / 1e200
    )


@pytest.mark.parametrize(
    "toml, needle",
    [
        ('[network]\ndepth = 2\nwidth = 8\nbatchnorm = "no"\n', "batchnorm must be"),
        (
            "[network]\ndepth = 2\nwidth = 8\n[init]\nbias = 1" + "0" * 400 + "\n",
            "bias",
        ),
        (
            '[network]\ndepth = 2\nwidth = 8\n[simulate]\nseeds = "x"\n',
            "[simulate] seeds",
        ),
        (
            "[network]\ndepth = 2\nwidth = 8\n[simulate]\nbackend = 3\n",
            "[simulate] backend",
        ),
        (
            "[network]\ndepth = 2\nwidth = 8\n[simulate]\njacobian = 1\n",
            "[simulate] jacobian",
        ),
        (
            "[network]\ndepth = 2\nwidth = 8\n[analyze]\ninput_correlation = 2\n",
            "[analyze]",
        ),
    ],
)
def test_toml_values_are_checked_and_named(tmp_path, toml, needle):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_study(f)
    assert str(f) in str(ei.value) and needle in str(ei.value)
    assert str(f) in bad("report", str(f), "--no-simulate", "-q")


def test_binary_toml_names_the_file(tmp_path):
    f = tmp_path / "b.toml"
    f.write_bytes(b"depth = \xff\xfe\x00\x01")
    assert f"{f}: not a TOML text file" in bad("report", str(f), "-q")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["report", "--weight", "normal(std=1" + "0" * 400 + ")"], "--weight"),
        (["report", "--bias", "normal(" + "(" * 3000 + ")"], "--bias"),
        (["report", "--weight", "x" * 100_000], "--weight"),
        (["phase", "--sigma-w2", "0:4:10"], "--sigma-w2"),
        (["phase", "--sigma-b2", "-1:4:10"], "--sigma-b2"),
        (["report", "--rng", "-1"], "--rng"),
    ],
)
def test_cli_bad_values_name_the_option(argv, needle):
    assert needle in bad(*argv)


def test_bad_backend_environment_is_named(monkeypatch):
    monkeypatch.setenv("INITDIAG_BACKEND", "nosuch")
    err = bad("report", "--depth", "2", "--width", "8", "-q")
    assert "INITDIAG_BACKEND='nosuch'" in err


def test_closed_stdout_exits_2():
    code = "import sys, os; os.close(1); sys.stdout = None; "
    code += "from initdiag import cli; sys.exit(cli.main(['report', '--depth', '2']))"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2, r.stderr
    assert "standard output is closed" in r.stderr and "Traceback" not in r.stderr


def test_mlp_flags_must_be_booleans():
    with pytest.raises(TypeError, match="batchnorm must be true or false"):
        idg.mlp(depth=2, width=4, batchnorm="no")
    with pytest.raises(TypeError, match="bias must be true or false"):
        idg.mlp(depth=2, width=4, bias=0)


# -- item 6: trunc_normal in the far tails ----------------------------------------


@pytest.mark.parametrize(
    "mean, std, a, b",
    [
        (0, 1, 10, 11),
        (0, 1, -11, -10),
        (0, 1, 40, 41),
        (0, 1, 5, 1e3),
        (1, 2, -60, -57),
    ],
)
def test_trunc_normal_far_tails(mean, std, a, b):
    al, be = (a - mean) / std, (b - mean) / std
    m_ref, v_ref = stats.truncnorm.stats(al, be, loc=mean, scale=std, moments="mv")
    m, v = _truncnorm_moments(mean, std, a, b)
    assert m == pytest.approx(float(m_ref), rel=1e-12)
    # the closed form of the variance cancels ~2 log10(alpha) digits
    assert v == pytest.approx(float(v_ref), rel=1e-8)
    n = 100_000
    x = trunc_normal(mean, std, a, b).sample(n, 1, 1, np.random.default_rng(1), "f8")
    assert x.min() >= a and x.max() <= b
    # the sample mean within 5 standard errors of the exact mean (the old sampler
    # returned b every time for alpha = 10)
    assert abs(x.mean() - m_ref) < 5 * math.sqrt(v_ref / n)
    assert np.unique(x).size > n // 2


# -- item 1: the compiled-kernel cache --------------------------------------------


def test_numba_cache_is_outside_the_package():
    from initdiag.kernels import _cache
    from initdiag.kernels import stats as kstats

    pkg = os.path.dirname(idg.__file__)
    path = kstats._sumsq_nb._cache._cache_path
    assert not os.path.abspath(path).startswith(os.path.abspath(pkg) + os.sep)
    assert path.startswith(_cache.cache_dir())
    import numba

    # the setting is restored: the user's own functions keep numba's default
    assert numba.config.CACHE_DIR == os.environ.get("NUMBA_CACHE_DIR", "")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from initdiag.kernels import _cache

    _cache.cache_dir.cache_clear()
    try:
        monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert _cache.cache_dir() == str(tmp_path / "xdg" / "initdiag" / "numba")
        _cache.cache_dir.cache_clear()
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "nb"))
        assert _cache.cache_dir() == str(tmp_path / "nb")
    finally:
        _cache.cache_dir.cache_clear()


@pytest.mark.slow
def test_installed_copy_writes_nothing_into_itself(tmp_path):
    """A copy of the package (as site-packages holds it) compiles a kernel and
    leaves no Numba cache file inside itself; importing does not touch os.environ."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "initdiag",
        site / "initdiag",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    code = (
        "import os; before = dict(os.environ); import initdiag; "
        "assert dict(os.environ) == before; import numpy as np; "
        "from initdiag import kernels; "
        "kernels.column_stats(np.ones((4, 3), np.float32), backend='numba'); "
        "print(initdiag.__file__)"
    )
    env = dict(os.environ, PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "c"))
    env.pop("NUMBA_CACHE_DIR", None)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(site))
    inside = [p for p in (site / "initdiag").rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert inside == []
    assert list((tmp_path / "c" / "initdiag" / "numba").rglob("*.nbi"))


# -- item 2: a missing speed-up is reported ---------------------------------------


def test_missing_threadpoolctl_is_reported(monkeypatch):
    from initdiag import empirical

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    with pytest.warns(RuntimeWarning, match="pip install threadpoolctl"):
        w, _ = empirical._thread_plan(4, True, False, 1, [])
    assert w == 1


# -- item 4: Ctrl-C keeps what is done (in process; the signal test is
# tests/test_interrupt.py) ----------------------------------------------------------


def test_stop_request_gives_the_finished_seeds():
    net = idg.mlp(depth=3, width=16)

    def stop_after_two(k, n):
        if k >= 2:
            _interrupt.request_stop()

    with pytest.raises(_interrupt.Interrupted) as ei:
        idg.simulate(
            net, batch_size=8, seeds=6, backend="numpy", progress=stop_after_two
        )
    part = ei.value.partial
    assert isinstance(ei.value, KeyboardInterrupt)
    assert part.meta["partial"] is True and part.meta["seeds_finished"] == 2
    # serial seeds finish in order: the partial profile is the 2-seed profile
    full = idg.simulate(net, batch_size=8, seeds=2, backend="numpy")
    for c in ("second_moment", "grad_second_moment", "correlation"):
        np.testing.assert_array_equal(part.columns[c], full.columns[c])
    assert full.meta["partial"] is False and full.meta["seeds_finished"] == 2


def test_stop_request_stops_worker_threads():
    net = idg.mlp(depth=3, width=16)
    calls = []

    def stop_at_first(k, n):
        calls.append(k)
        _interrupt.request_stop()

    with pytest.raises(_interrupt.Interrupted) as ei:
        idg.simulate(net, batch_size=8, seeds=40, progress=stop_at_first)
    part = ei.value.partial
    done = part.meta["seeds_finished"]
    assert 1 <= done < 40 and part.meta["partial"]
    assert set(part.meta["seeds_reached"]) == {done}
    # the next run is not stopped by the old request
    assert idg.simulate(net, batch_size=8, seeds=2).meta["partial"] is False


def test_run_study_interrupted_keeps_finished_networks():
    from initdiag.report.study import run_study
    from initdiag.report.writers import study_to_dict

    nets = [idg.mlp(depth=2, width=8, name=f"n{k}") for k in range(3)]
    labels = []

    def progress(label):
        labels.append(label)
        if label == "n1: seed 1/3":
            _interrupt.request_stop()

    with pytest.raises(_interrupt.Interrupted) as ei:
        run_study(
            nets,
            simulate_kw={"batch_size": 8, "seeds": 3, "backend": "numpy"},
            progress=progress,
        )
    res = ei.value.partial
    assert res.partial and [e.name for e in res.entries] == ["n0", "n1"]
    assert res.entries[1].empirical.meta["seeds_finished"] == 1
    d = json.loads(json.dumps(study_to_dict(res)))
    assert d["partial"] is True


# -- item 6: progress, per-file settings, rendering ---------------------------------


def test_progress_moves_once_per_seed():
    from initdiag.report.study import progress_steps, run_study

    nets = [idg.mlp(depth=2, width=8)]
    labels = []
    sim = {"batch_size": 8, "seeds": 3}
    run_study(nets, simulate_kw=sim, progress=labels.append)
    assert len(labels) == progress_steps(nets, [sim], True) == 4
    assert labels[0].endswith("analyze") and labels[-1].endswith("seed 3/3")


def test_compare_applies_each_files_simulate(tmp_path):
    a = tmp_path / "a.toml"
    b = tmp_path / "b.toml"
    a.write_text(
        "[network]\ndepth = 2\nwidth = 8\n[simulate]\nbatch_size = 8\nseeds = 2\n"
    )
    b.write_text(
        "[network]\ndepth = 2\nwidth = 8\n[simulate]\nbatch_size = 12\nseeds = 3\n"
    )
    rc, out, err = run_main("compare", str(a), str(b), "--format", "json", "-q")
    assert rc == 0, err
    d = json.loads(out)
    metas = [v["empirical"]["meta"] for v in d["variants"]]
    assert [(m["batch_size"], m["seeds"]) for m in metas] == [(8, 2), (12, 3)]
    # an option still applies to every file
    rc, out, _ = run_main(
        "compare", str(a), str(b), "--seeds", "2", "--format", "json", "-q"
    )
    assert [v["empirical"]["meta"]["seeds"] for v in json.loads(out)["variants"]] == [
        2,
        2,
    ]


def test_wide_tables_and_deep_descriptions_fit_the_width():
    from initdiag.report import text
    from initdiag.report.study import run_study

    net = idg.mlp(depth=300, width=16, batchnorm=True, input_dim=20)
    desc = text.describe_network(net, width=80)
    assert "299 x [" in desc or "300 x [" in desc
    assert max(map(len, desc.splitlines())) <= 80 and len(desc) < 400
    res = run_study(
        [idg.mlp(depth=2, width=8, name=n) for n in ("a", "b")],
        simulate_kw={"batch_size": 8, "seeds": 2},
    )
    for width in (60, 100):
        body = text.render_study(res, width=width, details=True)
        assert max(map(len, body.splitlines())) <= max(width, 88)


def test_overflow_table_keeps_its_columns():
    from initdiag.report import text
    from initdiag.report.study import run_study

    net = idg.mlp(depth=3, width=8, init=InitScheme(weight="normal(std=1e200)"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing leaks to stderr
        res = run_study([net], simulate_kw={"batch_size": 8, "seeds": 2})
        body = text.render_entry(res.entries[0], width=200)
    assert "q pred" in body and "no finite value" in body


def test_profile_plot_returns_a_pyplot_figure():
    import matplotlib.pyplot as plt

    a = idg.analyze(idg.mlp(depth=2, width=8))
    fig = a.plot()
    assert fig.number in plt.get_fignums()
    plt.close(fig)


def test_to_frame_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    a = idg.analyze(idg.mlp(depth=2, width=8))
    with pytest.raises(ImportError, match=r"initdiag\[frames\]"):
        a.to_frame()


def test_phase_marks_each_network_differently():
    from initdiag.report.plots import phase_plot

    w = np.linspace(0.5, 3, 5)
    b = np.linspace(0, 0.5, 4)
    marks = [(1.0, 0.1, "a"), (2.0, 0.2, "b"), (2.5, 0.3, "c")]
    fig = phase_plot(
        w, b, np.ones((4, 5)), quantity="chi1", activation="tanh", marks=marks
    )
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in ("a", "b", "c")]
    assert len({ln.get_marker() for ln in lines}) == 3


@pytest.mark.parametrize(
    "opts",
    [
        ["--bias", "1e300"],
        ["--weight", "normal(std=1e200)"],
        ["--bias", "uniform(-1e300, 1e300)", "--batchnorm"],
        ["--weight", "orthogonal(gain=1e300)", "--activation", "tanh"],
    ],
)
def test_huge_finite_inits_are_findings_not_errors(opts):
    """Overflow is a verdict of the report: exit 0, no RuntimeWarning, no
    OverflowError from a Python float's ``**``."""
    argv = ["report", "--depth", "3", "--width", "8", "--seeds", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rc, out, err = run_main(*argv, "--batch-size", "8", *opts, "-q")
    assert rc == 0, err
    assert "overflow" in out


def test_bad_backend_environment_variable_is_named_by_the_api(monkeypatch):
    import initdiag.kernels as K

    monkeypatch.setenv("INITDIAG_BACKEND", "nosuch")
    with pytest.raises(ValueError, match="INITDIAG_BACKEND.*'nosuch'"):
        K.activation_forward(np.ones((2, 2)), "relu")

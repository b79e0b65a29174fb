"""The C extension loads, its self-test runs, and a missing compiler is not fatal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import initdiag.kernels as K
from initdiag.kernels import _c

ROOT = Path(__file__).resolve().parents[1]


def test_extension_loads_and_selftest_writes_the_sequence():
    ffi, lib, err = _c.load()
    if err is not None:
        pytest.skip(f"C extension not built here: {err}")
    out = np.full(5, -1.0)
    assert lib.idg_selftest(ffi.from_buffer("double[]", out), 5) == 0
    np.testing.assert_array_equal(out, np.arange(5.0))
    assert lib.idg_selftest(ffi.NULL, -1) == lib.IDG_EINVAL
    st = _c.status()
    assert st["available"] and st["version"] == "0.1"
    assert isinstance(st["openmp"], bool)
    assert lib.idg_num_threads() >= 1


def test_check_raises_on_negative_codes():
    _c.check(0, "ok")
    with pytest.raises(RuntimeError, match="IDG_EINVAL"):
        _c.check(-1, "idg_something")


def test_c_kernels_reject_a_bad_activation_code():
    ffi, lib, err = _c.load()
    if err is not None:
        pytest.skip(f"C extension not built here: {err}")
    x = np.ones(3)
    rc = lib.idg_activation_forward_f64(_c.ptr(x), 3, 99, 0.0, _c.ptr(x), 1)
    assert rc == lib.IDG_EINVAL


def test_missing_extension_reports_c_unavailable(monkeypatch):
    # sys.modules[name] = None makes "import initdiag._cext" raise ImportError
    monkeypatch.setitem(sys.modules, "initdiag._cext", None)
    monkeypatch.setattr(_c, "_STATE", None)
    monkeypatch.setattr(_c, "_FN_CACHE", {})
    info = K.available_backends()["c"]
    assert info["available"] is False
    assert "not built" in info["reason"] and "compiler" in info["reason"]
    with pytest.raises(K.BackendUnavailableError, match="'c' is unavailable"):
        K.batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), backend="c")
    # auto never picks c, so the other backends keep working
    assert K.get_backend() in ("numba", "numpy")
    K.column_stats(np.ones((2, 3)), backend="numpy")


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs setuptools + a shell")
def test_build_without_a_compiler_succeeds_without_the_extension(tmp_path):
    """setup.py build_ext with CC=/bin/false exits 0 and builds no extension."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "csrc", proj / "csrc")
    pkg = proj / "initdiag"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for sub in ("kernels", "report", "integrations"):
        (pkg / sub).mkdir()
        (pkg / sub / "__init__.py").write_text("")
    env = dict(os.environ, CC="/bin/false", LDSHARED="/bin/false")
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "building the C extension failed" in r.stderr
    assert not list(pkg.glob("_cext*"))

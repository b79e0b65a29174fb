"""Thread-pool configuration: nothing at import, the documented policy from the
first kernel call on, explicit configure_threads (initdiag.kernels._threading).

Each check runs in a fresh interpreter: the policy is process state that the
OpenMP runtime reads once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, **env: str) -> None:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")
    }
    base.update(env)
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_import_changes_nothing_and_first_kernel_call_configures():
    run(
        """
        import os, sys
        before = dict(os.environ)
        import initdiag, initdiag.kernels
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        assert "numba" not in sys.modules
        assert "initdiag._cext" not in sys.modules
        initdiag.simulate, initdiag.analyze  # the engines' modules import quietly too
        assert dict(os.environ) == before
        import numpy as np
        initdiag.kernels.layer_summary(np.ones((4, 3)), backend="numba")
        import numba
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        prio = list(numba.config.THREADING_LAYER_PRIORITY)
        assert prio == ["omp", "tbb", "workqueue"]
        """
    )


def test_explicit_configuration_wins_and_late_changes_raise():
    run(
        """
        import os
        import numpy as np
        import initdiag.kernels as K
        prio = ["workqueue", "omp", "tbb"]
        info = K.configure_threads(wait_policy="active", layer_priority=prio)
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" == info["OMP_WAIT_POLICY"]
        assert info["layer_priority"] == prio
        K.layer_summary(np.ones((4, 3)), backend="numba")
        # the automatic call before the first kernel is a no-op now
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
        K.available_backends()  # loads the C extension, i.e. libgomp
        try:
            K.configure_threads(wait_policy="PASSIVE")
        except RuntimeError as exc:
            assert "already started" in str(exc)
        else:
            raise SystemExit("a late change of the wait policy did not raise")
        K.configure_threads(wait_policy="ACTIVE", layer_priority=prio)  # no change
        for bad in ({"wait_policy": "sometimes"}, {"layer_priority": ["omp"]}):
            try:
                K.configure_threads(**bad)
            except ValueError:
                pass
            else:
                raise SystemExit(f"{bad} accepted")
        """
    )


@pytest.mark.parametrize("policy", ["ACTIVE", "PASSIVE"])
def test_a_policy_in_the_environment_wins(policy):
    run(
        f"""
        import os
        import numpy as np
        import initdiag.kernels as K
        K.column_stats(np.ones((4, 3)), backend="numba")
        K.configure_threads()
        assert os.environ["OMP_WAIT_POLICY"] == {policy!r}
        """,
        OMP_WAIT_POLICY=policy,
    )

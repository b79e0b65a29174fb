"""Fault test: Ctrl-C (SIGINT) at random moments of ``report``, ``compare`` and
``phase``, run as subprocesses.  Whatever was written must be valid and marked
complete or partial; the exit code is 130 (or 0 when the run had finished).

The moments are drawn from the progress bar, which the command draws on stderr when
that is a terminal (a pty here): after a random number of steps plus a random
delay, so the signal lands in the analysis, between seeds, inside a seed, or while
the result is being written.  ``INITDIAG_FAULT_SEED`` picks other moments.
"""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("INITDIAG_FAULT_SEED", "13"))
#: seconds from SIGINT to exit; issue 13 asks for 5 s on a large network, measured
#: there; a test on a machine shared with other jobs gets twice that
EXIT_WITHIN = 10.0
PNG = b"\x89PNG\r\n\x1a\n"

STUDY = """\
[study]
name = "{name}"
[network]
depth = {depth}
width = 128
activation = "{act}"
[simulate]
batch_size = 64
seeds = {seeds}
[[variants]]
name = "zero bias"
[[variants]]
name = "N(0, 0.1^2) bias"
init = {{ bias = "normal(0, 0.1)" }}
"""


def launch(args: list[str], cwd: Path) -> tuple[subprocess.Popen, int]:
    master, slave = pty.openpty()
    env = dict(os.environ, MPLBACKEND="Agg", NO_COLOR="1", COLUMNS="100")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(cwd / "stdout", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "initdiag.cli", *args],
            stdout=out,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        )
    os.close(slave)
    return proc, master


def drain(master: int, proc: subprocess.Popen, buf: bytearray, until, timeout: float):
    """Read the pty into ``buf`` until ``until(buf)``, the exit, or ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if until(buf):
            return True
        if proc.poll() is not None:
            # the last bytes may still be in the pty
            with_data, _, _ = select.select([master], [], [], 0)
            if not with_data:
                return until(buf)
        r, _, _ = select.select([master], [], [], 0.05)
        if r:
            try:
                buf += os.read(master, 65536)
            except OSError:  # the child closed its end
                return until(buf)
    return until(buf)


def steps(buf: bytes) -> int:
    done = re.findall(rb"\] (\d+)/(\d+) ", buf)
    return int(done[-1][0]) if done else -1


def interrupt(args: list[str], cwd: Path, rng: random.Random, label: bytes):
    """Start the command, SIGINT it at a random moment, return (rc, seconds from
    the signal to the exit, stderr text)."""
    proc, master = launch(args, cwd)
    buf = bytearray()
    try:
        started = drain(master, proc, buf, lambda b: label in b, timeout=600)
        assert started or proc.poll() is not None, bytes(buf)[-500:]
        total = re.findall(rb"\] \d+/(\d+) ", bytes(buf))
        n = int(total[-1]) if total else 1
        target = rng.randint(0, max(n - 1, 0))
        drain(master, proc, buf, lambda b: steps(bytes(b)) >= target, timeout=600)
        time.sleep(rng.uniform(0.0, 0.4))
        t_sig = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        drain(master, proc, buf, lambda b: proc.poll() is not None, EXIT_WITHIN + 30)
        rc = proc.wait(timeout=60)
        waited = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, waited, bytes(buf).decode("utf-8", "replace")


def check_profile_meta(m: dict) -> None:
    assert isinstance(m["partial"], bool)
    if m["partial"]:
        assert 0 <= m["seeds_finished"] < m["seeds"]
    else:
        assert m["seeds_finished"] == m["seeds"]
    # every finished seed reached every layer (nothing overflows in these networks)
    assert set(m["seeds_reached"]) <= {m["seeds_finished"]}


def check_report(d: dict, n_variants: int) -> None:
    assert d["schema"].startswith("initdiag.report")
    assert isinstance(d["partial"], bool)
    variants = d["variants"]
    if not d["partial"]:
        assert len(variants) == n_variants
    assert len(variants) <= n_variants
    for k, v in enumerate(variants):
        e = v["empirical"]
        if e is None:  # interrupted before its first seed finished
            assert d["partial"] and k == len(variants) - 1
            continue
        check_profile_meta(e["meta"])
        if e["meta"]["partial"]:
            assert d["partial"] and k == len(variants) - 1


def check_outputs(cwd: Path, rc: int, err: str, n_variants: int, what: str) -> None:
    assert rc in (0, 130), (rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    out = cwd / "out"
    leftovers = [p.name for p in out.glob("*.tmp*")] if out.exists() else []
    assert leftovers == [], leftovers
    stdout = (cwd / "stdout").read_bytes()
    if what == "phase":
        for p in out.glob("phase.json"):
            assert json.loads(p.read_text())["partial"] is False
        for p in out.glob("*.png"):
            assert p.read_bytes().startswith(PNG)
        if stdout:
            assert json.loads(stdout)["partial"] is False
        return
    report = out / "report.json"
    if report.exists():
        d = json.loads(report.read_text())
        check_report(d, n_variants)
        if rc == 0:
            assert d["partial"] is False
    elif rc == 0:
        raise AssertionError("exit 0 without report.json")
    for p in out.glob("*.png"):
        assert p.read_bytes().startswith(PNG)
    if stdout:
        s = json.loads(stdout)
        check_report(s, n_variants)
        if report.exists():
            assert s["partial"] == d["partial"]


def _files(tmp: Path) -> dict[str, Path]:
    a = tmp / "a.toml"
    b = tmp / "b.toml"
    a.write_text(STUDY.format(name="a", depth=12, act="relu", seeds=6))
    b.write_text(STUDY.format(name="b", depth=10, act="tanh", seeds=5))
    return {"a": a, "b": b}


CASES = {
    "report": (
        [
            "report",
            "--depth",
            "20",
            "--width",
            "256",
            "--batch-size",
            "64",
            "--seeds",
            "32",
            "--out",
            "out",
            "--format",
            "json",
        ],
        1,
        b"] ",
    ),
    "study": (["report", "a.toml", "--out", "out", "--format", "json"], 2, b"] "),
    "compare": (
        ["compare", "a.toml", "b.toml", "--out", "out", "--format", "json"],
        4,
        b"] ",
    ),
    "phase": (
        [
            "phase",
            "--quantity",
            "corr",
            "--depth",
            "400",
            "--sigma-w2",
            "0.05:4:160",
            "--sigma-b2",
            "0:0.5:120",
            "--out",
            "out",
            "--format",
            "json",
        ],
        0,
        b"phase:",
    ),
}


#: (case, moment) pairs: two moments of the single-network report (the acceptance
#: case of issue 13), one of each other command; INITDIAG_FAULT_SEED draws others
RUNS = [("report", 0), ("report", 1), ("study", 0), ("compare", 0), ("phase", 0)]


@pytest.mark.slow
@pytest.mark.parametrize("case, moment", RUNS)
def test_sigint_leaves_valid_marked_output(tmp_path, case, moment):
    args, n_variants, label = CASES[case]
    rng = random.Random(f"{SEED}-{case}-{moment}")
    _files(tmp_path)
    rc, waited, err = interrupt(args, tmp_path, rng, label)
    check_outputs(tmp_path, rc, err, n_variants, "phase" if case == "phase" else "")
    if rc == 130:
        assert waited < EXIT_WITHIN, f"exit {waited:.1f} s after SIGINT"

"""initdiag.Monitor without any framework: statistics against direct NumPy
computations written here, NaN findings, bounded memory, histograms, threads,
sinks (files survive a killed process), the plot and ``initdiag monitor-report``."""

from __future__ import annotations

import gc
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from initdiag import Monitor
from initdiag.cli import main
from initdiag.monitor import ACTIVATION_FIELDS, read_rows

#: the checkout whose initdiag the subprocesses import (python -c puts the cwd first)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ references
def direct_activation(h: np.ndarray) -> dict[str, float]:
    """Profile statistics of h (B, n) or (B, C, *S), by definition, in float64:
    a unit is a column, or a channel whose samples are every (b, s)."""
    h = np.asarray(h, dtype=np.float64)
    B = h.shape[0]
    units = (
        h.reshape(B, -1)
        if h.ndim == 2
        else np.moveaxis(h, 1, -1).reshape(-1, h.shape[1])
    )
    cos = []
    rows = h.reshape(B, -1)
    for a in range(B):
        for b in range(B):
            if a != b:
                na, nb = np.linalg.norm(rows[a]), np.linalg.norm(rows[b])
                cos.append(0.0 if na == 0 or nb == 0 else rows[a] @ rows[b] / (na * nb))
    return {
        "mean": h.mean(),
        "second_moment": (h**2).mean(),
        "variance": units.var(axis=0).mean(),
        "squared_mean": (units.mean(axis=0) ** 2).mean(),
        "correlation": np.mean(cos) if cos else math.nan,
        "active_fraction": (h > 0).mean(),
        "zero_fraction": (h == 0).mean(),
        "dead_fraction": (~(units > 0).any(axis=0)).mean(),
        "nonfinite_count": float((~np.isfinite(h)).sum()),
    }


def assert_stats(got: dict, want: dict, rtol: float) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rtol, abs=rtol), k


def _relu_batch(rng, shape, dtype=np.float64):
    h = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    return h


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_activation_statistics_equal_direct(dtype, rtol):
    rng = np.random.default_rng(1)
    h = _relu_batch(rng, (12, 9), dtype)
    h[:, 3] = 0.0  # a dead unit
    h[:, 5] -= 0.5
    m = Monitor()
    got = m.record(0, "relu1", activations=h)
    want = direct_activation(h)
    assert want["dead_fraction"] == pytest.approx(1 / 9)
    assert_stats(got, want, rtol)
    assert set(got) == set(ACTIVATION_FIELDS)


def test_convolution_statistics_are_per_channel():
    rng = np.random.default_rng(2)
    h = rng.standard_normal((5, 4, 3, 6)) + np.arange(4)[None, :, None, None]
    h[:, 2] = -np.abs(h[:, 2])  # channel 2 has no positive entry: dead
    h[0, 1, 0, 0] = 0.0
    got = Monitor(backend="numpy").record(3, "conv1", activations=h)
    want = direct_activation(h)
    assert want["dead_fraction"] == 0.25
    assert_stats(got, want, 1e-12)
    # per channel, not per (channel, position): the squared channel means differ
    per_position = (h.reshape(5, -1).mean(axis=0) ** 2).mean()
    assert not math.isclose(got["squared_mean"], per_position, rel_tol=1e-3)


def test_gradient_parameter_and_update_statistics():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((8, 6))
    w = rng.standard_normal((6, 5)) * 0.3
    b = rng.standard_normal(6) * 0.1
    dw, db = rng.standard_normal((6, 5)), rng.standard_normal(6)
    upd = -0.01 * dw
    got = Monitor().record(
        0,
        "fc",
        grads={"output": g, "weight": dw, "bias": db},
        params={"weight": w, "bias": b},
        updates={"weight": upd},
    )
    want = {
        "grad_second_moment": (g**2).mean(),
        "grad_norm2": (g**2).sum(),
        "weight_grad_norm2": (dw**2).sum(),
        "bias_grad_norm2": (db**2).sum(),
        "weight_mean": w.mean(),
        "weight_variance": w.var(),
        "weight_norm2": (w**2).sum(),
        "bias_mean": b.mean(),
        "bias_variance": b.var(),
        "weight_update_ratio": np.linalg.norm(upd) / np.linalg.norm(w),
        "grad_nonfinite_count": 0.0,
    }
    assert_stats(got, want, 1e-12)
    assert "bias_update_ratio" not in got
    # a bare array is the output gradient / the weight
    alone = Monitor().record(0, "fc", grads=g, params=w)
    assert alone["grad_norm2"] == pytest.approx((g**2).sum(), rel=1e-12)
    assert alone["weight_norm2"] == pytest.approx((w**2).sum(), rel=1e-12)


def test_calls_of_one_step_merge_into_one_row_and_every_skips():
    rng = np.random.default_rng(4)
    m = Monitor(every=5)
    for step in range(12):
        h = rng.standard_normal((4, 3))
        r1 = m.record(step, "a", activations=h)
        r2 = m.record(step, "a", grads=h)
        assert (r1 is None) == (r2 is None) == (not m.sampled(step))
    rows = m.rows()
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert {"mean", "grad_second_moment"} <= set(rows[0])


def test_device_arrays_give_the_host_results_with_one_transfer_each(monkeypatch):
    from numba import cuda

    rng = np.random.default_rng(5)
    x2 = rng.standard_normal((7, 5))
    x4 = rng.standard_normal((3, 2, 4, 2))
    host = Monitor(backend="numpy")
    want = [host.record(0, "a", activations=x2), host.record(0, "b", activations=x4)]
    d2, d4 = cuda.to_device(x2), cuda.to_device(x4)
    cls = type(cuda.device_array(1))
    copies = []
    orig = cls.copy_to_host
    monkeypatch.setattr(
        cls,
        "copy_to_host",
        lambda self, *a, **k: copies.append(self.size) or orig(self, *a, **k),
    )
    dev = Monitor()
    got = [dev.record(0, "a", activations=d2), dev.record(0, "b", activations=d4)]
    assert copies == [10, 10 + 4 * 2 * 4 * 2]  # one small buffer per tensor
    for g, w in zip(got, want, strict=True):
        assert_stats(g, w, 1e-12)


# ------------------------------------------------------------------ NaN
def test_nan_is_a_finding_and_the_loop_goes_on():
    rng = np.random.default_rng(6)
    m = Monitor(bins=16)
    for step in range(100):
        h = rng.standard_normal((6, 4))
        g = rng.standard_normal((6, 4))
        if step == 50:
            h[1, 2] = np.nan
            g[0, 0] = np.inf
        m.record(step, "l1", activations=h, grads=g)
    (f1, f2) = m.findings
    assert (f1["step"], f1["layer"], f1["tensor"], f1["count"]) == (
        50,
        "l1",
        "activations",
        1,
    )
    assert (f2["step"], f2["tensor"]) == (50, "grads")
    assert "step 50" in f1["message"] and "l1" in f1["message"]
    rows = m.rows()
    assert len(rows) == 100 and math.isnan(rows[50]["mean"])
    assert math.isfinite(rows[51]["mean"])
    s = m.summary()["l1"]["mean"]
    assert s["count"] == 99 and s["last_step"] == 99
    edges, counts = m.histogram("l1")
    assert counts.sum() == 100 * 24 - 1  # the NaN is not counted


def test_findings_are_bounded():
    m = Monitor(max_findings=3)
    for step in range(10):
        m.record(step, "x", activations=np.full((2, 2), np.nan))
    assert len(m.findings) == 3 and m.findings_dropped == 7


# ------------------------------------------------------------------ memory
def test_memory_does_not_grow_with_steps_beyond_the_history():
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((8, 16)) for _ in range(4)]
    m = Monitor(history=100, bins=32, backend="numpy")

    def run(a, b):
        for step in range(a, b):
            for layer in ("l1", "l2"):
                h = batches[step % 4]
                m.record(step, layer, activations=h, grads=h, params={"weight": h})

    run(0, 200)  # fills the history and every lazily built structure
    tracemalloc.start()
    run(200, 400)
    gc.collect()  # count what is live, not cycles awaiting the collector
    base = tracemalloc.take_snapshot()
    run(400, 2000)
    gc.collect()
    grown = sum(
        s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename")
    )
    tracemalloc.stop()
    assert len(m.rows()) == 100
    assert m.rows()[-1]["step"] == 1999
    # 1600 more steps (3200 rows recorded, 3100 evicted) leave no trace: the
    # history is the same size, the aggregates and histograms are fixed
    assert grown < 16 * 1024, grown


# ------------------------------------------------------------------ histograms
def test_histograms_cover_negatives_and_equal_one_histogram_of_everything():
    rng = np.random.default_rng(8)
    batches = [np.maximum(rng.standard_normal((10, 5)), 0) * 0.1]  # >= 0 first
    batches += [rng.standard_normal((10, 5)) * s for s in (0.5, 3.0, 40.0)]
    batches.append(np.zeros((10, 5)))
    results = []
    for order in (batches, batches[::-1]):
        m = Monitor(bins=64)
        for i, h in enumerate(order):
            m.record(i, "h", activations=h)
        results.append(m.histogram("h"))
    (edges, counts), (edges_r, counts_r) = results
    allv = np.concatenate([b.ravel() for b in batches])
    assert edges[0] < allv.min() and allv.max() < edges[-1]
    assert edges[0] == -edges[-1] and math.log2(edges[-1]).is_integer()
    assert edges[-1] / 2 <= np.abs(allv).max()  # the smallest power of two
    want, _ = np.histogram(allv, bins=edges)
    np.testing.assert_array_equal(counts, want)
    # whatever the order of the records
    np.testing.assert_array_equal(edges, edges_r)
    np.testing.assert_array_equal(counts, counts_r)


def test_nonnegative_histograms_keep_every_bin_on_the_values():
    m = Monitor(bins=8)
    m.record(0, "relu", activations=np.array([[0.0, 0.3], [0.9, 1.7]]))
    edges, counts = m.histogram("relu")
    np.testing.assert_array_equal(edges, np.linspace(0, 2, 9))
    np.testing.assert_array_equal(counts, [1, 1, 0, 1, 0, 0, 1, 0])


# ------------------------------------------------------------------ threads
def test_record_from_a_thread_pool_equals_serial():
    rng = np.random.default_rng(9)
    tasks = []
    for step in range(30):
        for layer in ("a", "b", "c"):
            h = rng.standard_normal((6, 8))
            if step == 17 and layer == "b":
                h[0, 0] = np.nan
            tasks.append((step, layer, h, rng.standard_normal((6, 8))))

    def run(pool: bool):
        m = Monitor(bins=16)

        def one(t):
            m.record(t[0], t[1], activations=t[2], grads=t[3])

        if pool:
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(one, tasks[::-1]))
        else:
            for t in tasks:
                one(t)
        return m

    s, p = run(False), run(True)
    key = lambda r: (r["step"], r["layer"])  # noqa: E731
    rs, rp = sorted(s.rows(), key=key), sorted(p.rows(), key=key)
    assert json.dumps(rs) == json.dumps(rp)  # bit for bit, NaN included
    assert s.findings == p.findings and len(s.findings) == 1
    for layer in "abc":
        np.testing.assert_array_equal(s.histogram(layer)[1], p.histogram(layer)[1])
        np.testing.assert_array_equal(s.histogram(layer)[0], p.histogram(layer)[0])
        for k, a in s.summary()[layer].items():
            b = p.summary()[layer][k]
            assert (a["count"], a["min"], a["max"], a["last_step"]) == (
                b["count"],
                b["min"],
                b["max"],
                b["last_step"],
            )
            # Welford's running mean: equal up to the rounding of the order
            assert b["mean"] == pytest.approx(a["mean"], rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------ sinks
@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_file_sinks_round_trip_and_append(tmp_path, ext):
    rng = np.random.default_rng(10)
    path = tmp_path / f"run{ext}"
    with Monitor(sink=str(path)) as m:
        for step in range(3):
            h = rng.standard_normal((4, 3))
            h[0, 0] = np.nan if step == 1 else h[0, 0]
            m.record(step, "l1", activations=h)
            m.record(step, "l1", grads=h, params={"weight": h})
    assert json.dumps(read_rows(path)) == json.dumps(m.rows())
    with Monitor(sink=path) as m2:  # appends: no second header
        m2.record(7, "l2", activations=rng.standard_normal((2, 2)))
    rows = read_rows(path)
    assert [(r["step"], r["layer"]) for r in rows][-1] == (7, "l2") and len(rows) == 4


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from initdiag import Monitor
    m = Monitor(sink=[sys.argv[1], sys.argv[2]], backend="numpy")
    rng = np.random.default_rng(0)
    step = 0
    while True:
        m.record(step, "l1", activations=rng.standard_normal((4, 3)))
        step += 1
    """
)


def test_a_killed_process_keeps_what_was_written(tmp_path):
    csv_path, jl_path = tmp_path / "run.csv", tmp_path / "run.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(csv_path), str(jl_path)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if jl_path.exists() and jl_path.read_text().count("\n") >= 50:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    for p in (csv_path, jl_path):
        if p == jl_path:  # a line cut by the kill is the only thing lost
            text = p.read_text()
            p.write_text(text[: text.rfind("\n") + 1])
        rows = read_rows(p)
        assert len(rows) >= 50
        assert [r["step"] for r in rows] == list(range(len(rows)))
        complete = rows[:-1]  # the last CSV record may have been cut between lines
        assert all(set(ACTIVATION_FIELDS) <= set(r) for r in complete)


class FakeWriter:
    """SummaryWriter's add_scalar / add_histogram, which (like TensorBoard)
    refuses NaN in a histogram."""

    def __init__(self):
        self.scalars, self.hists = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_histogram(self, tag, values, step):
        if not np.isfinite(values).all():
            raise ValueError("The histogram is empty, please file a bug report.")
        self.hists.append((tag, np.asarray(values).size, step))


def test_tensorboard_writer_gets_scalars_and_finite_histograms():
    w = FakeWriter()
    m = Monitor(sink=w, bins=8)
    h = np.ones((3, 4))
    h[0, 0] = np.nan
    m.record(2, "conv", activations=h, grads=np.ones((3, 4)))
    tags = {t for t, _, _ in w.scalars}
    assert {"conv/mean", "conv/dead_fraction", "conv/grad_second_moment"} <= tags
    assert ("conv/nonfinite_count", 1.0, 2) in w.scalars
    assert w.hists == [("conv/activations", 11, 2), ("conv/grads", 12, 2)]
    assert m.findings[0]["step"] == 2


def test_a_real_summary_writer_gets_scalars_references_and_finite_histograms(
    tmp_path,
):
    pytest.importorskip(
        "tensorboard",
        reason='needs tensorboard: pip install "initdiag[tensorboard]" '
        "(tensorboard==2.21.0)",
    )
    tb = pytest.importorskip(
        "torch.utils.tensorboard", reason="SummaryWriter needs torch (initdiag[torch])"
    )
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    rng = np.random.default_rng(21)
    writer = tb.SummaryWriter(log_dir=str(tmp_path))
    # the peer fault: SummaryWriter.add_histogram raises on an all-NaN tensor
    # (and writes NaN min / max / sum for a partly NaN one)
    with pytest.raises(ValueError):
        writer.add_histogram("raw", np.full(4, np.nan), 0)
    m = Monitor(sink=writer, bins=8)
    acts = {}
    for step in range(3):
        h = rng.standard_normal((16, 4))
        h[0, 0], h[1, 1] = np.nan, np.inf
        g = rng.standard_normal((16, 4)) if step != 1 else np.full((16, 4), np.nan)
        acts[step] = (h, g)
        m.record(step, "l1", activations=h, grads=g, params={"weight": h[:4]})
        m.record(step, "l2", activations=np.abs(h))
    m.record_reference(0, "l1", {"second_moment": 0.75}, source="analytic")
    m.close()  # flushes; the writer is the caller's
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    rows = {(r["step"], r["layer"]): r for r in m.rows() if r["source"] == "measured"}
    written = 0
    for (step, layer), r in rows.items():
        for k, v in r.items():
            if k in ("step", "layer", "source"):
                continue
            got = {e.step: e.value for e in acc.Scalars(f"{layer}/{k}")}
            # TensorBoard stores float32
            np.testing.assert_allclose(got[step], np.float32(v), rtol=1e-7)
            written += 1
    assert written == sum(len(r) - 3 for r in rows.values())
    assert [(e.step, e.value) for e in acc.Scalars("l1/second_moment/analytic")] == [
        (0, 0.75)
    ]
    hist = {e.step: e.histogram_value for e in acc.Histograms("l1/activations")}
    ghist = {e.step: e.histogram_value for e in acc.Histograms("l1/grads")}
    assert sorted(hist) == [0, 1, 2] and sorted(ghist) == [0, 2]  # all-NaN: none
    for step, (h, g) in acts.items():
        fin = h[np.isfinite(h)]
        hv = hist[step]
        assert hv.num == fin.size == h.size - 2
        assert (hv.min, hv.max) == (fin.min(), fin.max())
        assert hv.sum == pytest.approx(fin.sum(), rel=1e-12)
        if step != 1:
            assert ghist[step].num == g.size
    assert {f["tensor"] for f in m.findings if f["step"] == 1} == {
        "activations",
        "grads",
        "weight",
    }


def test_reference_rows_sit_beside_the_measured_ones(tmp_path):
    class OnlyWrite:  # a sink without write_reference gets the measured rows only
        def __init__(self):
            self.calls = []

        def write(self, step, layer, values):
            self.calls.append((step, layer))

    own = OnlyWrite()
    w = FakeWriter()
    m = Monitor(sink=[own, w, str(tmp_path / "r.csv")])
    m.record(0, "a", activations=np.ones((2, 2)))
    m.record_reference(0, "a", {"mean": 2.0, "output_rows": 2}, source="analytic")
    m.record_reference(0, "a", {"variance": np.float32(0.5)}, source="analytic")
    measured, ref = m.rows()
    assert (measured["source"], measured["mean"]) == ("measured", 1.0)
    assert ref == {
        "step": 0,
        "layer": "a",
        "source": "analytic",
        "mean": 2.0,
        "output_rows": 2.0,
        "variance": 0.5,
    }
    assert m.summary()["a"]["mean"]["count"] == 1  # references stay out
    assert own.calls == [(0, "a")]
    assert ("a/mean/analytic", 2.0, 0) in w.scalars
    m.close()
    assert json.dumps(read_rows(tmp_path / "r.csv")) == json.dumps(m.rows())
    h = Monitor(history=2)  # a history per kind of row
    h.record_reference(0, "a", {"mean": 2.0}, source="analytic")
    for step in (1, 2, 3):
        h.record(step, "a", activations=np.ones((2, 2)))
    assert [(r["step"], r["source"]) for r in h.rows()] == [
        (0, "analytic"),
        (2, "measured"),
        (3, "measured"),
    ]
    for step in (4, 5):
        h.record_reference(step, "a", {"mean": 2.0}, source="analytic")
    assert [(r["step"], r["source"]) for r in h.rows()] == [
        (2, "measured"),
        (3, "measured"),
        (4, "analytic"),
        (5, "analytic"),
    ]


def test_files_of_the_older_format_are_read_and_not_appended_to(tmp_path):
    old_csv = tmp_path / "old.csv"
    old_csv.write_text("step,layer,statistic,value\n0,a,mean,1.5\n0,a,mean2,nan\n")
    old_jl = tmp_path / "old.jsonl"
    old_jl.write_text('{"step": 3, "layer": "b", "mean": null}\n')
    got = read_rows(old_csv)[0]
    assert (got["source"], got["mean"], math.isnan(got["mean2"])) == (
        "measured",
        1.5,
        True,
    )
    got = read_rows(old_jl)[0]
    assert (got["step"], got["source"], math.isnan(got["mean"])) == (
        3,
        "measured",
        True,
    )
    with pytest.raises(ValueError, match="write to a new file"):
        Monitor(sink=str(old_csv))


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((0, "a", {"mean": 1.0}), ValueError, "source must be a non-empty string"),
        ((-1, "a", {"mean": 1.0}, "analytic"), ValueError, "step must be"),
        ((0, "", {"mean": 1.0}, "analytic"), TypeError, "layer must be"),
        ((0, "a", [1.0], "analytic"), TypeError, "values must be a mapping"),
        ((0, "a", {"source": 1.0}, "analytic"), ValueError, "statistic names"),
        ((0, "a", {"mean": "x"}, "analytic"), TypeError, r"values\['mean'\]"),
    ],
)
def test_record_reference_bad_input(args, exc, match):
    *pos, src = args if len(args) == 4 else (*args, "measured")
    with pytest.raises(exc, match=match):
        Monitor().record_reference(*pos, source=src)


def test_to_frame_or_how_to_get_pandas():
    m = Monitor()
    m.record(0, "a", activations=np.ones((2, 2)))
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install "initdiag\[frames\]"'):
            m.to_frame()
    else:
        m.record_reference(0, "a", {"mean": 0.5}, source="analytic")
        df = m.to_frame()
        assert list(df["step"]) == [0, 0] and list(df["mean"]) == [1.0, 0.5]
        assert list(df["source"]) == ["measured", "analytic"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"activations": [[1.0]]}, TypeError, "NumPy array, a PyTorch tensor"),
        ({"activations": np.ones((2, 2), dtype=np.int64)}, TypeError, "floating-point"),
        ({"activations": np.array(1.0)}, ValueError, "batch dimension"),
        (
            {"params": {"w": np.ones(2)}, "updates": {"b": np.ones(2)}},
            ValueError,
            "no parameter",
        ),
    ],
)
def test_bad_tensors_raise_saying_what_works(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Monitor().record(0, "a", **kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="step must be"):
        Monitor().record(-1, "a")
    with pytest.raises(TypeError, match="layer must be"):
        Monitor().record(0, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        Monitor(bins=10)
    with pytest.raises(ValueError, match="every must be"):
        Monitor(every=0)
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        Monitor(sink="run.txt")
    with pytest.raises(TypeError, match="sink must be"):
        Monitor(sink=3)


def test_float16_is_widened():
    h = np.array([[0.5, -1.0], [2.0, 0.0]], dtype=np.float16)
    got = Monitor().record(0, "a", activations=h)
    assert_stats(got, direct_activation(h.astype(np.float64)), 1e-6)  # float32 kernels


# ------------------------------------------------------------------ plots
def test_plot_and_monitor_report(tmp_path, capsys):
    rng = np.random.default_rng(11)
    path = tmp_path / "run.jsonl"
    with Monitor(sink=path) as m:
        for step in range(20):
            for layer in ("l1", "l2"):
                h = rng.standard_normal((4, 3))
                m.record(step, layer, activations=h, grads=h)
    fig = m.plot()
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == [
        "second_moment",
        "mean",
        "dead_fraction",
        "correlation",
        "grad_second_moment",
    ]
    line = axes[0].get_lines()[1]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(20))
    np.testing.assert_allclose(
        line.get_ydata(), [r["second_moment"] for r in m.rows() if r["layer"] == "l2"]
    )
    out = tmp_path / "plots"
    assert main(["monitor-report", str(path), "--out", str(out)]) == 0
    assert (out / "monitor.png").stat().st_size > 1000
    assert "2 layers, 20 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "cannot read"),
        ("hello\n", "neither the monitor CSV"),
        ("", "no rows"),
        ("step,layer,statistic,value\n0,a,mean,x\n", "not a number"),
        ("step,layer,source,statistic,value\n0,a,mean,1\n", "expected 5 fields"),
    ],
)
def test_monitor_report_bad_input_exits_2_with_one_line(
    tmp_path, capsys, content, match
):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    assert main(["monitor-report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_without_torch_the_monitor_works_and_torchmonitor_says_what_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import numpy as np
        import initdiag
        m = initdiag.Monitor(backend="numpy")
        assert m.record(0, "a", activations=np.ones((2, 2)))["mean"] == 1.0
        try:
            import initdiag.integrations._torch_monitor
        except ImportError as exc:
            print(exc)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert 'pip install "initdiag[torch]"' in res.stdout

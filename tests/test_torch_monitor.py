"""TorchMonitor in real training loops: every recorded statistic against a direct
computation from the tensors of an independent replica of the model, in-place
ReLU and ``out += identity``, hooks removed (also after an exception), NaN,
memory, torch.compile.  Skipped without torch."""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
import warnings

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="TorchMonitor needs torch (initdiag[torch])"
)
nn = torch.nn

from test_monitor import direct_activation  # noqa: E402

from initdiag.integrations._torch_monitor import TorchMonitor  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's BasicBlock shape: in-place ReLU and ``out += identity``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu2(out)


def mlp():
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 12), nn.Tanh(),
        nn.Linear(12, 3),
    )  # fmt: skip


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        BasicBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def reference(make, model, x, y):
    """The tensors of one training step, by a replica with the same state:
    ``{layer: (output before any later in-place op, dL/doutput)}`` and the
    parameter gradients."""
    rep = make()
    rep.load_state_dict(model.state_dict())
    for m in rep.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    outs, handles = {}, []
    for name, m in rep.named_modules():
        if next(m.children(), None) is None:

            def keep(mod, args, out, name=name):
                out.retain_grad()
                outs[name] = (out, out.detach().clone())

            handles.append(m.register_forward_hook(keep))
    nn.functional.mse_loss(rep(x), y).backward()
    for h in handles:
        h.remove()
    acts = {k: (v.numpy(), t.grad.numpy()) for k, (t, v) in outs.items()}
    grads = {k: p.grad.numpy().copy() for k, p in rep.named_parameters()}
    params = {k: p.detach().numpy().copy() for k, p in rep.named_parameters()}
    return acts, grads, params


@pytest.mark.parametrize("make,shape", [(mlp, (8, 6)), (cnn, (8, 2, 5, 5))])
def test_training_loop_statistics_equal_direct_computation(make, shape):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    refs = {}
    with TorchMonitor(model, every=10) as tm:
        for step in range(100):
            x = torch.randn(shape, generator=g)
            y = torch.randn(8, 3, generator=g)
            if tm.monitor.sampled(step):
                refs[step] = reference(make, model, x, y)
            tm.step(step)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if tm.monitor.sampled(step):
                new = {
                    k: p.detach().numpy().copy() for k, p in model.named_parameters()
                }
                refs[step] = (*refs[step], new)
    rows = {(r["step"], r["layer"]): r for r in tm.monitor.rows()}
    leaves = [n for n, m in model.named_modules() if next(m.children(), None) is None]
    assert sorted({s for s, _ in rows}) == list(range(0, 100, 10))
    assert {n for _, n in rows} == set(leaves)  # parameter-free modules included
    checked = 0
    for step, (acts, pgrads, params, new) in refs.items():
        for layer in leaves:
            r = rows[(step, layer)]
            h, dh = acts[layer]
            want = direct_activation(h)
            want["grad_second_moment"] = np.mean(dh.astype(np.float64) ** 2)
            want["grad_norm2"] = np.sum(dh.astype(np.float64) ** 2)
            prefix = f"{layer}."
            for full, p in params.items():
                if full.rsplit(".", 1)[0] == layer:
                    pn = full[len(prefix) :]
                    p64, d = p.astype(np.float64), new[full] - p
                    want[f"{pn}_mean"] = p64.mean()
                    want[f"{pn}_variance"] = p64.var()
                    want[f"{pn}_norm2"] = (p64**2).sum()
                    want[f"{pn}_grad_norm2"] = (
                        pgrads[full].astype(np.float64) ** 2
                    ).sum()
                    with np.errstate(divide="ignore"):  # BatchNorm's beta = 0
                        ratio = np.linalg.norm(d) / np.linalg.norm(p64)
                    want[f"{pn}_update_ratio"] = ratio
            for k, v in want.items():
                assert r[k] == pytest.approx(v, rel=2e-5, abs=1e-7), (step, layer, k)
                checked += 1
            assert set(r) - {"step", "layer", "source", "grad_nonfinite_count"} == set(
                want
            )
    assert checked >= 10 * len(leaves) * 11  # every step, layer and statistic


def test_inplace_relu_and_residual_add_are_monitored_where_they_happen():
    torch.manual_seed(3)
    model = cnn()
    x, y = torch.randn(8, 2, 5, 5), torch.randn(8, 3)
    acts, *_ = reference(cnn, model, x, y)
    with TorchMonitor(model) as tm:
        tm.step(0)
        nn.functional.mse_loss(model(x), y).backward()
    rows = {r["layer"]: r for r in tm.monitor.rows()}
    # bn1's row is before the in-place ReLU that overwrites its output ...
    assert rows["3.bn1"]["active_fraction"] < 0.75
    assert rows["3.bn1"]["mean"] == pytest.approx(0.0, abs=1e-6)  # BatchNorm
    # ... and relu's row after it; its gradient is that of the ReLU output
    assert rows["3.relu"]["zero_fraction"] == pytest.approx(
        (acts["3.relu"][0] == 0).mean()
    )
    bn1_grad = acts["3.bn1"][1]
    assert rows["3.bn1"]["grad_norm2"] == pytest.approx(
        float((bn1_grad.astype(np.float64) ** 2).sum()), rel=1e-5
    )
    # bn2's row is before `out += identity`, relu2's after the sum
    h = acts["3.bn2"][0]
    assert rows["3.bn2"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert rows["3.bn2"]["second_moment"] == pytest.approx(
        float((h.astype(np.float64) ** 2).mean()), rel=1e-5
    )
    assert rows["3.relu2"]["second_moment"] == pytest.approx(
        float((acts["3.relu2"][0].astype(np.float64) ** 2).mean()), rel=1e-5
    )


def _hooks(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def test_no_hook_remains_after_the_context_also_after_an_exception():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    with TorchMonitor(model, optimizer=opt) as tm:
        for _ in range(3):
            out = model(x)
            assert _hooks(model) > 0
            loss = nn.functional.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert _hooks(model) == 0 and not opt._optimizer_step_post_hooks
    assert sorted({r["step"] for r in tm.monitor.rows()}) == [0, 1, 2]
    with pytest.raises(ZeroDivisionError):
        with TorchMonitor(model) as tm2:
            tm2.step(0)
            kept = model(x)  # a graph built inside, its tensor hooks pending
            assert _hooks(model) > 0
            1 / 0  # noqa: B018
    assert _hooks(model) == 0
    before = len(tm2.monitor.rows())
    nn.functional.mse_loss(kept, y).backward()  # the output hooks are gone too
    assert len(tm2.monitor.rows()) == before
    assert not any("grad_norm2" in r for r in tm2.monitor.rows())


def test_nan_at_step_50_is_a_finding_and_training_goes_on():
    torch.manual_seed(4)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with TorchMonitor(model, every=1, optimizer=opt) as tm:
        for step in range(100):
            x, y = torch.randn(4, 6), torch.randn(4, 3)
            if step == 50:
                x[0, 0] = float("nan")
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if step == 50:  # the run survives by skipping the poisoned update
                opt.zero_grad()
            opt.step()
    found = tm.monitor.findings
    assert found and {f["step"] for f in found} == {50}
    assert {f["layer"] for f in found if f["tensor"] == "activations"} == {
        "0", "1", "2", "3", "4",
    }  # fmt: skip
    assert max(r["step"] for r in tm.monitor.rows()) == 99
    assert all(math.isfinite(r["mean"]) for r in tm.monitor.rows() if r["step"] > 50)


def test_memory_is_bounded_over_2000_steps():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 4), torch.randn(4, 2)

    def train(tm, n):
        for _ in range(n):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    with TorchMonitor(model, every=5, optimizer=opt, history=60, bins=16) as tm:
        train(tm, 200)
        tracemalloc.start()
        train(tm, 200)
        gc.collect()  # count what is live, not cycles awaiting the collector
        base = tracemalloc.take_snapshot()
        train(tm, 1600)
        gc.collect()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
    grown = sum(s.size_diff for s in snap.compare_to(base, "filename"))
    assert tm.current_step is None and len(tm.monitor.rows()) == 60
    assert tm.monitor.summary()["0"]["mean"]["count"] == 400
    assert grown < 32 * 1024, grown


def test_cpu_tensors_reach_the_kernels_without_copies(monkeypatch):
    import initdiag.kernels as k

    seen = []
    real = k.layer_stats

    def spy(x, **kw):
        seen.append(x)
        return real(x, **kw)

    monkeypatch.setattr(k, "layer_stats", spy)
    from initdiag import Monitor

    t = torch.randn(6, 5, requires_grad=True) * 1.0
    c = torch.randn(3, 2, 4, 4)
    m = Monitor(backend="numba")
    m.record(0, "a", activations=t)
    m.record(0, "c", activations=c)
    assert np.shares_memory(seen[0], t.detach().numpy())
    assert np.shares_memory(seen[1], c.numpy())


def test_torch_compile_warns_instead_of_failing():
    torch.manual_seed(6)
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TorchMonitor(compiled, optimizer=opt) as tm:
            for _ in range(3):
                loss = nn.functional.mse_loss(compiled(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    text = " ".join(str(w.message) for w in caught)
    assert "compiled" in text and "parameters, their gradients and updates" in text
    rows = tm.monitor.rows()
    assert rows and all("weight_update_ratio" in r for r in rows)
    assert _hooks(model) == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TorchMonitor(object())
    with pytest.raises(ValueError, match="not a module of the model"):
        TorchMonitor(mlp(), modules=["nope"])
    tm = TorchMonitor(mlp(), modules=[nn.Linear])
    assert [n for n, _ in tm.modules] == ["0", "2", "4"]
    with pytest.raises(RuntimeError, match="inside"):
        tm.step(0)


class TwoHeads(nn.Module):
    def forward(self, x):
        return x, -x


def test_outputs_that_are_not_float_tensors_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(3, 4), TwoHeads())
    with TorchMonitor(model) as tm:
        tm.step(0)
        model(torch.randn(2, 3))
    assert tm.skipped == {"1": "its output is a tuple, not a tensor"}
    assert [r["layer"] for r in tm.monitor.rows()] == ["0"]


# ------------------------------------------------------------------ the step-0 link
WIDTH, BATCH, SEEDS = 256, 64, 8


def wide_mlp():
    return nn.Sequential(
        nn.Linear(16, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(inplace=True),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, 10),
    )  # fmt: skip


def _scale(column, m, B):
    """The stated rescaling of a Profile column onto the monitor's raw scale."""
    if column == "grad_second_moment":
        return m
    return B * m if column.endswith("_grad_norm2") else 1.0


#: the Profile columns the step-0 link carries for a Linear / ReLU MLP (named
#: alike in the monitor's rows)
LINKED = (
    "mean", "second_moment", "variance", "squared_mean", "correlation",
    "active_fraction", "dead_fraction", "grad_second_moment",
    "weight_grad_norm2", "bias_grad_norm2",
)  # fmt: skip


@pytest.fixture(scope="module")
def step0_run(tmp_path_factory):
    """A training run with the step-0 link, the probe loss of diagnose at step 0
    (an output gradient G independent of the forward pass) and MSE after; and an
    independent diagnose of the same model."""
    from initdiag.integrations.torch import diagnose

    tmp = tmp_path_factory.mktemp("step0")
    torch.manual_seed(11)
    model = wide_mlp()
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(BATCH, 16, generator=g)
    # a non-unit output gradient, so that the rescaling by m shows
    G = 0.1 * torch.randn(BATCH, 10, generator=g)
    d = diagnose(model, x0, seeds=SEEDS, kernels=False)
    paths = [tmp / "run.csv", tmp / "run.jsonl"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with TorchMonitor(
        model,
        every=10,
        optimizer=opt,
        sink=[str(p) for p in paths],
        predict=x0,
        predict_options={"seeds": SEEDS},
    ) as tm:
        for step in range(30):
            if step == 0:
                loss = (model(x0) * G).sum()
            else:
                x = torch.randn(BATCH, 16, generator=g)
                loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :10]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    m = float(G.double().pow(2).mean())
    return tm, d, x0, m, paths


def _rows(tm, source, step=0):
    return {
        r["layer"]: r
        for r in tm.monitor.rows()
        if r["source"] == source and r["step"] == step
    }


def test_predicted_rows_are_diagnoses_columns_rescaled_by_the_measured_output_gradient(
    step0_run,
):
    tm, d, _, m, _ = step0_run
    assert tm.diagnosis is not None and _hooks(tm.model) == 0
    for source, prof in (("analytic", d.analytic), ("ensemble", d.measured)):
        rows = _rows(tm, source)
        # nn.Sequential: module k is the network's k-th row
        assert sorted(rows, key=int) == [str(k) for k in range(len(d.network.names))]
        for name, r in rows.items():
            i = int(name)
            want = {}
            for c in LINKED:
                v = prof.columns[c][i]
                if np.isfinite(v):
                    want[c] = v * _scale(c, m, BATCH)
            assert set(r) - {"step", "layer", "source"} == {
                *want,
                "output_grad_second_moment",
                "output_rows",
            }
            assert r["output_grad_second_moment"] == pytest.approx(m, rel=1e-12)
            assert r["output_rows"] == BATCH
            for k, v in want.items():
                assert r[k] == pytest.approx(v, rel=1e-12, abs=1e-300), (
                    source,
                    name,
                    k,
                )
    # the readout's gradient is the output gradient itself: 1 x m
    assert _rows(tm, "analytic")["6"]["grad_second_moment"] == pytest.approx(
        m, rel=1e-12
    )


def test_measured_step0_agrees_with_the_prediction(step0_run):
    """The step-0 rows are one draw of the initialisation diagnose averages over:
    against its measured column within 4 single-draw standard deviations (sd = se
    sqrt(seeds), the draw and the mean independent: sd sqrt(1 + 1/seeds)); against
    the analytic column within 4 sd plus the finite-width and input terms of
    tests/test_torch_integration.py (5 sum 1/n over the dense layers the signal
    passed, the input's spread v / 2), for the columns that term covers."""
    tm, d, x0, m, _ = step0_run
    measured, S = _rows(tm, "measured"), SEEDS
    e, a = d.measured, d.analytic
    infos = d.network.infos
    inv = np.array([1 / i.width if i.kind == "dense" else 0.0 for i in infos])
    inv_hidden = inv.copy()
    inv_hidden[-1] = 0.0
    beta_fwd = 5 * (np.cumsum(inv) - inv)
    beta_grad = 5 * (inv_hidden[::-1].cumsum()[::-1] - inv_hidden)
    beta = {
        "second_moment": beta_fwd,
        "grad_second_moment": beta_grad,
        "weight_grad_norm2": beta_fwd + beta_grad,
        "bias_grad_norm2": beta_grad,
    }
    qb = (x0.double() ** 2).mean(dim=1)
    v = float(qb.var(unbiased=False) / qb.mean() ** 2)
    n_ens = n_ana = 0
    worst = {"ensemble": 0.0, "analytic": 0.0}
    for name, r in measured.items():
        i = int(name)
        for c in LINKED:
            if not np.isfinite(e.columns[c][i]):  # a column the row lacks
                assert c not in r, (name, c)
                continue
            got = r[c] / _scale(c, m, BATCH)  # back on the Profile's scale
            sd = e.columns[f"{c}_se"][i] * np.sqrt(S)
            # float32 rounding of the statistics (measured in float32)
            f32 = 1e-5 * abs(got) + 1e-9
            tol = 4 * sd * np.sqrt(1 + 1 / S) + f32
            diff = abs(got - e.columns[c][i])
            assert diff <= tol, (name, c, got, e.columns[c][i], tol)
            worst["ensemble"] = max(worst["ensemble"], diff / tol)
            n_ens += 1
            if c in beta and np.isfinite(a.columns[c][i]):
                ana = a.columns[c][i]
                tol = 4 * sd + (beta[c][i] + v / 2) * abs(ana) + f32
                assert abs(got - ana) <= tol, (name, c, got, ana, tol)
                worst["analytic"] = max(worst["analytic"], abs(got - ana) / tol)
                n_ana += 1
    assert n_ens >= 7 * 6 and n_ana >= 7 * 2
    print(
        f"step 0 vs the prediction, worst |diff| / tol {worst}, {n_ens} / {n_ana} cells"
    )


def test_prediction_round_trips_through_the_files_and_is_plotted(step0_run, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import LineCollection

    from initdiag.cli import main as cli
    from initdiag.monitor import plot_rows, read_rows

    tm, *_, paths = step0_run
    rows = tm.monitor.rows()
    assert {r["source"] for r in rows} == {"measured", "analytic", "ensemble"}
    for p in paths:
        assert json.dumps(read_rows(p)) == json.dumps(rows), p
    refs = [r for r in rows if r["source"] != "measured"]
    for fig in (tm.monitor.plot(), plot_rows(read_rows(paths[1]))):
        axes = {ax.get_title(): ax for ax in fig.axes}
        for c in ("second_moment", "grad_second_moment"):
            segs = [
                seg
                for coll in axes[c].collections
                if isinstance(coll, LineCollection)
                for seg in coll.get_segments()
            ]
            # one horizontal line per reference row, from step 0 to the last step
            np.testing.assert_allclose(
                sorted(seg[0][1] for seg in segs), sorted(r[c] for r in refs)
            )
            assert {tuple(seg[:, 0]) for seg in segs} == {(0, 20)}
            assert all(seg[0][1] == seg[1][1] for seg in segs)
        note = " ".join(t.get_text() for t in axes["grad_second_moment"].texts)
        assert "analytic x m" in note and "E[g_out^2] measured at step 0" in note
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert "analytic (step 0)" in legend and "ensemble (step 0)" in legend
    assert cli(["monitor-report", str(paths[0]), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "monitor.png").stat().st_size > 0


def test_a_precomputed_diagnosis_and_a_step0_without_backward(step0_run):
    tm0, d, x0, *_ = step0_run
    torch.manual_seed(11)
    model = wide_mlp()  # the same initial model as step0_run's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TorchMonitor(model, predict=d) as tm:
            tm.step(0)
            with torch.no_grad():
                model(x0)
    assert "no gradient reached the model's output at step 0" in " ".join(
        str(w.message) for w in caught
    )
    rows = _rows(tm, "analytic")
    assert rows["2"]["second_moment"] == _rows(tm0, "analytic")["2"]["second_moment"]
    assert not any(
        k.startswith("grad") or "grad_norm2" in k for r in rows.values() for k in r
    )
    assert "output_rows" not in rows["2"]


def test_the_prediction_is_written_when_the_first_step_fails():
    torch.manual_seed(2)
    model = mlp()
    x = torch.randn(8, 6)
    with pytest.raises(RuntimeError, match="first step"):
        with TorchMonitor(model, predict=x, predict_options={"seeds": 2}) as tm:
            tm.step(0)
            (model(x) ** 2).sum().backward()
            raise RuntimeError("the loop fails in its first step")
    assert {r["source"] for r in tm.monitor.rows()} == {
        "measured",
        "analytic",
        "ensemble",
    }
    assert _hooks(model) == 0


def test_conv_rows_leave_correlation_out_of_the_prediction():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 3)
    )
    x = torch.randn(8, 2, 5, 5)
    with TorchMonitor(model, predict=x, predict_options={"seeds": 2}) as tm:
        tm.step(0)
        model(x).sum().backward()
    rows = _rows(tm, "ensemble")
    assert "correlation" not in rows["0"] and "correlation" not in rows["1"]
    assert "correlation" in rows["3"] and "2" not in rows  # Flatten: passed through
    assert rows["3"]["output_rows"] == 8


def test_predict_bad_arguments():
    with pytest.raises(TypeError, match="example input batch"):
        TorchMonitor(mlp(), predict=[1, 2])
    with pytest.raises(ValueError, match="predict_options needs predict="):
        TorchMonitor(mlp(), predict_options={"seeds": 2})
    on_meta = nn.Linear(6, 3, device="meta")  # as a model on cuda: not the host
    with pytest.raises(
        ValueError, match=r"on the CPU; got tensors on \['cpu', 'meta'\]"
    ):
        TorchMonitor(on_meta, predict=torch.randn(4, 6))
    with pytest.raises(TypeError, match=r"\['seed'\] are not diagnose options"):
        TorchMonitor(mlp(), predict=torch.randn(4, 6), predict_options={"seed": 2})

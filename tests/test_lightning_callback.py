"""InitdiagCallback in a 20-step ``Trainer.fit`` on CPU (skipped without lightning)."""

from __future__ import annotations

import csv

import pytest

torch = pytest.importorskip("torch", reason="needs torch (initdiag[torch])")
pl = pytest.importorskip(
    "lightning.pytorch", reason="needs lightning (pip install lightning==2.6.0)"
)
nn = torch.nn

from initdiag.integrations.lightning import InitdiagCallback  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(model, loader, cb, tmp_path, max_steps: int) -> None:
    """``Trainer.fit`` on the CPU, quiet, logging to CSV under ``tmp_path``."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)


def _logged(tmp_path) -> list[dict]:
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_trainer_fit_logs_the_statistics(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(160, 4), torch.randn(160, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Tiny()
    cb = InitdiagCallback(every=5)
    _fit(model, loader, cb, tmp_path, 20)
    rows = cb.monitor.rows()
    assert sorted({r["step"] for r in rows}) == [0, 5, 10, 15]
    assert {r["layer"] for r in rows} == {"net.0", "net.1", "net.2"}
    assert all("weight_update_ratio" in r for r in rows if r["layer"] != "net.1")
    logged = _logged(tmp_path)
    key = "initdiag/net.1/dead_fraction"
    steps = sorted({int(r["step"]) for r in logged if r.get(key)})
    assert steps == [0, 5, 10, 15]
    r5 = next(r for r in rows if r["step"] == 5 and r["layer"] == "net.1")
    got = next(float(r[key]) for r in logged if r.get(key) and int(r["step"]) == 5)
    assert got == pytest.approx(r5["dead_fraction"])
    for m in model.modules():
        assert not m._forward_hooks


def test_lightning_callback_logs_the_prediction(tmp_path):
    # the step-0 link (issue 17): the analytic prediction logged beside step 0
    torch.manual_seed(0)
    X, Y = torch.randn(80, 6), torch.randn(80, 3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=8
    )
    net = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 12), nn.Tanh(),
        nn.Linear(12, 3),
    )  # fmt: skip
    cb = InitdiagCallback(every=5, predict=X[:8], predict_options={"seeds": 2})
    _fit(Tiny(net), loader, cb, tmp_path, 10)
    ref = {r["layer"]: r for r in cb.monitor.rows() if r["source"] == "analytic"}
    assert set(ref) == {"net.0", "net.1", "net.2", "net.3", "net.4"}
    logged = _logged(tmp_path)
    key = "initdiag/net.2/grad_second_moment/analytic"
    got = [(int(r["step"]), float(r[key])) for r in logged if r.get(key)]
    assert got == [(0, pytest.approx(ref["net.2"]["grad_second_moment"]))]

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
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)
        )

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_trainer_fit_logs_the_statistics(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(160, 4), torch.randn(160, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Tiny()
    cb = InitdiagCallback(every=5)
    trainer = pl.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    rows = cb.monitor.rows()
    assert sorted({r["step"] for r in rows}) == [0, 5, 10, 15]
    assert {r["layer"] for r in rows} == {"net.0", "net.1", "net.2"}
    assert all("weight_update_ratio" in r for r in rows if r["layer"] != "net.1")
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        logged = list(csv.DictReader(fh))
    key = "initdiag/net.1/dead_fraction"
    steps = sorted({int(r["step"]) for r in logged if r.get(key)})
    assert steps == [0, 5, 10, 15]
    r5 = next(r for r in rows if r["step"] == 5 and r["layer"] == "net.1")
    got = next(float(r[key]) for r in logged if r.get(key) and int(r["step"]) == 5)
    assert got == pytest.approx(r5["dead_fraction"])
    for m in model.modules():
        assert not m._forward_hooks

"""Monitor the first few hundred steps of a small MLP and a small CNN.

    python examples/monitor_training.py [--steps 300] [--out monitor_example]

Synthetic data (a random teacher network), SGD, ``TorchMonitor`` on every leaf
module every 5 steps, with the step-0 link: ``predict=`` the first batch, so
``diagnose``'s prediction at initialisation (analytic and over 8 fresh
initialisations) is written beside the measured rows of step 0, gradient columns
times the output-gradient second moment measured there, and drawn as dashed /
dotted lines the measured curves drift away from.  Each run writes
``DIR/<model>.jsonl`` and its plot ``DIR/<model>/monitor.png`` (the same as
``initdiag monitor-report FILE``) and prints step 0 against the prediction.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from initdiag.cli import main as initdiag_cli
from initdiag.integrations.torch import TorchMonitor


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(inplace=True),
        nn.Linear(128, 128), nn.ReLU(inplace=True),
        nn.Linear(128, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


SOURCES = ("analytic", "ensemble", "measured")


def run(name: str, model: nn.Module, shape: tuple, steps: int, out: str) -> str:
    g = torch.Generator().manual_seed(0)
    teacher = nn.Linear(int(torch.tensor(shape).prod()), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = os.path.join(out, f"{name}.jsonl")
    if os.path.exists(path):
        os.remove(path)  # the sinks append
    first = torch.randn(64, *shape, generator=g)
    with TorchMonitor(model, every=5, sink=path, optimizer=opt, predict=first) as tm:
        for i in range(steps):
            x = first if i == 0 else torch.randn(64, *shape, generator=g)
            with torch.no_grad():
                y = teacher(x.flatten(1)).argmax(1)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"{name}: {len(tm.monitor.rows())} rows, findings: {tm.monitor.findings}")
    at0 = {(r["layer"], r["source"]): r for r in tm.monitor.rows() if r["step"] == 0}
    last = max(r["step"] for r in tm.monitor.rows())
    now = {r["layer"]: r for r in tm.monitor.rows() if r["step"] == last}
    for k, note in tm.diagnosis.notes.items():
        print(f"  diagnose's note ({k}): {note}")
    print(f"  second_moment: analytic / ensemble at init / step 0 / step {last}")
    for layer in tm.prediction.get("ensemble", {}):
        cells = [at0.get((layer, s), {}).get("second_moment") for s in SOURCES]
        cells.append(now[layer]["second_moment"])
        print(
            f"  {layer:>4}  "
            + "  ".join("-" if v is None else f"{v:9.4g}" for v in cells)
        )
    initdiag_cli(["monitor-report", path, "--out", os.path.join(out, name)])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="monitor_example")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    run("mlp", mlp(), (32,), args.steps, args.out)
    run("cnn", cnn(), (3, 8, 8), args.steps, args.out)


if __name__ == "__main__":
    main()

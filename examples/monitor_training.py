"""Monitor the first few hundred steps of a small MLP and a small CNN.

    python examples/monitor_training.py [--steps 300] [--out monitor_example]

Synthetic data (a random teacher network), SGD, ``TorchMonitor`` on every leaf
module every 5 steps; each run writes ``DIR/<model>.jsonl`` and its plot
``DIR/<model>/monitor.png`` (the same as ``initdiag monitor-report FILE``).
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


def run(name: str, model: nn.Module, shape: tuple, steps: int, out: str) -> str:
    g = torch.Generator().manual_seed(0)
    teacher = nn.Linear(int(torch.tensor(shape).prod()), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = os.path.join(out, f"{name}.jsonl")
    if os.path.exists(path):
        os.remove(path)  # the sinks append
    with TorchMonitor(model, every=5, sink=path, optimizer=opt) as tm:
        for _ in range(steps):
            x = torch.randn(64, *shape, generator=g)
            with torch.no_grad():
                y = teacher(x.flatten(1)).argmax(1)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"{name}: {len(tm.monitor.rows())} rows, findings: {tm.monitor.findings}")
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

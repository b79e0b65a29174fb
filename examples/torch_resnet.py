"""Diagnose, audit and fix a small ResNet (torchvision's BasicBlock on features).

Run: ``python examples/torch_resnet.py`` (needs the torch extra).  It reads the
model as an initdiag network, prints the coverage table, the audit of its
parameters (nn.Linear's default init), the measured profile beside the
analytic one, then fixes the initialisation (edge of chaos for every
Linear -> ReLU, zero-init of every residual branch) and shows chi1 and the
gradient profile before and after.  Last, a model with a module initdiag cannot
map (``nn.Mish``): ``fix`` takes the data route there, measuring each layer's
Jacobian gain in execution order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from initdiag.integrations import torch as itorch


class Block(nn.Module):
    """A pre-activation residual block: x + fc2(relu(fc1(relu(x))))."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


def small_resnet(width: int = 128, blocks: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, width),
        *[Block(width) for _ in range(blocks)],
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def main() -> None:
    torch.manual_seed(0)
    model = small_resnet()
    x = torch.randn(64, 32)

    network, coverage = itorch.read(model, x)
    print(network.describe(), "\n")
    print(coverage, "\n")
    print(itorch.audit(model), "\n")

    d = itorch.diagnose(model, x, seeds=4)
    print(d, "\n")

    res = itorch.fix(model, x, residual="zero_gamma", seeds=4)
    print(res, "\n")
    before, after = res.measured["before"], res.measured["after"]
    print("row                      grad_second_moment before -> after (measured)")
    for i, name in enumerate(before.name):
        g0 = before.columns["grad_second_moment"][i]
        g1 = after.columns["grad_second_moment"][i]
        print(f"{name:<24} {g0:10.4g} -> {g1:10.4g}")
    # dry_run=True (the default) left the model alone; apply it:
    itorch.fix(model, x, residual="zero_gamma", seeds=2, dry_run=False)

    # what the theory cannot map: the data route (method="auto" picks it)
    mish = nn.Sequential(
        nn.Linear(32, 128),
        nn.Mish(),
        nn.Linear(128, 128),
        nn.Mish(),
        nn.Linear(128, 10),
    )
    res = itorch.fix(mish, x, seeds=2)
    print(res)  # the per-layer route, scale and measured gain


if __name__ == "__main__":
    main()

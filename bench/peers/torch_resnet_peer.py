"""PyTorch CPU peer of the residual workload, written as a careful user would.

The network of ``initdiag.resnet_mlp(blocks, width, norm="batchnorm",
norm_position="post")``: a stem ``nn.Linear(width, width)``, then ``blocks`` blocks
``out = x + bn2(fc2(relu(bn1(fc1(x)))))``.  The model is built once and
re-initialised in place per seed with ``nn.init`` (Kaiming-normal weights, zero
biases, BatchNorm gamma 1, beta 0); the input batch and the output gradient are
standard Gaussian, fresh per seed.  Statistics, computed with the same vectorised
torch ops as :mod:`torch_peer` (its ``_fwd_stats``): a forward hook on every
module (and on every block, for the stream after the add) records the forward
statistics of its output and registers a tensor hook on that output, which records
the gradient's second moment during backward.  Tensor hooks rather than
:mod:`torch_peer`'s full backward hooks: a residual block's module output is
exactly the tensor whose gradient is wanted, and full backward hooks add an
autograd node around every module's inputs and outputs (on torch 2.13 they give
the same values here, with a warning for the stem, whose input needs no gradient).
Parameter-gradient norms come from ``.grad`` after backward.

Rows come out in the order of ``net.infos`` of the initdiag network: ``dense1``
(stem), then per block ``dense1, bn1, relu1, dense2, bn2, out``.
"""

from __future__ import annotations

import torch
from torch import nn

from .torch_peer import _fwd_stats


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.fc2(self.relu(self.bn1(self.fc1(x)))))


class Peer:
    """``run(batch, seeds)``: per seed, one dict of statistics per row."""

    def __init__(self, blocks: int = 20, width: int = 1024, threads: int = 2) -> None:
        if blocks < 1 or width < 1:
            raise ValueError(
                f"blocks and width must be >= 1, got blocks={blocks}, width={width}"
            )
        torch.set_num_threads(threads)
        self.width = width
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(blocks))
        self.model = nn.Sequential(self.stem, *self.blocks)
        # row order of initdiag's resnet_mlp: the stem, then each block's branch
        # modules followed by the block itself (its output is the stream)
        self.row_modules: list[nn.Module] = [self.stem]
        for b in self.blocks:
            self.row_modules += [b.fc1, b.bn1, b.relu, b.fc2, b.bn2, b]
        self.rows: dict[nn.Module, dict[str, float]] = {}
        self.m_out = 1.0
        for m in self.row_modules:
            m.register_forward_hook(self._fwd)

    def _fwd(self, mod, inp, out):
        row = _fwd_stats(out.detach())
        self.rows[mod] = row

        def grad_hook(g: torch.Tensor) -> None:
            g64 = g.double()
            row["grad_second_moment"] = float((g64 * g64).mean()) / self.m_out

        out.register_hook(grad_hook)

    def _init_params(self) -> None:
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm1d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def run(self, batch: int = 512, seeds: int = 8) -> list[list[dict[str, float]]]:
        out = []
        for seed in range(seeds):
            gen = torch.manual_seed(seed)
            self._init_params()
            self.model.zero_grad(set_to_none=True)
            x = torch.randn(batch, self.width, generator=gen)
            self.rows = {}
            y = self.model(x)
            g = torch.randn(y.shape, generator=gen)
            self.m_out = float((g.double() ** 2).mean())
            y.backward(g)
            norm = 1.0 / (batch * self.m_out)
            for m in self.row_modules:
                if isinstance(m, nn.Linear):
                    names = ("weight_grad_norm2", "bias_grad_norm2")
                elif isinstance(m, nn.BatchNorm1d):
                    names = ("gamma_grad_norm2", "beta_grad_norm2")
                else:
                    continue
                for name, p in zip(names, (m.weight, m.bias), strict=True):
                    self.rows[m][name] = float(p.grad.double().pow(2).sum()) * norm
            out.append([self.rows[m] for m in self.row_modules])
        return out

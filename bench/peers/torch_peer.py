"""PyTorch CPU peer, written as a careful user would: the model is built once and
re-initialised in place per seed with ``nn.init``; forward hooks on every module and
full backward hooks compute the same statistics with vectorised torch ops.
``norm="layernorm"`` puts ``nn.LayerNorm`` where ``nn.BatchNorm1d`` stands."""

from __future__ import annotations

import torch
from torch import nn


def _fwd_stats(h: torch.Tensor) -> dict[str, float]:
    h64 = h.double()
    cm = h64.mean(0)
    u = h64 / h64.norm(dim=1, keepdim=True).clamp_min(1e-300)
    s = u.sum(0)
    B = h.shape[0]
    st = torch.stack(
        [
            cm.mean(),
            (h64 * h64).mean(),
            h64.var(0, unbiased=False).mean(),
            (cm * cm).mean(),
            (s @ s - (u * u).sum()) / (B * (B - 1)),
            (h > 0).double().mean(),
            (h <= 0).all(0).double().mean(),
        ]
    ).tolist()
    keys = (
        "mean",
        "second_moment",
        "variance",
        "squared_mean",
        "correlation",
        "active_fraction",
        "dead_fraction",
    )
    return dict(zip(keys, st, strict=True))


class Peer:
    def __init__(
        self,
        depth: int = 20,
        width: int = 1024,
        threads: int = 2,
        norm: str = "batchnorm",
    ) -> None:
        torch.set_num_threads(threads)
        norms = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}
        if norm not in norms:
            raise ValueError(f"norm must be one of {sorted(norms)}, got {norm!r}")
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), norms[norm](width), nn.ReLU()]
        self.model = nn.Sequential(*layers)
        self.width = width
        self.rows: dict[nn.Module, dict[str, float]] = {}
        self.m_out = 1.0
        for m in self.model:
            m.register_forward_hook(self._fwd)
            m.register_full_backward_hook(self._bwd)

    def _fwd(self, mod, inp, out):
        self.rows[mod] = _fwd_stats(out.detach())

    def _bwd(self, mod, gin, gout):
        g = gout[0].double()
        self.rows[mod]["grad_second_moment"] = float((g * g).mean()) / self.m_out

    def run(self, batch: int = 512, seeds: int = 8) -> list[list[dict[str, float]]]:
        out = []
        for seed in range(seeds):
            gen = torch.manual_seed(seed)
            with torch.no_grad():
                for m in self.model:
                    if isinstance(m, nn.Linear):
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                        nn.init.zeros_(m.bias)
                    elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                        nn.init.ones_(m.weight)
                        nn.init.zeros_(m.bias)
            self.model.zero_grad(set_to_none=True)
            x = torch.randn(batch, self.width, generator=gen).requires_grad_(False)
            self.rows = {}
            y = self.model(x)
            g = torch.randn(y.shape, generator=gen)
            self.m_out = float((g.double() ** 2).mean())
            y.backward(g)
            norm = 1.0 / (batch * self.m_out)
            for m in self.model:
                if isinstance(m, nn.Linear):
                    self.rows[m]["weight_grad_norm2"] = (
                        float(m.weight.grad.double().pow(2).sum()) * norm
                    )
                    self.rows[m]["bias_grad_norm2"] = (
                        float(m.bias.grad.double().pow(2).sum()) * norm
                    )
                elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                    self.rows[m]["gamma_grad_norm2"] = (
                        float(m.weight.grad.double().pow(2).sum()) * norm
                    )
                    self.rows[m]["beta_grad_norm2"] = (
                        float(m.bias.grad.double().pow(2).sum()) * norm
                    )
            out.append([self.rows[m] for m in self.model])
        return out

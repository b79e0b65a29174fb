"""What monitoring costs a training step: TorchMonitor against the bare step and a
fastai-style peer (per-module forward hooks computing the statistics in torch).

Command (repository root; figures go to bench/MONITOR.md by hand)::

    python bench/bench_monitor.py [--rounds 3] [--steps 10]

The reference step: an MLP of depth 20 (20 x [Linear(1024, 1024), ReLU]), batch
512, float32, torch CPU, MSE loss, SGD.  Each variant trains its own copy of the
model; the variants run in turn, step after step, so the load of a shared machine
hits each alike.  A round is ``--steps`` steps (``every=10`` samples one step in
ten); the figures are the median over ``--rounds`` rounds of the mean time per
step, and the overhead is the median over the rounds of variant / bare:

``bare``
    the training step alone;
``monitor every=10`` / ``monitor every=1``
    inside ``TorchMonitor(model, every=N)`` (every leaf module: 40 forward hooks,
    40 output-gradient hooks, 40 parameter-gradient hooks, 20 parameter copies
    for the update ratios on a sampled step);
``peer every=10`` / ``peer every=1``
    the activation statistics, output-gradient second moments, parameter-gradient
    norms and update ratios from forward and tensor hooks written with torch ops
    (``h.mean()``, ``h.var(0)``, ``(h > 0).float().mean()``, the sum of the
    normalised rows for the correlation ...), each statistic a ``.item()``, as
    fastai's ``ActivationStats`` computes its mean and std (the monitor also
    computes each parameter's mean, variance and norm, and the non-finite counts).

Before timing, one monitored step and one peer step from the same state are
compared statistic by statistic (they agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]  # this checkout's initdiag

import torch  # noqa: E402
from torch import nn  # noqa: E402

from initdiag.integrations.torch import TorchMonitor  # noqa: E402

DEPTH, WIDTH, BATCH = 20, 1024, 512


def make():
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, WIDTH)
    y = torch.randn(BATCH, WIDTH)
    return model, opt, x, y


def train_step(model, opt, x, y) -> None:
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# ------------------------------------------------------------------ the peer
def torch_activation_stats(h: torch.Tensor) -> dict[str, float]:
    """The Monitor's activation statistics of a (B, n) output, in torch ops."""
    h = h.detach()
    B = h.shape[0]
    u = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    s = u.sum(0)
    cos = ((s @ s) - (u * u).sum()) / (B * (B - 1))
    col_mean = h.mean(0)
    return {
        "mean": h.mean().item(),
        "second_moment": (h * h).mean().item(),
        "variance": h.var(0, unbiased=False).mean().item(),
        "squared_mean": (col_mean * col_mean).mean().item(),
        "correlation": cos.item(),
        "active_fraction": (h > 0).float().mean().item(),
        "zero_fraction": (h == 0).float().mean().item(),
        "dead_fraction": (~(h > 0).any(0)).float().mean().item(),
    }


class Peer:
    """fastai-style hooks: statistics per leaf module in torch, on sampled steps."""

    def __init__(self, model, every: int) -> None:
        self.model, self.every = model, every
        self.leaves = [
            (n, m) for n, m in model.named_modules() if next(m.children(), None) is None
        ]
        self.rows: dict = {}
        self.handles: list = []
        self.old: dict = {}

    def _hook(self, name, step):
        def fwd(mod, args, out):
            self.rows[(step, name)] = torch_activation_stats(out)

            def grad(g):
                self.rows[(step, name)]["grad_second_moment"] = (g * g).mean().item()

            self.handles.append(out.register_hook(grad))

        return fwd

    def begin(self, step: int) -> None:
        self.end()
        self.step = step
        if step % self.every:
            return
        for n, m in self.leaves:
            self.handles.append(m.register_forward_hook(self._hook(n, step)))
            self.old[n] = {k: p.detach().clone() for k, p in m.named_parameters()}

    def end(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for n, m in self.leaves:
            for k, p in m.named_parameters():
                if n in self.old:
                    r = self.rows[(self.step, n)]
                    r[f"{k}_grad_norm2"] = (p.grad * p.grad).sum().item()
                    d = p.detach() - self.old[n][k]
                    r[f"{k}_update_ratio"] = (d.norm() / self.old[n][k].norm()).item()
        self.old = {}


# ------------------------------------------------------------------ variants
class Bare:
    def __init__(self) -> None:
        self.model, self.opt, self.x, self.y = make()

    def begin(self, step: int) -> None:
        pass

    def run(self, step: int) -> None:
        self.begin(step)
        train_step(self.model, self.opt, self.x, self.y)

    def close(self) -> None:
        pass


class Monitored(Bare):
    def __init__(self, every: int) -> None:
        super().__init__()
        self.tm = TorchMonitor(self.model, every=every).__enter__()

    def begin(self, step: int) -> None:
        self.tm.step(step)

    def close(self) -> None:
        self.tm.__exit__(None, None, None)


class Peered(Bare):
    def __init__(self, every: int) -> None:
        super().__init__()
        self.peer = Peer(self.model, every)

    def begin(self, step: int) -> None:
        self.peer.begin(step)

    def close(self) -> None:
        self.peer.end()


def check() -> float:
    """Largest relative difference between the monitor's and the peer's
    statistics of one step from the same state."""
    m, p = Monitored(1), Peered(1)
    m.run(0), p.run(0)
    m.close(), p.close()
    worst = 0.0
    for r in m.tm.monitor.rows():
        for k, v in p.peer.rows[(0, r["layer"])].items():
            worst = max(worst, abs(r[k] - v) / max(abs(v), 1e-6))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(
        f"MLP depth {DEPTH}, width {WIDTH}, batch {BATCH}, float32, torch "
        f"{torch.__version__} CPU, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"monitor vs peer, largest relative difference: {check():.2e}")
    variants = {
        "bare": Bare(),
        "monitor every=10": Monitored(10),
        "monitor every=1": Monitored(1),
        "peer every=10": Peered(10),
        "peer every=1": Peered(1),
    }
    for v in variants.values():  # warm-up (numba compilation, allocator): step 0
        v.run(0)
    # step by step, the variants in turn (each its own model), so the load of a
    # shared machine hits each alike; a round is the sum of `steps` steps
    times: dict = {k: [] for k in variants}
    for r in range(args.rounds):
        acc = dict.fromkeys(variants, 0.0)
        for i in range(args.steps):
            step = 10 * (r + 1) * args.steps + i  # every=10 samples the first
            for k, v in variants.items():
                t0 = time.perf_counter()
                v.run(step)
                acc[k] += time.perf_counter() - t0
        for k in variants:
            times[k].append(acc[k] / args.steps)
    for v in variants.values():
        v.close()
    med = {k: float(np.median(v)) for k, v in times.items()}
    # the variants share each round's load: the overhead is the median of the
    # per-round ratios (paired), steadier than a ratio of medians
    bare = np.array(times["bare"])
    ratio = {k: float(np.median(np.array(v) / bare)) for k, v in times.items()}
    print(
        f"\nmedian over {args.rounds} rounds of the mean seconds per step of "
        f"{args.steps} steps; overhead: median over the rounds of variant / bare"
    )
    print(f"{'variant':<18} {'s / step':>9} {'overhead':>9}  (rounds, s / step)")
    for k, v in med.items():
        raw = " ".join(f"{t:.3f}" for t in times[k])
        print(f"{k:<18} {v:9.3f} {ratio[k] - 1:+9.1%}  ({raw})")


if __name__ == "__main__":
    main()

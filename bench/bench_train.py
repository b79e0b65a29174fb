"""One training step of initdiag.train's engine vs PyTorch CPU eager, and the GEMM
floor, side by side in one run.

Reference workload (issue 14): ``initdiag.mlp(20, 1024, batchnorm=True)``
(Linear-BatchNorm-ReLU x 20, biases on), batch 512, float32, mean squared error
against a fixed target, SGD with momentum 0.9 (torch.optim.SGD(foreach=False) and
``initdiag.kernels.sgd_update``); per step: forward in training mode (batch
statistics, running statistics updated), the loss head, backward with every
parameter gradient, the update of every tensor.  Both sides use 2 threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_train.py \
        [--rounds 3] [--steps 5]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench/bench_train.py

Rounds as ``bench_simulate.run_rounds`` (sgemm rate, the engines in rotated order
with a pause before each, sgemm rate again); the report gives medians over rounds
of the seconds per step and of the per-round ratios.  The floor: the GEMM flops of
the step, ``3 x 2 B N^2`` per layer (forward ``X W^T``, ``dX = G W``,
``dW = G^T X``), at the sgemm rate of the same round.
"""

from __future__ import annotations

import numpy as np
from bench_simulate import (
    BATCH,
    FLOPS_GEMM,
    THREADS,
    WIDTH,
    _setup_threads,
    results,
    run_benchmark,
    run_rounds,
)

DEPTH = 20
FLOPS_FLOOR = DEPTH * 3 * FLOPS_GEMM
GROUP = "train"
LR, MOMENTUM = 0.01, 0.9


def _batch():
    gen = np.random.default_rng(0)
    x = gen.standard_normal((BATCH, WIDTH)).astype(np.float32)
    y = gen.standard_normal((BATCH, WIDTH)).astype(np.float32)
    return x, y


class Ours:
    def __init__(self) -> None:
        import initdiag as idg
        from initdiag.training import Trainer, make_optimizer
        from initdiag.training.run import thread_context

        net = idg.mlp(DEPTH, WIDTH, batchnorm=True)
        # train()'s thread policy (BLAS threads, one Numba thread between them)
        self.threads = lambda: thread_context(net, BATCH)
        self.tr = Trainer(
            net,
            "mse",
            make_optimizer("sgd", MOMENTUM),
            LR,
            np.dtype("float32"),
            None,
            0,
            0,
        )
        self.x, self.y = _batch()

    def run(self, steps: int) -> None:
        with self.threads():
            for _ in range(steps):
                self.tr.step(self.x, self.y)


class Torch:
    def __init__(self) -> None:
        import torch

        torch.set_num_threads(THREADS)
        layers = []
        for _ in range(DEPTH):
            layers += [
                torch.nn.Linear(WIDTH, WIDTH),
                torch.nn.BatchNorm1d(WIDTH),
                torch.nn.ReLU(),
            ]
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=LR, momentum=MOMENTUM, foreach=False
        )
        self.loss = torch.nn.MSELoss()
        x, y = _batch()
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(self.x), self.y).backward()
            self.opt.step()


def measure(rounds: int = 3, steps: int = 5) -> dict:
    _setup_threads()
    ours, peer = Ours(), Torch()
    engines = [
        ("initdiag", GROUP, steps, ours.run),
        ("torch", GROUP, steps, peer.run),
    ]
    per_round, load = run_rounds(engines, rounds)
    for row in per_round:
        row["floor"] = FLOPS_FLOOR / (row["sgemm_gflops"] * 1e9)
        row["torch/initdiag"] = row[GROUP, "torch"] / row[GROUP, "initdiag"]
        row["initdiag/floor"] = row[GROUP, "initdiag"] / row["floor"]
        row["torch/floor"] = row[GROUP, "torch"] / row["floor"]
    return results(per_round, load, steps=steps)


def report(res: dict) -> str:
    m = res["median"]
    lines = [
        f"workload: mlp({DEPTH}, {WIDTH}, batchnorm=True), batch {BATCH}, float32, "
        f"MSE, SGD momentum {MOMENTUM}, {THREADS} threads; {res['steps']} steps per "
        f"engine per round",
        f"BLAS: {res['blas']}; {len(res['rounds'])} rounds; 1-min load average after "
        f"each round: {', '.join(f'{v:.2f}' for v in res['load'])}",
        f"sgemm median {m['sgemm_gflops']:.0f} GFLOP/s; GEMM floor (3 GEMMs / layer) "
        f"{m['floor'] * 1e3:.0f} ms/step",
        "",
        "| engine | ms / step | / floor |",
        "|---|---|---|",
        f"| initdiag | {m[GROUP, 'initdiag'] * 1e3:.0f} | {m['initdiag/floor']:.2f} |",
        f"| PyTorch eager | {m[GROUP, 'torch'] * 1e3:.0f} | {m['torch/floor']:.2f} |",
        "",
        f"PyTorch / initdiag (median of per-round ratios): {m['torch/initdiag']:.2f}x",
        "per round (torch/initdiag, initdiag/floor): "
        + "; ".join(
            f"{r['torch/initdiag']:.2f}x {r['initdiag/floor']:.2f}"
            for r in res["rounds"]
        ),
    ]
    return "\n".join(lines)


def test_train_step_vs_torch(benchmark):
    run_benchmark(benchmark, lambda: measure(rounds=1, steps=2), report)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    print(report(measure(a.rounds, a.steps)))

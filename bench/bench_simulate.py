"""simulate() vs a careful PyTorch CPU version vs plain NumPy, and the GEMM floor.

Reference workload (issue 5): depth 20, width 1024, batch 512, float32, Linear ->
BatchNorm -> ReLU, Kaiming-normal weights, zero biases; per seed parameter sampling +
forward + backward + every Profile statistic of every layer; 2 threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_simulate.py \
        [--rounds 3] [--seeds 8]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench/bench_simulate.py

Every round measures, back to back in one process, the sgemm rate (the workload's
own GEMM shape, 512 x 1024 times 1024 x 1024), simulate, the PyTorch peer, the NumPy
peer and the sgemm rate again, with a 0.3 s pause before each engine (so that no
engine pays for the previous one's spinning thread pools); the engines' order
rotates from round to round.  The
report gives medians over rounds of the seconds per seed and of the per-round ratios
(a shared machine's load changes from round to round; ratios taken within a round
are the robust figure).

Floors (seconds per seed at the sgemm rate measured in the same round):

- ``floor``: the issue's definition, GEMM flops of the workload as written by the
  peers: forward ``X W^T``, ``dX = G W`` and ``dW = G^T X`` in every layer,
  ``3 x 2 B N^2`` flops per layer (the NumPy peer and PyTorch do exactly these);
- ``floor_sim``: the GEMM flops simulate itself performs: ``2 B N^2`` forward,
  ``2 B N^2`` for dX in every layer but the first, and two B x B Gram matrices
  (``syrk``, ``B^2 N`` flops each) instead of dW (exact identity
  ``||G^T X||_F^2 = <G G^T, X X^T>``); syrk runs below the gemm rate, so this floor is
  optimistic.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

DEPTH, WIDTH, BATCH, THREADS = 20, 1024, 512, 2
FLOPS_GEMM = 2 * BATCH * WIDTH * WIDTH
FLOPS_FLOOR = DEPTH * 3 * FLOPS_GEMM
FLOPS_SIM = DEPTH * (FLOPS_GEMM + 2 * BATCH * BATCH * WIDTH) + (DEPTH - 1) * FLOPS_GEMM


def _setup_threads() -> None:
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(THREADS)
    threadpool_limits(THREADS)


def sgemm_rate(reps: int = 20) -> float:
    """Flop/s of the workload's GEMM (median of ``reps`` timed calls)."""
    x = np.random.default_rng(0).standard_normal((BATCH, WIDTH), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((WIDTH, WIDTH), dtype=np.float32)
    out = np.empty((BATCH, WIDTH), np.float32)
    np.matmul(x, w.T, out=out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(x, w.T, out=out)
        ts.append(time.perf_counter() - t0)
    return FLOPS_GEMM / statistics.median(ts)


def run_simulate(seeds: int):
    import initdiag as idg

    net = idg.mlp(depth=DEPTH, width=WIDTH, activation="relu", batchnorm=True)
    return idg.simulate(net, batch_size=BATCH, seeds=seeds)


def blas_info() -> str:
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(
        f"{i['internal_api']} {i.get('version')} {i.get('architecture')} "
        f"x{i['num_threads']}"
        for i in blas
    )


def measure(seeds: int = 8, rounds: int = 3) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _setup_threads()
    from peers import numpy_peer, torch_peer

    peer = torch_peer.Peer(DEPTH, WIDTH, THREADS)
    engines = {
        "simulate": run_simulate,
        "torch": lambda n: peer.run(batch=BATCH, seeds=n),
        "numpy": lambda n: numpy_peer.run(DEPTH, WIDTH, BATCH, n),
    }
    for fn in engines.values():  # compile / warm up
        fn(2)
    per_round: list[dict] = []
    load = []
    for r in range(rounds):
        row: dict = {}
        rates = [sgemm_rate()]
        names = list(engines)
        names = names[r % 3 :] + names[: r % 3]
        for name in names:
            # let the previous engine's thread pools go idle (OpenBLAS workers spin
            # ~50 ms after a call, OpenMP workers too): every engine starts clean
            time.sleep(0.3)
            t = time.perf_counter()
            out = engines[name](seeds)
            row[name] = (time.perf_counter() - t) / seeds
            if name == "simulate":
                row.update(
                    {f"sim_{k}": v / seeds for k, v in out.meta["timing"].items()}
                )
        rates.append(sgemm_rate())
        rate = statistics.mean(rates)
        row["sgemm_gflops"] = rate / 1e9
        row["floor"] = FLOPS_FLOOR / rate
        row["floor_sim"] = FLOPS_SIM / rate
        per_round.append(row)
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    ratios = {
        "torch/simulate": statistics.median(
            r["torch"] / r["simulate"] for r in per_round
        ),
        "numpy/simulate": statistics.median(
            r["numpy"] / r["simulate"] for r in per_round
        ),
        "simulate/floor": statistics.median(
            r["simulate"] / r["floor"] for r in per_round
        ),
        "simulate/floor_sim": statistics.median(
            r["simulate"] / r["floor_sim"] for r in per_round
        ),
    }
    return {
        "median": med,
        "ratios": ratios,
        "rounds": per_round,
        "load": load,
        "blas": blas_info(),
        "seeds": seeds,
    }


def report(res: dict) -> str:
    m, q = res["median"], res["ratios"]
    s = m["simulate"]
    lines = [
        f"BLAS: {res['blas']}; {len(res['rounds'])} rounds x {res['seeds']} seeds per "
        f"engine; 1-min load average during the rounds: "
        f"{', '.join(f'{v:.2f}' for v in res['load'])}",
        f"sgemm (512x1024 @ 1024x1024, float32) median {m['sgemm_gflops']:.0f} GFLOP/s "
        f"(same rounds)",
        "",
        "| engine | s / seed (median) | ratio (median of per-round ratios) |",
        "|---|---|---|",
        f"| initdiag.simulate | {s:.3f} | 1.00 |",
        f"| PyTorch CPU peer | {m['torch']:.3f} | torch / simulate = "
        f"{q['torch/simulate']:.2f}x |",
        f"| plain NumPy peer | {m['numpy']:.3f} | numpy / simulate = "
        f"{q['numpy/simulate']:.2f}x |",
        f"| GEMM floor (issue: 3 GEMMs / layer) | {m['floor']:.3f} | "
        f"simulate / floor = "
        f"{q['simulate/floor']:.2f} |",
        f"| GEMM floor (simulate's own GEMM/syrk flops) | {m['floor_sim']:.3f} | "
        f"simulate / floor = {q['simulate/floor_sim']:.2f} |",
        "",
        f"simulate split per seed (medians): sampling {m['sim_sample']:.3f} s, forward "
        f"{m['sim_forward']:.3f} s, backward {m['sim_backward']:.3f} s",
        "",
        "per round: "
        + "; ".join(
            f"sim {r['simulate']:.3f} torch {r['torch']:.3f} numpy {r['numpy']:.3f} "
            f"floor {r['floor']:.3f} ({r['sgemm_gflops']:.0f} GF/s)"
            for r in res["rounds"]
        ),
    ]
    return "\n".join(lines)


def test_simulate_vs_peers(benchmark):
    res = benchmark.pedantic(
        measure, kwargs={"seeds": 2, "rounds": 3}, rounds=1, iterations=1
    )
    benchmark.extra_info.update({k: v for k, v in res["median"].items()})
    benchmark.extra_info.update(res["ratios"])
    print("\n" + report(res))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8, help="seeds per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(report(measure(a.seeds, a.rounds)))

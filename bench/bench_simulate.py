"""simulate() vs a careful PyTorch CPU version vs plain NumPy, and the GEMM floor.

Reference workload (issue 5): depth 20, width 1024, batch 512, float32, Linear ->
BatchNorm -> ReLU, Kaiming-normal weights, zero biases; per seed parameter sampling +
forward + backward + every Profile statistic of every layer; 2 threads.  The same
MLP with LayerNorm in place of BatchNorm (issue 10) is measured beside it, and
simulate at several seeds counts (default 1, 2 and 8: a lone seed must use both
cores too).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_simulate.py \
        [--rounds 3] [--seeds 1 2 8] [--peer-seeds 2]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench/bench_simulate.py

Every round measures, back to back in one process, the sgemm rate (the workload's
own GEMM shape, 512 x 1024 times 1024 x 1024), then for each MLP simulate at every
seeds count, the PyTorch peer (``--peer-seeds`` seeds: it runs seeds one after the
other, so its time per seed does not depend on the count) and, for the BatchNorm
MLP, the NumPy peer, and the sgemm rate again, with a 0.3 s pause before each engine
(so that no engine pays for the previous one's spinning thread pools); the order
of the engines rotates from round to round.  The report gives medians over rounds
of the seconds per seed and of the per-round ratios (a shared machine's load
changes from round to round; ratios taken within a round are the robust figure).

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


NORMS = ("batchnorm", "layernorm")


def run_simulate(norm: str, seeds: int):
    import initdiag as idg

    net = idg.mlp(depth=DEPTH, width=WIDTH, activation="relu", norm=norm)
    return idg.simulate(net, batch_size=BATCH, seeds=seeds)


def blas_info() -> str:
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(
        f"{i['internal_api']} {i.get('version')} {i.get('architecture')} "
        f"x{i['num_threads']}"
        for i in blas
    )


def run_rounds(engines: list[tuple], rounds: int) -> tuple[list[dict], list[float]]:
    """The rounds of one bench run, shared by the bench scripts.

    ``engines``: ``(name, group, seeds, fn)`` tuples, ``fn(seeds)`` one timed run
    (each is called once with 2 seeds first, to compile and warm up).  Every round
    measures the sgemm rate, then every engine (order rotated from round to round,
    a 0.3 s pause before each), then the sgemm rate again.  Returns one dict per
    round (``row[group, name]``: seconds per seed; for a ``sim*`` engine also
    ``row[group, f"{name}_{phase}"]``, its ``meta["timing"]`` per seed;
    ``row["sgemm_gflops"]``: the mean of the round's two sgemm rates) and the
    1-min load average after each round.
    """
    for _, _, _, fn in engines:  # compile / warm up
        fn(2)
    per_round: list[dict] = []
    load = []
    for r in range(rounds):
        row: dict = {}
        rates = [sgemm_rate()]
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for name, group, n, fn in order:
            # let the previous engine's thread pools go idle (OpenBLAS workers spin
            # ~50 ms after a call, OpenMP workers too): every engine starts clean
            time.sleep(0.3)
            t = time.perf_counter()
            out = fn(n)
            row[group, name] = (time.perf_counter() - t) / n
            if name.startswith("sim"):
                for k, v in out.meta["timing"].items():
                    row[group, f"{name}_{k}"] = v / n
        rates.append(sgemm_rate())
        row["sgemm_gflops"] = statistics.mean(rates) / 1e9
        per_round.append(row)
        load.append(os.getloadavg()[0])
    return per_round, load


def results(per_round: list[dict], load: list[float], **extra) -> dict:
    """A bench run's result: medians over rounds of every figure (ratios included:
    the median of the per-round ratios), the rounds, the load, the BLAS kernel."""
    med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    return {
        "median": med,
        "rounds": per_round,
        "load": load,
        "blas": blas_info(),
        **extra,
    }


def measure(
    seeds: tuple[int, ...] = (1, 2, 8), rounds: int = 3, peer_seeds: int = 2
) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _setup_threads()
    from peers import numpy_peer, torch_peer

    peers = {n: torch_peer.Peer(DEPTH, WIDTH, THREADS, norm=n) for n in NORMS}
    # (name, norm, seeds, callable): one timed engine run each
    engines = []
    for norm in NORMS:
        engines += [
            (f"sim{s}", norm, s, lambda s, n=norm: run_simulate(n, s)) for s in seeds
        ]
        engines.append(
            ("torch", norm, peer_seeds, lambda s, n=norm: peers[n].run(BATCH, s))
        )
    engines.append(
        (
            "numpy",
            "batchnorm",
            peer_seeds,
            lambda s: numpy_peer.run(DEPTH, WIDTH, BATCH, s),
        )
    )
    per_round, load = run_rounds(engines, rounds)
    for row in per_round:
        rate = row["sgemm_gflops"] * 1e9
        row["floor"] = FLOPS_FLOOR / rate
        row["floor_sim"] = FLOPS_SIM / rate
        for norm in NORMS:
            for s in seeds:
                t = row[norm, f"sim{s}"]
                row[norm, f"torch/sim{s}"] = row[norm, "torch"] / t
                row[norm, f"sim{s}/floor"] = t / row["floor"]
                row[norm, f"sim{s}/floor_sim"] = t / row["floor_sim"]
                if (norm, "numpy") in row:
                    row[norm, f"numpy/sim{s}"] = row[norm, "numpy"] / t
    return results(per_round, load, seeds=seeds, peer_seeds=peer_seeds)


def report(res: dict) -> str:
    m = res["median"]
    lines = [
        f"BLAS: {res['blas']}; {len(res['rounds'])} rounds; peers {res['peer_seeds']} "
        f"seeds per round; 1-min load average during the rounds: "
        f"{', '.join(f'{v:.2f}' for v in res['load'])}",
        f"sgemm (512x1024 @ 1024x1024, float32) median "
        f"{m['sgemm_gflops']:.0f} GFLOP/s; "
        f"GEMM floor (issue: 3 GEMMs / layer) {m['floor']:.3f} s/seed, simulate's own "
        f"GEMM/syrk flops {m['floor_sim']:.3f} s/seed (same rounds)",
        "",
        "| MLP | seeds | simulate s/seed | PyTorch s/seed | torch / sim | sim / floor "
        "| sim / own-flops floor | numpy / sim |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for norm in NORMS:
        for s in res["seeds"]:
            np_ratio = m.get((norm, f"numpy/sim{s}"))
            lines.append(
                f"| {norm} | {s} | {m[norm, f'sim{s}']:.3f} | {m[norm, 'torch']:.3f} | "
                f"{m[norm, f'torch/sim{s}']:.2f}x | {m[norm, f'sim{s}/floor']:.2f} | "
                f"{m[norm, f'sim{s}/floor_sim']:.2f} | "
                + (f"{np_ratio:.2f}x |" if np_ratio is not None else "- |")
            )
    lines.append("")
    lines.append(
        f"NumPy peer (batchnorm) {m['batchnorm', 'numpy']:.3f} s/seed.  "
        "simulate split per seed (medians; phases summed over concurrent seeds):"
    )
    for norm in NORMS:
        lines.append(
            f"  {norm}: "
            + "; ".join(
                f"seeds={s}: sample {m[norm, f'sim{s}_sample']:.3f} forward "
                f"{m[norm, f'sim{s}_forward']:.3f} backward "
                f"{m[norm, f'sim{s}_backward']:.3f}"
                for s in res["seeds"]
            )
        )
    lines.append("")
    lines.append(
        "per round (torch / sim, sim / floor): "
        + "; ".join(
            f"[{r['sgemm_gflops']:.0f} GF/s] "
            + ", ".join(
                f"{norm[0:2]}{s} {r[norm, f'torch/sim{s}']:.2f}x "
                f"{r[norm, f'sim{s}/floor']:.2f}"
                for norm in NORMS
                for s in res["seeds"]
            )
            for r in res["rounds"]
        )
    )
    return "\n".join(lines)


def run_benchmark(benchmark, measure, report) -> None:
    """The pytest-benchmark entry of a bench script: one round at seeds 1 and 2."""
    res = benchmark.pedantic(
        measure, kwargs={"seeds": (1, 2), "rounds": 1}, rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        {
            "/".join(k) if isinstance(k, tuple) else k: v
            for k, v in res["median"].items()
        }
    )
    print("\n" + report(res))


def main(doc: str, measure, report, peer_help: str) -> None:
    """A bench script's command line: ``--seeds``, ``--rounds``, ``--peer-seeds``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1, 2, 8],
        help="simulate's seeds counts",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-seeds", type=int, default=2, help=peer_help)
    a = ap.parse_args()
    print(report(measure(tuple(a.seeds), a.rounds, a.peer_seeds)))


def test_simulate_vs_peers(benchmark):
    run_benchmark(benchmark, measure, report)


if __name__ == "__main__":
    main(__doc__, measure, report, "seeds per peer per round")

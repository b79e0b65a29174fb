"""simulate() on a residual MLP vs a careful PyTorch CPU version, and the GEMM floor.

Reference workload (issue 11): ``initdiag.resnet_mlp(20, 1024, norm="batchnorm",
norm_position="post")``, a stem Dense(1024) then 20 blocks
``x + BN(W2 relu(BN(W1 x)))`` (41 dense layers), batch 512, float32, Kaiming-normal
weights, zero biases, BatchNorm gamma 1 and beta 0, default Gaussian inputs and
output gradient; per seed parameter sampling + forward + backward + every Profile
statistic of every row (the stream after each add included); 2 threads.  simulate
runs at several seeds counts (default 1, 2 and 8), the PyTorch peer
(``bench/peers/torch_resnet_peer.py``) seeds one after the other.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_residual.py \
        [--rounds 3] [--seeds 1 2 8] [--peer-seeds 2]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench/bench_residual.py

The rounds are those of ``bench_simulate.run_rounds`` (sgemm rate, every engine in
rotated order with a pause before each, sgemm rate again); the report gives
medians over rounds of the seconds per seed and of the per-round ratios.

Floors (seconds per seed at the sgemm rate measured in the same round), defined as
``bench_simulate``'s for the 41 dense layers (stem + 2 per block):

- ``floor``: the issue's definition, GEMM flops of the workload as the peer
  computes it: forward ``X W^T``, ``dX = G W`` and ``dW = G^T X`` in every dense
  layer, ``3 x 2 B N^2`` flops per layer (PyTorch skips only the stem's ``dX``;
  the floor keeps it, as ``bench_simulate``'s does);
- ``floor_sim``: the GEMM flops simulate itself performs: ``2 B N^2`` forward,
  ``2 B N^2`` for dX in every dense layer but the stem, and two B x B Gram matrices
  (``syrk``, ``B^2 N`` flops each) instead of dW; syrk runs below the gemm rate, so
  this floor is optimistic.
"""

from __future__ import annotations

from bench_simulate import (
    BATCH,
    FLOPS_GEMM,
    THREADS,
    WIDTH,
    _setup_threads,
    main,
    results,
    run_benchmark,
    run_rounds,
)

BLOCKS = 20
LAYERS = 1 + 2 * BLOCKS  # dense layers: the stem and two per block
FLOPS_FLOOR = LAYERS * 3 * FLOPS_GEMM
FLOPS_SIM = (
    LAYERS * (FLOPS_GEMM + 2 * BATCH * BATCH * WIDTH) + (LAYERS - 1) * FLOPS_GEMM
)
GROUP = "resnet"


def network():
    import initdiag as idg

    return idg.resnet_mlp(BLOCKS, WIDTH, norm="batchnorm", norm_position="post")


def run_simulate(net, seeds: int):
    import initdiag as idg

    prof = idg.simulate(net, batch_size=BATCH, seeds=seeds)
    if prof.meta["executor"] != "fused":
        raise RuntimeError(
            f"simulate ran the {prof.meta['executor']!r} executor; the bench measures "
            "the fused numba path (is numba the default backend?)"
        )
    return prof


def measure(
    seeds: tuple[int, ...] = (1, 2, 8), rounds: int = 3, peer_seeds: int = 2
) -> dict:
    _setup_threads()
    from peers import torch_resnet_peer

    net = network()
    peer = torch_resnet_peer.Peer(BLOCKS, WIDTH, THREADS)
    engines = [(f"sim{s}", GROUP, s, lambda s: run_simulate(net, s)) for s in seeds]
    engines.append(("torch", GROUP, peer_seeds, lambda s: peer.run(BATCH, s)))
    per_round, load = run_rounds(engines, rounds)
    for row in per_round:
        rate = row["sgemm_gflops"] * 1e9
        row["floor"] = FLOPS_FLOOR / rate
        row["floor_sim"] = FLOPS_SIM / rate
        row["torch/floor"] = row[GROUP, "torch"] / row["floor"]
        for s in seeds:
            t = row[GROUP, f"sim{s}"]
            row[f"torch/sim{s}"] = row[GROUP, "torch"] / t
            row[f"sim{s}/floor"] = t / row["floor"]
            row[f"sim{s}/floor_sim"] = t / row["floor_sim"]
    return results(
        per_round, load, seeds=seeds, peer_seeds=peer_seeds, network=net.describe()
    )


def report(res: dict) -> str:
    m = res["median"]
    lines = [
        f"workload: {res['network'][:100]}... ({BLOCKS} blocks, {LAYERS} dense "
        f"layers), batch {BATCH}, float32, {THREADS} threads",
        f"BLAS: {res['blas']}; {len(res['rounds'])} rounds; PyTorch peer "
        f"{res['peer_seeds']} seeds per round; 1-min load average after each round: "
        f"{', '.join(f'{v:.2f}' for v in res['load'])}",
        f"sgemm (512x1024 @ 1024x1024, float32) median {m['sgemm_gflops']:.0f} "
        f"GFLOP/s; GEMM floor (3 GEMMs / dense layer) {m['floor']:.3f} s/seed, "
        f"simulate's own GEMM/syrk flops {m['floor_sim']:.3f} s/seed (same rounds); "
        f"PyTorch / floor {m['torch/floor']:.2f}",
        "",
        "| seeds | simulate s/seed | PyTorch s/seed | torch / sim | sim / floor "
        "| sim / own-flops floor |",
        "|---|---|---|---|---|---|",
    ]
    for s in res["seeds"]:
        lines.append(
            f"| {s} | {m[GROUP, f'sim{s}']:.3f} | {m[GROUP, 'torch']:.3f} | "
            f"{m[f'torch/sim{s}']:.2f}x | {m[f'sim{s}/floor']:.2f} | "
            f"{m[f'sim{s}/floor_sim']:.2f} |"
        )
    lines += [
        "",
        "simulate split per seed (medians; phases summed over concurrent seeds): "
        + "; ".join(
            f"seeds={s}: sample {m[GROUP, f'sim{s}_sample']:.3f} forward "
            f"{m[GROUP, f'sim{s}_forward']:.3f} backward "
            f"{m[GROUP, f'sim{s}_backward']:.3f}"
            for s in res["seeds"]
        ),
        "",
        "per round (torch / sim, sim / floor for each seeds count): "
        + "; ".join(
            f"[{r['sgemm_gflops']:.0f} GF/s, torch {r[GROUP, 'torch']:.3f} s] "
            + ", ".join(
                f"{s}: {r[f'torch/sim{s}']:.2f}x {r[f'sim{s}/floor']:.2f}"
                for s in res["seeds"]
            )
            for r in res["rounds"]
        ),
    ]
    return "\n".join(lines)


def test_residual_vs_torch(benchmark):
    run_benchmark(benchmark, measure, report)


if __name__ == "__main__":
    main(__doc__, measure, report, "PyTorch peer seeds per round")

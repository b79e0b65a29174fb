"""The optimizer updates against torch.optim on one 1024 x 1024 float32 tensor.

Command (repository root)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_optim.py

The reference MLP's largest parameter is a 1024 x 1024 weight.  One update of it
through the public dispatchers (``sgd_update`` with momentum 0.9,
``adam_update``: what ``initdiag.train`` calls, validation included) on numpy,
numba and c, against ``torch.optim.SGD`` / ``Adam`` ``.step()`` on the same
tensor (single-tensor ``foreach=False`` and the default multi-tensor
``foreach=True`` implementations, torch's own thread count), interleaved round
after round (``_interleaved`` of bench_kernels.py, so the load of a shared
machine hits every function alike); medians of ``--rounds`` rounds.  The memory
floor is the bytes an update must move over the copy bandwidth measured in the
same run (``np.copyto`` moves two arrays): SGD with momentum reads p, g, v and
writes p, v (2.5 copies); Adam reads p, g, m, v and writes p, m, v (3.5
copies).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
# this checkout's initdiag (not an installed one), and bench_kernels next to us
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from bench_kernels import _interleaved  # noqa: E402

import initdiag.kernels as K  # noqa: E402
from initdiag.kernels import optim  # noqa: E402

N = 1024
DT = np.float32
LR = 1e-6  # small, so that many rounds leave the parameters' scale unchanged
FLOOR_COPIES = {"sgd": 2.5, "adam": 3.5}


def groups(torch) -> dict:
    """op -> {label: thunk}; every label updates its own copy of the tensor."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((N, N)).astype(DT)
    g = rng.standard_normal((N, N)).astype(DT)
    have_c = K.available_backends()["c"]["available"]
    backends = ("numpy", "numba", "c") if have_c else ("numpy", "numba")
    out: dict = {"sgd": {}, "adam": {}}
    for b in backends:
        p, v = p0.copy(), np.zeros_like(p0)
        out["sgd"][b] = lambda p=p, v=v, b=b: K.sgd_update(
            p, g, v, lr=LR, momentum=0.9, backend=b
        )
        q, m, w = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        out["adam"][b] = lambda q=q, m=m, w=w, b=b: K.adam_update(
            q, g, m, w, step=10, lr=LR, backend=b
        )
    if torch is not None:
        for fe in (False, True):
            label = "torch foreach" if fe else "torch"
            tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
            tp.grad = torch.from_numpy(g.copy())
            out["sgd"][label] = torch.optim.SGD(
                [tp], lr=LR, momentum=0.9, foreach=fe
            ).step
            tq = torch.nn.Parameter(torch.from_numpy(p0.copy()))
            tq.grad = torch.from_numpy(g.copy())
            out["adam"][label] = torch.optim.Adam([tq], lr=LR, foreach=fe).step
    src, dst = p0.copy(), np.empty_like(p0)
    for grp in out.values():
        grp["copy"] = lambda: np.copyto(dst, src)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: no torch.optim columns")
    threads = {
        op: optim.update_threads(N * N, adam=op == "adam") for op in FLOOR_COPIES
    }
    tt = torch.get_num_threads() if torch is not None else "-"
    print(
        f"float32 {N} x {N}, {args.rounds} rounds, medians in us; our threads at "
        f"this size: sgd {threads['sgd']}, adam {threads['adam']}; torch threads {tt}"
    )
    print(
        "| op | numpy | numba | c | torch | torch foreach | copy "
        "| torch / numba | torch / c | best torch / numba | numba / floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for op, fns in groups(torch).items():
        m = {k: 1e6 * v for k, v in _interleaved(fns, args.rounds).items()}
        t1, t2, c = m.get("torch", nan), m.get("torch foreach", nan), m.get("c", nan)
        floor = FLOOR_COPIES[op] * m["copy"]
        print(
            f"| {op} | {m['numpy']:.0f} | {m['numba']:.0f} | {c:.0f} | {t1:.0f} "
            f"| {t2:.0f} | {m['copy']:.0f} | {t1 / m['numba']:.2f} | {t1 / c:.2f} "
            f"| {min(t1, t2) / m['numba']:.2f} | {m['numba'] / floor:.2f} |"
        )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()

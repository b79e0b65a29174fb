"""Check and time every initdiag CUDA kernel on a real GPU.

Usage::

    python bench/cuda_check.py            # batch 512 x width 1024, float32 + float64
    python bench/cuda_check.py --reps 50
    NUMBA_ENABLE_CUDASIM=1 python bench/cuda_check.py --tiny   # smoke run, no GPU

Every host launcher (``initdiag.kernels._cuda_*``) runs on device arrays; its result
is compared with a float64 NumPy reference written below (independent of initdiag's
own kernels) within |got - ref| <= 8 eps (|ref| + scale), ``scale`` the magnitude of
the terms behind each result (K |x| |w| for a length-K product).  Timing: one warm-up
call (compiles), then the median of ``--reps`` calls, each bracketed by
``cuda.synchronize()`` and ``time.perf_counter()`` (launch overhead included, host
transfers excluded).  Prints one table row per kernel; exits 1 on any mismatch, 0
when all match, and 0 with a message when no GPU is present.  Under the CUDA
simulator sizes are forced tiny (it runs one Python thread per CUDA thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import special

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from initdiag.kernels import _cuda_common as cc  # noqa: E402

SLOPE = 0.01
EPS_BN = 1e-5


# --------------------------------------------------------------- NumPy references
def ref_act(z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.where(z <= 0, 0.0, z)
    if act == "gelu":
        return z * 0.5 * special.erfc(-z / np.sqrt(2.0))
    if act == "identity":
        return z
    raise ValueError(act)


def ref_act_grad(g: np.ndarray, z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.where(z > 0, g, 0.0)
    if act == "gelu":
        phi = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
        return g * (0.5 * special.erfc(-z / np.sqrt(2.0)) + z * phi)
    raise ValueError(act)


def ref_colstats(x: np.ndarray):
    m = x.mean(0)
    return m, x.var(0), (x <= 0).mean(0), (x == 0).mean(0)


def ref_summary(x: np.ndarray) -> np.ndarray:
    m = x.mean(0)
    return np.array(
        [
            x.mean(),
            (x * x).mean(),
            x.var(0).mean(),
            (m * m).mean(),
            (x > 0).mean(),
            (x <= 0).all(0).mean(),
            (x == 0).mean(),
            float((~np.isfinite(x)).sum()),
        ]
    )


def ref_rowcorr(x: np.ndarray) -> float:
    nrm = np.linalg.norm(x, axis=1)
    u = np.where(nrm[:, None] > 0, x / np.where(nrm > 0, nrm, 1)[:, None], 0.0)
    G = u @ u.T
    B = x.shape[0]
    return float((G.sum() - np.trace(G)) / (B * (B - 1)))


# ----------------------------------------------------------------------- harness
def timed(fn, reps: int, cuda) -> float:
    fn()  # warm-up: compiles
    cuda.synchronize()
    ts = []
    for _ in range(reps):
        cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ratio(got, ref, eps, scale=0.0) -> float:
    """max |got - ref| / (8 eps (|ref| + scale)); NaN pattern must match (else inf)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape or not np.array_equal(np.isnan(got), np.isnan(ref)):
        return np.inf
    fin = np.isfinite(ref)
    tol = np.broadcast_to(8 * eps * (np.abs(ref) + scale), ref.shape)[fin]
    err = np.abs(got - ref)[fin]
    return float(np.max(err / np.maximum(tol, np.finfo(np.float64).tiny), initial=0.0))


def run(B: int, n: int, reps: int, dtypes) -> int:
    rows: list[tuple] = []
    bad = sum(run_dtype(np.dtype(dt), B, n, reps, rows) for dt in dtypes)
    head = (
        f"{'kernel':26s} {'dtype':8s} {'median ms':>10s} {'rate':>10s} "
        f"{'unit':8s} {'err/tol':>8s}  check"
    )
    print(head)
    print("-" * len(head))
    for name, dtn, ms, rate, unit, worst, ok in rows:
        print(
            f"{name:26s} {dtn:8s} {ms:10.4f} {rate:10.2f} {unit:8s} {worst:8.3f}  {ok}"
        )
    print(f"\n{len(rows) - bad}/{len(rows)} kernels match the NumPy reference")
    return 1 if bad else 0


def run_dtype(dt: np.dtype, B: int, n: int, reps: int, rows: list) -> int:
    """Check and time every kernel for one dtype; appends table rows, returns the
    number of mismatches."""
    from numba import cuda

    from initdiag.kernels import _cuda_activation as ka
    from initdiag.kernels import _cuda_batchnorm as kb
    from initdiag.kernels import _cuda_dense as kd
    from initdiag.kernels import _cuda_layernorm as kl
    from initdiag.kernels import _cuda_stats as ks

    bad = 0
    e64 = float(np.finfo(np.float64).eps)
    eps = float(np.finfo(dt).eps)
    it = dt.itemsize
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, n)).astype(dt)
    w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(dt)
    b = rng.standard_normal(n).astype(dt)
    dy = rng.standard_normal((B, n)).astype(dt)
    gamma = (1 + 0.1 * rng.standard_normal(n)).astype(dt)
    beta = (0.1 * rng.standard_normal(n)).astype(dt)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    g64, be64 = gamma.astype(np.float64), beta.astype(np.float64)
    d = {
        k: cuda.to_device(v)
        for k, v in dict(x=x, w=w, b=b, dy=dy, g=gamma, be=beta).items()
    }

    def dev(shape, dtp=dt):
        return cuda.device_array(shape, dtype=dtp)

    def add(name, fn, checks, work, unit):
        nonlocal bad
        t = timed(fn, reps, cuda)
        worst = max(ratio(*c) for c in checks)
        ok = worst <= 1.0
        bad += not ok
        rate = work / t / 1e9
        rows.append(
            (name, dt.name, t * 1e3, rate, unit, worst, "ok" if ok else "MISMATCH")
        )

    # dense forward: relu(x @ w.T + b), pre-activation written
    out, pre = dev((B, n)), dev((B, n))
    kd.dense_forward_cuda(d["x"], d["w"], d["b"], "relu", SLOPE, out, pre)
    zref = x64 @ w64.T + b64
    gscale = n * (np.abs(x64) @ np.abs(w64).T) + np.abs(b64)
    add(
        "dense_forward +bias+relu",
        lambda: kd.dense_forward_cuda(d["x"], d["w"], d["b"], "relu", SLOPE, out, pre),
        [
            (out.copy_to_host(), ref_act(zref, "relu"), eps, gscale),
            (pre.copy_to_host(), zref, eps, gscale),
        ],
        2.0 * B * n * n,
        "GFLOP/s",
    )
    dx, dw, db = dev((B, n)), dev((n, n)), dev(n)
    kd.dense_backward_cuda(d["dy"], d["x"], d["w"], dx, dw, db)
    add(
        "dense_backward dx,dw,db",
        lambda: kd.dense_backward_cuda(d["dy"], d["x"], d["w"], dx, dw, db),
        [
            (dx.copy_to_host(), dy64 @ w64, eps, n * (np.abs(dy64) @ np.abs(w64))),
            (
                dw.copy_to_host(),
                dy64.T @ x64,
                eps,
                B * (np.abs(dy64).T @ np.abs(x64)),
            ),
            (
                db.copy_to_host(),
                dy64.sum(0),
                eps,
                B * e64 / eps * np.abs(dy64).sum(0),
            ),
        ],
        4.0 * B * n * n,
        "GFLOP/s",
    )
    a = dev((B, n))
    ka.activation_forward_cuda(d["x"], "gelu", SLOPE, a)
    add(
        "activation_forward gelu",
        lambda: ka.activation_forward_cuda(d["x"], "gelu", SLOPE, a),
        [(a.copy_to_host(), ref_act(x64, "gelu"), eps, np.abs(x64))],
        2.0 * B * n * it,
        "GB/s",
    )
    ka.activation_backward_cuda(d["dy"], d["x"], "gelu", SLOPE, a)
    add(
        "activation_backward gelu",
        lambda: ka.activation_backward_cuda(d["dy"], d["x"], "gelu", SLOPE, a),
        [
            (
                a.copy_to_host(),
                ref_act_grad(dy64, x64, "gelu"),
                eps,
                np.abs(dy64) * (1 + x64**2),
            )
        ],
        3.0 * B * n * it,
        "GB/s",
    )
    mean, inv = dev(n), dev(n)
    kb.batchnorm_forward_cuda(
        d["x"], d["g"], d["be"], EPS_BN, "relu", SLOPE, a, mean, inv
    )
    rm = x64.mean(0)
    rs = 1 / np.sqrt(x64.var(0) + EPS_BN)
    xh = (x64 - rm) * rs
    zscale = 2 * np.abs(g64) * (np.abs(x64) + np.abs(rm)) * rs + np.abs(be64)
    add(
        "batchnorm_forward +relu",
        lambda: kb.batchnorm_forward_cuda(
            d["x"], d["g"], d["be"], EPS_BN, "relu", SLOPE, a, mean, inv
        ),
        [
            (a.copy_to_host(), ref_act(g64 * xh + be64, "relu"), eps, zscale),
            (mean.copy_to_host(), rm, eps, np.abs(x64).max(0)),
            (inv.copy_to_host(), rs, eps),
        ],
        3.0 * B * n * it,
        "GB/s",
    )
    dgam, dbet = dev(n), dev(n)
    kb.batchnorm_backward_cuda(
        d["dy"], d["x"], mean, inv, d["g"], d["be"], "relu", SLOPE, a, dgam, dbet
    )
    m_s, i_s = (
        mean.copy_to_host().astype(np.float64),
        inv.copy_to_host().astype(np.float64),
    )
    xh = (x64 - m_s) * i_s
    gg = ref_act_grad(dy64, g64 * xh + be64, "relu")
    rdb, rdg = gg.sum(0), (gg * xh).sum(0)
    rdx = g64 * i_s / B * (B * gg - rdb - xh * rdg)
    ag = np.abs(dy64)
    dscale = (
        np.abs(g64)
        * i_s
        / B
        * (B * ag + ag.sum(0) + np.abs(xh) * (ag * np.abs(xh)).sum(0))
    )
    add(
        "batchnorm_backward +relu",
        lambda: kb.batchnorm_backward_cuda(
            d["dy"],
            d["x"],
            mean,
            inv,
            d["g"],
            d["be"],
            "relu",
            SLOPE,
            a,
            dgam,
            dbet,
        ),
        [
            (a.copy_to_host(), rdx, eps, dscale),
            (dbet.copy_to_host(), rdb, eps, B * e64 / eps * ag.sum(0)),
            (
                dgam.copy_to_host(),
                rdg,
                eps,
                B * e64 / eps * (ag * np.abs(xh)).sum(0),
            ),
        ],
        5.0 * B * n * it,
        "GB/s",
    )
    lm, li = dev(B), dev(B)
    kl.layernorm_forward_cuda(d["x"], d["g"], d["be"], EPS_BN, "relu", SLOPE, a, lm, li)
    rm = x64.mean(1, keepdims=True)
    rs = 1 / np.sqrt(x64.var(1, keepdims=True) + EPS_BN)
    xh = (x64 - rm) * rs
    zscale = 2 * np.abs(g64) * (np.abs(x64) + np.abs(rm)) * rs + np.abs(be64)
    add(
        "layernorm_forward +relu",
        lambda: kl.layernorm_forward_cuda(
            d["x"], d["g"], d["be"], EPS_BN, "relu", SLOPE, a, lm, li
        ),
        [
            (a.copy_to_host(), ref_act(g64 * xh + be64, "relu"), eps, zscale),
            (lm.copy_to_host(), rm[:, 0], eps, np.abs(x64).max(1)),
            (li.copy_to_host(), rs[:, 0], eps),
        ],
        3.0 * B * n * it,
        "GB/s",
    )
    kl.layernorm_backward_cuda(
        d["dy"], d["x"], lm, li, d["g"], d["be"], "relu", SLOPE, a, dgam, dbet
    )
    m_s = lm.copy_to_host().astype(np.float64)[:, None]
    i_s = li.copy_to_host().astype(np.float64)[:, None]
    xh = (x64 - m_s) * i_s
    gg = ref_act_grad(dy64, g64 * xh + be64, "relu")
    h = gg * g64
    rdx = (
        i_s
        / n
        * (n * h - h.sum(1, keepdims=True) - xh * (h * xh).sum(1, keepdims=True))
    )
    ah = np.abs(dy64) * np.abs(g64)
    dscale = (
        i_s
        / n
        * (
            n * ah
            + ah.sum(1, keepdims=True)
            + np.abs(xh) * (ah * np.abs(xh)).sum(1, keepdims=True)
        )
    )
    ag = np.abs(dy64)
    add(
        "layernorm_backward +relu",
        lambda: kl.layernorm_backward_cuda(
            d["dy"],
            d["x"],
            lm,
            li,
            d["g"],
            d["be"],
            "relu",
            SLOPE,
            a,
            dgam,
            dbet,
        ),
        [
            (a.copy_to_host(), rdx, eps, dscale),
            (dbet.copy_to_host(), gg.sum(0), eps, B * e64 / eps * ag.sum(0)),
            (
                dgam.copy_to_host(),
                (gg * xh).sum(0),
                eps,
                B * e64 / eps * (ag * np.abs(xh)).sum(0),
            ),
        ],
        5.0 * B * n * it,
        "GB/s",
    )
    cs = [dev(n, np.float64) for _ in range(4)]
    ks.column_stats_cuda(d["x"], *cs)
    refs = ref_colstats(x64)
    sc = B * np.abs(x64).max(0)
    add(
        "column_stats",
        lambda: ks.column_stats_cuda(d["x"], *cs),
        [
            (c.copy_to_host(), r, e64, s)
            for c, r, s in zip(cs, refs, (sc, sc**2, 0, 0), strict=True)
        ],
        1.0 * B * n * it,
        "GB/s",
    )
    s8 = dev(8, np.float64)
    xr = np.maximum(x, 0)
    d_xr = cuda.to_device(xr)
    ks.layer_summary_cuda(d_xr, s8)
    mx = float(np.abs(x64).max())
    add(
        "layer_summary",
        lambda: ks.layer_summary_cuda(d_xr, s8),
        [
            (
                s8.copy_to_host(),
                ref_summary(xr.astype(np.float64)),
                e64,
                B * n * max(mx, mx * mx),
            )
        ],
        1.0 * B * n * it,
        "GB/s",
    )
    c1 = dev(1, np.float64)
    ks.row_correlation_cuda(d_xr, c1)
    add(
        "row_correlation",
        lambda: ks.row_correlation_cuda(d_xr, c1),
        [
            (
                c1.copy_to_host(),
                [ref_rowcorr(xr.astype(np.float64))],
                e64,
                4.0 * B * n,
            )
        ],
        2.0 * B * n * it,
        "GB/s",
    )

    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="batch 5 x width 7, 1 rep")
    args = p.parse_args(argv)
    ok, reason = cc.cuda_status()
    if not ok:
        print(f"cuda_check: no GPU here, nothing to check ({reason})")
        return 0
    B, n, reps = args.batch, args.width, args.reps
    if cc.simulator_active():
        if not args.tiny:
            print("cuda_check: CUDA simulator active; forcing --tiny sizes")
        args.tiny = True
        # small launches keep the simulator (one Python thread a CUDA thread) quick
        cc.THREADS_PER_BLOCK, cc.TILE, cc.REDUCE_COLS = 8, 4, 4
    if args.tiny:
        B, n, reps = 5, 7, 1
    else:
        from numba import cuda

        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        print(f"device: {name}, cc {dev.compute_capability}")
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    print(f"batch {B} x width {n}, median of {reps} runs\n")
    return run(B, n, reps, dtypes)


if __name__ == "__main__":
    sys.exit(main())

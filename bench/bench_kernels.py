"""Kernel benchmarks: float32, batch 512 x width 1024, NumPy as the peer in the run.

Command (repository root; results go to bench/KERNELS.md by hand)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python -m pytest bench/bench_kernels.py -q -p no:cacheprovider \\
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Every kernel is timed through its private variant with preallocated outputs (what
the empirical engine's hot path runs); medians of many rounds.  The last test
prints the ratio table, under the wait policy in force (our default PASSIVE) and
again in a fresh process under OMP_WAIT_POLICY=ACTIVE (``python
bench/bench_kernels.py --table`` prints one table under the current environment);
the ``threads`` column says how many threads each row-sweep kernel used
(``initdiag.kernels._threading.sweep_threads``):

* BatchNorm(+ReLU) forward / backward: plain-NumPy time / ours (target >= 5) and
  ours / memory floor (target <= 2), the floor being the bytes that must move
  (forward: read x, write y; backward: read dy and x, write dx) divided by the
  copy bandwidth measured on a 512 x 1024 float32 array in the same run;
* LayerNorm(+ReLU, affine) forward / backward: the same ratios and floor;
* dense forward with fused bias + ReLU / the bare ``np.matmul`` GEMM (<= 1.1);
* column_stats / layer_summary / floor (read x once) (<= 1.5);
* c / numba for every op (within 1.5 either way);
* a 3-layer MLP forward + backward step (GEMMs interleaved with our kernels)
  with numba and c against the same step in NumPy, interleaved in one process,
  plus the numba step in fresh processes with OMP_WAIT_POLICY=ACTIVE vs PASSIVE
  (alternated), to show what the thread-pool policy
  (initdiag/kernels/_threading.py) prevents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import initdiag.kernels as K
from initdiag.kernels import _threading, fused
from initdiag.kernels import activation as ka
from initdiag.kernels import batchnorm as kb
from initdiag.kernels import dense as kd
from initdiag.kernels import layernorm as kl
from initdiag.kernels import stats as ks

B, N = 512, 1024
DT = np.float32
ROUNDS = 15
MEDIANS: dict[str, float] = {}
HAVE_C = K.available_backends()["c"]["available"]
BACKENDS = ["numba", "c"] if HAVE_C else ["numba"]


def _run(benchmark, name, fn, rounds=ROUNDS):
    benchmark.group = name.split(":")[0]
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=3)
    MEDIANS[name] = benchmark.stats.stats.median


def make_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, N)).astype(DT)
    return {
        "x": x,
        "dy": rng.standard_normal((B, N)).astype(DT),
        "w": (rng.standard_normal((N, N)) / np.sqrt(N)).astype(DT),
        "b": rng.standard_normal(N).astype(DT),
        "gamma": (1 + 0.1 * rng.standard_normal(N)).astype(DT),
        "beta": (0.1 * rng.standard_normal(N)).astype(DT),
        "out": np.empty((B, N), DT),
        "out2": np.empty((B, N), DT),
        "vec": [np.empty(N, DT) for _ in range(4)],
        "vec64": [np.empty(N) for _ in range(4)],
    }


@pytest.fixture(scope="module")
def data():
    return make_data()


def test_report_blas(blas_report):
    assert blas_report["pools"], "threadpoolctl found no BLAS"


def test_copy_floor(benchmark, data):
    x, out = data["x"], data["out"]
    _run(benchmark, "copy", lambda: np.copyto(out, x), rounds=100)


# ------------------------------------------------------------------ BatchNorm
def _bn_plain_numpy_fwd(x, gamma, beta, eps=1e-5):
    m = x.mean(axis=0)
    v = x.var(axis=0)
    inv = 1 / np.sqrt(v + eps)
    y = np.maximum((x - m) * (gamma * inv) + beta, 0)
    return y, m, inv


def _bn_plain_numpy_bwd(dy, x, m, inv, gamma, beta):
    xhat = (x - m) * inv
    g = np.where(gamma * xhat + beta > 0, dy, 0)
    db = g.sum(0)
    dg = (g * xhat).sum(0)
    return gamma * inv / x.shape[0] * (x.shape[0] * g - db - xhat * dg), dg, db


def test_bn_fwd_numpy(benchmark, data):
    d = data
    _run(
        benchmark,
        "bn_fwd:numpy",
        lambda: _bn_plain_numpy_fwd(d["x"], d["gamma"], d["beta"]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_fwd(benchmark, data, backend):
    d = data
    fn = getattr(kb, f"_batchnorm_forward_{backend}")
    m, s = d["vec"][0], d["vec"][1]
    _run(
        benchmark,
        f"bn_fwd:{backend}",
        lambda: fn(d["x"], d["gamma"], d["beta"], 1e-5, "relu", 0.0, d["out"], m, s),
    )


def test_bn_bwd_numpy(benchmark, data):
    d = data
    _, m, s = _bn_plain_numpy_fwd(d["x"], d["gamma"], d["beta"])
    _run(
        benchmark,
        "bn_bwd:numpy",
        lambda: _bn_plain_numpy_bwd(d["dy"], d["x"], m, s, d["gamma"], d["beta"]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_bwd(benchmark, data, backend):
    d = data
    _, m, s = K.batchnorm_forward(d["x"], d["gamma"], d["beta"], backend="numpy")
    fn = getattr(kb, f"_batchnorm_backward_{backend}")
    dg, db = d["vec"][2], d["vec"][3]
    _run(
        benchmark,
        f"bn_bwd:{backend}",
        lambda: fn(
            d["dy"], d["x"], m, s, d["gamma"], d["beta"], "relu", 0.0, d["out"], dg, db
        ),
    )


# ------------------------------------------------------------------ LayerNorm
def _ln_plain_numpy_fwd(x, gamma, beta, eps=1e-5):
    m = x.mean(axis=1, keepdims=True)
    inv = 1 / np.sqrt(x.var(axis=1, keepdims=True) + eps)
    y = np.maximum((x - m) * inv * gamma + beta, 0)
    return y, m[:, 0], inv[:, 0]


def _ln_plain_numpy_bwd(dy, x, m, inv, gamma, beta):
    n = x.shape[1]
    xhat = (x - m[:, None]) * inv[:, None]
    g = np.where(gamma * xhat + beta > 0, dy, 0)
    h = g * gamma
    s1 = h.sum(1, keepdims=True)
    s2 = (h * xhat).sum(1, keepdims=True)
    dx = inv[:, None] / n * (n * h - s1 - xhat * s2)
    return dx, (g * xhat).sum(0), g.sum(0)


def _ln_saved(d):
    """Row statistics (float32, (B,)) of the benchmark input."""
    _, m, s = K.layernorm_forward(d["x"], d["gamma"], d["beta"], backend="numpy")
    return m, s


def test_ln_fwd_numpy(benchmark, data):
    d = data
    _run(
        benchmark,
        "ln_fwd:numpy",
        lambda: _ln_plain_numpy_fwd(d["x"], d["gamma"], d["beta"]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_fwd(benchmark, data, backend):
    d = data
    fn = getattr(kl, f"_layernorm_forward_{backend}")
    m, s = (np.empty(B, DT) for _ in range(2))
    _run(
        benchmark,
        f"ln_fwd:{backend}",
        lambda: fn(d["x"], d["gamma"], d["beta"], 1e-5, "relu", 0.0, d["out"], m, s),
    )


def test_ln_bwd_numpy(benchmark, data):
    d = data
    m, s = _ln_saved(d)
    _run(
        benchmark,
        "ln_bwd:numpy",
        lambda: _ln_plain_numpy_bwd(d["dy"], d["x"], m, s, d["gamma"], d["beta"]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_bwd(benchmark, data, backend):
    d = data
    m, s = _ln_saved(d)
    fn = getattr(kl, f"_layernorm_backward_{backend}")
    dg, db = d["vec"][2], d["vec"][3]
    _run(
        benchmark,
        f"ln_bwd:{backend}",
        lambda: fn(
            d["dy"], d["x"], m, s, d["gamma"], d["beta"], "relu", 0.0, d["out"], dg, db
        ),
    )


# ------------------------------------------------------------------ dense
def test_gemm_bare(benchmark, data):
    d = data
    wt = d["w"].T
    _run(
        benchmark,
        "dense_fwd:gemm",
        lambda: np.matmul(d["x"], wt, out=d["out"]),
        rounds=30,
    )


@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_dense_fwd(benchmark, data, backend):
    d = data
    fn = getattr(kd, f"_dense_forward_{backend}")
    _run(
        benchmark,
        f"dense_fwd:{backend}",
        lambda: fn(d["x"], d["w"], d["b"], "relu", 0.0, d["out"], None),
        rounds=30,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_epilogue_only(benchmark, data, backend):
    """The part we own: bias + ReLU over a (B, N) GEMM output, in place."""
    d = data
    out = d["out2"]
    out[...] = d["x"]
    if backend == "numba":

        def fn():
            kd._dense_epilogue_nb(out, d["b"], True, False, ka.RELU, 0.0, out, False)
    else:
        from initdiag.kernels._c import fn as cfn
        from initdiag.kernels._c import ptr

        f = cfn("idg_dense_epilogue", out.dtype)

        def fn():
            f(ptr(out), ptr(None), ptr(d["b"]), B, N, ka.RELU, 0.0, 1)

    _run(benchmark, f"dense_epilogue:{backend}", fn)


# ------------------------------------------------------------------ activations
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_activation_fwd(benchmark, data, backend, act):
    d = data
    fn = getattr(ka, f"_activation_forward_{backend}")
    _run(
        benchmark,
        f"act_fwd_{act}:{backend}",
        lambda: fn(d["x"], act, 0.0, d["out"]),
        rounds=20 if act == "tanh" else ROUNDS,
    )


@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_activation_bwd_relu(benchmark, data, backend):
    d = data
    fn = getattr(ka, f"_activation_backward_{backend}")
    _run(
        benchmark,
        f"act_bwd_relu:{backend}",
        lambda: fn(d["dy"], d["x"], "relu", 0.0, d["out"]),
    )


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_column_stats(benchmark, data, backend):
    d = data
    fn = getattr(ks, f"_column_stats_{backend}")
    _run(
        benchmark,
        f"column_stats:{backend}",
        lambda: fn(d["x"], *d["vec64"]),
        rounds=20 if backend == "numpy" else ROUNDS,
    )


@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_layer_summary(benchmark, data, backend):
    d = data
    fn = getattr(ks, f"_layer_summary_{backend}")
    out = np.empty(8)
    _run(
        benchmark,
        f"layer_summary:{backend}",
        lambda: fn(d["x"], out),
        rounds=20 if backend == "numpy" else ROUNDS,
    )


@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_row_correlation(benchmark, data, backend):
    d = data
    fn = getattr(ks, f"_row_correlation_{backend}")
    out = np.empty(1)
    _run(
        benchmark,
        f"row_correlation:{backend}",
        lambda: fn(d["x"], out),
        rounds=20 if backend == "numpy" else ROUNDS,
    )


# ------------------------------------------------------------------ fused passes
def _fused_thunks(d, backend: str) -> dict:
    """The fused passes of simulate (kernels/fused.py) on one backend, called raw as
    the empirical engine calls them: BatchNorm + ReLU units, float32."""
    f = fused.resolve(backend)
    x, dy, out, out2 = d["x"], d["dy"], d["out"], d["out2"]
    nch = fused.row_chunks(B)
    acc = [np.empty((nch, 4, N)) for _ in range(2)]
    sc = [np.empty((nch, 4)) for _ in range(2)]
    st = [np.empty(10), np.empty(10)]
    m64, v64 = d["vec64"][0], d["vec64"][1]
    ks._column_stats_numpy(x, m64, v64, d["vec64"][2], d["vec64"][3])
    inv = 1.0 / np.sqrt(v64 + 1e-5)
    g64 = d["gamma"].astype(np.float64)
    b64 = d["beta"].astype(np.float64)
    relu = fused.FusedKernels.ACT_CODES["relu"]
    vec = [np.empty(N) for _ in range(3)]
    sums = np.empty(3)
    gram = np.empty((B, B), DT)
    return {
        "layer_stats": lambda: f.layer_stats(x, acc[0], sc[0], st[0], m64, v64),
        "unit_fwd_bn_relu": lambda: f.unit_forward(
            x,
            m64,
            inv,
            g64,
            b64,
            relu,
            0.0,
            True,
            out,
            acc[0],
            sc[0],
            acc[1],
            sc[1],
            st[0],
            st[1],
        ),
        "unit_bwd_bn_relu": lambda: f.unit_backward(
            dy,
            x,
            m64,
            inv,
            g64,
            b64,
            relu,
            0.0,
            True,
            True,
            out2,
            acc[0],
            sums,
            *vec,
        ),
        "gram": lambda: f.gram(x, gram),
    }


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize(
    "op", ["layer_stats", "unit_fwd_bn_relu", "unit_bwd_bn_relu", "gram"]
)
def test_fused(benchmark, data, backend, op):
    fn = _fused_thunks(data, backend)[op]
    _run(benchmark, f"{op}:{backend}", fn, rounds=10 if backend == "numpy" else ROUNDS)


# ------------------------------------------------------------------ MLP sequence
def _mlp_step_factory(backend: str, depth: int = 3):
    """Forward + backward of a depth x 1024 ReLU MLP, batch 512, float32."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((B, N)).astype(DT)
    ws = [(rng.standard_normal((N, N)) / np.sqrt(N)).astype(DT) for _ in range(depth)]
    bs = [np.zeros(N, DT) for _ in range(depth)]

    def step():
        x, acts = x0, []
        for w, b in zip(ws, bs, strict=True):
            y, pre = K.dense_forward(
                x, w, b, "relu", return_preactivation=True, backend=backend
            )
            acts.append((x, pre))
            x = y
        K.layer_summary_array(x, backend=backend)
        g = np.ones_like(x)
        for w, (xin, pre) in zip(reversed(ws), reversed(acts), strict=True):
            g = K.activation_backward(g, pre, "relu", backend=backend)
            g, _, _ = K.dense_backward(g, xin, w, backend=backend)

    return step


_MLP_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    sys.path.insert(0, "bench")
    from bench_kernels import _mlp_step_factory
    step = _mlp_step_factory(sys.argv[1])
    for _ in range(2):
        step()
    ts = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    print(json.dumps({"median": float(np.median(ts))}))
    """
)


def _mlp_subprocess(backend: str, policy: str | None, reps: int = 4) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, "-c", _MLP_SCRIPT, backend, str(reps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=here,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["median"]


def test_mlp_sequence_in_process():
    """numpy vs numba vs c for the whole MLP step, interleaved in one process
    (our default policy: OMP_WAIT_POLICY=PASSIVE)."""
    fns = {be: _mlp_step_factory(be) for be in ["numpy", *BACKENDS]}
    for be, t in _interleaved(fns, 6).items():
        MEDIANS[f"mlp:{be}"] = t


def test_mlp_sequence_wait_policy():
    """The numba MLP step in fresh processes, PASSIVE (ours) vs ACTIVE (spinning
    OpenMP workers), alternated three times so machine load hits both alike."""
    res: dict = {"passive": [], "active": []}
    for _ in range(3):
        res["passive"].append(_mlp_subprocess("numba", "PASSIVE"))
        res["active"].append(_mlp_subprocess("numba", "ACTIVE"))
    for k, v in res.items():
        MEDIANS[f"mlp_policy:numba+{k}"] = float(np.median(v))


# ------------------------------------------------------------------ report
def _interleaved(fns: dict, rounds: int, raw: dict | None = None) -> dict:
    """Median seconds of each function, the functions run in turn round after
    round, so that the load of a shared machine hits all of them alike.

    After the "numpy" peer every other function runs once untimed: the plain-NumPy
    peers allocate, touch and free ~20 MB of temporaries per call, and whichever
    function ran next was measured ~300 us slower (cold caches, fresh pages), be it
    numba or c; that cost belongs to the peer, not to the kernel timed after it.
    """
    import time

    for f in fns.values():
        f()
    ts: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
            if k == "numpy":
                for k2, f2 in fns.items():
                    if k2 != "numpy":
                        f2()
    if raw is not None:
        raw.update(ts)
    return {k: float(np.median(v)) for k, v in ts.items()}


def _groups(d):
    """op -> {label: thunk}; every group carries its own copy (memory floor)."""
    x, dy, out, out2 = d["x"], d["dy"], d["out"], d["out2"]
    g, be, w, b = d["gamma"], d["beta"], d["w"], d["b"]
    v32, v64 = d["vec"], d["vec64"]
    o8, o1 = np.empty(8), np.empty(1)
    _, m, s = K.batchnorm_forward(x, g, be, backend="numpy")
    ln_m, ln_s = _ln_saved(d)
    ln_rows = [np.empty(B, DT) for _ in range(2)]
    copy = lambda: np.copyto(out2, x)  # noqa: E731
    groups: dict = {
        "bn_fwd": {"numpy": lambda: _bn_plain_numpy_fwd(x, g, be)},
        "bn_bwd": {"numpy": lambda: _bn_plain_numpy_bwd(dy, x, m, s, g, be)},
        "ln_fwd": {"numpy": lambda: _ln_plain_numpy_fwd(x, g, be)},
        "ln_bwd": {"numpy": lambda: _ln_plain_numpy_bwd(dy, x, ln_m, ln_s, g, be)},
        "dense_fwd": {"gemm": lambda: np.matmul(x, w.T, out=out)},
        "column_stats": {"numpy": lambda: ks._column_stats_numpy(x, *v64)},
        "layer_summary": {"numpy": lambda: ks._layer_summary_numpy(x, o8)},
        "row_correlation": {"numpy": lambda: ks._row_correlation_numpy(x, o1)},
        "act_fwd_relu": {
            "numpy": lambda: ka._activation_forward_numpy(x, "relu", 0.0, out)
        },
        "act_bwd_relu": {
            "numpy": lambda: ka._activation_backward_numpy(dy, x, "relu", 0.0, out)
        },
    }
    for bk in BACKENDS:
        bnf = getattr(kb, f"_batchnorm_forward_{bk}")
        bnb = getattr(kb, f"_batchnorm_backward_{bk}")
        lnf = getattr(kl, f"_layernorm_forward_{bk}")
        lnb = getattr(kl, f"_layernorm_backward_{bk}")
        dfw = getattr(kd, f"_dense_forward_{bk}")
        cs = getattr(ks, f"_column_stats_{bk}")
        ls = getattr(ks, f"_layer_summary_{bk}")
        rc = getattr(ks, f"_row_correlation_{bk}")
        af = getattr(ka, f"_activation_forward_{bk}")
        ab = getattr(ka, f"_activation_backward_{bk}")
        groups["bn_fwd"][bk] = lambda f=bnf: f(
            x, g, be, 1e-5, "relu", 0.0, out, v32[0], v32[1]
        )
        groups["bn_bwd"][bk] = lambda f=bnb: f(
            dy, x, m, s, g, be, "relu", 0.0, out, v32[2], v32[3]
        )
        groups["ln_fwd"][bk] = lambda f=lnf: f(
            x, g, be, 1e-5, "relu", 0.0, out, *ln_rows
        )
        groups["ln_bwd"][bk] = lambda f=lnb: f(
            dy, x, ln_m, ln_s, g, be, "relu", 0.0, out, v32[2], v32[3]
        )
        groups["dense_fwd"][bk] = lambda f=dfw: f(x, w, b, "relu", 0.0, out, None)
        groups["column_stats"][bk] = lambda f=cs: f(x, *v64)
        groups["layer_summary"][bk] = lambda f=ls: f(x, o8)
        groups["row_correlation"][bk] = lambda f=rc: f(x, o1)
        groups["act_fwd_relu"][bk] = lambda f=af: f(x, "relu", 0.0, out)
        groups["act_bwd_relu"][bk] = lambda f=ab: f(dy, x, "relu", 0.0, out)
    fz = {bk: _fused_thunks(d, bk) for bk in ("numpy", "numba")}
    for op in fz["numba"]:
        groups[op] = {bk: fz[bk][op] for bk in fz}
    for grp in groups.values():
        grp["copy"] = copy
    return groups


# bytes that must move, in units of one (B, N) float32 array
FLOOR_ARRAYS = {
    "bn_fwd": 2,  # read x, write y
    "bn_bwd": 3,  # read dy, x, write dx
    "ln_fwd": 2,  # read x, write y
    "ln_bwd": 3,  # read dy, x, write dx
    "column_stats": 1,  # read x
    "layer_summary": 1,
    "row_correlation": 1,
    "act_fwd_relu": 2,
    "act_bwd_relu": 3,
    "layer_stats": 1,  # read x
    "unit_fwd_bn_relu": 2,  # read x, write h
    "unit_bwd_bn_relu": 5,  # read g, x, write g'; read g', x, write dx
}


# threads a row-sweep kernel runs on at this size (initdiag.kernels._threading)
SWEEP_COST = {
    "bn_fwd": _threading.COST_BN_FORWARD,
    "bn_bwd": _threading.COST_BN_BACKWARD,
    "ln_fwd": kl.COST_LN_FORWARD,
    "ln_bwd": kl.COST_LN_BACKWARD,
    "column_stats": _threading.COST_STATS,
    "layer_summary": _threading.COST_STATS,
}


def _threads_used(op: str, label: str) -> str:
    if op not in SWEEP_COST or label not in ("numba", "c"):
        return ""
    if label == "numba":
        nt = _threading.numba_threads()
    else:
        nt = _threading.c_threads()
    return str(_threading.sweep_threads(B * N, nt, SWEEP_COST[op]))


def ratio_table(d) -> tuple[str, dict]:
    """Interleaved medians of every group and the ratio table (markdown)."""
    rows = []
    summary = {}
    for op, fns in _groups(d).items():
        rounds = 15 if op == "dense_fwd" else 30
        raw: dict = {}
        med = _interleaved(fns, rounds, raw)
        copy = med.pop("copy")
        floor = FLOOR_ARRAYS.get(op, 0) / 2 * copy  # a copy moves 2 arrays
        for label, t in med.items():
            ref = ""
            if op == "dense_fwd" and label != "gemm":
                # the 2-thread GEMM swings by up to 10x with the machine's load:
                # the median of per-round ratios (neighbours in time) is steadier
                r = np.median(np.asarray(raw[label]) / np.asarray(raw["gemm"]))
                ref = f"{r:.3f} x GEMM (per-round)"
            elif floor:
                ref = f"{t / floor:.2f} x floor"
            speed = (
                f"{med['numpy'] / t:.1f}x"
                if "numpy" in med and label != "numpy"
                else ""
            )
            cn = f"{t / med['numba']:.2f}" if label == "c" and "numba" in med else ""
            th = _threads_used(op, label)
            rows.append(
                f"| {op} | {label} | {th} | {t * 1e6:.0f} | {speed} | {ref} | {cn} |"
            )
            summary[f"{op}:{label}"] = t
        summary[f"{op}:copy"] = copy
    nbytes = B * N * np.dtype(DT).itemsize
    bw = 2 * nbytes / np.median([v for k, v in summary.items() if k.endswith(":copy")])
    policy = os.environ.get("OMP_WAIT_POLICY")
    text = "\n".join(
        [
            f"OMP_WAIT_POLICY={policy}; copy bandwidth {bw / 1e9:.1f} GB/s "
            "(512 x 1024 float32, interleaved with each group)",
            "",
            "| op | backend | threads | median (us) | speed-up vs NumPy | "
            "vs floor / GEMM | c / numba |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    return text, summary


def _active_policy_table() -> str:
    """The ratio table again in a fresh process with OMP_WAIT_POLICY=ACTIVE
    (spinning workers: the row-sweep kernels then split across threads)."""
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, os.path.join("bench", "bench_kernels.py"), "--table"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=here,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_zz_ratio_table(data, blas_report):
    """Interleaved medians of every group, and the ratio table (printed, and
    written to $INITDIAG_BENCH_OUT when set), under our default wait policy and,
    in a fresh process, under OMP_WAIT_POLICY=ACTIVE."""
    text, _ = ratio_table(data)
    rows = []
    for k in [k for k in MEDIANS if k.startswith("mlp:")]:
        t = MEDIANS[k]
        rel = f"{MEDIANS['mlp:numpy'] / t:.2f}x" if "mlp:numpy" in MEDIANS else ""
        rows.append(f"| mlp step, in-process | {k[4:]} | | {t * 1e6:.0f} | {rel} | | |")
    for k in [k for k in MEDIANS if k.startswith("mlp_policy:")]:
        t = MEDIANS[k]
        p = MEDIANS.get("mlp_policy:numba+passive")
        rel = f"{t / p:.2f} x passive" if p else ""
        rows.append(
            f"| mlp step, subprocess | {k[11:]} | | {t * 1e6:.0f} | | {rel} | |"
        )
    text = "\n".join([text, *rows])
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE":
        text += "\n\n" + _active_policy_table()
    print("\n" + text)
    path = os.environ.get("INITDIAG_BENCH_OUT")
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n\n" + json.dumps(blas_report, default=str, indent=1))


if __name__ == "__main__" and "--table" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(ratio_table(make_data())[0])

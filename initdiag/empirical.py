"""``simulate``: Monte Carlo over random networks through the kernel backends.

For every seed the engine samples all parameters with the network's
:class:`~initdiag.initializers.InitScheme`, pushes a batch forward and an output
gradient backward through :mod:`initdiag.kernels`, and records every Profile column
(see :mod:`initdiag.profile`) for every layer output.  Columns are averaged over seeds;
``<col>_se`` is the standard error over seeds (sample standard deviation / sqrt(n)).

Design notes
------------
- Sampling: parameters come from :mod:`initdiag._rng` (counter-based Philox4x32-10),
  one key per ``(rng, seed, layer)`` and one stream per parameter slot, so results are
  bit-identical whatever the thread count.  Initializers without a closed-form
  distribution (truncated normal, orthogonal) use their own ``sample`` with a numpy
  Generator seeded from the same stream name.
- Backward keeps only what it needs: the weights, the inputs of activation and
  BatchNorm layers (with BatchNorm's saved mean / inverse std), and, for every dense
  layer, the B x B Gram matrix ``X X^T`` of its input instead of the input itself.
- Weight-gradient norms are exact and use the identity
  ``||G^T X||_F^2 = sum_ab (G G^T)_ab (X X^T)_ab`` (both B x B Gram matrices, formed
  by BLAS syrk), which costs ``B^2 (n_in + n_out)`` flops instead of the
  ``2 B n_in n_out`` of forming ``dW``; it is used when cheaper (``B < ~N``), else
  ``dW`` is formed.  ``dW`` itself is never needed at initialisation.
- Fused numba path (the default ``numba`` backend): :mod:`initdiag._fused` computes
  every forward statistic of a layer output in one pass, BatchNorm + activation and
  the statistics of both outputs in one pass (the BatchNorm output is never stored:
  backward recomputes it), and the backward of activation + BatchNorm with the
  gradient second moments and parameter-gradient sums in two passes; GEMMs go to
  BLAS into buffers allocated once per worker and kept between calls for the
  latest network structure (no page faults on repeated calls;
  :func:`clear_workspace` frees them).  The other backends (``numpy``, ``c``)
  take the generic path through the kernel dispatchers, so the two paths check each
  other (tests/test_empirical.py).
- Threads: on the fused path seeds run concurrently, one per thread (up to Numba's
  thread count), each with single-threaded BLAS and Numba (:func:`_n_workers` says
  why); a seed's results do not depend on which thread ran it.
- Overflow: a non-finite layer output or gradient (or a signal that underflows to all
  zeros through a layer that should not zero it) records a finding and stops that seed;
  its later rows are missing for that seed, and every row is averaged over the seeds
  that reached it (``meta["seeds_reached"]`` / ``meta["seeds_reached_backward"]``).
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _rng
from .network import BatchNorm, Dense, Network
from .profile import STAT_COLUMNS, Profile

__all__ = ["simulate", "estimate_memory", "parse_bytes", "available_memory"]

_COL = {c: i for i, c in enumerate(STAT_COLUMNS)}
# key words naming the non-parameter streams (parameters use the layer index)
_INPUT_STREAM = 2**31
_OUTGRAD_STREAM = 2**31 + 1
_PROBE_STREAM = 2**31 + 2
_EXACT_JACOBIAN_MAX_WIDTH = 512
_EXACT_JACOBIAN_EXAMPLES = 4


# -- memory -----------------------------------------------------------------------


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"2GB"``, ``"512 MiB"``, ``"1.5e9"``."""
    if isinstance(value, bool):
        raise TypeError(
            f"memory_limit must be bytes or a string like '2GB', got {value!r}"
        )
    if isinstance(value, (int, np.integer)):
        out = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"memory_limit must be finite, got {value!r}")
        out = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value
        )
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read memory_limit {value!r}; use bytes or a string like "
                f"'2GB', '512MiB'"
            )
        out = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(
            "memory_limit must be bytes or a string like '2GB', got "
            f"{type(value).__name__}"
        )
    if out <= 0:
        raise ValueError(f"memory_limit must be positive, got {value!r}")
    return out


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where unreadable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _use_gram(batch: int, n_in: int, n_out: int) -> bool:
    # syrk flops for the two Grams vs gemm flops for dW
    return batch * (n_in + n_out) < 2 * n_in * n_out


def estimate_memory(
    network: Network, batch_size: int, dtype: Any = "float32", jacobian: bool = False
) -> dict[str, int]:
    """Peak bytes ``simulate`` needs for one seed, by part.

    Parts: ``parameters`` (weights and vectors of every layer, kept for backward),
    ``saved`` (what backward keeps per layer: inputs of activation / BatchNorm layers,
    B x B Gram matrices or inputs of dense layers), ``workspace`` (live batch buffers,
    gradients and dW when formed) and ``total``.  Seeds that run concurrently (see
    :func:`_n_workers`) need this much each; ``simulate`` runs fewer at once when
    their total would exceed the available memory or ``memory_limit``.
    """
    item = np.dtype(dtype).itemsize
    B = int(batch_size)
    params = saved = 0
    widest = network.input_dim
    work_extra = 0
    for info in network.infos:
        n_in, n_out = info.fan_in, info.width
        widest = max(widest, n_out)
        if info.kind == "dense":
            params += (n_in * n_out + n_out) * item
            if _use_gram(B, n_in, n_out):
                saved += B * B * item
                work_extra = max(work_extra, 2 * B * B * 8)
            else:
                saved += B * n_in * item
                work_extra = max(work_extra, n_in * n_out * item)
        elif info.kind == "batchnorm":
            params += 2 * n_out * item
            saved += (B * n_in + 2 * n_out) * item
        else:
            saved += B * n_in * item
    # forward: input, output, pre-activation; backward: gradient in/out + tangent
    workspace = 4 * B * widest * item + work_extra
    if jacobian:
        workspace += 4 * B * widest * item
        if widest <= _EXACT_JACOBIAN_MAX_WIDTH:
            workspace += 3 * widest * widest * 8
    return {
        "parameters": params,
        "saved": saved,
        "workspace": workspace,
        "total": params + saved + workspace,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# -- kernels ----------------------------------------------------------------------


class _Ops:
    """The kernel dispatchers bound to one backend."""

    def __init__(self, backend: str | None) -> None:
        from . import kernels

        self.k = kernels
        self.backend = backend

    def dense(self, x, w, b, out):
        return self.k.dense_forward(x, w, b, None, backend=self.backend, out=out)

    def act(self, x, layer, out=None):
        return self.k.activation_forward(
            x, layer.name, negative_slope=_slope(layer), backend=self.backend, out=out
        )

    def act_backward(self, dy, x, layer):
        return self.k.activation_backward(
            dy, x, layer.name, negative_slope=_slope(layer), backend=self.backend
        )

    def bn(self, x, gamma, beta, eps):
        return self.k.batchnorm_forward(x, gamma, beta, eps, backend=self.backend)

    def bn_backward(self, dy, x, saved, gamma, beta):
        return self.k.batchnorm_backward(
            dy, x, saved, gamma, beta, backend=self.backend
        )

    def summary(self, x, out):
        return self.k.layer_summary_array(x, out, backend=self.backend)

    def corr(self, x):
        return float(self.k.row_correlation(x, backend=self.backend))


def _slope(layer: Any) -> float:
    return float(getattr(layer, "negative_slope", 0.01))


# -- threads ----------------------------------------------------------------------


@contextlib.contextmanager
def _numba_threads(n: int):
    """Numba's thread count of the calling thread set to ``n`` (restored after)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - the fused path needs numba
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _n_workers(
    seeds: int,
    fused: bool,
    jacobian: bool,
    user_callable: bool,
    per_seed_bytes: int,
    caps: list[int],
) -> int:
    """Seeds run concurrently on the fused path, one per thread.

    Measured on the reference workload (bench/SIMULATE.md): alternating BLAS GEMMs
    (2 OpenBLAS threads, whose workers spin ~50 ms after each call) with 2-thread
    Numba passes ran ~3x slower than with 1-thread Numba passes, because the Numba
    worker and the spinning BLAS worker share a core.  Running one seed per thread,
    each with single-threaded BLAS and Numba, removes every pool hand-off: each core
    alternates GEMMs and element-wise passes on its own.  Needs threadpoolctl (to
    make BLAS single-threaded for the duration); not used for ``jacobian=True`` or a
    callable ``output_grad`` (user code need not be thread-safe), nor when the
    concurrent seeds would not fit in memory.
    """
    if not fused or jacobian or user_callable or seeds < 2:
        return 1
    try:
        import numba
        import threadpoolctl  # noqa: F401
    except ImportError:
        return 1
    w = min(seeds, numba.get_num_threads())
    while w > 1 and any(w * per_seed_bytes > c for c in caps):
        w -= 1
    return w


def _run_concurrent(
    one_seed: Callable,
    network: Network,
    B: int,
    dt: np.dtype,
    seeds: int,
    workers: int,
    timing: dict[str, float],
) -> None:
    """Each worker thread takes the next seed not yet started (BLAS and Numba
    single-threaded inside), so a core slowed by other work takes fewer seeds;
    results do not depend on the assignment."""
    import itertools
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    tms = [dict.fromkeys(timing, 0.0) for _ in range(workers)]
    counter = itertools.count()
    lock = threading.Lock()

    def work(k: int) -> None:
        with _numba_threads(1), _pooled_plan(network, B, dt) as plan:
            while True:
                with lock:
                    s = next(counter)
                if s >= seeds:
                    return
                one_seed(s, plan, tms[k])

    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(max_workers=workers) as ex,
    ):
        for fut in [ex.submit(work, k) for k in range(workers)]:
            fut.result()
    for tm in tms:
        for k, v in tm.items():
            timing[k] += v


# -- validation ---------------------------------------------------------------------


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an integer >= {minimum}, got {value!r}")
    value = int(value.__index__())
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value}")
    return value


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"dtype must be 'float32' or 'float64', got {dtype!r}"
        ) from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt


def _check_array(a: Any, shape: tuple[int, int], what: str, dt: np.dtype) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(
            f"{what} must be a numpy array, got {type(a).__name__}"
        ) from exc
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if (
        arr.ndim != 2
        or arr.shape[1] != shape[1]
        or (shape[0] and arr.shape[0] != shape[0])
    ):
        want = f"({shape[0] or 'B'}, {shape[1]})"
        raise ValueError(f"{what} must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or inf")
    return np.ascontiguousarray(arr, dtype=dt)


# -- sampling -----------------------------------------------------------------------


def _sample_param(
    init: Any,
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    dt: np.dtype,
    entropy: int,
    seed: int,
    layer: int,
    slot: int,
) -> np.ndarray:
    """One parameter tensor from its own stream (seed, layer, slot): Philox for the
    closed-form distributions, a numpy Generator on the same stream otherwise."""
    if init.distribution(fan_in, fan_out) is None:
        gen = _rng.numpy_generator(entropy, seed, layer, slot)
        arr = init.sample(shape, fan_in, fan_out, gen, dt)
        return np.ascontiguousarray(arr, dtype=dt)
    out = np.empty(shape, dtype=dt)
    return _fill_param(out, init, fan_in, fan_out, dt, entropy, seed, layer, slot)


def _layer_params(
    info: Any, p: dict[str, Any], dt: np.dtype, entropy: int, seed: int, i: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight, bias) of a dense layer or (gamma, beta) of a BatchNorm, drawn from
    their streams (slot 0 and 1 of layer ``i``); a bias-free dense layer gives None.
    Dense parameters get the layer's fans, BatchNorm's get (width, width)."""
    if info.kind == "dense":
        shape, fan_in = (info.width, info.fan_in), info.fan_in
    else:
        shape, fan_in = (info.width,), info.width
    first = _sample_param(
        p["weight"], shape, fan_in, info.width, dt, entropy, seed, i, 0
    )
    second = None
    if p.get("bias") is not None:
        second = _sample_param(
            p["bias"], (info.width,), fan_in, info.width, dt, entropy, seed, i, 1
        )
    return first, second


def _fill_param(
    out: np.ndarray,
    init: Any,
    fan_in: int,
    fan_out: int,
    dt: np.dtype,
    entropy: int,
    seed: int,
    layer: int,
    slot: int,
) -> np.ndarray:
    """:func:`_sample_param` into a preallocated buffer (same values)."""
    dist = init.distribution(fan_in, fan_out)
    if dist is None:
        out[...] = _sample_param(
            init, out.shape, fan_in, fan_out, dt, entropy, seed, layer, slot
        )
        return out
    if dist[0] == "constant":  # no key needed
        out.fill(dist[1])
        return out
    return _rng.fill(out, dist, _rng.derive_key(entropy, seed, layer), slot)


def _output_grad(
    spec: Any,
    y: np.ndarray,
    dt: np.dtype,
    entropy: int,
    seed: int,
    out: np.ndarray | None = None,
):
    """The output gradient of one seed: fresh standard Gaussian (into ``out`` when
    given), the user's array, or the user's callable applied to the network output."""
    if spec is None:
        key = _rng.derive_key(entropy, seed, _OUTGRAD_STREAM)
        if out is None:
            out = np.empty(y.shape, dtype=dt)
        return _rng.fill_normal(out, key, 0)
    if callable(spec):
        return _check_array(spec(y.copy()), y.shape, "output_grad(output)", dt)
    return spec


def _gram64(a: np.ndarray) -> np.ndarray:
    """``a a^T`` in float64 (generic path)."""
    a64 = a.astype(np.float64, copy=False)
    return a64 @ a64.T


def _is_zero_init(init: Any, fan_in: int, fan_out: int) -> bool:
    if init is None:
        return True
    dist = init.distribution(fan_in, fan_out)
    return dist is not None and dist[0] == "constant" and dist[1] == 0.0


def _default_inputs(
    B: int,
    d: int,
    c: float,
    dt: np.dtype,
    entropy: int,
    seed: int,
    out: np.ndarray | None = None,
):
    key = _rng.derive_key(entropy, seed, _INPUT_STREAM)
    if out is None:
        out = np.empty((B, d), dtype=dt)
    x = _rng.fill_normal(out, key, 0)
    if c > 0.0:
        z0 = _rng.fill_normal(np.empty((1, d), dtype=dt), key, 1)
        x *= dt.type(math.sqrt(1.0 - c))
        x += dt.type(math.sqrt(c)) * z0
    return x


# -- the engine ----------------------------------------------------------------------


def _finding(info: Any, seed: int, pas: str, kind: str, what: str) -> dict[str, Any]:
    sig = "signal" if pas == "forward" else "gradient"
    return {
        "kind": kind,
        "layer": info.name,
        "index": int(info.index),
        "block": int(info.block),
        "pass": pas,
        "seed": seed,
        "message": f"the {sig} {what} at layer {info.index + 1} ({info.name}), "
        f"seed {seed}",
    }


def _run_seed(
    net: Network,
    inits: list[dict[str, Any]],
    x: np.ndarray,
    g_out_spec: Any,
    ops: _Ops,
    dt: np.dtype,
    entropy: int,
    seed: int,
    stats: np.ndarray,
    findings: list[dict[str, Any]],
    jac: dict[str, list[Any]] | None,
    timing: dict[str, float],
) -> None:
    """Forward + backward of one random network; fills ``stats[row, col]``."""
    B = x.shape[0]
    infos = net.infos
    saved: list[Any] = [None] * len(infos)
    summ = np.empty(8, dtype=np.float64)
    cur = x
    fwd_ok = len(infos)
    t_sample = t_fwd = 0.0
    for i, info in enumerate(infos):
        layer = info.layer
        t0 = time.perf_counter()
        if isinstance(layer, Dense):
            p = inits[i]
            w, b = _layer_params(info, p, dt, entropy, seed, i)
            t1 = time.perf_counter()
            t_sample += t1 - t0
            t0 = t1
            gram = _use_gram(B, info.fan_in, info.width)
            # Gram in float64: a float32 Gram overflows long before the signal does
            saved[i] = (w, b, _gram64(cur) if gram else cur, gram)
            out = ops.dense(cur, w, b, np.empty((B, info.width), dtype=dt))
            by_design = _is_zero_init(p["weight"], info.fan_in, info.width)
        elif isinstance(layer, BatchNorm):
            p = inits[i]
            gamma, beta = _layer_params(info, p, dt, entropy, seed, i)
            t1 = time.perf_counter()
            t_sample += t1 - t0
            t0 = t1
            out, mean, invstd = ops.bn(cur, gamma, beta, layer.eps)
            saved[i] = (cur, (mean, invstd), gamma, beta)
            by_design = _is_zero_init(
                p["weight"], info.width, info.width
            ) and _is_zero_init(p["bias"], info.width, info.width)
        else:
            out = ops.act(cur, layer)
            saved[i] = cur
            by_design = True  # an activation may legitimately zero everything
        ops.summary(out, summ)
        t_fwd += time.perf_counter() - t0
        if summ[7] > 0:
            findings.append(
                _finding(info, seed, "forward", "overflow", "overflowed (inf/NaN)")
            )
            fwd_ok = i
            break
        if summ[6] == 1.0 and not by_design and np.any(cur != 0):
            findings.append(
                _finding(info, seed, "forward", "underflow", "underflowed to all zeros")
            )
            fwd_ok = i
            break
        row = stats[i]
        row[_COL["mean"]] = summ[0]
        row[_COL["second_moment"]] = summ[1]
        row[_COL["variance"]] = summ[2]
        row[_COL["squared_mean"]] = summ[3]
        row[_COL["active_fraction"]] = summ[4]
        row[_COL["dead_fraction"]] = summ[5]
        row[_COL["correlation"]] = ops.corr(out)
        cur = out
    timing["sample"] += t_sample
    timing["forward"] += t_fwd
    if fwd_ok < len(infos):
        return

    # -- backward ---------------------------------------------------------------------
    t0 = time.perf_counter()
    g = _output_grad(g_out_spec, cur, dt, entropy, seed)
    g64 = g.astype(np.float64, copy=False)
    m_out = float(np.mean(g64 * g64))
    if not m_out > 0:
        raise ValueError("the output gradient is all zeros; nothing to propagate")
    norm = 1.0 / (B * m_out)
    for i in range(len(infos) - 1, -1, -1):
        info = infos[i]
        layer = info.layer
        row = stats[i]
        g64sq = (
            float(np.vdot(g, g))
            if dt == np.float64
            else float(np.einsum("ij,ij->", g, g, dtype=np.float64))
        )
        row[_COL["grad_second_moment"]] = g64sq / (g.size * m_out)
        if isinstance(layer, Dense):
            w, b, xs, gram = saved[i]
            if gram:
                wn = float(np.vdot(_gram64(g), xs))
            else:
                dw = g.T @ xs
                wn = float(np.einsum("ij,ij->", dw, dw, dtype=np.float64))
            row[_COL["weight_grad_norm2"]] = wn * norm
            if b is not None:
                db = g.sum(axis=0, dtype=np.float64)
                row[_COL["bias_grad_norm2"]] = float(db @ db) * norm
            if i == 0:
                break
            gin = g @ w
            by_design = _is_zero_init(inits[i]["weight"], info.fan_in, info.width)
        elif isinstance(layer, BatchNorm):
            xin, sv, gamma, beta = saved[i]
            gin, dgamma, dbeta = ops.bn_backward(g, xin, sv, gamma, beta)
            row[_COL["gamma_grad_norm2"]] = (
                float(np.dot(dgamma.astype(np.float64), dgamma)) * norm
            )
            row[_COL["beta_grad_norm2"]] = (
                float(np.dot(dbeta.astype(np.float64), dbeta)) * norm
            )
            if i == 0:
                break
            by_design = _is_zero_init(inits[i]["weight"], info.width, info.width)
        else:
            if i == 0:
                break
            gin = ops.act_backward(g, saved[i], layer)
            by_design = True
        saved[i] = None
        if not np.all(np.isfinite(gin)):
            findings.append(
                _finding(
                    infos[i - 1], seed, "backward", "overflow", "overflowed (inf/NaN)"
                )
            )
            break
        if not by_design and not np.any(gin) and np.any(g):
            findings.append(
                _finding(
                    infos[i - 1],
                    seed,
                    "backward",
                    "underflow",
                    "underflowed to all zeros",
                )
            )
            break
        g = gin
    timing["backward"] += time.perf_counter() - t0


# -- fused numba path ---------------------------------------------------------------


class _FusedPlan:
    """Units of the fused numba path and their buffers (allocated once per call,
    reused across seeds).

    A unit is a Dense layer (``("dense", i)``) or an element-wise unit
    ``("elem", bn_row, act_row)``: a BatchNorm followed by an activation, a lone
    BatchNorm (identity activation) or a lone activation (no affine part).  The
    BatchNorm output of a BatchNorm + activation unit is never stored: backward
    recomputes it from the unit input.
    """

    def __init__(self, net: Network, B: int, dt: np.dtype) -> None:
        from . import _fused

        self.f = _fused
        infos = net.infos
        units: list[tuple] = []
        i = 0
        while i < len(infos):
            layer = infos[i].layer
            if isinstance(layer, Dense):
                units.append(("dense", i))
                i += 1
            elif isinstance(layer, BatchNorm):
                nxt = infos[i + 1].layer if i + 1 < len(infos) else None
                if nxt is not None and not isinstance(nxt, (Dense, BatchNorm)):
                    units.append(("elem", i, i + 1))
                    i += 2
                else:
                    units.append(("elem", i, None))
                    i += 1
            else:
                units.append(("elem", None, i))
                i += 1
        self.units = units
        self.B = B
        self.dt = dt
        widths = [net.input_dim, *[info.width for info in infos]]
        nmax = max(widths)
        nch = _fused.row_chunks(B)
        self.acc = [np.empty((nch, 4, nmax)) for _ in range(2)]
        self.sc = [np.empty((nch, 4)) for _ in range(2)]
        self.colmean = np.empty(nmax)
        self.colvar = np.empty(nmax)
        self.vec = {k: np.empty(nmax) for k in ("dgamma", "dbeta", "dxsum")}
        self.sums = np.empty(3)
        self.flat = [np.empty(B * nmax, dt) for _ in range(2)]  # ping-pong
        self.gg = np.empty((B, B), dt)
        self.bufs: dict[tuple, np.ndarray] = {}

    def buf(self, key: tuple, shape: tuple[int, ...], dtype: Any = None) -> np.ndarray:
        a = self.bufs.get(key)
        if a is None or a.shape != shape:
            a = np.empty(shape, dtype or self.dt)
            self.bufs[key] = a
        return a

    def nbytes(self) -> int:
        arrs = [*self.acc, *self.sc, *self.flat, self.gg, *self.bufs.values()]
        return sum(a.nbytes for a in arrs)

    def pingpong(self, k: int, n: int) -> np.ndarray:
        return self.flat[k % 2][: self.B * n].reshape(self.B, n)


# Workspaces kept across calls: the buffers of a plan (weights, pre-activations,
# Grams of every layer: ~140 MB per worker on the reference workload) are
# page-faulted in on first touch, ~10 ms per seed-core when a call starts fresh.
# Finished plans go back to this pool; a call with the same network structure,
# batch and dtype takes them out again (a plan is used by one thread at a time).
# Only the latest structure is kept, at most ``_POOL_MAX_PLANS`` plans of at most
# ``_POOL_MAX_BYTES`` each; :func:`clear_workspace` frees them.
_POOL_LOCK = threading.Lock()
_POOL: dict[tuple, list[_FusedPlan]] = {}
_POOL_MAX_PLANS = 4
_POOL_MAX_BYTES = 1 << 30


def _plan_key(net: Network, B: int, dt: np.dtype) -> tuple:
    return (
        net.input_dim,
        B,
        dt.str,
        tuple((type(i.layer).__name__, i.fan_in, i.width, i.kind) for i in net.infos),
    )


def clear_workspace() -> None:
    """Free the buffers ``simulate`` keeps between calls."""
    with _POOL_LOCK:
        _POOL.clear()


def _drop_other_plans(key: tuple) -> None:
    with _POOL_LOCK:
        for k in [k for k in _POOL if k != key]:
            del _POOL[k]


@contextlib.contextmanager
def _pooled_plan(net: Network, B: int, dt: np.dtype):
    """A :class:`_FusedPlan` from the pool (or a new one), returned after use."""
    key = _plan_key(net, B, dt)
    with _POOL_LOCK:
        plans = _POOL.get(key)
        plan = plans.pop() if plans else None
    if plan is None:
        plan = _FusedPlan(net, B, dt)
    yield plan
    if plan.nbytes() <= _POOL_MAX_BYTES:
        _drop_other_plans(key)
        with _POOL_LOCK:
            plans = _POOL.setdefault(key, [])
            if len(plans) < _POOL_MAX_PLANS:
                plans.append(plan)


def _fused_ok(net: Network, backend: str | None) -> bool:
    """The fused path serves the numba backend for Dense / BatchNorm / activation
    networks (every network ``Network`` can describe)."""
    try:
        from . import kernels

        name = kernels._resolve(backend, ())
    except Exception:  # pragma: no cover - the generic path reports the problem
        return False
    if name != "numba":
        return False
    from .kernels.activation import ACT_CODES

    return all(
        isinstance(i.layer, (Dense, BatchNorm)) or i.layer.name in ACT_CODES
        for i in net.infos
    )


def _record_fwd(row: np.ndarray, st: np.ndarray) -> None:
    row[_COL["mean"]] = st[0]
    row[_COL["second_moment"]] = st[1]
    row[_COL["variance"]] = st[2]
    row[_COL["squared_mean"]] = st[3]
    row[_COL["active_fraction"]] = st[4]
    row[_COL["dead_fraction"]] = st[5]
    row[_COL["correlation"]] = st[8]


def _run_seed_fused(
    net: Network,
    inits: list[dict[str, Any]],
    x: np.ndarray,
    g_out_spec: Any,
    plan: _FusedPlan,
    dt: np.dtype,
    entropy: int,
    seed: int,
    stats: np.ndarray,
    findings: list[dict[str, Any]],
    timing: dict[str, float],
) -> None:
    """:func:`_run_seed` through the fused numba passes of :mod:`initdiag._fused`."""
    f = plan.f
    B = x.shape[0]
    infos = net.infos
    units = plan.units
    st_y = np.empty(10)
    st_h = np.empty(10)
    saved: list[Any] = [None] * len(units)
    cur = x
    cur_has_colstats = False
    prev_nonzero = bool(np.any(x))
    t_sample = t_fwd = 0.0
    for u, unit in enumerate(units):
        t0 = time.perf_counter()
        nxt = units[u + 1] if u + 1 < len(units) else None
        if unit[0] == "dense":
            i = unit[1]
            info = infos[i]
            p = inits[i]
            n_in, n_out = info.fan_in, info.width
            w = plan.buf(("w", i), (n_out, n_in))
            _fill_param(w, p["weight"], n_in, n_out, dt, entropy, seed, i, 0)
            b = None
            if p.get("bias") is not None:
                b = plan.buf(("b", i), (n_out,))
                _fill_param(b, p["bias"], n_in, n_out, dt, entropy, seed, i, 1)
            t1 = time.perf_counter()
            t_sample += t1 - t0
            t0 = t1
            gram = _use_gram(B, n_in, n_out)
            if gram:
                xs = _safe_gram(f, cur, plan.buf(("gram", i), (B, B)))
            else:
                xs = cur.copy()
            saved[u] = (w, b, xs, gram)
            pre = plan.buf(("pre", i), (B, n_out))
            np.matmul(cur, w.T, out=pre)
            if b is not None and not _is_zero_init(p["bias"], n_in, n_out):
                pre += b
            f.col_stats(
                pre,
                plan.acc[1],
                plan.sc[1],
                st_h,
                plan.colmean[:n_out],
                plan.colvar[:n_out],
            )
            t_fwd += time.perf_counter() - t0
            if st_h[7] > 0:
                findings.append(
                    _finding(info, seed, "forward", "overflow", "overflowed (inf/NaN)")
                )
                break
            if (
                st_h[6] == 1.0
                and prev_nonzero
                and not _is_zero_init(p["weight"], n_in, n_out)
            ):
                findings.append(
                    _finding(
                        info, seed, "forward", "underflow", "underflowed to all zeros"
                    )
                )
                break
            _record_fwd(stats[i], st_h)
            prev_nonzero = st_h[9] > 0
            cur = pre
            cur_has_colstats = True
            continue
        _, ib, ia = unit
        n = cur.shape[1]
        if ib is not None:
            info = infos[ib]
            p = inits[ib]
            gamma = plan.buf(("gamma", ib), (n,))
            beta = plan.buf(("beta", ib), (n,))
            _fill_param(gamma, p["weight"], n, n, dt, entropy, seed, ib, 0)
            _fill_param(beta, p["bias"], n, n, dt, entropy, seed, ib, 1)
            t1 = time.perf_counter()
            t_sample += t1 - t0
            t0 = t1
            if not cur_has_colstats:
                f.col_stats(
                    cur,
                    plan.acc[1],
                    plan.sc[1],
                    st_h,
                    plan.colmean[:n],
                    plan.colvar[:n],
                )
            mean = plan.buf(("mean", ib), (n,), np.float64)
            invstd = plan.buf(("invstd", ib), (n,), np.float64)
            mean[:] = plan.colmean[:n]
            np.divide(1.0, np.sqrt(plan.colvar[:n] + float(info.layer.eps)), out=invstd)
            g64 = gamma.astype(np.float64)
            b64 = beta.astype(np.float64)
            bn_design = _is_zero_init(p["weight"], n, n) and _is_zero_init(
                p["bias"], n, n
            )
        else:
            mean = np.zeros(n)
            invstd = g64 = np.ones(n)
            b64 = np.zeros(n)
            bn_design = True
        act_layer = infos[ia].layer if ia is not None else None
        code = f.ACT_CODES[act_layer.name] if ia is not None else f.IDENTITY
        slope = _slope(act_layer) if ia is not None else 0.0
        rec_y = ib is not None and ia is not None
        keep = (
            nxt is None or nxt[0] == "elem" or not _use_gram(B, n, infos[nxt[1]].width)
        )
        h = plan.buf(("h", u), (B, n)) if keep else plan.pingpong(u, n)
        f.unit_forward(
            cur,
            mean,
            invstd,
            g64,
            b64,
            code,
            slope,
            rec_y,
            h,
            plan.acc[0],
            plan.sc[0],
            plan.acc[1],
            plan.sc[1],
            st_y,
            st_h,
        )
        saved[u] = (cur, mean, invstd, g64, b64, code, slope)
        t_fwd += time.perf_counter() - t0
        stop = False
        for row, st, design in (
            (ib if rec_y else None, st_y, bn_design),
            (ia if ia is not None else ib, st_h, bn_design if ia is None else True),
        ):
            if row is None:
                continue
            if st[7] > 0:
                findings.append(
                    _finding(
                        infos[row], seed, "forward", "overflow", "overflowed (inf/NaN)"
                    )
                )
                stop = True
                break
            if st[6] == 1.0 and prev_nonzero and not design:
                findings.append(
                    _finding(
                        infos[row],
                        seed,
                        "forward",
                        "underflow",
                        "underflowed to all zeros",
                    )
                )
                stop = True
                break
            _record_fwd(stats[row], st)
            prev_nonzero = st[9] > 0
        if stop:
            break
        cur = h
        cur_has_colstats = False
    else:
        timing["sample"] += t_sample
        timing["forward"] += t_fwd
        _backward_fused(
            net,
            inits,
            cur,
            g_out_spec,
            plan,
            dt,
            entropy,
            seed,
            stats,
            findings,
            saved,
            timing,
        )
        return
    timing["sample"] += t_sample
    timing["forward"] += t_fwd


def _backward_fused(
    net: Network,
    inits: list[dict[str, Any]],
    y: np.ndarray,
    g_out_spec: Any,
    plan: _FusedPlan,
    dt: np.dtype,
    entropy: int,
    seed: int,
    stats: np.ndarray,
    findings: list[dict[str, Any]],
    saved: list[Any],
    timing: dict[str, float],
) -> None:
    f = plan.f
    t0 = time.perf_counter()
    infos = net.infos
    B = y.shape[0]
    g = _output_grad(g_out_spec, y, dt, entropy, seed, plan.buf(("gout",), y.shape))
    m_out = f._row_sumsq(g.reshape(-1)) / g.size
    if not m_out > 0:
        raise ValueError("the output gradient is all zeros; nothing to propagate")
    norm = 1.0 / (B * m_out)
    prod_design, prod_nonzero = True, True  # the output gradient was checked
    colsum = None  # column sums of g when its producer computed them
    for u in range(len(plan.units) - 1, -1, -1):
        unit = plan.units[u]
        n = g.shape[1]
        if unit[0] == "dense":
            i = unit[1]
            info = infos[i]
            w, b, xs, gram = saved[u]
            if gram:
                gg = _safe_gram(f, g, plan.gg)
                if gg.dtype == xs.dtype:
                    wn, ss = f.gram_dot(gg, xs, f.gram_split(B))
                else:  # a float64 fallback on one side: both full, float64
                    wn, ss = f.gram_dot(_full64(f, gg), _full64(f, xs), 0)
            else:
                ss = float(np.einsum("ij,ij->", g, g, dtype=np.float64))
                dw = g.T @ xs
                wn = float(np.einsum("ij,ij->", dw, dw, dtype=np.float64))
            if not _grad_ok(ss, info, seed, findings, prod_design, prod_nonzero):
                break
            row = stats[i]
            row[_COL["grad_second_moment"]] = ss / (g.size * m_out)
            row[_COL["weight_grad_norm2"]] = wn * norm
            if b is not None:
                db = colsum if colsum is not None else g.sum(axis=0, dtype=np.float64)
                row[_COL["bias_grad_norm2"]] = float(db @ db) * norm
            if i == 0:
                break
            gin = np.matmul(g, w, out=plan.pingpong(u, info.fan_in))
            prod_design = _is_zero_init(inits[i]["weight"], info.fan_in, info.width)
            prod_nonzero = ss > 0
            colsum = None
            g = gin
            continue
        _, ib, ia = unit
        x, mean, invstd, g64, b64, code, slope = saved[u]
        first = ib if ib is not None else ia
        out_row = ia if ia is not None else ib
        dx = plan.pingpong(u, n)
        vec = plan.vec
        f.unit_backward(
            g,
            x,
            mean,
            invstd,
            g64,
            b64,
            code,
            slope,
            ib is not None,
            first > 0,
            dx,
            plan.acc[0],
            plan.sums,
            vec["dgamma"][:n],
            vec["dbeta"][:n],
            vec["dxsum"][:n],
        )
        s = plan.sums
        if not _grad_ok(
            float(s[0]), infos[out_row], seed, findings, prod_design, prod_nonzero
        ):
            break
        stats[out_row][_COL["grad_second_moment"]] = s[0] / (g.size * m_out)
        if ib is not None and ia is not None:
            if not _grad_ok(float(s[1]), infos[ib], seed, findings, True, s[0] > 0):
                break
            stats[ib][_COL["grad_second_moment"]] = s[1] / (g.size * m_out)
        if ib is not None:
            dg = vec["dgamma"][:n]
            dbt = vec["dbeta"][:n]
            stats[ib][_COL["gamma_grad_norm2"]] = float(dg @ dg) * norm
            stats[ib][_COL["beta_grad_norm2"]] = float(dbt @ dbt) * norm
            prod_design = _is_zero_init(inits[ib]["weight"], n, n)
        else:
            prod_design = True
        if first == 0:
            break
        prod_nonzero = s[1] > 0
        colsum = vec["dxsum"][:n].copy()
        g = dx
    timing["backward"] += time.perf_counter() - t0


def _safe_gram(f: Any, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``f.gram(a, out)``; where the working-precision Gram overflows (its trace,
    the largest row norm^2 bound of every entry, is not finite) although ``a`` is
    finite, the full Gram in float64 instead (rare: signals near the float32 range)."""
    f.gram(a, out)
    if math.isfinite(float(np.trace(out, dtype=np.float64))):
        return out
    a64 = a.astype(np.float64)
    if not np.all(np.isfinite(a64)):
        return out  # a itself overflowed: the caller reports it
    return a64 @ a64.T


def _full64(f: Any, g: np.ndarray) -> np.ndarray:
    """A Gram stored as :func:`initdiag._fused.gram` leaves it, as a full float64
    matrix."""
    h = f.gram_split(g.shape[0])
    if g.dtype == np.float64 and h == 0:
        return g
    full = g.astype(np.float64)
    if h < 0:  # upper triangle by rows
        up = np.triu(full)
        return up + np.triu(full, 1).T
    if h:
        B = g.shape[0]
        for s in range(h, B, h):  # mirror the blocks left of each diagonal block
            e = min(s + h, B)
            full[:s, s:e] = full[s:e, :s].T
    return full


def _grad_ok(
    ss: float,
    info: Any,
    seed: int,
    findings: list[dict[str, Any]],
    prod_design: bool,
    prod_nonzero: bool,
) -> bool:
    """Check a gradient from its sum of squares (inf/NaN -> overflow; all zeros from
    a non-zero gradient through a layer that should not zero it -> underflow)."""
    if not math.isfinite(ss):
        findings.append(
            _finding(info, seed, "backward", "overflow", "overflowed (inf/NaN)")
        )
        return False
    if ss == 0.0 and prod_nonzero and not prod_design:
        findings.append(
            _finding(info, seed, "backward", "underflow", "underflowed to all zeros")
        )
        return False
    return True


def simulate(
    network: Network,
    *,
    batch_size: int = 256,
    seeds: int = 8,
    inputs: npt.ArrayLike | None = None,
    input_correlation: float = 0.0,
    output_grad: npt.ArrayLike | Callable[[np.ndarray], npt.ArrayLike] | None = None,
    backend: str | None = None,
    dtype: Any = "float32",
    rng: int | np.random.Generator | None = 0,
    jacobian: bool = False,
    memory_limit: int | str | None = None,
) -> Profile:
    """Measure a network's step-0 statistics by Monte Carlo over random networks.

    For each of ``seeds`` independent draws of the parameters (from the network's
    :class:`~initdiag.initializers.InitScheme`, per-layer overrides included), a batch
    is pushed forward and the gradient of ``L = sum_b <g_out[b], y[b]>`` backward
    through the kernel backend, and every Profile column is recorded for every layer
    output (definitions in :mod:`initdiag.profile`).

    Parameters
    ----------
    network : Network
        The network description.
    batch_size : int
        Examples per batch (>= 2); ignored when ``inputs`` is given.
    seeds : int
        Independent random networks (and input batches); >= 2 for standard errors.
    inputs : array (B, input_dim), optional
        The user's data, used for every seed.  Default: a fresh Gaussian batch per seed
        with ``E[x^2] = 1`` and pairwise correlation ``input_correlation``:
        ``x_b = sqrt(c) z_0 + sqrt(1 - c) z_b`` per feature (matches ``analyze``).
    input_correlation : float in [0, 1]
        The default inputs' correlation ``c``.
    output_grad : array (B, output_dim) or callable, optional
        ``g_out``; a callable receives the network output (B, output_dim) and returns
        the gradient of the user's loss.  Default: standard Gaussian, fresh per seed.
    backend : str, optional
        Kernel backend (``"numba"``, ``"c"``, ``"numpy"``); default as
        :func:`initdiag.kernels.dense_forward` resolves it.
    dtype : {"float32", "float64"}
        Working precision (statistics are accumulated in float64).
    rng : int, numpy Generator or None
        Seeds every stream; the same ``rng`` gives identical results (parameters
        and inputs bit-identical whatever the thread count; statistics identical
        for the same thread count and equal to float32 rounding across thread
        counts, which change how BLAS splits its sums).
    jacobian : bool
        Also estimate ``m1, m2`` (first two moments of the eigenvalues of ``J J^T``, J
        the input-output Jacobian of one example with the batch statistics of
        BatchNorm held fixed) with one Gaussian probe per example through JVP / VJP
        passes: ``m1 = E||J u||^2 / n_out``, ``m2 = E||J^T J u||^2 / n_out``
        (Hutchinson's estimator, u ~ N(0, I)); with width <= 512 also the exact
        singular values of J for a few examples (SVD).  Stored in
        ``profile.extra["jacobian"]``.
    memory_limit : int or str, optional
        Refuse to start when the estimated peak (:func:`estimate_memory`) exceeds it
        (bytes or ``"2GB"``); the machine's available memory is always checked.

    Returns
    -------
    Profile
        ``source="empirical"``; every column with ``<col>_se``; ``summary`` with the
        measured ``gradient_ratio`` and ``correlation_depth`` and the analytic
        ``chi1, regime, q_star, c_star, xi_q, xi_c`` (from :func:`initdiag.analyze`,
        when it can describe the network); ``findings`` lists overflow / underflow
        events; ``meta`` records batch, seeds, backend, dtype, ``workers`` (seeds run
        at once), ``seconds`` (wall time) and ``timing`` (per phase, summed over
        seeds; each seed runs on one thread, so with ``workers > 1`` the sum exceeds
        the wall time).

    Raises
    ------
    TypeError, ValueError
        For invalid arguments; ValueError also when the memory estimate exceeds the
        available memory or ``memory_limit`` (nothing large is allocated before).

    References
    ----------
    Poole et al. (2016), Schoenholz et al. (2017) for the quantities measured;
    Pennington, Schoenholz & Ganguli (2017) for ``m1, m2`` of ``J J^T``.
    """
    if not isinstance(network, Network):
        raise TypeError(
            f"simulate() needs an initdiag.Network (e.g. initdiag.mlp(...)), got "
            f"{type(network).__name__}"
        )
    dt = _check_dtype(dtype)
    seeds = _check_int(seeds, "seeds", 1)
    try:
        c_in = float(input_correlation)
    except (TypeError, ValueError):
        raise TypeError(
            f"input_correlation must be a number in [0, 1], got {input_correlation!r}"
        ) from None
    if not 0.0 <= c_in <= 1.0:
        raise ValueError(
            f"input_correlation must be in [0, 1], got {input_correlation!r}"
        )
    if inputs is not None:
        x_user = _check_array(inputs, (0, network.input_dim), "inputs", dt)
        B = x_user.shape[0]
        if B < 2:
            raise ValueError(f"inputs need at least 2 rows (examples), got {B}")
    else:
        x_user = None
        B = _check_int(batch_size, "batch_size", 2)
    if B <= 3 and any(info.kind == "batchnorm" for info in network.infos):
        from .meanfield import batchnorm_small_batch

        raise ValueError(f"{batchnorm_small_batch(B)}; use a batch of at least 4")
    g_spec: Any = None
    if output_grad is not None:
        if callable(output_grad):
            g_spec = output_grad
        else:
            g_spec = _check_array(
                output_grad, (B, network.output_dim), "output_grad", dt
            )
            if not np.any(g_spec):
                raise ValueError("output_grad is all zeros; nothing to propagate")
    if not isinstance(jacobian, bool):
        raise TypeError(f"jacobian must be True or False, got {jacobian!r}")
    entropy = _rng.entropy_of(rng)

    # memory check before anything large exists (workspaces kept from calls on
    # other networks are freed first)
    _drop_other_plans(_plan_key(network, B, dt))
    est = estimate_memory(network, B, dt, jacobian)
    limit = parse_bytes(memory_limit) if memory_limit is not None else None
    avail = available_memory()
    for cap, what in ((limit, "memory_limit"), (avail, "available memory")):
        if cap is not None and est["total"] > cap:
            raise ValueError(
                f"simulate() would need about {_fmt_bytes(est['total'])} (parameters "
                f"{_fmt_bytes(est['parameters'])}, saved for backward "
                f"{_fmt_bytes(est['saved'])}, workspace "
                f"{_fmt_bytes(est['workspace'])}) "
                f"but the {what} is {_fmt_bytes(cap)}; use a smaller batch_size, a "
                f"narrower or shallower network, or dtype='float32'"
            )

    ops = _Ops(backend)
    infos = network.infos
    inits = network.param_inits()
    stats = np.full((seeds, len(infos), len(STAT_COLUMNS)), np.nan)
    timing = {"sample": 0.0, "forward": 0.0, "backward": 0.0, "jacobian": 0.0}
    jac: dict[str, list[Any]] | None = (
        {"m1": [], "m2": [], "singular_values": [], "m1_exact": [], "m2_exact": []}
        if jacobian
        else None
    )
    fused = _fused_ok(network, backend)
    workers = _n_workers(
        seeds,
        fused,
        jacobian,
        callable(output_grad),
        est["total"],
        [c for c in (limit, avail) if c is not None],
    )
    seed_findings: list[list[dict[str, Any]]] = [[] for _ in range(seeds)]

    def one_seed(s: int, plan: _FusedPlan | None, tm: dict[str, float]) -> None:
        t0 = time.perf_counter()
        x = (
            x_user
            if x_user is not None
            else _default_inputs(
                B,
                network.input_dim,
                c_in,
                dt,
                entropy,
                s,
                None if plan is None else plan.buf(("x",), (B, network.input_dim)),
            )
        )
        tm["sample"] += time.perf_counter() - t0
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            if plan is not None:
                _run_seed_fused(
                    network,
                    inits,
                    x,
                    g_spec,
                    plan,
                    dt,
                    entropy,
                    s,
                    stats[s],
                    seed_findings[s],
                    tm,
                )
            else:
                _run_seed(
                    network,
                    inits,
                    x,
                    g_spec,
                    ops,
                    dt,
                    entropy,
                    s,
                    stats[s],
                    seed_findings[s],
                    jac,
                    tm,
                )
        if jac is not None:
            t0 = time.perf_counter()
            _jacobian_seed(network, inits, x, ops, dt, entropy, s, jac)
            tm["jacobian"] += time.perf_counter() - t0

    t_start = time.perf_counter()
    if workers > 1:
        _run_concurrent(one_seed, network, B, dt, seeds, workers, timing)
    elif fused:
        with _numba_threads(1), _pooled_plan(network, B, dt) as plan:
            for s in range(seeds):
                one_seed(s, plan, timing)
    else:
        for s in range(seeds):
            one_seed(s, None, timing)
    findings = [f for fs in seed_findings for f in fs]
    wall = time.perf_counter() - t_start

    prof = Profile.empty(network, "empirical", with_se=True)
    reached = np.sum(~np.isnan(stats[:, :, _COL["second_moment"]]), axis=0)
    reached_b = np.sum(~np.isnan(stats[:, :, _COL["grad_second_moment"]]), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        for c, j in _COL.items():
            v = stats[:, :, j]
            ok = ~np.isnan(v)
            n = ok.sum(axis=0)
            tot = np.where(ok, v, 0.0).sum(axis=0)
            mean = np.where(n > 0, tot / np.maximum(n, 1), np.nan)
            dev = np.where(ok, v - mean, 0.0)
            var = (dev * dev).sum(axis=0) / np.maximum(n - 1, 1)
            se = np.where(n >= 2, np.sqrt(var / np.maximum(n, 1)), np.nan)
            prof.columns[c] = mean
            prof.columns[f"{c}_se"] = se
    prof.findings = findings
    summary: dict[str, Any] = {
        k: math.nan for k in ("chi1", "q_star", "c_star", "xi_q", "xi_c")
    }
    summary["regime"] = None
    summary.update(_analytic_summary(network))
    summary["correlation_depth"] = prof.correlation_depth()
    summary["gradient_ratio"] = prof.gradient_ratio()
    prof.summary = summary
    if jac is not None:
        prof.extra["jacobian"] = _jacobian_summary(jac)
    prof.meta = {
        "engine": "simulate",
        "batch_size": B,
        "seeds": seeds,
        "inputs": "user" if x_user is not None else "gaussian",
        "input_correlation": c_in if x_user is None else None,
        "output_grad": "gaussian"
        if output_grad is None
        else ("callable" if callable(output_grad) else "user"),
        "backend": _resolved_backend(ops),
        "dtype": dt.name,
        "rng": entropy,
        "seeds_reached": reached.tolist(),
        "seeds_reached_backward": reached_b.tolist(),
        "memory_estimate": est["total"],
        "workers": workers,
        "seconds": wall,
        "timing": dict(timing),
    }
    return prof


def _resolved_backend(ops: _Ops) -> str | None:
    res = getattr(ops.k, "resolve_backend", None) or getattr(ops.k, "get_backend", None)
    if ops.backend is not None:
        return ops.backend
    try:
        return res() if res is not None else None
    except Exception:  # pragma: no cover - informative only
        return None


def _analytic_summary(network: Network) -> dict[str, Any]:
    """chi1, regime, q*, c*, xi_q, xi_c from the analytic engine, when available."""
    try:
        from .analytic import analyze
    except ImportError:
        return {}
    try:
        a = analyze(network)
    except (ValueError, NotImplementedError, TypeError):
        return {}
    keys = ("chi1", "regime", "q_star", "c_star", "xi_q", "xi_c")
    return {k: a.summary[k] for k in keys if k in a.summary}


# -- Jacobian ---------------------------------------------------------------------


def _jacobian_seed(
    net: Network,
    inits: list[dict[str, Any]],
    x: np.ndarray,
    ops: _Ops,
    dt: np.dtype,
    entropy: int,
    seed: int,
    jac: dict[str, list[Any]],
) -> None:
    """m1, m2 of J J^T by one Gaussian probe per example; exact SVD when narrow.

    The same parameters as the seed's forward pass are re-drawn from their streams
    (cheap) so the main pass keeps only what its backward needs.
    """
    B = x.shape[0]
    layers = []  # (kind, payload) with the per-example linearisation of each layer
    cur = x
    for i, info in enumerate(net.infos):
        layer = info.layer
        if isinstance(layer, Dense):
            p = inits[i]
            w, b = _layer_params(info, p, dt, entropy, seed, i)
            cur = ops.dense(cur, w, b, np.empty((B, info.width), dtype=dt))
            layers.append(("dense", w))
        elif isinstance(layer, BatchNorm):
            p = inits[i]
            gamma, beta = _layer_params(info, p, dt, entropy, seed, i)
            out, _, invstd = ops.bn(cur, gamma, beta, layer.eps)
            layers.append(("scale", (gamma * invstd).astype(dt)))
            cur = out
        else:
            layers.append(("act", (cur, layer)))
            cur = ops.act(cur, layer)
        if not np.all(np.isfinite(cur)):
            return

    def jvp(t: np.ndarray) -> np.ndarray:
        for kind, pl in layers:
            if kind == "dense":
                t = t @ pl.T
            elif kind == "scale":
                t = t * pl
            else:
                h, layer = pl
                t = ops.act_backward(np.ascontiguousarray(t), h, layer)
        return t

    def vjp(g: np.ndarray) -> np.ndarray:
        for kind, pl in reversed(layers):
            if kind == "dense":
                g = g @ pl
            elif kind == "scale":
                g = g * pl
            else:
                h, layer = pl
                g = ops.act_backward(np.ascontiguousarray(g), h, layer)
        return g

    key = _rng.derive_key(entropy, seed, _PROBE_STREAM)
    u = _rng.fill_normal(np.empty((B, net.input_dim), dtype=dt), key, 0)
    jv = jvp(u)
    jtjv = vjp(np.ascontiguousarray(jv))
    n_out = net.output_dim
    jv64 = jv.astype(np.float64)
    v64 = jtjv.astype(np.float64)
    jac["m1"].append(float(np.mean(np.sum(jv64 * jv64, axis=1))) / n_out)
    jac["m2"].append(float(np.mean(np.sum(v64 * v64, axis=1))) / n_out)
    widest = max([net.input_dim, *net.widths])
    if widest <= _EXACT_JACOBIAN_MAX_WIDTH:
        for b in range(min(B, _EXACT_JACOBIAN_EXAMPLES)):
            # J^T for example b: push the identity through the linearisation of b
            t = np.eye(net.input_dim, dtype=np.float64)
            for kind, pl in layers:
                if kind == "dense":
                    t = t @ pl.T.astype(np.float64)
                elif kind == "scale":
                    t = t * pl.astype(np.float64)
                else:
                    h, layer = pl
                    ones = np.ones((1, h.shape[1]), dtype=h.dtype)
                    d = ops.act_backward(
                        ones, np.ascontiguousarray(h[b : b + 1]), layer
                    )
                    t = t * d.astype(np.float64)
            sv = np.linalg.svd(t, compute_uv=False)
            lam = sv * sv
            jac["singular_values"].append(sv)
            jac["m1_exact"].append(float(lam.sum()) / n_out)
            jac["m2_exact"].append(float((lam * lam).sum()) / n_out)


def _jacobian_summary(jac: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": "hutchinson probes (one per example), BatchNorm statistics held fixed"
    }
    for k in ("m1", "m2", "m1_exact", "m2_exact"):
        v = np.asarray(jac[k], dtype=np.float64)
        if not v.size:
            continue
        out[k] = float(v.mean()) if v.size else math.nan
        out[f"{k}_se"] = (
            float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
        )
    if jac["singular_values"]:
        out["singular_values"] = np.stack(jac["singular_values"])
    return out

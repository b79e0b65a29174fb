"""The fused executor: the same plan through the fused numba passes.

Units come from each layer's :meth:`~initdiag.layers.Layer.fusion` primitive:
``("gemm",)`` (a dense layer: BLAS GEMM into a kept buffer, then every statistic
of its output in one pass), ``("batch_affine", eps)`` followed by
``("elementwise", code, slope)`` (BatchNorm + activation and the statistics of
both outputs in one pass; the BatchNorm output is never stored: backward
recomputes it), a lone ``batch_affine`` (identity activation) or a lone
``elementwise`` (no affine part); ``("row_affine", eps)`` (LayerNorm) with the
``elementwise`` that follows it: the numba LayerNorm kernel into a kept buffer,
then the activation and the statistics of both outputs in one fused pass (the
same pass with an identity affine part), and backward the fused activation
backward followed by the LayerNorm backward kernel; a layer without a primitive
(``None``) runs its generic step (:mod:`initdiag.empirical.generic`) inside this
plan.

GEMMs go to BLAS into buffers allocated once per worker and kept between calls
for the latest network structure (no page faults on repeated calls;
:func:`clear_workspace` frees them).  Weight-gradient norms are exact and use
``||G^T X||_F^2 = sum_ab (G G^T)_ab (X X^T)_ab`` (both B x B Grams by BLAS syrk)
where cheaper (:func:`initdiag.layers.dense.use_gram`).

Threads within a seed (:class:`Lanes`): with ``threads > 1`` (a lone seed on
several cores) every hand-off to the lanes is a list of single-threaded BLAS
calls that the caller and the pool threads pull in turn (NumPy's matmul and the
ctypes syrk release the GIL): a dense layer's Gram whole (cut into the blocks of
:func:`initdiag.kernels.fused.gram_parts` only when it exceeds a lane's share),
then its GEMM in :func:`guided_blocks` of rows, one hand-off per layer and pass.
The work that no later step waits for runs on a lane behind the caller's serial
passes (BatchNorm / LayerNorm + activation + statistics, on the caller's thread),
which would otherwise leave the other cores idle: the next layers' parameter
draws (:meth:`FusedExecutor._prefetch`; the GEMM blocks wait for them) and, in
the backward pass, each layer's gradient Gram and weight-gradient norm
(:meth:`FusedExecutor._dx_then_norm`; the engine records deferred sums when the
pass ends).  BLAS must be single-threaded for the duration (the caller's
``threadpool_limits``): OpenBLAS's own workers spin after each call and would
take the cores the Numba passes need (bench/SIMULATE.md).  Numba's parallel
kernels run on one thread on every lane: a parallel draw woke workers that
delayed the lanes' GEMMs by 1-5 ms each (bench/SIMULATE.md).  A row of a GEMM is
computed the same way whatever block it falls in, so results are identical for
a given thread count and equal to float rounding across thread counts (a Gram
block computed by GEMM rather than syrk rounds differently, and a lone seed on
several lanes takes a dense row's gradient sum of squares from the gradient
rather than from its Gram's trace).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..layers.dense import is_zero_init, use_gram
from .engine import Block, SeedContext, plan
from .generic import step_context
from .ops import Ops, sumsq64
from .sampling import layer_params, output_grad

# a syrk costs ~1.1x a GEMM per multiply-add (512 x 1024 float32, one thread:
# bench/SIMULATE.md); the cost model that deals a layer's GEMM rows and Gram
_SYRK_COST = 1.1

__all__ = [
    "FusedExecutor",
    "Lanes",
    "numba_threads",
    "fused_ok",
    "pooled_executor",
    "clear_workspace",
    "drop_other_plans",
    "plan_key",
]


def _fused_kernels():
    """The raw fused numba kernels (no per-call validation: this executor owns its
    buffers), ``row_chunks`` and ``gram_parts``."""
    from ..kernels import fused

    return fused.resolve("numba"), fused.row_chunks, fused.gram_parts


@contextlib.contextmanager
def numba_threads(n: int):
    """Numba's thread count of the calling thread set to ``n`` (at most Numba's
    pool size; restored after)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - the fused path needs numba
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def guided_blocks(rows: int, lanes: int, min_rows: int = 64) -> list[int]:
    """Row edges cutting a GEMM of ``rows`` rows for ``lanes`` lanes that pull
    blocks as they free up: each block a ``1 / lanes`` share of the rows left
    (half, for two lanes), none below ``min_rows`` unless ``rows`` is (smaller
    row blocks run below the GEMM rate), so that lanes that start at different
    times (one of them finishing a draw or a Gram first) still finish together."""
    edges = [0]
    while lanes > 1:
        left = rows - edges[-1]
        take = max(min_rows, -(-left // lanes))
        if left - take < min_rows:
            break
        edges.append(edges[-1] + take)
    edges.append(rows)
    return edges


def _in_turn(*tasks: Any) -> Any:
    """One task running ``tasks`` one after the other (on one lane)."""

    def run() -> None:
        for t in tasks:
            t()

    return run


def _as_caller(err: dict, fn: Any) -> Any:
    """``fn()`` on a lane thread as the caller would run it: under the caller's
    NumPy error state (the engine's ``np.errstate``, which is per thread: it
    reports overflow as findings, not warnings) and with Numba's kernels on one
    thread (``set_num_threads`` is per thread too: a new thread has them all)."""
    with np.errstate(**err), numba_threads(1):
        return fn()


class Lanes:
    """``threads`` threads for one seed's BLAS calls: the caller and a pool of
    ``threads - 1`` kept for the whole ``simulate`` call (starting threads per
    GEMM would cost more than the hand-off)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="initdiag-lane")
            if threads > 1
            else None
        )

    def run(self, tasks: list, after: tuple = ()) -> list:
        """Run independent zero-argument ``tasks``; the caller and the pool threads
        take the next task not yet started, so when a pool thread is not scheduled
        in time (a loaded machine) the caller runs its share instead of waiting.
        ``after``: jobs a pool thread starts once no task is left to take (the
        caller does not wait for them); their Futures (``threads > 1`` only)."""
        if self._pool is None or len(tasks) == 1:
            for t in tasks:
                t()
            return [self.submit(job) for job in after]
        it = iter(tasks)
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    t = next(it, None)
                if t is None:
                    return
                t()

        err = np.geterr()
        futs = [
            self._pool.submit(_as_caller, err, drain)
            for _ in range(min(len(tasks), self.threads) - 1)
        ]
        later = [self.submit(job) for job in after]  # queued behind the drains
        try:
            drain()
        finally:
            for fut in futs:
                if not fut.cancel():  # started: wait for its task
                    fut.result()
        return later

    def submit(self, fn: Any) -> Future:
        """Start ``fn`` on a pool thread (:func:`_as_caller`) while the caller goes
        on; its Future (done already, ``fn`` run here, on one lane)."""
        if self._pool is not None:
            return self._pool.submit(_as_caller, np.geterr(), fn)
        fut: Future = Future()
        try:
            fut.set_result(fn())
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    def gemm_tasks(
        self, a: np.ndarray, b: np.ndarray, out: np.ndarray, wait: Any = None
    ) -> list:
        """``np.matmul(a, b, out=out)`` as tasks for :meth:`run`: one on one lane,
        :func:`guided_blocks` of rows on several; each first waits for the Future
        ``wait`` (the draw of ``b``) when given."""
        edges = guided_blocks(a.shape[0], self.threads)
        tasks = [
            functools.partial(np.matmul, a[r0:r1], b, out=out[r0:r1])
            for r0, r1 in zip(edges[:-1], edges[1:], strict=True)
        ]
        if wait is not None:
            tasks = [_in_turn(wait.result, t) for t in tasks]
        return tasks

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``np.matmul(a, b, out=out)`` over the lanes."""
        self.run(self.gemm_tasks(a, b, out))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class FusedExecutor:
    """Units of the fused numba path and their buffers (allocated once per plan,
    reused across seeds).  A plan is used by one thread at a time."""

    def __init__(self, net: Any, B: int, dt: np.dtype) -> None:
        f, row_chunks, self._gram_parts = _fused_kernels()
        self.f = f
        from ..kernels._registry import resolve

        # the raw numba add: this executor owns (and has checked) its buffers
        self.f_residual_add = resolve("residual_add", "numba")
        self.lanes = Lanes(1)  # set per call by pooled_executor
        self.net = net
        infos = net.infos
        self.units = plan(net, net.top, self._group)
        # position of every unit in execution order (ping-pong parity, buffer
        # keys) and the unit that consumes its output within its sequence
        self._pos: dict[tuple, int] = {}
        self._next: dict[tuple, Any] = {}
        self._order: list[tuple] = []  # the units in execution order
        # unit -> (Future, SeedContext) of a draw a lane started (_prefetch)
        self._pending: dict[tuple, tuple] = {}
        self._norm_jobs: list[Any] = [None, None]  # _dx_then_norm's, in turn
        self._norm_turn = 0
        self._index(self.units)
        self._colstats_of: Any = None
        self._colsum_of: Any = None
        self._colsum: Any = None
        self.B = B
        self.dt = dt
        self.ops = Ops("numba")
        widths = [net.input_dim, *[info.width for info in infos]]
        nmax = max(widths)
        nch = row_chunks(B)
        self.acc = [np.empty((nch, 4, nmax)) for _ in range(2)]
        self.sc = [np.empty((nch, 4)) for _ in range(2)]
        self.colmean = np.empty(nmax)
        self.colvar = np.empty(nmax)
        self.vec = {k: np.empty(nmax) for k in ("dgamma", "dbeta", "dxsum")}
        self.sums = np.empty(3)
        self.flat = [np.empty(B * nmax, dt) for _ in range(2)]  # ping-pong
        self.gg = np.empty((B, B), dt)
        self.bufs: dict[tuple, np.ndarray] = {}
        self.saved: dict[int, Any] = {}
        self.output: np.ndarray | None = None

    def _group(self, rows: list[int]) -> list[tuple]:
        """Units of a run of plain rows from their fusion primitives."""
        infos = self.net.infos
        units: list[tuple] = []
        k = 0
        while k < len(rows):
            i = rows[k]
            prim = infos[i].layer.fusion()
            j = rows[k + 1] if k + 1 < len(rows) else None
            nxt = infos[j].layer.fusion() if j is not None else None
            pair = nxt is not None and nxt[0] == "elementwise"
            if prim is None:
                units.append(("step", i))
            elif prim[0] == "gemm":
                units.append(("dense", i))
            elif prim[0] == "row_affine":
                units.append(("ln", i, j if pair else None))
                k += pair
            elif prim[0] == "batch_affine":
                units.append(("elem", i, j if pair else None))
                k += pair
            else:
                units.append(("elem", None, i))
            k += 1
        return units

    def _index(self, seq: tuple) -> None:
        for k, unit in enumerate(seq):
            if isinstance(unit, Block):
                self._index(unit.branch)
                self._index(unit.shortcut)
                continue
            self._pos[unit] = len(self._pos)
            self._order.append(unit)
            self._next[unit] = seq[k + 1] if k + 1 < len(seq) else None

    # -- buffers ----------------------------------------------------------------
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

    def _u(self, unit: tuple) -> int:
        return self._pos[unit]

    def _gram(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``f.gram(a, out)``, cut over the lanes."""
        if self.lanes.threads == 1:
            return self.f.gram(a, out)
        self.lanes.run(self._gram_parts(a, out, self.lanes.threads))
        return out

    def _matmul_gram(
        self, a, b, out, ga=None, gout=None, wait=None, after: tuple = ()
    ) -> list:
        """``out = a @ b`` and, when ``ga`` is given, its Gram into ``gout``, in one
        hand-off to the lanes (each fork-join costs a thread wake-up): the Gram is
        the first task, whole when it is at most one lane's share of the work and
        cut over the lanes otherwise; the GEMM's row blocks follow, each waiting
        for ``wait`` (the draw of ``b``) first, so a lane finishing that draw
        starts on the GEMM while another runs the Gram; ``after``:
        :meth:`Lanes.run`'s, whose Futures it returns."""
        tasks = self.lanes.gemm_tasks(a, b, out, wait)
        if ga is not None:
            n = self.lanes.threads
            gemm = a.shape[0] * a.shape[1] * b.shape[1]
            cost = _SYRK_COST * ga.shape[0] ** 2 * ga.shape[1] / 2
            if n * cost <= gemm + cost:
                tasks.insert(0, functools.partial(self.f.gram, ga, gout))
            else:
                tasks[:0] = self._gram_parts(ga, gout, n)
        return self.lanes.run(tasks, after)

    # -- sampling -----------------------------------------------------------------
    def sample(self, unit: tuple, sc: SeedContext) -> None:
        """The unit's parameters: drawn now, unless a lane is drawing them for this
        seed (:meth:`_prefetch`; the unit's forward waits for that draw where it
        first needs them, :meth:`_drawn`)."""
        pending = self._pending.get(unit)
        if pending is not None and pending[1] is sc:
            return
        self._drawn(unit)  # another seed's draw (an aborted pass): let it end
        self._sample(unit, sc)

    def _drawn(self, unit: tuple) -> Any:
        """Wait for the lane's draw of ``unit``'s parameters, if one is pending;
        its Future (None when there was none)."""
        pending = self._pending.pop(unit, None)
        if pending is None:
            return None
        pending[0].result()  # raises what the draw raised
        return pending[0]

    def _sample(self, unit: tuple, sc: SeedContext) -> None:
        infos = self.net.infos
        if unit[0] == "step":
            i = unit[1]
            params = layer_params(infos[i], sc.inits[i], sc.dt, sc.entropy, sc.seed)
            self._step_ctx = step_context(infos[i], params, sc, self.ops)
            return
        for job in self._draws(unit, sc):
            job()

    def _draws(self, unit: tuple, sc: SeedContext) -> list:
        """Zero-argument draws of the unit's parameters into their kept buffers
        (the buffers are made here, on the caller's thread)."""
        infos = self.net.infos
        rows = (
            [unit[1]] if unit[0] == "dense" else [r for r in unit[1:] if r is not None]
        )
        jobs = []
        for i in rows:
            info, p = infos[i], sc.inits[i]
            layer = info.layer
            bufs = {
                slot.name: self.buf(
                    (slot.name, i), layer.param_shape(slot, info.fan_in, info.width)
                )
                for slot in layer.slot_table
                if p.get(slot.name) is not None
            }
            jobs.append(
                functools.partial(
                    layer_params, info, p, sc.dt, sc.entropy, sc.seed,
                    lambda name, shape, bufs=bufs: bufs[name],
                )
            )  # fmt: skip
        return jobs

    def _prefetch(self, unit: tuple, sc: SeedContext) -> tuple[list, list]:
        """The units after ``unit`` up to the next dense one, and one draw of
        their parameters each, for a lane to run behind ``unit``'s GEMM while this
        thread runs the passes between (:meth:`sample` then leaves them to it):
        with one seed on several
        lanes, the draws cost no wall time (values depend only on the seed, layer
        and slot, not on when or where they are drawn).  Nothing on one lane."""
        todo: list[tuple] = []
        if self.lanes.threads > 1:
            for nxt in self._order[self._pos[unit] + 1 :]:
                if nxt[0] == "step" or nxt in self._pending:
                    break
                todo.append(nxt)
                if nxt[0] == "dense":
                    break
        return todo, [_in_turn(*self._draws(u, sc)) for u in todo]

    # -- forward ------------------------------------------------------------------
    def forward(self, unit: tuple, cur: np.ndarray, sc: SeedContext):
        if unit[0] == "dense":
            return self._dense_forward(unit, cur, sc)
        if unit[0] == "step":
            return self._step_forward(unit, cur, sc)
        if unit[0] == "ln":
            return self._ln_forward(unit, cur, sc)
        return self._elem_forward(unit, cur, sc)

    def _stats(self, x: np.ndarray, n: int, st: np.ndarray) -> np.ndarray:
        self.f.layer_stats(
            x, self.acc[1], self.sc[1], st, self.colmean[:n], self.colvar[:n]
        )
        return st

    def _dense_forward(self, unit: tuple, cur: np.ndarray, sc: SeedContext):
        i = unit[1]
        info = self.net.infos[i]
        p = sc.inits[i]
        n_in, n_out = info.fan_in, info.width
        w = self.bufs[("weight", i)]
        b = self.bufs[("bias", i)] if p.get("bias") is not None else None
        gram = use_gram(self.B, n_in, n_out)
        pre = self.buf(("pre", i), (self.B, n_out))
        drawing = self._pending.pop(unit, (None,))[0]  # sample() left it running
        ahead, draws = self._prefetch(unit, sc)
        xs = self.buf(("gram", i), (self.B, self.B)) if gram else None
        futs = self._matmul_gram(
            cur, w.T, pre, cur if gram else None, xs, drawing, draws
        )
        for u, fut in zip(ahead, futs, strict=True):
            self._pending[u] = (fut, sc)
        xs = _checked_gram(cur, xs) if gram else cur.copy()
        self.saved[unit] = (w, b, xs, gram)
        if b is not None and not is_zero_init(p["bias"], n_in, n_out):
            pre += b
        st = self._stats(pre, n_out, np.empty(10))
        self._colstats_of = pre  # its column moments, for a BatchNorm next
        return pre, [(i, st)]

    def _step_forward(self, unit: tuple, cur: np.ndarray, sc: SeedContext):
        i = unit[1]
        ctx = self._step_ctx
        y, saved = ctx.info.layer.forward(ctx, cur)
        self.saved[unit] = (ctx, saved)
        self._colstats_of = None
        return y, [(i, self.ops.row_stats(y, np.empty(10)))]

    def _keep_output(self, unit: tuple, n: int) -> np.ndarray:
        """Where ``unit`` writes its (B, n) output: a kept buffer unless the next
        unit of its sequence is a dense layer that saves only the Gram of its
        input (an output that feeds a residual block, or ends a branch, is read
        again later and is always kept)."""
        nxt = self._next[unit]
        u = self._u(unit)
        keep = not (
            isinstance(nxt, tuple)
            and nxt[0] == "dense"
            and use_gram(self.B, n, self.net.infos[nxt[1]].width)
        )
        return self.buf(("h", u), (self.B, n)) if keep else self.pingpong(u, n)

    def _ln_params(self, i: int, sc: SeedContext, n: int):
        if sc.inits[i].get("weight") is not None:
            return self.bufs[("weight", i)], self.bufs[("bias", i)]
        return np.ones(n, self.dt), np.zeros(n, self.dt)  # affine=False

    def _ln_forward(self, unit: tuple, cur: np.ndarray, sc: SeedContext):
        from .. import kernels

        self._drawn(unit)
        f = self.f
        infos = self.net.infos
        _, il, ia = unit
        u = self._u(unit)
        n = cur.shape[1]
        gamma, beta = self._ln_params(il, sc, n)
        mean = self.buf(("mean", il), (self.B,))
        invstd = self.buf(("invstd", il), (self.B,))
        # y: the output itself, or the activation's input (kept for backward)
        y = (
            self._keep_output(unit, n)
            if ia is None
            else self.buf(("lny", u), (self.B, n))
        )
        kernels.layernorm_forward(
            cur,
            gamma,
            beta,
            infos[il].layer.fusion()[1],
            backend="numba",
            out=(y, mean, invstd),
        )
        self.saved[unit] = (cur, mean, invstd, gamma, beta, y)
        self._colstats_of = None
        st_y = np.empty(10)
        if ia is None:
            return y, [(il, self._stats(y, n, st_y))]
        code, slope = infos[ia].layer.fusion()[1:]
        h = self._keep_output(unit, n)
        st_h = np.empty(10)
        zero, one = np.zeros(n), np.ones(n)
        f.unit_forward(
            y, zero, one, one, zero, code, slope, True, h,
            self.acc[0], self.sc[0], self.acc[1], self.sc[1], st_y, st_h,
        )  # fmt: skip
        return h, [(il, st_y), (ia, st_h)]

    def _ln_backward(self, unit: tuple, g: np.ndarray, sc: SeedContext):
        from .. import kernels

        _, il, ia = unit
        u = self._u(unit)
        n = g.shape[1]
        x, mean, invstd, gamma, beta, y = self.saved[unit]
        rows = []
        if ia is not None:  # the activation's backward, identity affine part
            code, slope = self.net.infos[ia].layer.fusion()[1:]
            zero, one = np.zeros(n), np.ones(n)
            dy = self.pingpong(u, n)
            vec = self.vec
            self.f.unit_backward(
                g, y, zero, one, one, zero, code, slope, False, True, dy,
                self.acc[0], self.sums, vec["dgamma"][:n], vec["dbeta"][:n],
                vec["dxsum"][:n],
            )  # fmt: skip
            rows.append((ia, float(self.sums[0]), {}))
            ss = float(self.sums[1])
        else:
            dy, ss = g, sumsq64(g)
        dx = self.buf(("lndx",), (self.B, n))
        dgamma, dbeta = self.buf(("lndg",), (n,)), self.buf(("lndb",), (n,))
        kernels.layernorm_backward(
            dy, x, (mean, invstd), gamma, beta, backend="numba", out=(dx, dgamma, dbeta)
        )
        norms = {}
        if sc.inits[il].get("weight") is not None:
            dg, db = dgamma.astype(np.float64), dbeta.astype(np.float64)
            norms = {
                "gamma_grad_norm2": float(dg @ dg),
                "beta_grad_norm2": float(db @ db),
            }
        rows.append((il, ss, norms))
        self._colsum_of = None
        return (dx if il > 0 else None), rows

    def _elem_forward(self, unit: tuple, cur: np.ndarray, sc: SeedContext):
        self._drawn(unit)
        f = self.f
        infos = self.net.infos
        _, ib, ia = unit
        n = cur.shape[1]
        if ib is not None:
            eps = infos[ib].layer.fusion()[1]
            if sc.inits[ib].get("weight") is not None:
                g64 = self.bufs[("weight", ib)].astype(np.float64)
                b64 = self.bufs[("bias", ib)].astype(np.float64)
            else:  # affine=False: gamma = 1, beta = 0
                g64, b64 = np.ones(n), np.zeros(n)
            if self._colstats_of is not cur:
                self._stats(cur, n, np.empty(10))
            mean = self.buf(("mean", ib), (n,), np.float64)
            invstd = self.buf(("invstd", ib), (n,), np.float64)
            mean[:] = self.colmean[:n]
            np.divide(1.0, np.sqrt(self.colvar[:n] + float(eps)), out=invstd)
        else:
            mean = np.zeros(n)
            invstd = g64 = np.ones(n)
            b64 = np.zeros(n)
        code, slope = (
            (infos[ia].layer.fusion()[1:]) if ia is not None else (f.IDENTITY, 0.0)
        )
        rec_y = ib is not None and ia is not None
        h = self._keep_output(unit, n)
        st_y, st_h = np.empty(10), np.empty(10)
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
            self.acc[0],
            self.sc[0],
            self.acc[1],
            self.sc[1],
            st_y,
            st_h,
        )
        self.saved[unit] = (cur, mean, invstd, g64, b64, code, slope)
        self._colstats_of = None
        rows = []
        if rec_y:
            rows.append((ib, st_y))
        rows.append((ia if ia is not None else ib, st_h))
        return h, rows

    def merge(self, b: Block, xb: np.ndarray, xs: np.ndarray, sc: SeedContext):
        """The add into the block's kept buffer, then every statistic of the
        stream (and its column moments, for a BatchNorm next)."""
        layer = self.net.infos[b.row].layer
        n = xs.shape[1]
        y = self.buf(("h", "merge", b.row), xs.shape)
        st = np.empty(10)
        # one pass: the add and every statistic of its result (bench/KERNELS.md)
        self.f.residual_add_stats(
            xs, xb, layer.multiplier, y, self.acc[1], self.sc[1], st,
            self.colmean[:n], self.colvar[:n],
        )  # fmt: skip
        self._colstats_of = y
        return y, [(b.row, st)]

    # -- backward -----------------------------------------------------------------
    def merge_backward(self, b: Block, g: np.ndarray, sc: SeedContext):
        """The gradient of both paths, each in a buffer of the block's own (the
        units below write their ping-pong buffers, where ``g`` may lie)."""
        layer = self.net.infos[b.row].layer
        add = self.f_residual_add
        gb = add(None, g, layer.multiplier, self.buf(("gbranch", b.row), g.shape))
        gs = add(None, g, 1.0, self.buf(("gskip", b.row), g.shape))
        self._colsum_of = None
        return gb, gs, [(b.row, sumsq64(g), {})]

    def keep_grad(self, b: Block, g: np.ndarray) -> np.ndarray:
        """The branch's input gradient, kept while the shortcut's backward runs."""
        return self.f_residual_add(None, g, 1.0, self.buf(("gkeep", b.row), g.shape))

    def add_grads(self, b: Block, g1: Any, g2: Any) -> Any:
        if g1 is None or g2 is None:
            return None
        out = self.f_residual_add(g2, g1, 1.0, self.buf(("gsum", b.row), g2.shape))
        self._colsum_of = None
        return out

    def output_grad(self, y: np.ndarray, sc: SeedContext) -> np.ndarray:
        self._colsum_of = None
        return output_grad(
            sc.g_spec, y, sc.dt, sc.entropy, sc.seed, self.buf(("gout",), y.shape)
        )

    def backward(self, unit: tuple, g: np.ndarray, sc: SeedContext):
        if unit[0] == "dense":
            return self._dense_backward(unit, g, sc)
        if unit[0] == "step":
            i = unit[1]
            ctx, saved = self.saved.pop(unit)
            ss = sumsq64(g)
            gin, sums = ctx.info.layer.backward(ctx, g, saved, i > 0)
            self._colsum_of = None
            return gin, [(i, ss, sums)]
        if unit[0] == "ln":
            return self._ln_backward(unit, g, sc)
        return self._elem_backward(unit, g, sc)

    def _dense_backward(self, unit: tuple, g: np.ndarray, sc: SeedContext):
        i = unit[1]
        info = self.net.infos[i]
        w, b, xs, gram = self.saved[unit]
        gin = self.pingpong(self._u(unit), info.fan_in) if i > 0 else None
        if gram and gin is not None and self.lanes.threads > 1:
            ss, wn = self._dx_then_norm(unit, g, w, xs, gin)
        elif gram:
            if gin is None:
                self._gram(g, self.gg)
            else:
                self._matmul_gram(g, w, gin, g, self.gg)
            wn, ss = self._gram_norm(_checked_gram(g, self.gg), xs)
        else:
            ss = float(np.einsum("ij,ij->", g, g, dtype=np.float64))
            dw = self.lanes.matmul(
                g.T, xs, np.empty((g.shape[1], xs.shape[1]), g.dtype)
            )
            wn = float(np.einsum("ij,ij->", dw, dw, dtype=np.float64))
        sums = {"weight_grad_norm2": wn}
        if b is not None:
            db = (
                self._colsum
                if self._colsum_of is g
                else g.sum(axis=0, dtype=np.float64)
            )
            sums["bias_grad_norm2"] = float(db @ db)
        self._colsum_of = None
        if gin is not None and not gram:
            self.lanes.matmul(g, w, gin)
        return gin, [(i, ss, sums)]

    def _gram_norm(self, gg: np.ndarray, xs: np.ndarray) -> tuple[float, float]:
        """(||G^T X||_F^2, ||G||_F^2) from the Grams of G and X."""
        f = self.f
        if gg.dtype == xs.dtype:
            return f.gram_dot(gg, xs, f.gram_layout(self.B))
        # a float64 fallback on one side: both full, float64
        return f.gram_dot(_full64(f, gg), _full64(f, xs), 0)

    def _dx_then_norm(self, unit, g, w, xs, gin) -> tuple[float, Any]:
        """Several lanes: ``gin = g @ w`` over the lanes, with a copy of ``g`` and
        its sum of squares in the same hand-off; then the Gram of ``g`` and the
        weight-gradient norm on a lane, while this thread goes on with the units
        below (their serial passes would leave the other lanes idle).  Returns
        ``(sum g^2, norm)``, the norm as a callable the engine calls when the pass
        ends.  The copy: the unit below overwrites ``g``'s buffer; two copies and
        two Gram buffers alternate, each reused once its last job has ended."""
        k = self._norm_turn = 1 - self._norm_turn
        if self._norm_jobs[k] is not None:
            self._norm_jobs[k].result()
        hold = self.buf(("ghold", k), g.shape)
        gg = self.buf(("gg", k), (self.B, self.B))
        ss: list[float] = []
        held = threading.Event()

        def keep() -> None:
            try:
                np.copyto(hold, g)
                ss.append(sumsq64(g))
            finally:
                held.set()  # norm() must not wait for ever if this failed

        def norm() -> float:
            held.wait()  # keep() may still run on another lane
            return self._gram_norm(_checked_gram(hold, self.f.gram(hold, gg)), xs)[0]

        tasks = [keep, *self.lanes.gemm_tasks(g, w, gin)]
        (job,) = self.lanes.run(tasks, (norm,))
        self._norm_jobs[k] = job
        return ss[0], job.result

    def _elem_backward(self, unit: tuple, g: np.ndarray, sc: SeedContext):
        f = self.f
        _, ib, ia = unit
        u = self._u(unit)
        n = g.shape[1]
        x, mean, invstd, g64, b64, code, slope = self.saved[unit]
        first = ib if ib is not None else ia
        out_row = ia if ia is not None else ib
        dx = self.pingpong(u, n)
        vec = self.vec
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
            self.acc[0],
            self.sums,
            vec["dgamma"][:n],
            vec["dbeta"][:n],
            vec["dxsum"][:n],
        )
        s = self.sums
        rows = [(out_row, float(s[0]), {})]
        affine = ib is not None and sc.inits[ib].get("weight") is not None
        norms = {}
        if affine:
            dg, dbt = vec["dgamma"][:n], vec["dbeta"][:n]
            norms = {
                "gamma_grad_norm2": float(dg @ dg),
                "beta_grad_norm2": float(dbt @ dbt),
            }
        if ib is not None and ia is not None:
            rows.append((ib, float(s[1]), norms))
        elif ib is not None:
            rows[0] = (ib, float(s[0]), norms)
        if first == 0:
            return None, rows
        self._colsum = vec["dxsum"][:n].copy()
        self._colsum_of = dx  # its column sums, for the dense bias below
        return dx, rows


def _checked_gram(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The working-precision Gram ``out`` of ``a``, or, where it overflowed (its
    trace, the largest row norm^2 bound of every entry, is not finite) although
    ``a`` is finite, the full Gram in float64 (rare: signals near the float32
    range)."""
    if math.isfinite(float(np.trace(out, dtype=np.float64))):
        return out
    a64 = a.astype(np.float64)
    if not np.all(np.isfinite(a64)):
        return out  # a itself overflowed: the caller reports it
    return a64 @ a64.T


def _full64(f: Any, g: np.ndarray) -> np.ndarray:
    """A Gram stored as the fused ``gram`` leaves it, as a full float64 matrix."""
    h = f.gram_layout(g.shape[0])
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


def fused_ok(net: Any, backend: str | None) -> bool:
    """The fused executor serves the numba backend (any network: layers without a
    fused primitive run their generic step inside the plan)."""
    try:
        from .. import kernels

        return kernels._resolve(backend, ()) == "numba"
    except Exception:  # pragma: no cover - the generic path reports the problem
        return False


# Workspaces kept across calls: the buffers of a plan (weights, pre-activations,
# Grams of every layer: ~140 MB per worker on the reference workload) are
# page-faulted in on first touch, ~10 ms per seed-core when a call starts fresh.
# Finished plans go back to this pool; a call with the same network structure,
# batch and dtype takes them out again.  Only the latest structure is kept, at
# most ``_POOL_MAX_PLANS`` plans of at most ``_POOL_MAX_BYTES`` each.
_POOL_LOCK = threading.Lock()
_POOL: dict[tuple, list[FusedExecutor]] = {}
_POOL_MAX_PLANS = 4
_POOL_MAX_BYTES = 1 << 30


def plan_key(net: Any, B: int, dt: np.dtype) -> tuple:
    return (
        net.input_dim,
        B,
        dt.str,
        tuple((i.layer, i.fan_in, i.width) for i in net.infos),
    )


def clear_workspace() -> None:
    """Free the buffers ``simulate`` keeps between calls."""
    with _POOL_LOCK:
        _POOL.clear()


def drop_other_plans(key: tuple) -> None:
    with _POOL_LOCK:
        for k in [k for k in _POOL if k != key]:
            del _POOL[k]


@contextlib.contextmanager
def pooled_executor(net: Any, B: int, dt: np.dtype, threads: int = 1):
    """A :class:`FusedExecutor` from the pool (or a new one) whose BLAS calls are
    cut over ``threads`` :class:`Lanes`, returned after use."""
    key = plan_key(net, B, dt)
    with _POOL_LOCK:
        plans = _POOL.get(key)
        plan = plans.pop() if plans else None
    if plan is None:
        plan = FusedExecutor(net, B, dt)
    plan.lanes = Lanes(threads)
    try:
        yield plan
    finally:
        plan.lanes.close()
        plan.lanes = Lanes(1)
    if plan.nbytes() <= _POOL_MAX_BYTES:
        drop_other_plans(key)
        with _POOL_LOCK:
            plans = _POOL.setdefault(key, [])
            if len(plans) < _POOL_MAX_PLANS:
                plans.append(plan)

"""``simulate``: Monte Carlo over random networks through the kernel backends.

For every seed the engine samples all parameters with the network's
:class:`~initdiag.initializers.InitScheme` (:mod:`.sampling`), pushes a batch forward
and an output gradient backward through one interpreter (:mod:`.engine`) and an
executor (:mod:`.generic`: each layer's own step through the kernel dispatchers of
any backend; :mod:`.fused`: the same plan through fused numba passes, the default
on the numba backend), and records every Profile column (see
:mod:`initdiag.profile`) for every layer output.  Columns are averaged over seeds;
``<col>_se`` is the standard error over seeds (sample standard deviation / sqrt(n)).

- Backward keeps only what it needs (weights, inputs of activation and
  normalisation layers with their saved statistics, and for dense layers the B x B
  Gram ``X X^T`` instead of the input when cheaper): weight-gradient norms use
  ``||G^T X||_F^2 = sum_ab (G G^T)_ab (X X^T)_ab``; ``dW`` itself is never needed.
- Threads: on the fused path the caller's Numba thread count T is shared out:
  ``min(seeds, T)`` seeds run concurrently and each gets ``T // workers`` threads
  for its GEMMs, Grams and sampling, with BLAS single-threaded throughout
  (:func:`_thread_plan` says why); a seed's results do not depend on which thread
  ran it, and equal to float rounding across thread counts.
- Overflow: a non-finite layer output or gradient (or a signal that underflows to
  all zeros through a layer that should not zero it) records a finding and stops
  that seed; its later rows are missing for that seed, and every row is averaged
  over the seeds that reached it (``meta["seeds_reached"]`` /
  ``meta["seeds_reached_backward"]``).
- Jacobian probes (``jacobian=True``) reuse the main forward pass's saved
  linearisations (:mod:`.jacobian`), so that call runs the generic executor.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _interrupt, _limits, _rng
from .._inputs import check_input_moments
from ..network import Network, require_network
from ..profile import STAT_COLUMNS, Profile
from .engine import COL, SeedContext, run_seed
from .fused import (
    clear_workspace,
    drop_other_plans,
    fused_ok,
    numba_threads,
    plan_key,
    pooled_executor,
)
from .generic import GenericExecutor
from .jacobian import summary as jacobian_summary
from .memory import available_memory, estimate_memory, fmt_bytes, parse_bytes
from .ops import Ops
from .sampling import check_array, default_inputs

__all__ = [
    "simulate",
    "estimate_memory",
    "parse_bytes",
    "available_memory",
    "clear_workspace",
]


def _thread_plan(
    seeds: int,
    fused: bool,
    user_callable: bool,
    per_seed_bytes: int,
    caps: list[int],
) -> tuple[int, int]:
    """(workers, threads per seed) on the fused path.

    With T = the caller's Numba thread count, ``workers = min(seeds, T)`` seeds
    run concurrently (fewer when they would not fit in memory; one for a callable
    ``output_grad``: user code need not be thread-safe) and each seed gets
    ``max(1, T // workers)`` threads (lanes): its GEMMs and Grams are cut into
    single-threaded BLAS calls that the lanes pull in turn, and its parameter
    draws and backward Grams run on a lane behind its serial passes
    (:class:`~initdiag.empirical.fused.Lanes`).  BLAS itself stays
    single-threaded for the whole call, and every Numba kernel runs on one
    thread: the fused passes are ~5% of a seed's work, and
    each parallel region would wake a sleeping worker (~50 us on a quiet machine,
    milliseconds on a loaded one, where measured 2-thread passes ran ~10x slower
    than 1-thread ones).

    Why (bench/SIMULATE.md): alternating multi-threaded OpenBLAS GEMMs (whose workers
    spin ~50 ms after each call) with 2-thread Numba passes ran ~3x slower than
    1-thread passes, because the Numba worker and the spinning BLAS worker share a
    core; with single-threaded BLAS calls on our own threads nothing spins, so one
    seed can use every core.  Needs threadpoolctl (to make BLAS single-threaded);
    without it, seeds run one at a time with BLAS's own threads.
    """
    if not fused:
        return 1, 1
    try:
        import numba
        import threadpoolctl  # noqa: F401
    except ImportError as exc:
        warnings.warn(
            f"seeds run one at a time ({exc.name} is missing: pip install "
            f"{exc.name}); a run takes several times longer",
            RuntimeWarning,
            stacklevel=3,
        )
        return 1, 1
    T = numba.get_num_threads()
    w = 1 if user_callable else min(seeds, T)
    while w > 1 and any(w * per_seed_bytes > c for c in caps):
        w -= 1
    return w, max(1, T // w)


@contextlib.contextmanager
def _blas_single():
    """BLAS single-threaded for the duration (seeds run their own BLAS threads)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _run_concurrent(
    one_seed: Callable,
    network: Network,
    B: int,
    dt: np.dtype,
    seeds: int,
    workers: int,
    threads: int,
    timing: dict[str, float],
) -> None:
    """Each worker thread takes the next seed not yet started (BLAS single-threaded,
    ``threads`` lanes per seed), so a core slowed by other work
    takes fewer seeds; results do not depend on the assignment."""
    import itertools
    import threading
    from concurrent.futures import ThreadPoolExecutor

    tms = [dict.fromkeys(timing, 0.0) for _ in range(workers)]
    counter = itertools.count()
    lock = threading.Lock()

    def work(k: int) -> None:
        with numba_threads(1), pooled_executor(network, B, dt, threads) as plan:
            while True:
                with lock:
                    s = next(counter)
                if s >= seeds:
                    return
                one_seed(s, plan, tms[k])

    with (
        _blas_single(),
        ThreadPoolExecutor(max_workers=workers) as ex,
    ):
        futs = [ex.submit(work, k) for k in range(workers)]
        try:
            for fut in futs:
                fut.result()
        except KeyboardInterrupt:
            # Ctrl-C reaches the main thread only: the workers see the token at
            # their next layer and abandon their seeds; leaving the block joins them
            _interrupt.request_stop()
            raise
    for tm in tms:
        for k, v in tm.items():
            timing[k] += v


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


def simulate(
    network: Network,
    *,
    batch_size: int = 256,
    seeds: int = 8,
    inputs: npt.ArrayLike | None = None,
    input_second_moment: float = 1.0,
    input_correlation: float = 0.0,
    output_grad: npt.ArrayLike | Callable[[np.ndarray], npt.ArrayLike] | None = None,
    backend: str | None = None,
    dtype: Any = "float32",
    rng: int | np.random.Generator | None = 0,
    jacobian: bool = False,
    memory_limit: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    parameters: Sequence[Mapping[str, Mapping[str, npt.ArrayLike]]] | None = None,
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
    input_second_moment : float > 0
        The default inputs' second moment ``E[x^2]`` per feature (as ``analyze``).
    input_correlation : float in [0, 1]
        The default inputs' correlation ``c``.
    output_grad : array (B, output_dim), sequence of them, or callable, optional
        ``g_out``; a sequence gives one array per seed; a callable receives the
        network output (B, output_dim) and returns the gradient of the user's
        loss.  Default: standard Gaussian, fresh per seed.
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
    progress : callable, optional
        ``progress(finished, seeds)`` after each seed completes (from the thread
        that ran it; calls are serialised by a lock), e.g. to advance a progress
        bar.
    parameters : sequence of mappings, optional
        The parameters themselves instead of draws: one mapping per seed from row
        name (``network.names``) to ``{slot: array}`` (``"weight"``, ``"bias"``;
        every row with parameters, each of its layer's shape), e.g. a PyTorch
        model's tensors after each of its initialisations; statistics then follow
        those very networks (the generic executor runs them).

    Returns
    -------
    Profile
        ``source="empirical"``; every column with ``<col>_se``; ``summary`` with the
        measured ``gradient_ratio`` and ``correlation_depth`` and the analytic
        ``chi1, regime, q_star, c_star, xi_q, xi_c`` (from :func:`initdiag.analyze`,
        when it can describe the network); ``findings`` lists overflow / underflow
        events; ``meta`` records batch, seeds, backend, dtype, ``workers`` (seeds run
        at once), ``threads_per_seed``, ``seconds`` (wall time) and ``timing``
        (per phase, summed over seeds; seeds run concurrently, so with
        ``workers > 1`` the sum exceeds the wall time; each seed's own thread's
        time, so work its other threads do behind it, such as a lone seed's
        parameter draws, counts only where it waits for it), ``partial`` (False) and
        ``seeds_finished``.

    Ctrl-C (or :func:`initdiag._interrupt.request_stop`) stops the run within one
    layer's kernels and raises :class:`initdiag._interrupt.Interrupted`, a
    KeyboardInterrupt whose ``partial`` is this Profile aggregated over the seeds
    that finished (``meta["partial"] = True``; NaN columns when none did).

    Raises
    ------
    TypeError, ValueError
        For invalid arguments; ValueError also when the memory estimate exceeds the
        available memory or ``memory_limit``, or the run exceeds the limits of
        :mod:`initdiag._limits` (nothing large is allocated before).
    initdiag._interrupt.Interrupted
        On Ctrl-C, with the partial Profile.

    References
    ----------
    Poole et al. (2016), Schoenholz et al. (2017) for the quantities measured;
    Pennington, Schoenholz & Ganguli (2017) for ``m1, m2`` of ``J J^T``.
    """
    require_network(network, "simulate()")
    dt = _check_dtype(dtype)
    seeds = _check_int(seeds, "seeds", 1)
    q_in, c_in = check_input_moments(input_second_moment, input_correlation)
    if inputs is not None:
        x_user = check_array(inputs, (0, network.input_dim), "inputs", dt)
        B = x_user.shape[0]
        if B < 2:
            raise ValueError(f"inputs need at least 2 rows (examples), got {B}")
    else:
        x_user = None
        B = _check_int(batch_size, "batch_size", 2)
    if B <= 3 and any(info.kind == "batchnorm" for info in network.infos):
        from ..meanfield import batchnorm_small_batch

        raise ValueError(f"{batchnorm_small_batch(B)}; use a batch of at least 4")
    g_spec: Any = None
    per_seed_grad = isinstance(output_grad, (list, tuple)) or (
        isinstance(output_grad, np.ndarray) and output_grad.ndim == 3
    )
    if per_seed_grad:
        if len(output_grad) != seeds:
            raise ValueError(
                f"output_grad holds {len(output_grad)} per-seed arrays for "
                f"{seeds} seeds; give one per seed (or one array for all)"
            )
        g_spec = [_check_grad(g, B, network, dt) for g in output_grad]
    elif output_grad is not None:
        g_spec = output_grad if callable(output_grad) else _check_grad(
            output_grad, B, network, dt
        )
    given = None
    if parameters is not None:
        given = _given_parameters(network, parameters, seeds, dt)
    if not isinstance(jacobian, bool):
        raise TypeError(f"jacobian must be True or False, got {jacobian!r}")
    entropy = _rng.entropy_of(rng)

    _limits.check_simulate(network, B, seeds, len(STAT_COLUMNS))
    # memory check before anything large exists (workspaces kept from calls on
    # other networks are freed first)
    drop_other_plans(plan_key(network, B, dt))
    est = estimate_memory(network, B, dt, jacobian)
    limit = parse_bytes(memory_limit) if memory_limit is not None else None
    avail = available_memory()
    for cap, what in ((limit, "memory_limit"), (avail, "available memory")):
        if cap is not None and est["total"] > cap:
            raise ValueError(
                f"simulate() would need about {fmt_bytes(est['total'])} (parameters "
                f"{fmt_bytes(est['parameters'])}, saved for backward "
                f"{fmt_bytes(est['saved'])}, workspace "
                f"{fmt_bytes(est['workspace'])}) "
                f"but the {what} is {fmt_bytes(cap)}; use a smaller batch_size, a "
                f"narrower or shallower network, or dtype='float32'"
            )

    ops = Ops(backend)
    infos = network.infos
    inits = network.param_inits()
    stats = np.full((seeds, len(infos), len(STAT_COLUMNS)), np.nan)
    timing = {"sample": 0.0, "forward": 0.0, "backward": 0.0, "jacobian": 0.0}
    jac: dict[str, list[Any]] | None = (
        {"m1": [], "m2": [], "singular_values": [], "m1_exact": [], "m2_exact": []}
        if jacobian
        else None
    )
    # the Jacobian probes read the generic executor's saved linearisations
    fused = fused_ok(network, backend) and not jacobian and given is None
    workers, threads = _thread_plan(
        seeds,
        fused,
        callable(output_grad),
        est["total"],
        [c for c in (limit, avail) if c is not None],
    )
    seed_findings: list[list[dict[str, Any]]] = [[] for _ in range(seeds)]
    finished = np.zeros(seeds, dtype=bool)
    progress_lock = threading.Lock()

    def one_seed(s: int, ex: Any, tm: dict[str, float]) -> None:
        t0 = time.perf_counter()
        buf = ex.buf(("x",), (B, network.input_dim)) if fused else None
        x = (
            x_user
            if x_user is not None
            else default_inputs(B, network.input_dim, q_in, c_in, dt, entropy, s, buf)
        )
        tm["sample"] += time.perf_counter() - t0
        g = g_spec[s] if per_seed_grad else g_spec
        sc = SeedContext(
            network, inits, dt, entropy, s, B, g, stats[s], seed_findings[s], tm
        )
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            run_seed(ex, sc, x, jac)
        finished[s] = True
        if progress is not None:
            with progress_lock:
                progress(int(finished.sum()), seeds)

    t_start = time.perf_counter()
    _interrupt.reset()
    interrupted = False
    try:
        if workers > 1:
            _run_concurrent(one_seed, network, B, dt, seeds, workers, threads, timing)
        elif fused:
            with (
                _blas_single() if threads > 1 else contextlib.nullcontext(),
                numba_threads(1),
                pooled_executor(network, B, dt, threads) as ex,
            ):
                for s in range(seeds):
                    one_seed(s, ex, timing)
        else:
            for s in range(seeds):
                one_seed(s, GenericExecutor(network, ops, given), timing)
    except (KeyboardInterrupt, _interrupt.Stopped):
        interrupted = True
        # a seed cut off mid-way left some layers filled: keep finished seeds only
        stats[~finished] = np.nan
        for s in np.flatnonzero(~finished):
            seed_findings[s].clear()
    findings = [f for fs in seed_findings for f in fs]
    wall = time.perf_counter() - t_start

    prof = _aggregate(network, stats)
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
        prof.extra["jacobian"] = jacobian_summary(jac)
    reached = np.sum(~np.isnan(stats[:, :, COL["second_moment"]]), axis=0)
    reached_b = np.sum(~np.isnan(stats[:, :, COL["grad_second_moment"]]), axis=0)
    prof.meta = {
        "engine": "simulate",
        "batch_size": B,
        "seeds": seeds,
        "inputs": "user" if x_user is not None else "gaussian",
        "input_second_moment": q_in if x_user is None else None,
        "input_correlation": c_in if x_user is None else None,
        "output_grad": "gaussian"
        if output_grad is None
        else ("callable" if callable(output_grad) else "user"),
        "backend": ops.resolved(),
        "executor": "fused" if fused else "generic",
        "dtype": dt.name,
        "rng": entropy,
        "seeds_reached": reached.tolist(),
        "seeds_reached_backward": reached_b.tolist(),
        "memory_estimate": est["total"],
        "workers": workers,
        "threads_per_seed": threads,
        "seconds": wall,
        "timing": dict(timing),
        # a Ctrl-C that lands after the last seed finished still stops the caller,
        # but this profile is complete
        "partial": bool(interrupted and not finished.all()),
        "seeds_finished": int(finished.sum()),
    }
    if interrupted:
        raise _interrupt.Interrupted(prof)
    return prof


def _check_grad(g: Any, B: int, network: Network, dt: np.dtype) -> np.ndarray:
    g = check_array(g, (B, network.output_dim), "output_grad", dt)
    if not np.any(g):
        raise ValueError("output_grad is all zeros; nothing to propagate")
    return g


def _given_parameters(
    network: Network, parameters: Any, seeds: int, dt: np.dtype
) -> list[list[dict[str, np.ndarray]]]:
    """``simulate(parameters=...)`` checked: per seed, per row, by slot, arrays of
    the layer's shapes in ``dt``."""
    if isinstance(parameters, Mapping) or len(parameters) != seeds:
        got = "a mapping" if isinstance(parameters, Mapping) else len(parameters)
        raise ValueError(
            f"parameters must be a sequence of one mapping per seed ({seeds}), got "
            f"{got}"
        )
    out = []
    for s, per in enumerate(parameters):
        rows = []
        for info in network.infos:
            want = {
                sl.name: info.layer.param_shape(sl, info.fan_in, info.width)
                for sl in info.layer.slots()
            }
            have = per.get(info.name, {}) if want else {}
            missing = sorted(set(want) - set(have))
            if missing:
                raise ValueError(
                    f"parameters[{s}]: row {info.name!r} needs {sorted(want)}, "
                    f"missing {missing}"
                )
            row = {}
            for k, shape in want.items():
                a = np.asarray(have[k])
                if a.shape != tuple(shape):
                    raise ValueError(
                        f"parameters[{s}][{info.name!r}][{k!r}] must have shape "
                        f"{tuple(shape)}, got {a.shape}"
                    )
                if not np.all(np.isfinite(a)):
                    raise ValueError(
                        f"parameters[{s}][{info.name!r}][{k!r}] contains NaN or inf"
                    )
                row[k] = np.ascontiguousarray(a, dtype=dt)
            rows.append(row)
        unknown = sorted(set(per) - set(network.names))
        if unknown:
            raise ValueError(
                f"parameters[{s}] names rows the network does not have: {unknown}; "
                f"its rows: {network.names}"
            )
        out.append(rows)
    return out


def _aggregate(network: Network, stats: np.ndarray) -> Profile:
    """Mean over the seeds that reached each row, and its standard error."""
    prof = Profile.empty(network, "empirical", with_se=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        for c, j in COL.items():
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
    return prof


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

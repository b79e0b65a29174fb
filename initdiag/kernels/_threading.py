"""Thread-pool policy of the CPU kernels (read this before changing it).

Problem (measured on a 2-core machine, see bench/KERNELS.md): after a parallel
region, OpenMP workers spin-wait for the next one (GNU libgomp spins ~300k
iterations by default, i.e. up to a few hundred microseconds).  A dense
forward/backward pass alternates BLAS GEMMs (OpenBLAS's own pthreads) with our
element-wise / BatchNorm kernels, so spinning workers of one pool steal the cores
the other pool needs and a whole pass can run ~2x slower.

Policy, applied by :func:`configure_threads` (public as
``initdiag.kernels.configure_threads``), never at import: importing ``initdiag`` or
``initdiag.kernels`` leaves ``os.environ`` alone and does not import Numba.  It runs
automatically, with the defaults below, the first time a numba or c kernel is
looked up (``_registry.resolve``: every dispatcher call goes through it, and so do
the fused passes of ``simulate`` via ``kernels.fused.resolve``), before the C
extension is loaded (``_c.load``) and before the first parallel parameter sampling
(``initdiag._rng``), i.e. before any OpenMP runtime of ours starts.  Call it
yourself first to choose other settings.

* ``OMP_WAIT_POLICY=PASSIVE`` (a value already in the environment wins).  libgomp
  reads it once, when it initialises: on the first Numba parallel region (Numba's
  ``omp`` threading layer) or when the C extension ``initdiag._cext`` (built with
  ``-fopenmp``) is loaded, whichever comes first; both use the same system
  libgomp, so one setting covers both.  Passive workers sleep on a futex at the
  end of a region; waking them costs ~10-50 us, small against kernels of 0.1 ms
  and more.
* Numba's threading layer priority is ``omp``, then ``tbb``, then ``workqueue``
  (``numba.config.THREADING_LAYER_PRIORITY``), unless ``NUMBA_THREADING_LAYER`` is
  set.  ``omp`` is thread-safe (several Python threads may call the kernels at
  once) and honours the wait policy above; TBB workers also sleep when idle.
  The ``workqueue`` layer is not thread-safe: when it is the one that loaded, the
  dispatchers serialise Numba kernel calls with a lock (:data:`NUMBA_LOCK`).

Measured (bench/KERNELS.md, 2 shared cores): the forward + backward step of a
3-layer 1024-wide MLP was 1.5x-2.5x slower with ``OMP_WAIT_POLICY=ACTIVE`` than
with PASSIVE, and a short ``GOMP_SPINCOUNT`` (1e3-3e4) was worse still on the
oversubscribed machine.  The price of PASSIVE: a parallel region pays the wake-up
of the second worker (~47 us back to back here), so the row-sweep kernels open one
only when their work outweighs it (:func:`sweep_threads`); at 512 x 1024 float32 the
statistics, BatchNorm forward and cheap activations run on one thread.

Both settings only take effect before the respective runtime is loaded; if libgomp
was already loaded by another library (or Numba's pool already started), the
policy in force is that library's (an explicit :func:`configure_threads` asking for
a change after our own runtimes started raises RuntimeError).  Set
``OMP_WAIT_POLICY`` / ``NUMBA_THREADING_LAYER`` in the environment before starting
Python to be certain.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

NUMBA_LOCK = threading.RLock()

WAIT_POLICIES = ("PASSIVE", "ACTIVE")
LAYERS = ("omp", "tbb", "workqueue")
DEFAULT_PRIORITY = LAYERS
# configured: any configure_threads call happened; policy_ours: OMP_WAIT_POLICY in
# os.environ was written by us (so a later explicit call may change it)
_STATE = {"configured": False, "policy_ours": False}


def _runtimes_started() -> tuple[bool, bool]:
    """(an OpenMP runtime of ours initialised, Numba's thread pool launched)."""
    numba_up = False
    if "numba" in sys.modules:
        try:
            sys.modules["numba"].threading_layer()
            numba_up = True
        except ValueError:  # no parallel region launched yet
            pass
    return numba_up or "initdiag._cext" in sys.modules, numba_up


def configure_threads(
    wait_policy: str | None = "PASSIVE",
    layer_priority: Sequence[str] | None = DEFAULT_PRIORITY,
) -> dict:
    """Set the CPU kernels' thread-pool policy (module docstring: what and why).

    Called automatically with the defaults before the first numba / c kernel runs;
    call it yourself first for other settings.  Idempotent.

    Parameters
    ----------
    wait_policy : {"PASSIVE", "ACTIVE"} or None
        Written to ``os.environ["OMP_WAIT_POLICY"]`` unless the environment
        already held a value before initdiag first configured (that value wins);
        None leaves the variable alone.  PASSIVE keeps idle OpenMP workers from
        spinning on the cores OpenBLAS needs for the GEMMs between our kernels.
    layer_priority : permutation of ("omp", "tbb", "workqueue"), or None
        ``numba.config.THREADING_LAYER_PRIORITY`` (ignored when
        ``NUMBA_THREADING_LAYER`` is set); None leaves Numba's default.

    Returns
    -------
    dict
        The settings now in force: ``OMP_WAIT_POLICY`` (the environment's value),
        ``layer_priority`` (Numba's) and ``NUMBA_THREADING_LAYER`` (the
        environment's, None when unset).  Unlike :func:`report` it starts no
        thread pool.

    Raises
    ------
    ValueError
        An unknown wait policy or threading layer.
    RuntimeError
        A change asked for after the OpenMP runtime (or Numba's pool) of initdiag
        started, when it can no longer take effect.
    """
    _apply(wait_policy, layer_priority, strict=True)
    numba = _import_numba() if "numba" in sys.modules else None
    prio = getattr(getattr(numba, "config", None), "THREADING_LAYER_PRIORITY", None)
    return {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "layer_priority": None if prio is None else list(prio),
        "NUMBA_THREADING_LAYER": os.environ.get("NUMBA_THREADING_LAYER"),
    }


def ensure_configured() -> None:
    """:func:`configure_threads` with the defaults, unless it ran already (the
    automatic call before a kernel's first use; never raises for a late call)."""
    if not _STATE["configured"]:
        _apply("PASSIVE", DEFAULT_PRIORITY, strict=False)


def _apply(wait_policy: Any, layer_priority: Any, strict: bool) -> None:
    policy = None
    if wait_policy is not None:
        policy = str(wait_policy).strip().upper()
        if policy not in WAIT_POLICIES:
            raise ValueError(
                f"wait_policy must be one of {WAIT_POLICIES} or None; got "
                f"{wait_policy!r}"
            )
    prio = None
    if layer_priority is not None:
        if isinstance(layer_priority, str):
            layer_priority = (layer_priority,)
        prio = [str(p).lower() for p in layer_priority]
        if sorted(prio) != sorted(LAYERS):  # Numba accepts permutations only
            raise ValueError(
                f"layer_priority must be a permutation of {LAYERS} or None; "
                f"got {layer_priority!r}"
            )
    omp_up, numba_up = _runtimes_started()
    current = os.environ.get("OMP_WAIT_POLICY")
    if policy is not None and (current is None or _STATE["policy_ours"]):
        if current is None or current.strip().upper() != policy:
            if omp_up:
                if strict:
                    raise RuntimeError(
                        f"OMP_WAIT_POLICY={policy} can no longer take effect: the "
                        "OpenMP runtime already started (call configure_threads "
                        "before the first kernel, or set OMP_WAIT_POLICY before "
                        "starting Python)"
                    )
            else:
                os.environ["OMP_WAIT_POLICY"] = policy
                _STATE["policy_ours"] = True
    if prio is not None and "NUMBA_THREADING_LAYER" not in os.environ:
        numba = _import_numba()
        if numba is not None:
            cfg = numba.config
            if list(getattr(cfg, "THREADING_LAYER_PRIORITY", [])) != prio:
                if numba_up:
                    if strict:
                        raise RuntimeError(
                            f"threading layer priority {prio} can no longer take "
                            f"effect: Numba's pool already runs on "
                            f"{numba.threading_layer()!r}"
                        )
                else:
                    cfg.THREADING_LAYER_PRIORITY = prio
    _STATE["configured"] = True


# Row-sweep kernels (BatchNorm, statistics) open a parallel region only when the
# work is large enough to pay for it.  Under the PASSIVE policy a region costs the
# wake-up of the sleeping worker and the end-of-region barrier: ~47 us back to back,
# ~9 us after a pause, on this project's 2-core VM (an empty 2-iteration prange).
# Measured crossovers there (serial vs 2 threads, PASSIVE, float32, us):
#   column_stats  512 x 1024: 45 vs 79;   1024 x 1024: 86 vs 98;  numba
#   BN forward    512 x 1024: 84 vs 106;  1024 x 1024: 164 vs 163
#   BN backward   512 x 1024: 202 vs 166 (c: 175 vs 149)
# so the threshold is PAR_MIN_PASSIVE elements divided by the kernel's relative cost
# per element (statistics 1, BatchNorm forward 2, backward 4).  With workers
# spinning (OMP_WAIT_POLICY=ACTIVE) a region costs ~3 us: PAR_MIN_ACTIVE.
PAR_MIN_PASSIVE = 1 << 21
PAR_MIN_ACTIVE = 1 << 16
COST_STATS, COST_BN_FORWARD, COST_BN_BACKWARD = 1, 2, 4


def numba_threads() -> int:
    """Threads of Numba's pool as seen by the calling thread (1 without Numba)."""
    try:
        import numba

        return numba.get_num_threads()
    except ImportError:  # pragma: no cover
        return 1


def c_threads() -> int:
    """Threads of the C extension's OpenMP regions (1 without it or OpenMP)."""
    from ._c import load

    ffi, lib, err = load()
    return int(lib.idg_num_threads()) if err is None else 1


def pool_is_hot() -> bool:
    """True when OpenMP workers spin between regions (``OMP_WAIT_POLICY=ACTIVE``
    in force); False under PASSIVE (our default) or an unknown policy."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "ACTIVE"


def sweep_threads(elements: int, nthreads: int, cost: int = COST_STATS) -> int:
    """Threads for a row-sweep kernel over ``elements`` entries of relative cost
    ``cost`` per entry: 1 below the wait policy's threshold, else ``nthreads``."""
    par_min = PAR_MIN_ACTIVE if pool_is_hot() else PAR_MIN_PASSIVE // max(1, cost)
    return max(1, nthreads) if elements >= par_min else 1


def numba_serialize() -> contextlib.AbstractContextManager:
    """A lock when Numba runs on the non-thread-safe workqueue layer, else a no-op."""
    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no layer launched yet
        layer = None
    if layer in (None, "workqueue"):
        return NUMBA_LOCK
    return contextlib.nullcontext()


def report() -> dict:
    """Current thread-pool state: wait policy, Numba layer, BLAS pools."""
    info: dict = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        import numba

        try:
            info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:
            info["numba_threading_layer"] = "not launched yet"
        info["numba_num_threads"] = numba.get_num_threads()
    except ImportError:
        info["numba_threading_layer"] = "numba not installed"
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = threadpool_info()
    except ImportError:
        pass
    return info


# -- Numba import shim: the kernel modules import njit/prange from here so that a
# missing Numba only disables the numba backend (available_backends says why).
# Resolved on first access (PEP 562), so importing this module imports no Numba.
_LAZY = ("njit", "prange", "NUMBA_IMPORT_ERROR")


def _import_numba():
    """The numba module, or None when it cannot be imported."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def _cached(numba_njit):
    """``numba.njit`` that decorates with Numba's cache pointed at the per-user
    directory of :mod:`initdiag.kernels._cache` (never the package folder): Numba
    fixes a function's cache locator when the function is decorated, so the
    setting is in force just for that moment and restored after."""
    from . import _cache

    def njit(*args, **kwargs):
        def decorate(fn):
            prev = _cache.begin() if kwargs.get("cache") else None
            try:
                return numba_njit(**kwargs)(fn)
            finally:
                _cache.end(prev)

        if args and callable(args[0]):
            return decorate(args[0])
        return decorate

    return njit


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from numba import njit as numba_njit
        from numba import prange

        njit = _cached(numba_njit)
        err: str | None = None
    except ImportError as exc:  # pragma: no cover - numba is a hard dependency
        err = f"numba cannot be imported ({exc}); pip install numba"

        def njit(*args, **kwargs):
            if args and callable(args[0]):
                return args[0]
            return lambda f: f

        prange = range
    globals().update(njit=njit, prange=prange, NUMBA_IMPORT_ERROR=err)
    return globals()[name]

"""Thread-pool policy of the CPU kernels (read this before changing it).

Problem (measured on a 2-core machine, see bench/KERNELS.md): after a parallel
region, OpenMP workers spin-wait for the next one (GNU libgomp spins ~300k
iterations by default, i.e. up to a few hundred microseconds).  A dense
forward/backward pass alternates BLAS GEMMs (OpenBLAS's own pthreads) with our
element-wise / BatchNorm kernels, so spinning workers of one pool steal the cores
the other pool needs and a whole pass can run ~2x slower.

Policy, applied once when ``initdiag.kernels`` is imported:

* ``OMP_WAIT_POLICY=PASSIVE`` (``os.environ.setdefault``: a user's own setting
  wins).  libgomp reads it when it is loaded, i.e. on the first Numba parallel
  call (Numba's ``omp`` threading layer) or when the C extension ``initdiag._cext``
  (built with ``-fopenmp``) is imported, whichever comes first; both use the same
  system libgomp, so one setting covers both.  Passive workers sleep on a futex
  at the end of a region; waking them costs ~10-50 us, small against kernels of
  0.1 ms and more.
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
policy in force is that library's.  Set ``OMP_WAIT_POLICY`` / ``NUMBA_THREADING_LAYER``
in the environment before starting Python to be certain.
"""

from __future__ import annotations

import contextlib
import os
import threading

_CONFIGURED = False
NUMBA_LOCK = threading.RLock()


def configure() -> None:
    """Apply the wait policy and threading-layer priority (idempotent)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    try:
        import numba
    except ImportError:  # numba missing: the numba backend reports it
        return
    with contextlib.suppress(AttributeError):
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


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
try:
    from numba import njit, prange

    NUMBA_IMPORT_ERROR: str | None = None
except ImportError as _exc:  # pragma: no cover - numba is a hard dependency
    NUMBA_IMPORT_ERROR = f"numba cannot be imported ({_exc}); pip install numba"

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        if args and callable(args[0]):
            return args[0]
        return lambda f: f

    prange = range  # type: ignore[assignment]

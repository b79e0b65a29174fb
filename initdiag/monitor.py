"""Profile statistics inside a training loop: :class:`Monitor` and its sinks.

Framework-neutral: :meth:`Monitor.record` takes NumPy arrays, PyTorch tensors
(duck-typed: torch is never imported here) or CUDA device arrays, and computes
with initdiag's kernels the columns a :class:`~initdiag.profile.Profile` defines,
for one layer at one training step.

Tensors in
----------
- NumPy arrays are read in place.
- PyTorch CPU tensors: ``t.detach().numpy()`` shares their memory (no copy); a
  non-contiguous tensor is made contiguous (one copy).
- Device arrays (``__cuda_array_interface__``: PyTorch CUDA tensors, CuPy,
  numba.cuda): computed on the device by the ``cuda`` backend; the small results
  of each tensor (at most ``10 + 4 C S`` float64, below) come back in one host
  transfer.  Histograms, when asked for, copy the tensor to the host.
- float16 / bfloat16 are widened to float32 (one copy); other dtypes raise
  TypeError.

Statistics (``h`` an activation of shape (B, n), or (B, C, *S) with the channel
axis second, as PyTorch lays convolutions out):

========================  ==============================================================
``mean``                  mean of h over every entry
``second_moment``         mean of h^2
``variance``              mean over units of the biased per-unit variance over the
                          batch; for (B, C, *S) a unit is a channel and its samples are
                          the B prod(S) entries of that channel (BatchNorm's grouping):
                          Var_c = mean_s Var_b h[b, c, s] + Var_s mean_b h[b, c, s]
                          (the law of total variance over the positions s)
``squared_mean``          mean over units (channels) of the squared unit mean
``correlation``           mean uncentred cosine between the flattened outputs of
                          distinct examples (NaN for B = 1)
``active_fraction``       fraction of entries > 0
``zero_fraction``         fraction of entries == 0
``dead_fraction``         fraction of units (channels) with no entry > 0 in the batch
``nonfinite_count``       NaN or inf entries
``grad_second_moment``    mean of g^2, g the gradient with respect to h
``grad_norm2``            sum of g^2
``{p}_mean``              mean of parameter p (``weight``, ``bias``, ...)
``{p}_variance``          variance of the entries of p
``{p}_norm2``             ||p||_F^2
``{p}_grad_norm2``        ||dL/dp||_F^2
``{p}_update_ratio``      ||delta p||_F / ||p||_F, the update-to-weight ratio (p as
                          passed in ``params``: the values the update was applied to)
========================  ==============================================================

These are the raw values of one batch (the Profile's gradient columns are
normalised by the output gradient; the monitor's are not).

Reference rows
--------------
:meth:`Monitor.record_reference` stores values that were not measured in this
run beside the measured ones, marked by a ``source`` other than ``"measured"``
(e.g. ``"analytic"``: the prediction at initialisation that
:class:`~initdiag.integrations.torch.TorchMonitor` writes with ``predict=``).
They share the table and the file sinks (CSV ``source`` column, JSON
``"source"`` key), have a ``history`` of their own (measured rows never push
them out), are left out of :meth:`Monitor.summary`, and
:func:`plot_rows` draws each as a marker at its step and a dashed horizontal
line from there on, so the measured curves' drift from them reads off the plot.
A reference row holding ``output_grad_second_moment`` (m) and ``output_rows``
(B) had its gradient columns put on the monitor's raw scale: a Profile's
normalised ``grad_second_moment`` times m, its parameter gradient norms times
B m (the legend says so).

NaN and inf
-----------
A non-finite entry is a *finding* (``monitor.findings``: ``{"kind": "nonfinite",
"step", "layer", "tensor", "count", "message"}``), never an exception; the
statistics of that tensor are then NaN or inf as arithmetic makes them, and the
loop goes on.

Memory
------
Bounded however long the run: ``every=N`` records every N-th step only; the
in-memory table keeps the last ``history`` rows (one row per step and layer);
the per-layer aggregates (count, mean, std, min, max, last) are streaming; at
most ``max_findings`` findings are kept (the rest are counted); histograms have
``bins`` fixed bins per layer and tensor.

Histograms
----------
``bins=K`` (a multiple of 4) accumulates, per layer, the counts of the finite
values of the activations and of the gradients.  The range is a power of two:
``[0, R)`` while no negative value has been seen, ``[-R, R)`` after, with R the
smallest power of two above every magnitude seen.  It is chosen on the first
record and widened by doubling R when a value falls outside, merging neighbouring
bins (exact: the new edges are a subset of the old ones), so the counts equal
those of one histogram of every value recorded with the final edges, whatever
the order of the records.

Threads
-------
``record`` may be called from several threads: the kernels run outside the lock,
the shared state (table, aggregates, findings, histograms, sinks) is updated
under it.

Sinks
-----
``sink=`` takes a path (``.csv``: long format
``step,layer,source,statistic,value``; ``.jsonl``: one JSON object per record,
NaN as null and inf as "inf"), a :class:`CSVSink`, :class:`JSONLinesSink`, an
object with TensorBoard's ``add_scalar`` (wrapped in :class:`TensorBoardSink`:
scalars ``layer/statistic``, reference rows ``layer/statistic/source``, and, with
``bins``, histograms of the finite values only, since ``add_histogram`` fails on
NaN), any object with ``write(step, layer, values)`` (and, to receive reference
rows, ``write_reference(step, layer, source, values)``), or a list of these.
Files are opened for appending and flushed after every record, so a crash keeps
every record written before it.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import kernels
from .kernels import LAYER_STATS_FIELDS
from .profile import _from_json_number, _jsonable

__all__ = [
    "Monitor",
    "CSVSink",
    "JSONLinesSink",
    "TensorBoardSink",
    "read_rows",
    "plot_rows",
    "ACTIVATION_FIELDS",
    "MEASURED",
]

#: the statistics of an activation tensor (the kernels' LAYER_STATS_FIELDS less
#: ``any_nonzero``)
ACTIVATION_FIELDS = LAYER_STATS_FIELDS[:9]
#: the ``source`` of the rows Monitor.record measured (reference rows have others)
MEASURED = "measured"
#: the keys of a row that are not statistics
_ROW_KEYS = ("step", "layer", "source")
#: columns Monitor.plot draws when none are named (those present)
DEFAULT_PLOT_COLUMNS = (
    "second_moment",
    "mean",
    "dead_fraction",
    "correlation",
    "grad_second_moment",
    "weight_update_ratio",
)
_FUSED_BACKENDS = ("numpy", "numba")
#: host tensors with fewer entries go through the NumPy kernels when no backend
#: is named (Monitor._host_backend)
SMALL_TENSOR = 1 << 16
_FLOATS = ("float32", "float64")
_WIDEN = ("float16", "bfloat16")


# ------------------------------------------------------------------ tensors in
def _dtype_name(dt: Any) -> str:
    return str(dt).removeprefix("torch.")


def _host_or_device(x: Any, what: str) -> tuple[Any, bool]:
    """``(array, on_device)``: a C-contiguous float32 / float64 NumPy array or a
    numba device array viewing ``x`` (copies only as the module docstring says)."""
    if isinstance(x, np.ndarray):
        name = x.dtype.name
        if name in _WIDEN:
            x = x.astype(np.float32)
        elif name not in _FLOATS:
            raise TypeError(
                f"{what} must be a floating-point array; got dtype {x.dtype} "
                "(convert with .astype(np.float32))"
            )
        # (np.ascontiguousarray would make a 0-d array 1-d)
        return (x if x.flags.c_contiguous else np.ascontiguousarray(x)), False
    if callable(getattr(x, "detach", None)) and hasattr(x, "dtype"):  # torch
        t = x.detach()
        name = _dtype_name(t.dtype)
        if name in _WIDEN:
            t = t.float()
        elif name not in _FLOATS:
            raise TypeError(
                f"{what} must be a floating-point tensor; got dtype {t.dtype} "
                "(convert with .float())"
            )
        if not t.is_contiguous():
            t = t.contiguous()
        if getattr(t, "is_cuda", False):
            from numba import cuda

            return cuda.as_cuda_array(t), True
        return t.numpy(), False
    if hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host"):
        from numba import cuda

        arr = x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)
        name = np.dtype(arr.dtype).name
        if name not in _FLOATS:
            raise TypeError(
                f"{what} must be a float32 or float64 device array; got {arr.dtype}"
            )
        if not arr.is_c_contiguous():
            raise TypeError(f"{what}: device arrays must be C-contiguous")
        return arr, True
    raise TypeError(
        f"{what} must be a NumPy array, a PyTorch tensor or a CUDA device array; "
        f"got {type(x).__name__}"
    )


def _alloc(n: int, device: bool):
    if device:
        from numba import cuda

        return cuda.device_array(n, dtype=np.float64)
    return np.empty(n, dtype=np.float64)


def _to_host(a: Any, device: bool) -> np.ndarray:
    return a.copy_to_host() if device else a


def _activation_stats(x: Any, device: bool, backend: str) -> dict[str, float]:
    """The ACTIVATION_FIELDS of one (B, ...) output (module docstring)."""
    if x.ndim == 0:
        raise ValueError("activations must have a batch dimension; got a scalar")
    B = x.shape[0]
    flat = x.reshape(B, -1) if x.ndim != 2 else x
    m = flat.shape[1]
    nd = x.ndim > 2
    buf = _alloc(10 + (4 * m if nd else 0), device)
    if not device and backend in _FUSED_BACKENDS:
        kernels.layer_stats(flat, backend=backend, out=buf[:10])
    else:
        kernels.layer_summary_array(flat, buf[:8], backend=None if device else backend)
        if device:
            # the public row_correlation copies its cell to the host; the raw
            # kernel writes it into our buffer, so a tensor costs one transfer
            kernels._call("row_correlation", "cuda", flat, buf[8:9])
        else:
            kernels.row_correlation(flat, backend=backend, out=buf[8:9])
    if nd:
        cols = tuple(buf[10 + i * m : 10 + (i + 1) * m] for i in range(4))
        kernels.column_stats(flat, backend=None if device else backend, out=cols)
    r = _to_host(buf, device)
    # layer_stats' order, which layer_summary_array + the correlation cell share
    out = dict(zip(ACTIVATION_FIELDS, r[:9], strict=True))
    if nd:
        C = x.shape[1]
        mean_bs, var_bs, le0 = (
            r[10 + i * m : 10 + (i + 1) * m].reshape(C, -1) for i in range(3)
        )
        mu = mean_bs.mean(axis=1)
        # law of total variance over the positions: both terms are >= 0
        var_c = var_bs.mean(axis=1) + ((mean_bs - mu[:, None]) ** 2).mean(axis=1)
        out["variance"] = var_c.mean()
        out["squared_mean"] = (mu**2).mean()
        out["dead_fraction"] = (le0 == 1.0).all(axis=1).mean()
    return {k: float(v) for k, v in out.items()}


def _moments(x: Any, device: bool, backend: str) -> tuple[float, ...]:
    """``(mean, second_moment, variance of the entries, sum of squares,
    nonfinite_count)`` of any tensor, viewed as (shape[0], rest)."""
    # (n, 1) for a vector; a matrix keeps its rows (a (size, 1) view of a large
    # one is slow in the row-parallel kernels)
    flat = (
        x.reshape(x.shape[0] if x.ndim else 1, -1) if x.ndim > 1 else x.reshape(-1, 1)
    )
    buf = _alloc(8, device)
    kernels.layer_summary_array(flat, buf, backend=None if device else backend)
    r = [float(v) for v in _to_host(buf, device)]
    mean, m2, var_in, sq = r[0], r[1], r[2], r[3]
    # the variance of all entries: within the columns plus between their means
    # (the law of total variance; the second term is >= 0 but for rounding)
    var = var_in + max(sq - mean * mean, 0.0)
    return mean, m2, var, m2 * flat.size, r[7]


def _named(a: Any, what: str) -> dict[str, Any]:
    if a is None:
        return {}
    if isinstance(a, Mapping):
        for k in a:
            if not isinstance(k, str) or not k:
                raise TypeError(f"{what}: names must be non-empty strings; got {k!r}")
        return dict(a)
    return {"weight": a}


def _finite_values(x: Any, device: bool) -> np.ndarray:
    v = np.asarray(_to_host(x, device), dtype=np.float64).ravel()
    return v[np.isfinite(v)]


# ------------------------------------------------------------------ histograms
class _Histogram:
    """Fixed-bin counts over a power-of-two range widened by doubling (module
    docstring); ``edges()`` and ``counts`` are the histogram so far."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.R: float | None = None  # None: only zeros seen so far
        self.signed = False
        self.zeros = 0

    def edges(self) -> np.ndarray:
        if self.R is None:
            return np.array([], dtype=np.float64)
        lo = -self.R if self.signed else 0.0
        return np.linspace(lo, self.R, self.bins + 1)

    def _grow(self) -> None:
        c, k = self.counts, self.bins
        merged = c[0::2] + c[1::2]
        new = np.zeros_like(c)
        if self.signed:  # [-R, R) -> [-2R, 2R): the old range is the middle half
            new[k // 4 : k // 4 + k // 2] = merged
        else:  # [0, R) -> [0, 2R)
            new[: k // 2] = merged
        self.counts = new
        self.R *= 2.0

    def _sign(self) -> None:
        # [0, R) -> [-R, R): the old range is the upper half, at half resolution
        c, k = self.counts, self.bins
        new = np.zeros_like(c)
        new[k // 2 :] = c[0::2] + c[1::2]
        self.counts = new
        self.signed = True

    def add(self, v: np.ndarray) -> None:
        if v.size == 0:
            return
        top = float(np.max(np.abs(v)))
        if top == 0.0:
            if self.R is None:
                self.zeros += v.size
                return
        elif self.R is None:
            # the smallest power of two strictly above every magnitude
            self.R = 2.0 ** (math.floor(math.log2(top)) + 1)
            if self.zeros:
                self.counts[0] += self.zeros
                self.zeros = 0
        while top >= self.R:
            self._grow()
        if not self.signed and float(np.min(v)) < 0:
            self._sign()
        lo = -self.R if self.signed else 0.0
        idx = np.floor((v - lo) * (self.bins / (self.R - lo))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)  # rounding at the top edge
        self.counts += np.bincount(idx, minlength=self.bins)


# ------------------------------------------------------------------ sinks
def _fmt(v: float) -> str:
    return repr(float(v))  # 'nan', 'inf' round-trip through float()


class _FileSink:
    """Append-only text file, flushed after every record."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new:
            self._header()

    def _header(self) -> None:
        pass

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


_CSV_HEADER = "step,layer,source,statistic,value"
#: the header before reference rows existed (read as source "measured")
_CSV_HEADER_V1 = "step,layer,statistic,value"


class CSVSink(_FileSink):
    """Long-format CSV ``step,layer,source,statistic,value`` (one line per value;
    the header is written when the file is new or empty).

    Raises
    ------
    ValueError
        The file exists with another header (appending would mix formats).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, encoding="utf-8", newline="") as fh:
                head = fh.readline().strip()
            if head != _CSV_HEADER:
                raise ValueError(
                    f"{path} starts with {head[:60]!r}, not the monitor CSV header "
                    f"{_CSV_HEADER!r}: write to a new file (read_rows still reads "
                    "the older 'step,layer,statistic,value' files)"
                )
        super().__init__(path)

    def _header(self) -> None:
        self._fh.write(_CSV_HEADER + "\n")
        self._fh.flush()

    def write(self, step: int, layer: str, values: Mapping[str, float]) -> None:
        self.write_reference(step, layer, MEASURED, values)

    def write_reference(
        self, step: int, layer: str, source: str, values: Mapping[str, float]
    ) -> None:
        w = csv.writer(self._fh, lineterminator="\n")
        w.writerows((step, layer, source, k, _fmt(v)) for k, v in values.items())
        self._fh.flush()


class JSONLinesSink(_FileSink):
    """One JSON object per record: ``{"step", "layer", "source", <statistic>:
    value}`` (NaN as null, inf as "inf", as :meth:`Profile.to_dict`)."""

    def write(self, step: int, layer: str, values: Mapping[str, float]) -> None:
        self.write_reference(step, layer, MEASURED, values)

    def write_reference(
        self, step: int, layer: str, source: str, values: Mapping[str, float]
    ) -> None:
        rec = {"step": step, "layer": layer, "source": source}
        rec.update(_jsonable(dict(values)))
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()


class TensorBoardSink:
    """Scalars ``layer/statistic`` to a ``SummaryWriter``-like object (reference
    rows as ``layer/statistic/source``, so TensorBoard files them under the same
    layer) and, when the monitor has ``bins``, histograms ``layer/activations`` /
    ``layer/grads`` of the finite values only.  The writer is the caller's: never
    closed here."""

    def __init__(self, writer: Any) -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                "TensorBoardSink needs an object with add_scalar (a "
                f"torch.utils.tensorboard.SummaryWriter); got {type(writer).__name__}"
            )
        self.writer = writer

    def write(self, step: int, layer: str, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{layer}/{k}", float(v), step)

    def write_reference(
        self, step: int, layer: str, source: str, values: Mapping[str, float]
    ) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{layer}/{k}/{source}", float(v), step)

    def histogram(self, step: int, tag: str, finite: np.ndarray) -> None:
        add = getattr(self.writer, "add_histogram", None)
        if callable(add) and finite.size:
            add(tag, finite, step)

    def flush(self) -> None:
        fl = getattr(self.writer, "flush", None)
        if callable(fl):
            fl()

    def close(self) -> None:
        self.flush()


def _sinks(sink: Any) -> list[Any]:
    if sink is None:
        return []
    if isinstance(sink, (list, tuple)):
        return [s for item in sink for s in _sinks(item)]
    if isinstance(sink, (str, os.PathLike)):
        path = os.fspath(sink)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".csv":
            return [CSVSink(path)]
        if ext in (".jsonl", ".ndjson"):
            return [JSONLinesSink(path)]
        raise ValueError(
            f"sink path {path!r}: the file name must end in .csv or .jsonl"
        )
    if callable(getattr(sink, "write", None)):
        return [sink]
    if callable(getattr(sink, "add_scalar", None)):
        return [TensorBoardSink(sink)]
    raise TypeError(
        "sink must be None, a .csv / .jsonl path, a CSVSink / JSONLinesSink, a "
        "TensorBoard SummaryWriter (add_scalar), an object with write(step, layer, "
        f"values), or a list of these; got {type(sink).__name__}"
    )


# ------------------------------------------------------------------ the monitor
def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an integer >= 0; got {step!r}")
    return int(step)


def _check_layer(layer: Any) -> None:
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"layer must be a non-empty string; got {layer!r}")


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
    return int(v)


class Monitor:
    """Per-layer Profile statistics of a training run, bounded in memory.

    Parameters
    ----------
    every : int
        Record steps ``step % every == 0`` only (:meth:`sampled`).
    history : int
        Rows (one per step and layer) kept in the in-memory table; as many
        reference rows (:meth:`record_reference`) are kept besides.
    bins : int, optional
        Histogram bins (a multiple of 4) per layer for activations and gradients;
        None: no histograms.
    sink : path, sink object, SummaryWriter or list, optional
        Where each record also goes (module docstring).
    backend : {"numpy", "numba", "c"} or None
        Kernel backend for host arrays; None: NumPy for tensors of fewer than
        :data:`SMALL_TENSOR` entries, the kernels' default above.  Device arrays
        always run on ``cuda``.
    max_findings : int
        Findings kept (later ones are counted in :attr:`findings_dropped`).

    Examples
    --------
    >>> mon = Monitor(every=10, sink="run.csv")            # doctest: +SKIP
    >>> for step in range(steps):                           # doctest: +SKIP
    ...     h = layer(x)
    ...     if mon.sampled(step):
    ...         mon.record(step, "layer1", activations=h)
    """

    def __init__(
        self,
        *,
        every: int = 1,
        history: int = 10_000,
        bins: int | None = None,
        sink: Any = None,
        backend: str | None = None,
        max_findings: int = 1000,
    ) -> None:
        self.every = _positive_int(every, "every")
        self.history = _positive_int(history, "history")
        self.max_findings = _positive_int(max_findings, "max_findings")
        if bins is not None:
            bins = _positive_int(bins, "bins")
            if bins % 4:
                raise ValueError(f"bins must be a multiple of 4 (e.g. 64); got {bins}")
        self.bins = bins
        if backend is not None and backend not in ("numpy", "numba", "c"):
            raise ValueError(
                f"backend must be 'numpy', 'numba', 'c' or None; got {backend!r} "
                "(device arrays always run on cuda)"
            )
        self._backend = backend
        self._default = kernels.get_backend()
        self._sinks = _sinks(sink)
        self._lock = threading.Lock()
        # (step, layer, source) -> values, measured rows and reference rows in
        # tables of their own (a long run's measured rows never push the
        # prediction out); _opened numbers every row, so rows() can give them in
        # the order they were opened, which is the order the file sinks wrote
        self._rows: OrderedDict[tuple[int, str, str], dict[str, float]] = OrderedDict()
        self._refs: OrderedDict[tuple[int, str, str], dict[str, float]] = OrderedDict()
        self._opened: dict[tuple[int, str, str], int] = {}
        self._count = 0
        self._agg: dict[str, dict[str, list[float]]] = {}
        self._hist: dict[tuple[str, str], _Histogram] = {}
        self._findings: list[dict[str, Any]] = []
        self.findings_dropped = 0

    def _host_backend(self, a: Any) -> str:
        if self._backend is not None:
            return self._backend
        # a small tensor costs less in NumPy than waking a thread pool (which,
        # next to PyTorch's own OpenMP pool still spinning after its last op,
        # can wait for a time slice): bench/MONITOR.md
        return "numpy" if a.size < SMALL_TENSOR else self._default

    # -- recording ------------------------------------------------------------------
    def sampled(self, step: int) -> bool:
        """Whether :meth:`record` records ``step`` (``step % every == 0``)."""
        return step % self.every == 0

    def record(
        self,
        step: int,
        layer: str,
        activations: Any = None,
        grads: Any = None,
        params: Any = None,
        updates: Any = None,
    ) -> dict[str, float] | None:
        """Compute and store the statistics of one layer at one step.

        Parameters
        ----------
        step : int >= 0
        layer : str
        activations : array or tensor (B, n) or (B, C, *S), optional
        grads : array / tensor, or mapping, optional
            An array: the gradient with respect to the layer output (same shape
            as the activations).  A mapping: ``"output"`` -> that gradient, any
            other name -> the gradient of that parameter.
        params : array / tensor, or mapping name -> array, optional
            The layer's parameters (an array alone is named ``weight``).
        updates : array / tensor, or mapping name -> array, optional
            The update applied to each parameter this step (``new - old``), for
            ``{p}_update_ratio``; each name must be in ``params``.

        Returns
        -------
        dict or None
            The statistics computed (module docstring), or None when the step is
            not sampled.  Several calls for one step and layer (forward, backward,
            optimizer step) merge into one row.

        Raises
        ------
        TypeError, ValueError
            Bad step, layer name or tensor type / dtype; never for NaN / inf.
        """
        step = _check_step(step)
        _check_layer(layer)
        if not self.sampled(step):
            return None
        # NaN / inf are findings: NumPy's warnings about them are noise here
        with np.errstate(all="ignore"):
            values, nonfinite, hists = self._measure(
                activations, grads, params, updates
            )
        with self._lock:
            self._store(step, layer, values, nonfinite, hists)
        return values

    def _measure(self, activations, grads, params, updates) -> tuple:
        """The kernels' part of :meth:`record` (no shared state touched)."""
        values: dict[str, float] = {}
        nonfinite: list[tuple[str, float]] = []
        hists: list[tuple[str, np.ndarray]] = []
        be = self._host_backend

        if activations is not None:
            a, dev = _host_or_device(activations, "activations")
            st = _activation_stats(a, dev, be(a))
            values.update(st)
            if st["nonfinite_count"]:
                nonfinite.append(("activations", st["nonfinite_count"]))
            if self.bins:
                hists.append(("activations", _finite_values(a, dev)))
        if isinstance(grads, Mapping):
            g = _named(grads, "grads")
            out_grad = g.pop("output", None)
        else:
            g, out_grad = {}, grads
        if out_grad is not None:
            a, dev = _host_or_device(out_grad, "grads")
            _, m2, _, s2, bad = _moments(a, dev, be(a))
            values.update(
                grad_second_moment=m2, grad_norm2=s2, grad_nonfinite_count=bad
            )
            if bad:
                nonfinite.append(("grads", bad))
            if self.bins:
                hists.append(("grads", _finite_values(a, dev)))
        for name, t in g.items():
            a, dev = _host_or_device(t, f"grads[{name!r}]")
            *_, s2, bad = _moments(a, dev, be(a))
            values[f"{name}_grad_norm2"] = s2
            if bad:
                nonfinite.append((f"{name} gradient", bad))
        p, u = _named(params, "params"), _named(updates, "updates")
        missing = sorted(set(u) - set(p))
        if missing:
            raise ValueError(
                f"updates for {missing} have no parameter in params (got params "
                f"{sorted(p)}); the update ratio needs the parameter's norm"
            )
        for name, t in p.items():
            a, dev = _host_or_device(t, f"params[{name!r}]")
            mean, _, var, s2, bad = _moments(a, dev, be(a))
            values.update(
                {f"{name}_mean": mean, f"{name}_variance": var, f"{name}_norm2": s2}
            )
            if bad:
                nonfinite.append((name, bad))
            if name in u:
                b, dev = _host_or_device(u[name], f"updates[{name!r}]")
                *_, d2, bad = _moments(b, dev, be(b))
                values[f"{name}_update_ratio"] = float(np.sqrt(np.float64(d2) / s2))
                if bad:
                    nonfinite.append((f"{name} update", bad))
        return values, nonfinite, hists

    def record_reference(
        self,
        step: int,
        layer: str,
        values: Mapping[str, float],
        *,
        source: str,
    ) -> None:
        """Store a row that was not measured in this run (a prediction) beside
        the measured ones (module docstring, "Reference rows").

        Parameters
        ----------
        step : int >= 0
            Where it belongs (a prediction at initialisation: the first step).
        layer : str
        values : mapping str -> float
            Statistics named as :meth:`record`'s, on the same scale.
        source : str
            What it is (``"analytic"``, ...); anything but ``"measured"``.

        Raises
        ------
        TypeError, ValueError
            Bad step, layer, source or values.
        """
        step = _check_step(step)
        _check_layer(layer)
        if not isinstance(source, str) or not source or source == MEASURED:
            raise ValueError(
                f"source must be a non-empty string other than {MEASURED!r} (the "
                f"rows record() measures), e.g. 'analytic'; got {source!r}"
            )
        if not isinstance(values, Mapping):
            raise TypeError(
                f"values must be a mapping statistic -> number; got "
                f"{type(values).__name__}"
            )
        vals: dict[str, float] = {}
        for k, v in values.items():
            if not isinstance(k, str) or not k or k in _ROW_KEYS:
                raise ValueError(
                    f"values: statistic names must be non-empty strings other than "
                    f"{_ROW_KEYS}; got {k!r}"
                )
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"values[{k!r}] must be a number; got {v!r}")
            vals[k] = float(v)
        with self._lock:
            self._row(step, layer, source).update(vals)
            for s in self._sinks:
                fn = getattr(s, "write_reference", None)
                if callable(fn):
                    fn(step, layer, source, vals)

    def _row(self, step: int, layer: str, source: str) -> dict[str, float]:
        key = (step, layer, source)
        table = self._rows if source == MEASURED else self._refs
        row = table.get(key)
        if row is None:
            row = table[key] = {}
            self._opened[key] = self._count
            self._count += 1
            while len(table) > self.history:
                del self._opened[table.popitem(last=False)[0]]
        return row

    def _store(self, step, layer, values, nonfinite, hists) -> None:
        self._row(step, layer, MEASURED).update(values)
        agg = self._agg.setdefault(layer, {})
        for k, v in values.items():
            _aggregate(agg, k, v, step)
        for tensor, count in nonfinite:
            if len(self._findings) >= self.max_findings:
                self.findings_dropped += 1
                continue
            self._findings.append(
                {
                    "kind": "nonfinite",
                    "step": step,
                    "layer": layer,
                    "tensor": tensor,
                    "count": int(count),
                    "message": f"{int(count)} NaN / inf entries in the {tensor} of "
                    f"{layer} at step {step}",
                }
            )
        for tensor, v in hists:
            h = self._hist.get((layer, tensor))
            if h is None:
                h = self._hist[(layer, tensor)] = _Histogram(self.bins)
            h.add(v)
            for s in self._sinks:
                if callable(getattr(s, "histogram", None)):
                    s.histogram(step, f"{layer}/{tensor}", v)
        for s in self._sinks:
            s.write(step, layer, values)

    # -- reading --------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """The in-memory table: ``[{"step", "layer", "source", <statistic>:
        value}]`` (``source`` ``"measured"``, or a reference row's), in the order
        the rows were opened (the last ``history`` measured rows and the last
        ``history`` reference rows)."""
        with self._lock:
            both = [*self._rows.items(), *self._refs.items()]
            both.sort(key=lambda kv: self._opened[kv[0]])
            return [
                {"step": s, "layer": n, "source": src, **r} for (s, n, src), r in both
            ]

    def to_frame(self):
        """:meth:`rows` as a pandas DataFrame.

        Needs pandas: ``pip install "initdiag[frames]"``.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                'Monitor.to_frame needs pandas: pip install "initdiag[frames]" (or '
                "pip install pandas); Monitor.rows() gives the same table without it"
            ) from None
        return pd.DataFrame(self.rows())

    @property
    def findings(self) -> list[dict[str, Any]]:
        """Non-finite tensors seen, sorted by step and layer (module docstring)."""
        with self._lock:
            return sorted(
                (dict(f) for f in self._findings),
                key=lambda f: (f["step"], f["layer"], f["tensor"]),
            )

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Streaming aggregates over every recorded step (not only the history):
        ``{layer: {statistic: {"count", "mean", "std", "min", "max", "last",
        "last_step"}}}`` over the finite values (``count`` 0: none finite)."""
        with self._lock:
            out = {}
            for layer, agg in self._agg.items():
                out[layer] = {}
                for k, (n, mean, m2, lo, hi, last, last_step) in agg.items():
                    out[layer][k] = {
                        "count": int(n),
                        "mean": mean if n else math.nan,
                        "std": math.sqrt(m2 / n) if n else math.nan,
                        "min": lo,
                        "max": hi,
                        "last": last,
                        "last_step": int(last_step),
                    }
            return out

    def histogram(
        self, layer: str, tensor: str = "activations"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(edges, counts)`` of the finite values recorded for ``layer``
        (``tensor`` "activations" or "grads"); needs ``bins``."""
        if not self.bins:
            raise ValueError("this Monitor keeps no histograms; create it with bins=64")
        with self._lock:
            h = self._hist.get((layer, tensor))
            if h is None:
                have = sorted(self._hist)
                raise KeyError(
                    f"no {tensor} histogram for layer {layer!r}; have {have}"
                )
            return h.edges(), h.counts.copy()

    def plot(
        self,
        columns: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
        *,
        pyplot: bool = False,
    ):
        """Per-layer statistics against steps (matplotlib): :func:`plot_rows`
        of :meth:`rows`."""
        return plot_rows(self.rows(), columns, layers, pyplot=pyplot)

    # -- lifetime -------------------------------------------------------------------
    def _each_sink(self, method: str) -> None:
        with self._lock:
            for s in self._sinks:
                fn = getattr(s, method, None)
                if callable(fn):
                    fn()

    def flush(self) -> None:
        """Flush every sink (the file sinks flush after each record anyway)."""
        self._each_sink("flush")

    def close(self) -> None:
        """Close the file sinks (a SummaryWriter is flushed, not closed)."""
        self._each_sink("close")

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _aggregate(agg: dict[str, list[float]], k: str, v: float, step: int) -> None:
    a = agg.get(k)
    if a is None:
        a = agg[k] = [0, 0.0, 0.0, math.inf, -math.inf, math.nan, -1]
    if step >= a[6]:
        a[5], a[6] = v, step
    if not math.isfinite(v):
        return
    # Welford's update (Welford 1962): stable for long runs
    a[0] += 1
    d = v - a[1]
    a[1] += d / a[0]
    a[2] += d * (v - a[1])
    a[3] = min(a[3], v)
    a[4] = max(a[4], v)


# ------------------------------------------------------------------ files back
def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows a CSV or JSON-lines sink wrote, records of one step, layer and
    source merged, in file order: ``[{"step", "layer", "source", <statistic>:
    value}]``, as :meth:`Monitor.rows`.  Files written before reference rows
    existed (CSV header ``step,layer,statistic,value``, JSON without
    ``"source"``) read as ``source="measured"``.

    Raises
    ------
    FileNotFoundError
    ValueError
        Not a monitor file (the message names the line).
    """
    path = os.fspath(path)
    rows: OrderedDict[tuple[int, str, str], dict[str, Any]] = OrderedDict()

    def put(step: Any, layer: Any, src: Any, k: str, v: float, where: str) -> None:
        try:
            s = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: step {step!r} is not an integer") from None
        if not isinstance(src, str) or not src:
            raise ValueError(f"{where}: source {src!r} is not a non-empty string")
        key = (s, str(layer), src)
        rows.setdefault(key, {"step": s, "layer": str(layer), "source": src})[k] = v

    with open(path, encoding="utf-8", newline="") as fh:
        head = fh.readline().strip()
        if head in (_CSV_HEADER, _CSV_HEADER_V1):
            n = head.count(",") + 1
            for i, rec in enumerate(csv.reader(fh), start=2):
                if not rec:
                    continue
                where = f"{path}:{i}"
                if len(rec) != n:
                    raise ValueError(f"{where}: expected {n} fields, got {len(rec)}")
                try:
                    v = float(rec[-1])
                except ValueError:
                    raise ValueError(
                        f"{where}: value {rec[-1]!r} is not a number"
                    ) from None
                src = rec[2] if n == 5 else MEASURED
                put(rec[0], rec[1], src, rec[-2], v, where)
        else:
            fh.seek(0)
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{i}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(
                        f"{where}: neither the monitor CSV header "
                        f"{_CSV_HEADER!r} nor a JSON line"
                    ) from None
                if not isinstance(rec, dict) or "step" not in rec or "layer" not in rec:
                    raise ValueError(
                        f"{where}: a JSON object with step and layer expected"
                    )
                src = rec.get("source", MEASURED)
                for k, v in rec.items():
                    if k not in _ROW_KEYS:
                        try:
                            num = _from_json_number(v)
                        except (TypeError, ValueError):
                            raise ValueError(
                                f"{where}: {k}={v!r} is not a number"
                            ) from None
                        put(rec["step"], rec["layer"], src, k, num, where)
    return list(rows.values())


def _is_grad_column(c: str) -> bool:
    return c == "grad_second_moment" or c.endswith("_grad_norm2")


#: the columns of a reference row saying how its gradient columns were rescaled
_SCALE_KEYS = ("output_grad_second_moment", "output_rows")
_REFERENCE_STYLES = ("--", ":", "-.")


def plot_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    *,
    pyplot: bool = False,
):
    """One panel per statistic, one line per layer, against the step; reference
    rows (``source`` other than ``"measured"``) as an open marker at their step
    and a horizontal line from there to the last step, in the layer's colour,
    one line style per source (the legend names it).  In a gradient panel, a
    note says how the references were rescaled (``x m``: grad_second_moment
    times the measured output-gradient second moment; ``x B m``: parameter
    gradient norms, B the output's rows) when their rows say so (module
    docstring).

    Parameters
    ----------
    rows : iterable of dict
        :meth:`Monitor.rows` or :func:`read_rows`.
    columns : sequence of str, optional
        Default: those of :data:`DEFAULT_PLOT_COLUMNS` present.
    layers : sequence of str, optional
        Default: every layer, in order of appearance.
    pyplot : bool
        Create the figure through pyplot (``plt.show()``); default a bare Figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        No rows, or a named column / layer absent.
    """
    from matplotlib.lines import Line2D

    from .report.plots import _new_figure

    rows = list(rows)
    if not rows:
        raise ValueError("nothing to plot: no rows (was anything recorded?)")
    present = {k for r in rows for k in r} - set(_ROW_KEYS)
    order = list(dict.fromkeys(str(r["layer"]) for r in rows))
    if columns is None:
        cols = [c for c in DEFAULT_PLOT_COLUMNS if c in present] or sorted(
            present - set(_SCALE_KEYS)
        )[:4]
    else:
        cols = list(columns)
        bad = [c for c in cols if c not in present]
        if bad:
            raise ValueError(
                f"columns {bad} are not in the rows; have {sorted(present)}"
            )
    names = order if layers is None else list(layers)
    bad = [n for n in names if n not in order]
    if bad:
        raise ValueError(f"layers {bad} are not in the rows; have {order}")
    measured = [r for r in rows if r.get("source", MEASURED) == MEASURED]
    refs = [r for r in rows if r.get("source", MEASURED) != MEASURED]
    sources = list(dict.fromkeys(r["source"] for r in refs))
    style = {src: _REFERENCE_STYLES[i % 3] for i, src in enumerate(sources)}
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}
    last = max(r["step"] for r in rows)
    fig, axes = _new_figure(len(cols), pyplot=pyplot)
    for ax, c in zip(axes, cols, strict=True):
        for n in names:
            pts = sorted(
                (r["step"], r[c]) for r in measured if r["layer"] == n and c in r
            )
            pts = [(s, v) for s, v in pts if math.isfinite(v)]
            if pts:
                s, v = zip(*pts, strict=True)
                ax.plot(s, v, label=n, lw=1.2, color=color[n])
        rescaled = set()
        for r in refs:
            v = r.get(c)
            if r["layer"] not in color or v is None or not math.isfinite(v):
                continue
            col, ls = color[r["layer"]], style[r["source"]]
            ax.plot([r["step"]], [v], marker="o", mfc="none", ls="none", color=col)
            ax.hlines(v, r["step"], last, colors=col, linestyles=ls, lw=1.0)
            if _is_grad_column(c) and "output_grad_second_moment" in r:
                rescaled.add((r["source"], r["step"]))
        if rescaled:
            factor = "m" if c == "grad_second_moment" else "B m"
            what = ", ".join(f"{src} x {factor}" for src, _ in sorted(rescaled))
            at = ", ".join(sorted({str(st) for _, st in rescaled}))
            ax.text(
                0.02,
                0.02,
                f"{what}\nm = E[g_out^2] measured at step {at}",
                transform=ax.transAxes,
                fontsize="x-small",
                va="bottom",
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0},
            )
        ax.set_xlabel("step")
        ax.set_title(c)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(names) > 12:
        handles, labels = [], []
    for src in sources:
        at = sorted({r["step"] for r in refs if r["source"] == src})
        steps = ", ".join(map(str, at[:3])) + (", ..." if len(at) > 3 else "")
        handles.append(
            Line2D([], [], color="0.3", ls=style[src], marker="o", mfc="none")
        )
        labels.append(f"{src} (step {steps})")
    if handles:
        axes[0].legend(handles, labels, fontsize="small")
    return fig

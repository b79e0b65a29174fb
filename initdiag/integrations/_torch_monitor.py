"""PyTorch training loops through :class:`initdiag.Monitor`: :class:`TorchMonitor`.

Hooks (registered on sampled steps only, removed at the next step and when the
context exits, also by an exception):

- a forward hook on every monitored module (default: every leaf module,
  parameter-free ones included, so a ReLU's row is after the ReLU) computes the
  activation statistics at once, before any later in-place op (``ReLU(inplace=
  True)``, ``out += identity``) changes the tensor;
- a tensor hook on that output (``out.register_hook``) computes the statistics of
  the gradient with respect to it; a hook registered before an in-place op sees
  the gradient of the value before it.  Full backward hooks
  (``register_full_backward_hook``) are never used: they fail on in-place outputs;
- ``register_post_accumulate_grad_hook`` on the module's own parameters gives
  ``{p}_grad_norm2`` from the accumulated ``p.grad``;
- the module's parameters are copied at the start of a sampled step; at the start
  of the next step (or on exit) ``{p}_update_ratio`` compares the change with
  them, whatever optimizer (or none) made it.  One copy of the monitored
  parameters lives at a time.

The step-0 link (``predict=example_input``): :func:`initdiag.integrations.torch.
diagnose` runs once when the monitor is made (before any hook is armed; the model
is left as it was) and its rows, mapped to the monitored modules by name through
its coverage table, are written beside the measured rows of the first sampled
step that runs (normally step 0) as reference rows
(:meth:`initdiag.Monitor.record_reference`) of two sources:

- ``"analytic"``: the mean-field prediction (``diagnose(...).analytic``; absent
  where the network has no mean-field rule);
- ``"ensemble"``: the model itself at ``seeds`` fresh initialisations, mean over
  them (``diagnose(...).measured``), finite width included.

One scale for both sides: a Profile's gradient columns are normalised by the
output gradient (``grad_second_moment = E[g^2] / m``, parameter gradient norms
``||dL/dtheta||^2 / (B m)``, m = E[g_out^2] the second moment of the gradient
with respect to the model's output, B its rows: the batch, times the positions
of an N-d output), the monitor's are raw.  The prediction is put on the
monitor's raw scale with the m and B *measured* at that step (a hook on the
model's output): ``grad_second_moment x m``, ``{p}_grad_norm2 x B m``; each
reference row carries them as ``output_grad_second_moment`` and
``output_rows``, and the plot says so.  The prediction's gradient columns are
those of diagnose's probe loss ``L = sum <g_out, y>`` with i.i.d. ``g_out``
independent of the forward pass (gradient independence); a real loss's output
gradient can correlate across examples (MSE through y, cross-entropy through the
softmax), which moves the bias and weight gradient norms away from the
prediction by those cross-example terms from step 0 on.  Forward columns need no
rescaling; ``correlation`` is left out for N-d outputs (diagnose correlates
positions, the monitor whole examples).

Under ``torch.compile`` the hooks inside a compiled graph cannot run eagerly:
TorchMonitor says so with a warning (what it still sees: parameters, their
gradients and updates; what it may not: activations and output gradients of
compiled modules) and, at the end of a sampled step that recorded no activation,
a second warning, instead of failing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised without torch only
    raise ImportError(
        'initdiag.integrations.torch needs PyTorch: pip install "initdiag[torch]" '
        f"(it pins torch==2.13.0); importing torch failed: {exc}"
    ) from exc

from ..monitor import Monitor
from ..profile import STAT_COLUMNS
from ._torch_measure import _PARAM_COLS

__all__ = ["TorchMonitor"]

#: the keyword arguments of diagnose that ``predict_options`` may set
_PREDICT_OPTIONS = ("seeds", "resample", "batch_size", "init_fn", "rng")
#: the Profile columns of parameter gradients (the values of _PARAM_COLS)
_PARAM_PROFILE_COLS = {c for cols in _PARAM_COLS.values() for c in cols.values()}
#: the Profile's columns that need no rescaling
_FORWARD_COLS = tuple(
    c
    for c in STAT_COLUMNS
    if c != "grad_second_moment" and c not in _PARAM_PROFILE_COLS
)


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if callable(fn) else False


class TorchMonitor:
    """Monitor a PyTorch model's layers during training (a context manager).

    Parameters
    ----------
    model : torch.nn.Module
        Possibly compiled (``torch.compile``: its ``_orig_mod`` is walked).
    every : int
        Record steps ``step % every == 0``.
    modules : iterable of str, module types or modules, optional
        What to hook: qualified names (``"layer1.0.conv1"``), module classes
        (every module of that class) or module objects.  Default: every leaf
        module.
    sink : path, sink, SummaryWriter or list, optional
        As :class:`initdiag.Monitor`.
    optimizer : torch.optim.Optimizer, optional
        Count steps by it: step 0 starts on entering, each ``optimizer.step()``
        ends one and starts the next, so :meth:`step` need not be called.
    monitor : initdiag.Monitor, optional
        Record into this one (then ``every``, ``sink``, ``bins``, ``history`` and
        ``backend`` are its own and must not be passed).
    bins, history, backend
        Passed to the new :class:`~initdiag.Monitor`.
    predict : torch.Tensor or Diagnosis, optional
        The step-0 link (module docstring): an example input batch (like the
        training batches: the prediction is for its size) given to
        :func:`~initdiag.integrations.torch.diagnose` now, or a Diagnosis of
        this model already made (diagnose runs on the CPU: for a model on cuda,
        pass ``diagnose(copy.deepcopy(model).cpu(), x.cpu())``).  Its rows are
        written as reference rows (``source`` ``"analytic"`` and ``"ensemble"``)
        at the first sampled step that runs, gradient columns times the
        output-gradient second moment measured there.
    predict_options : mapping, optional
        Keyword arguments for diagnose: ``seeds`` (default 8), ``resample``,
        ``batch_size``, ``init_fn``, ``rng``.

    Attributes
    ----------
    diagnosis : Diagnosis or None
        What ``predict`` gave.
    prediction : dict
        ``{source: {module name: {statistic: value}}}``, the Profile's values
        (normalised gradient columns) of every monitored module that maps to a
        row.

    Examples
    --------
    >>> with TorchMonitor(model, every=10, sink="run.csv") as tm:  # doctest: +SKIP
    ...     for i, (x, y) in enumerate(loader):
    ...         tm.step(i)
    ...         loss = loss_fn(model(x), y)
    ...         opt.zero_grad(); loss.backward(); opt.step()
    >>> tm.monitor.rows()                                             # doctest: +SKIP

    The measured statistics beside the prediction at initialisation:

    >>> with TorchMonitor(model, every=10, optimizer=opt,
    ...                   predict=x_example) as tm:                 # doctest: +SKIP
    ...     ...
    >>> [r for r in tm.monitor.rows() if r["source"] == "analytic"]   # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        every: int = 1,
        modules: Iterable[Any] | None = None,
        sink: Any = None,
        *,
        optimizer: Any = None,
        monitor: Monitor | None = None,
        bins: int | None = None,
        history: int = 10_000,
        backend: str | None = None,
        predict: Any = None,
        predict_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}"
            )
        self.compiled = hasattr(model, "_orig_mod")
        self.model = model
        root = model._orig_mod if self.compiled else model
        if monitor is None:
            monitor = Monitor(
                every=every, history=history, bins=bins, sink=sink, backend=backend
            )
        elif not isinstance(monitor, Monitor):
            raise TypeError(
                f"monitor must be an initdiag.Monitor; got {type(monitor).__name__}"
            )
        elif sink is not None or bins is not None or every != 1:
            raise ValueError(
                "pass every / sink / bins to the Monitor given as monitor=, not here"
            )
        self.monitor = monitor
        self.modules = _select(root, modules)
        if optimizer is not None and not callable(
            getattr(optimizer, "register_step_post_hook", None)
        ):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (register_step_post_hook); "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        #: modules whose output could not be recorded: {name: reason}
        self.skipped: dict[str, str] = {}
        self._step: int | None = None
        self._handles: list[Any] = []
        self._persistent: list[Any] = []
        self._snapshot: dict[str, dict[str, torch.Tensor]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._warned_blind = False
        self._active = False
        self.diagnosis = _diagnosis(root, predict, predict_options)
        self.prediction = _prediction(self.diagnosis, self.modules, root)
        self._root = root
        self._pending = bool(self.prediction)
        #: the step the prediction is written at (None: not yet armed)
        self._predict_step: int | None = None
        self._out_scale: tuple[float, int] | None = None
        self._out_dims: dict[str, int] = {}

    # -- the context ----------------------------------------------------------------
    def __enter__(self) -> TorchMonitor:
        if self._active:
            raise RuntimeError("this TorchMonitor is already active")
        self._active = True
        if self.compiled:
            warnings.warn(
                "TorchMonitor: the model is compiled (torch.compile): parameters, "
                "their gradients and updates are recorded; activations and output "
                "gradients only where the hooks run outside the compiled graph "
                "(a warning follows if a sampled step recorded none); monitor the "
                "uncompiled model to see every layer",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.optimizer is not None:
            self._persistent.append(
                self.optimizer.register_step_post_hook(self._after_optimizer)
            )
            self.step(0)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._finish_step()
            elif self._pending and self._step == self._predict_step:
                # the loop failed in the first step: what it ran is worth seeing
                # beside the prediction
                self._write_prediction(self._step)
        finally:
            self._remove(self._handles)
            self._remove(self._persistent)
            self._snapshot = {}
            self._step = None
            self._active = False
            self.monitor.flush()

    @staticmethod
    def _remove(handles: list[Any]) -> None:
        while handles:
            handles.pop().remove()

    def _after_optimizer(self, *args: Any) -> None:
        self.step((self._step if self._step is not None else -1) + 1)

    # -- steps ----------------------------------------------------------------------
    @property
    def current_step(self) -> int | None:
        """The step being recorded into (None outside the context)."""
        return self._step

    def step(self, i: int) -> None:
        """Start step ``i``: finish the previous one (its updates), then arm the
        hooks if ``i`` is sampled, else leave none registered."""
        if not self._active:
            raise RuntimeError(
                "TorchMonitor.step() is called inside `with TorchMonitor(...)`"
            )
        self._finish_step()
        self._step = int(i)
        if not self.monitor.sampled(self._step):
            return
        self._seen = set()
        if self._pending:
            self._predict_step, self._out_scale = self._step, None
            self._handles.append(self._root.register_forward_hook(self._output_hook))
        for name, mod in self.modules:
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
            own = dict(mod.named_parameters(recurse=False))
            if own:
                self._snapshot[name] = {k: p.detach().clone() for k, p in own.items()}
            for pname, p in own.items():
                if p.requires_grad:
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(
                            self._param_hook(name, pname)
                        )
                    )

    def _finish_step(self) -> None:
        self._remove(self._handles)
        s = self._step
        if self._pending and s == self._predict_step:
            self._write_prediction(s)
        if s is None or not self.monitor.sampled(s) or not self._seen:
            # not sampled, or nothing ran in it (the step the optimizer's last
            # step() opened): no row, and no update to attribute
            if self.compiled and s is not None and self.monitor.sampled(s):
                self._blind(s)
            self._snapshot = {}
            return
        for name, mod in self.modules:
            old = self._snapshot.get(name)
            if not old:
                continue
            now = dict(mod.named_parameters(recurse=False))
            updates = {k: now[k].detach() - v for k, v in old.items() if k in now}
            self.monitor.record(s, name, params=old, updates=updates)
        self._snapshot = {}
        if self.compiled and not any(kind == "activations" for kind, _ in self._seen):
            self._blind(s)

    def _write_prediction(self, s: int) -> None:
        """The prediction's reference rows at step ``s`` (module docstring), once
        a forward pass ran in it (else it waits for the next sampled step)."""
        if not any(kind == "activations" for kind, _ in self._seen):
            return
        scale = self._out_scale
        if scale is None:
            warnings.warn(
                f"TorchMonitor: no gradient reached the model's output at step {s}: "
                "the prediction's gradient columns (normalised by it) are left out",
                RuntimeWarning,
                stacklevel=4,
            )
        for source, by_module in self.prediction.items():
            for name, vals in by_module.items():
                out = {}
                for k, v in vals.items():
                    if k == "correlation" and self._out_dims.get(name, 2) > 2:
                        continue
                    if k == "grad_second_moment" or k.endswith("_grad_norm2"):
                        if scale is None:
                            continue
                        m, B = scale
                        v = v * m if k == "grad_second_moment" else v * B * m
                    out[k] = v
                if scale is not None:
                    out["output_grad_second_moment"], out["output_rows"] = scale
                self.monitor.record_reference(s, name, out, source=source)
        self._pending = False

    def _output_hook(self, module: Any, args: Any, out: Any) -> None:
        # the model's output: the gradient there is the normaliser of the
        # Profile's gradient columns (its first call in the step counts)
        if (
            _is_compiling()
            or ("output", "") in self._seen
            or not isinstance(out, torch.Tensor)
            or not out.requires_grad
            or out.dim() == 0
        ):
            return
        self._seen.add(("output", ""))
        rows = out.shape[0] * (math.prod(out.shape[2:]) if out.dim() > 2 else 1)
        step = self._step

        def hook(g: torch.Tensor) -> None:
            if self._step == step and self._out_scale is None:
                m = float(g.detach().double().pow(2).mean())
                self._out_scale = (m, int(rows))

        out.register_hook(hook)

    def _blind(self, s: int) -> None:
        if self._warned_blind:
            return
        self._warned_blind = True
        warnings.warn(
            f"TorchMonitor: step {s} was sampled but no forward hook ran inside the "
            "compiled model (torch.compile): no activation or output-gradient "
            "statistics for it; parameters, gradients and updates are recorded",
            RuntimeWarning,
            stacklevel=4,
        )

    # -- hooks ----------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(module: Any, args: Any, out: Any) -> None:
            if _is_compiling():
                return
            step = self._step
            if step is None or ("activations", name) in self._seen:
                return  # a module run twice in a step: its first call counts
            if not isinstance(out, torch.Tensor):
                self.skipped.setdefault(
                    name, f"its output is a {type(out).__name__}, not a tensor"
                )
                return
            if not out.is_floating_point() or out.dim() == 0:
                self.skipped.setdefault(
                    name, f"its output is {out.dtype} of shape {tuple(out.shape)}"
                )
                return
            self._seen.add(("activations", name))
            self._out_dims[name] = out.dim()
            self.monitor.record(step, name, activations=out)
            if out.requires_grad:
                self._handles.append(out.register_hook(self._grad_hook(name, step)))

        return hook

    def _grad_hook(self, name: str, step: int):
        def hook(g: torch.Tensor) -> None:
            if self._step == step and ("grads", name) not in self._seen:
                self._seen.add(("grads", name))
                self.monitor.record(step, name, grads=g)

        return hook

    def _param_hook(self, name: str, pname: str):
        def hook(p: torch.Tensor) -> None:
            step = self._step
            if step is not None and p.grad is not None:
                self._seen.add(("param", name))
                self.monitor.record(step, name, grads={pname: p.grad})

        return hook


def _diagnosis(root: Any, predict: Any, options: Mapping[str, Any] | None) -> Any:
    """The Diagnosis ``predict`` asks for (None without one)."""
    from . import torch as itorch  # torch.py imports this module

    if predict is None:
        if options is not None:
            raise ValueError("predict_options needs predict= (an example input)")
        return None
    if isinstance(predict, itorch.Diagnosis):
        if options is not None:
            raise ValueError(
                "predict_options applies to an example input; predict= is already "
                "a Diagnosis"
            )
        return predict
    if not isinstance(predict, torch.Tensor):
        raise TypeError(
            "predict must be an example input batch (a torch.Tensor shaped like the "
            "training batches) or a Diagnosis from initdiag.integrations.torch."
            f"diagnose; got {type(predict).__name__}"
        )
    where = {t.device.type for t in (predict, *root.parameters(), *root.buffers())}
    if where != {"cpu"}:
        # diagnose measures the model on the host (its rows through NumPy)
        raise ValueError(
            f"predict= diagnoses the model on the CPU; got tensors on {sorted(where)}: "
            "pass predict=diagnose(copy.deepcopy(model).cpu(), example.cpu()) (a "
            "Diagnosis of the same model; rows are matched by module name)"
        )
    opts = dict(options or {})
    bad = sorted(set(opts) - set(_PREDICT_OPTIONS))
    if bad:
        raise TypeError(
            f"predict_options: {bad} are not diagnose options; use {_PREDICT_OPTIONS}"
        )
    return itorch.diagnose(root, predict, kernels=False, **opts)


def _prediction(d: Any, modules: list[tuple[str, Any]], root: Any) -> dict[str, dict]:
    """``{source: {module name: {statistic: Profile value}}}`` for the monitored
    modules that map to a row of ``d`` (a module called several times: its first
    row, as the monitor records its first call)."""
    if d is None:
        return {}
    row_of = {}
    for r in d.coverage.rows:
        if r.status == "mapped" and r.row:
            row_of[r.name] = r.row.split(", ")[0]
    index = {n: i for i, n in enumerate(d.network.names)}
    out: dict[str, dict] = {}
    for source, prof in (("analytic", d.analytic), ("ensemble", d.measured)):
        if prof is None:
            continue
        by_module = out[source] = {}
        for name, mod in modules:
            # the coverage table names a leaf root "", the monitor by its type
            row = row_of.get("" if mod is root else name)
            if row is None:
                continue
            i = index[row]
            vals = {
                c: prof.columns[c][i] for c in (*_FORWARD_COLS, "grad_second_moment")
            }
            for pname, col in _PARAM_COLS.get(d.network.infos[i].kind, {}).items():
                vals[f"{pname}_grad_norm2"] = prof.columns[col][i]
            # NaN: the column does not apply to the row (or theory leaves it open)
            by_module[name] = {k: float(v) for k, v in vals.items() if math.isfinite(v)}
    return out


def _select(root: Any, modules: Iterable[Any] | None) -> list[tuple[str, Any]]:
    """``[(qualified name, module)]`` to hook, in the model's order."""
    named = [(n or type(m).__name__, m) for n, m in root.named_modules()]
    if modules is None:
        return [(n, m) for n, m in named if next(m.children(), None) is None]
    want = list(modules)
    names = {n for n, _ in named}
    chosen: list[tuple[str, Any]] = []
    for w in want:
        if isinstance(w, str):
            if w not in names:
                some = ", ".join(sorted(names)[:8])
                raise ValueError(
                    f"modules: {w!r} is not a module of the model (have {some}, ...)"
                )
            hit = [(n, m) for n, m in named if n == w]
        elif isinstance(w, type) and issubclass(w, torch.nn.Module):
            hit = [(n, m) for n, m in named if isinstance(m, w)]
        elif isinstance(w, torch.nn.Module):
            hit = [(n, m) for n, m in named if m is w]
            if not hit:
                raise ValueError(
                    f"modules: {type(w).__name__} object is not in the model"
                )
        else:
            raise TypeError(
                "modules must hold qualified names, module classes or module "
                f"objects; got {type(w).__name__}"
            )
        chosen += [h for h in hit if h not in chosen]
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen, key=lambda nm: order[nm[0]])

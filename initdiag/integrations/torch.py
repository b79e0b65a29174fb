"""Real PyTorch models: read a model as an initdiag network, audit its
parameters, diagnose it (theory, the model itself, initdiag's kernels side by
side) and fix its initialisation.

Needs the ``torch`` extra (``pip install "initdiag[torch]"``); ``import initdiag``
never imports this module.

- :func:`read`: the :class:`~initdiag.Network` a model maps to, and a
  :class:`Coverage` table of every module;
- :func:`audit`: every parameter tensor against the law its fan and its apparent
  initializer imply (no input needed);
- :func:`diagnose`: per mapped output, the analytic prediction, the measurement
  of the model itself over fresh initialisations, and ``simulate`` of the mapped
  network;
- :func:`fix`: a per-layer rescaling to the edge of chaos or to unit variance.
"""

from __future__ import annotations

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised without torch only
    raise ImportError(
        'initdiag.integrations.torch needs PyTorch: pip install "initdiag[torch]"'
    ) from exc

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..analytic import analyze
from ..empirical import _aggregate, simulate
from ..initializers import InitScheme
from ..initializers import Normal as _Normal
from ..layers.base import check_bool
from ..network import Network
from . import _torch_graph as G
from . import _torch_lsuv as LS
from . import _torch_map as M
from . import _torch_measure as MS
from ._torch_audit import Audit, AuditRow
from ._torch_audit import audit as _audit
from ._torch_fix import FixRow, data_rows, plan_fix
from ._torch_laws import TensorLaw, module_fans, tensor_law
from ._torch_monitor import TorchMonitor

__all__ = [
    "read",
    "audit",
    "Audit",
    "AuditRow",
    "TensorLaw",
    "Coverage",
    "CoverageRow",
    "UnsupportedModuleError",
    "Mapping",
    "diagnose",
    "Diagnosis",
    "fix",
    "FixResult",
    "FixRow",
    "measured_chi1",
    "load_factory",
    "report",
    "TorchMonitor",
]


class UnsupportedModuleError(ValueError):
    """``read(..., strict=True)`` met modules initdiag cannot map."""


@dataclass(frozen=True)
class CoverageRow:
    """One module (or functional op) of the model: ``name`` (qualified name, or
    ``F.relu@node`` for a function), ``type``, ``status`` (``mapped``, ``passed
    through``, ``unsupported``, ``container``, ``not called``), ``row`` (the
    initdiag row it maps to, or ""), ``note``."""

    name: str
    type: str
    status: str
    row: str = ""
    note: str = ""


@dataclass
class Coverage:
    """The coverage table of :func:`read`; ``method`` says how the graph was read
    (``"fx"``, ``"recorded forward"``, ``"module order"``)."""

    rows: list[CoverageRow]
    method: str
    warnings: list[str] = field(default_factory=list)
    mapping: Mapping | None = None

    def unsupported(self) -> list[CoverageRow]:
        return [r for r in self.rows if r.status == "unsupported"]

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [4])
        t = max([len(r.type) for r in self.rows] + [4])
        lines = [
            f"coverage (graph: {self.method})",
            f"{'name':<{w}}  {'type':<{t}}  {'status':<14}  row",
        ]
        for r in self.rows:
            note = f"  ({r.note})" if r.note else ""
            lines.append(f"{r.name:<{w}}  {r.type:<{t}}  {r.status:<14}  {r.row}{note}")
        return "\n".join(lines)


@dataclass
class Mapping:
    """How a model maps to its network, for the measurement: the graph's nodes,
    the node key of every network row, and how the graph was read."""

    nodes: list[G.Node]
    row_keys: list[str]
    method: str
    modules: dict[str, nn.Module]


def _as_input(example_input: Any) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be a torch.Tensor of shape (batch, features) or "
            f"(batch, channels, ...), got {type(example_input).__name__}"
        )
    if example_input.dim() < 2 or example_input.shape[0] < 2:
        raise ValueError(
            f"example_input needs a batch of at least 2 examples and a feature "
            f"dimension, got shape {tuple(example_input.shape)}"
        )
    return example_input


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _graph(model: nn.Module, x: torch.Tensor) -> tuple[list[G.Node], str, tuple, str]:
    """(nodes, method, (items, keys on the data path), warning): fx first, then a
    recorded forward, then the leaf modules in execution order."""
    why = ""
    try:
        nodes = G.trace_fx(model)
        kinds = {n.key: M.classify(n) for n in nodes}
        return nodes, "fx", M.sequence(nodes, kinds), ""
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        why = f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
    with torch.no_grad():
        nodes, _ = G.record_forward(model, x)
    kinds = {n.key: M.classify(n) for n in nodes}
    try:
        return nodes, "recorded forward", M.sequence(nodes, kinds), why
    except M.GraphError as exc:
        why += f"; the recorded forward is not a chain of residual blocks ({exc})"
    chain = [n for n in nodes if n.op == "module" and kinds[n.key].layer is not None]
    items = [(kinds[n.key].layer, n.key) for n in chain]
    path = _ancestors(nodes)
    return (
        nodes,
        "module order",
        (items, path),
        (
            why
            + "; read as the leaf modules in execution order: residual structure is "
            "unknown"
        ),
    )


def _ancestors(nodes: list[G.Node]) -> set[str]:
    """The keys the last node depends on (the data path of a recorded forward)."""
    by_key = {n.key: n for n in nodes}
    seen: set[str] = set()
    todo = [nodes[-1].key]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo.extend(by_key[k].inputs)
    return seen


def _coverage(model, nodes, kinds, row_of, method, path) -> Coverage:
    """One row per module (a module called several times, such as a shared
    ``nn.ReLU``, lists every row it maps to) and per functional op on the data
    path."""
    called: dict[str, list[str]] = {}
    for n in nodes:
        if n.op == "module" and n.key in path:
            called.setdefault(n.qualname, []).append(n.key)
    rows = []
    for q, m in model.named_modules():
        tname = type(m).__name__
        if any(m.children()):
            rows.append(CoverageRow(q or "(model)", tname, "container"))
        elif q not in called:
            rows.append(CoverageRow(q, tname, "not called"))
        else:
            k = kinds[called[q][0]]
            mapped = ", ".join(row_of[c] for c in called[q] if c in row_of)
            rows.append(CoverageRow(q, tname, k.status, mapped, k.note))
    for n in nodes:
        if n.op == "function" and n.key in path:
            k = kinds[n.key]
            status = "mapped" if k.status == "add" else k.status
            rows.append(
                CoverageRow(
                    f"{n.target}@{n.key}",
                    "function",
                    status,
                    row_of.get(n.key, ""),
                    k.note,
                )
            )
    return Coverage(rows, method)


def read(
    model: nn.Module, example_input: torch.Tensor, *, strict: bool = False
) -> tuple[Network, Coverage]:
    """The initdiag network a PyTorch model maps to, and its coverage table.

    The graph comes from ``torch.fx`` symbolic tracing with every childless
    module a leaf; when tracing fails (data-dependent control flow) from one real
    forward pass of ``example_input`` (the residual adds and functional
    activations it sees, by tensor identity); when that is not a chain of
    residual blocks, from the leaf modules in execution order (with a warning
    that the residual structure is unknown).  ``nn.Linear`` -> Dense,
    ``nn.Conv1d/2d`` -> Dense on channels (an approximation, labelled),
    BatchNorm1d/2d in training mode -> BatchNorm, in eval mode -> Affine (the
    per-channel map ``a x + b`` of its running statistics), LayerNorm,
    GroupNorm -> LayerNorm (exact for ``GroupNorm(1, C)`` on ``(B, C)``; G > 1 an
    infinite-width approximation, labelled), Dropout,
    activation modules and their functional forms -> activations,
    ``x + f(x)`` / ``out += identity`` -> Residual (branch: the longer path from
    the fork to the add; shortcut: the other, e.g. a downsample Linear + BN),
    flatten / pooling passed through.

    The network's InitScheme gives every row the law of the model's *current*
    parameters (:func:`audit`): a weight as a Normal of its law's mean and
    variance rescaled so that ``fan_in E[W^2]`` is the model's (a convolution's
    ``C_in k / groups``, a Linear after a flatten its real fan_in), a bias, gamma
    or beta as its recognised law (``U(+-1/sqrt(fan_in))``, ``ones``, ...) or a
    Normal of its measured moments.

    Parameters
    ----------
    model : torch.nn.Module
    example_input : torch.Tensor (B, features) or (B, channels, ...)
        B >= 2; the forward pass of the fallback uses it (no gradient).
    strict : bool
        Raise :class:`UnsupportedModuleError` listing every unsupported module
        instead of passing them through with a warning.

    Returns
    -------
    network : Network
    coverage : Coverage
        ``coverage.mapping`` (:class:`Mapping`) ties every network row to its
        node of the model's graph.

    Raises
    ------
    TypeError
        For a model that is not an ``nn.Module`` or an input that is not a tensor.
    UnsupportedModuleError
        With ``strict=True``, naming each unsupported module and its type.
    """
    model = _check_model(model)
    x = _as_input(example_input)
    nodes, method, (items, path), why = _graph(model, x)
    kinds = {n.key: M.classify(n) for n in nodes}
    keys = M.flatten_keys(items)
    layers = M.to_layers(items)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} maps to no initdiag layer; supported: Linear, "
            "Conv1d/2d, BatchNorm1d/2d, LayerNorm, GroupNorm, Dropout, activations"
        )
    net0 = Network(input_dim=int(x.shape[1]), layers=layers, name=type(model).__name__)
    row_of = dict(zip(keys, net0.names, strict=True))
    cov = _coverage(model, nodes, kinds, row_of, method, path)
    bad = cov.unsupported()
    if bad and strict:
        raise UnsupportedModuleError(
            "unsupported modules: "
            + "; ".join(f"{r.name} ({r.type}: {r.note})" for r in bad)
            + "; remove strict=True to pass them through"
        )
    if why:
        cov.warnings.append(why)
    if bad:
        cov.warnings.append(
            "passed through without a model of their effect: "
            + ", ".join(f"{r.name} ({r.type})" for r in bad)
        )
    for w in cov.warnings:
        warnings.warn(w, stacklevel=2)
    mods = dict(model.named_modules())
    cov.mapping = Mapping(nodes, keys, method, mods)
    network = net0.with_init(_actual_init(net0, nodes, keys))
    return network, cov


def _actual_init(net: Network, nodes: list[G.Node], keys: list[str]) -> InitScheme:
    """Per-row overrides with the laws of the model's current parameters."""
    by_key = {n.key: n for n in nodes}
    over: dict[str, dict[str, Any]] = {}
    for info, key in zip(net.infos, keys, strict=True):
        node = by_key[key]
        if node.op != "module" or not info.layer.slots():
            continue
        laws = module_laws(node.qualname, node.target)
        table = {}
        for slot in info.layer.slots():
            law = laws.get(slot.name)
            if law is None:
                continue
            if slot.matrix:
                table[slot.name] = _dense_equivalent(law, info.fan_in)
            else:
                table[slot.name] = law.law
        if table:
            over[info.name] = table
    return InitScheme(overrides=over)


def _dense_equivalent(law: TensorLaw, net_fan_in: int) -> Any:
    """The Normal weight law of a Dense of fan_in ``net_fan_in`` with the same
    ``fan_in E[W]`` and ``fan_in Var[W]`` as the model's tensor (exact for the
    Dense rule, which reads the weight through its mean and variance only)."""
    s = law.fan_in / net_fan_in
    mean = law.law.mean(law.fan_in, law.fan_out)
    return _Normal(mean * s, math.sqrt(law.implied_var * s))


def module_laws(qualname: str, m: nn.Module) -> dict[str, TensorLaw]:
    """:class:`TensorLaw` of each direct parameter of ``m`` (a bias gets its
    weight's fans, as torch's default initialisation does)."""
    fans = module_fans(m)
    # an eval-mode BatchNorm maps to an Affine whose tensors are derived ones
    tensors = M.eval_affine(m) or dict(m.named_parameters(recurse=False))
    return {
        pname: tensor_law(f"{qualname}.{pname}" if qualname else pname, p, fans)
        for pname, p in tensors.items()
    }


def audit(model: nn.Module) -> Audit:
    """Every parameter tensor of ``model`` against the law it apparently came
    from, and a verdict per layer; needs no input.

    For each tensor: the measured mean and (biased) variance, the fans in torch's
    ``_calculate_fan_in_and_fan_out`` convention (a bias takes its weight's), the
    torch default it matches (``nn.Linear``'s ``kaiming_uniform(a=sqrt(5))`` =
    ``U(+-1/sqrt(fan_in))`` of variance ``1/(3 fan_in)``, ``kaiming_normal`` fan_in
    / fan_out, xavier, ``trunc_normal(std=0.02)``, ``ones`` / ``zeros``; matched
    within 4 standard errors of the sample variance and by kurtosis, see
    :mod:`initdiag.integrations._torch_laws`) and the variance that law implies.
    A Linear / Conv weight's verdict gives ``sigma_w2 = fan_in E[W^2]``,
    ``sigma_b2`` and ``chi1 = sigma_w2 E[phi'(h)^2]`` at the fixed point for the
    activation that follows (Poole et al. 2016; :func:`initdiag.meanfield.chi1`)
    beside the edge of chaos; a normalisation's, its gamma and beta.

    Returns
    -------
    Audit
        ``audit.rows`` (one :class:`AuditRow` per tensor); ``str(audit)`` is the
        table and the verdicts.

    Raises
    ------
    TypeError
        For a model that is not an ``nn.Module``.
    """
    return _audit(_check_model(model))


# -- diagnose ---------------------------------------------------------------------
@dataclass
class Diagnosis:
    """What :func:`diagnose` returns: three Profiles of the mapped network side by
    side (rows ``network.names``).

    ``analytic``: ``analyze`` of the network with the model's parameter laws (None
    with ``notes["analytic"]`` saying why, e.g. a ReLU after a residual add, whose
    input is not Gaussian); ``measured``: the model itself in PyTorch, mean and
    standard error over seeds; ``kernels``: ``simulate`` of the network through
    initdiag's kernels, over fresh draws from the same laws (not the model's
    tensors: ``simulate`` samples its own), so it agrees with ``measured`` within
    their standard errors, not to float32 tolerance (None outside the MLP /
    residual-MLP subset, and for a 4-D input).
    """

    network: Network
    coverage: Coverage
    analytic: Any
    measured: Any
    kernels: Any
    notes: dict[str, str] = field(default_factory=dict)

    def table(
        self, columns: tuple[str, ...] = ("second_moment", "grad_second_moment")
    ) -> str:
        """One line per row: each column as analytic / measured +- se / kernels."""
        out = [f"diagnosis of {self.network.name} (analytic / measured / kernels)"]
        for i, name in enumerate(self.network.names):
            cells = [f"{name:<24}"]
            for c in columns:
                a = _cell(self.analytic, c, i)
                m = _cell(self.measured, c, i, se=True)
                k = _cell(self.kernels, c, i, se=True)
                cells.append(f"{c}: {a} / {m} / {k}")
            out.append("  ".join(cells))
        out += [f"note ({k}): {v}" for k, v in self.notes.items()]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _cell(p: Any, c: str, i: int, se: bool = False) -> str:
    if p is None:
        return "-"
    v = p.columns[c][i]
    if se and f"{c}_se" in p.columns:
        return f"{v:.4g}+-{p.columns[f'{c}_se'][i]:.2g}"
    return f"{v:.4g}"


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "modes": {m: m.training for m in model.modules()},
        "grads": {
            p: (None if p.grad is None else p.grad.clone()) for p in model.parameters()
        },
    }


def _restore(model: nn.Module, snap: dict[str, Any]) -> None:
    with torch.no_grad():
        model.load_state_dict(snap["state"])
    for m, mode in snap["modes"].items():
        m.training = mode
    for p, g in snap["grads"].items():
        p.grad = g


def _reinit(model: nn.Module, init_fn: Any) -> None:
    with torch.no_grad():
        if init_fn is not None:
            init_fn(model)
            return
        for m in model.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()


def _law_changes(model: nn.Module, before: dict[str, TensorLaw]) -> list[str]:
    """Tensors whose re-initialisation matches a different law than they had."""
    now = _all_laws(model)
    return [
        k
        for k, a in before.items()
        if (a.source, a.source and a.implied_var)
        != (now[k].source, now[k].source and now[k].implied_var)
    ]


def _all_laws(model: nn.Module) -> dict[str, TensorLaw]:
    out = {}
    for q, m in model.named_modules():
        out.update(module_laws(q, m))
    return out


def _measure(
    model, x_of, network, mapping, seeds, resample, init_fn, rng, notes, captures=None
):
    targets = _measure_targets(mapping)
    by_key = {n.key: n for n in mapping.nodes}
    mods = [
        by_key[k].target if by_key[k].op == "module" else None for k in mapping.row_keys
    ]
    before = _all_laws(model) if resample else {}
    stats = []
    for s in range(seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng + s)
            gen = torch.Generator().manual_seed(rng + s)
            if resample:
                _reinit(model, init_fn)
                if s == 0:
                    changed = _law_changes(model, before)
                    if changed:
                        notes["resample"] = (
                            "re-initialisation draws "
                            + ", ".join(changed[:6])
                            + " from another law than the model had: pass init_fn "
                            "(the model's own init function) or resample=False"
                        )
                        warnings.warn(notes["resample"], stacklevel=3)
            cap = {} if captures is not None else None
            stats.append(
                MS.measure_seed(model, x_of(gen), network, targets, mods, gen, cap)
            )
            if captures is not None:
                captures.append(cap)
    return _aggregate(network, np.stack(stats))


def _measure_targets(mapping: Mapping) -> list[tuple[Any, int]]:
    return MS.occurrences(mapping.nodes, mapping.row_keys)


def _is_mlp_subset(network: Network, cov: Coverage) -> bool:
    ok = {
        "dense",
        "batchnorm",
        "layernorm",
        "affine",
        "activation",
        "residual",
        "dropout",
    }
    return all(i.kind in ok for i in network.infos) and not any(
        "approximation" in r.note for r in cov.rows
    )


def diagnose(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    seeds: int = 8,
    resample: bool = True,
    batch_size: int | None = None,
    init_fn: Any = None,
    rng: int = 0,
    kernels: bool = True,
) -> Diagnosis:
    """Profile a PyTorch model at initialisation three ways, row by row of its
    mapped network (:func:`read`).

    - analytic: ``initdiag.analyze`` of the network whose InitScheme holds the
      model's actual parameter laws (:func:`read`), for the input batch's second
      moment and mean correlation, at its batch size when it is 2-D (large batch
      for a 4-D one); convolutions are a dense-on-channels approximation
      (flagged in ``coverage``);
    - measured: the model itself, ``seeds`` times, re-initialised each time by
      ``init_fn(model)`` or every module's ``reset_parameters()`` when
      ``resample`` (a warning when that draws a tensor from another law than the
      model had, as torchvision's constructors re-initialise after it), with
      forward hooks, the recorder's function hooks and tensor hooks on the outputs
      (:mod:`initdiag.integrations._torch_measure`);
    - kernels: ``initdiag.simulate`` of the network (MLP / residual-MLP subset),
      fresh draws from the same laws: equal to the measurement within standard
      errors.

    The model is left exactly as it was: parameters, buffers (BatchNorm running
    statistics), ``.grad``, training modes, hooks, and torch's global RNG.

    Parameters
    ----------
    model : torch.nn.Module
    example_input : torch.Tensor (B, ...)
        The batch fed every seed (B >= 2).
    seeds : int
        Initialisations measured (>= 2 for standard errors).
    resample : bool
        Re-initialise for every seed; False measures the current parameters
        (seeds then differ in the output gradient and dropout masks only).
    batch_size : int, optional
        Feed a fresh standard Gaussian batch of this size (the example's feature
        shape) every seed instead of ``example_input``.
    init_fn : callable, optional
        ``init_fn(model)`` re-initialises in place (the model's own init).
    rng : int
        Seeds torch's RNG per seed (``rng + s``), inside ``fork_rng``.
    kernels : bool
        Also run ``simulate`` where it applies.

    Returns
    -------
    Diagnosis
    """
    model = _check_model(model)
    x0 = _as_input(example_input)
    seeds = _check_count(seeds, "seeds", 2)
    if batch_size is not None:
        batch_size = _check_count(batch_size, "batch_size", 2)
    network, cov = read(model, x0)
    notes: dict[str, str] = {}

    def x_of(gen: torch.Generator) -> torch.Tensor:
        if batch_size is None:
            return x0
        return torch.randn((batch_size, *x0.shape[1:]), generator=gen, dtype=x0.dtype)

    subset = kernels and _is_mlp_subset(network, cov) and x0.dim() == 2
    captures: list[dict] | None = [] if subset else None
    snap = _snapshot(model)
    try:
        measured = _measure(
            model,
            x_of,
            network,
            cov.mapping,
            seeds,
            resample,
            init_fn,
            rng,
            notes,
            captures,
        )
    finally:
        _restore(model, snap)
    analytic = _analytic(network, x0, batch_size, notes)
    approx = [f"{r.name} ({r.row})" for r in cov.rows if "approximation" in r.note]
    if approx and analytic is not None:
        notes["approximation"] = (
            "the analytic rows of " + ", ".join(approx) + " are an approximation "
            "(see the coverage table's notes)"
        )
    kern = None
    if subset:
        kern = _kernel_column(network, x0, batch_size, seeds, rng, captures, notes)
    elif kernels:
        notes["kernels"] = "simulate covers the MLP / residual-MLP subset only"
    return Diagnosis(network, cov, analytic, measured, kern, notes)


def _kernel_column(network, x0, batch_size, seeds, rng, captures, notes):
    """``simulate`` of the mapped network.  Where it can run the model's very
    networks (every parameter mapped slot for slot, one input batch, no dropout
    mask to share) it gets each seed's tensors, input and output gradient, and
    equals the measurement to float32 rounding; otherwise fresh draws from the
    same laws, equal within standard errors."""
    # (an eval-mode BatchNorm's Affine row holds its running-statistics map, not
    # the module's weight and bias)
    exact = (
        batch_size is None
        and all(i.kind not in ("dropout", "affine") for i in network.infos)
        and all(
            set(c["params"].get(i.name, {})) == {s.name for s in i.layer.slots()}
            for c in captures
            for i in network.infos
        )
    )
    if exact:
        dt = "float32" if x0.dtype == torch.float32 else "float64"
        notes["kernels"] = (
            "initdiag's kernels on the model's own tensors, input and output "
            "gradient, seed by seed"
        )
        return simulate(
            network,
            inputs=captures[0]["x"],
            parameters=[c["params"] for c in captures],
            output_grad=[c["g_out"] for c in captures],
            seeds=seeds,
            dtype=dt,
        )
    notes["kernels"] = (
        "initdiag's kernels on fresh draws from the model's parameter laws (the "
        "model's own tensors cannot be run here: dropout masks, a fresh batch per "
        "seed, an eval-mode BatchNorm or a parameter without an initdiag slot): "
        "equal within standard errors"
    )
    given = {"inputs": x0.detach().double().numpy()}
    if batch_size is not None:
        given = {"batch_size": batch_size}
    return simulate(network, **given, seeds=seeds, rng=rng)


def _check_count(v: Any, what: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {v!r}")
    return v


def _input_moments(x0: torch.Tensor) -> dict[str, Any]:
    """The exchangeable description ``analyze`` takes of a batch: its second
    moment per feature and mean correlation between rows (rows: the examples of
    a 2-D batch, the positions of a 4-D one, as the dense-on-channels view), and
    for a 2-D batch its size (finite-batch statistics, BatchNorm included).  The
    full ``inputs=`` kernel would be exact for the batch but costs seconds per
    BatchNorm row (its finite-batch rule is a Monte Carlo over the kernel)."""
    st = MS.row_statistics(MS.rows_2d(x0))
    kw = {
        "input_second_moment": st["second_moment"],
        "input_correlation": min(max(st["correlation"], 0.0), 1.0),
    }
    if x0.dim() == 2:
        kw["batch_size"] = int(x0.shape[0])
    return kw


def _analytic(network, x0, batch_size, notes) -> Any:
    kw = _input_moments(x0)
    if batch_size is not None:
        kw.update(input_second_moment=1.0, input_correlation=0.0)
        kw["batch_size"] = batch_size
    try:
        return analyze(network, **kw)
    except NotImplementedError as exc:
        notes["analytic"] = f"no mean-field rule: {exc}"
        return None


# -- fix ----------------------------------------------------------------------------
@dataclass
class FixResult:
    """What :func:`fix` returns.

    ``rows``: one :class:`FixRow` per rescaled tensor; ``patch``: ``{state_dict
    key: new tensor}``; ``network`` / ``fixed``: the mapped network before and
    after (laws scaled); ``analytic``: ``analyze`` of both (None where the
    network has no mean-field rule); ``measured``: the model's measured Profile
    before and after (current parameters, ``resample=False``); ``chi1``: the
    analytic summary's chi1 and the measured per-block gradient gain, before and
    after; ``applied``: whether the model was changed (``dry_run=False``);
    ``route``: which route set the scales and why (every row also says its own,
    ``FixRow.route``); ``gains``: per unit rescaled by the data route (module
    name), its measured Jacobian gain ``chi1_before`` / ``chi1_after`` with
    ``chi1_se`` and ``q_pre`` (E[h^2] at its nonlinearity's input).
    """

    rows: list[FixRow]
    patch: dict[str, torch.Tensor]
    network: Network
    fixed: Network
    analytic: dict[str, Any]
    measured: dict[str, Any]
    chi1: dict[str, float]
    applied: bool
    route: str = "analytic"
    gains: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"route {self.route}",
            f"{'tensor':<28} {'row':<22} {'scale':>8} {'before':>9} "
            f"{'after':>9}  {'route':<8}  reason",
        ]
        for r in self.rows:
            lines.append(
                f"{r.tensor:<28} {r.row:<22} {r.scale:>8.4g} {r.before:>9.4g} "
                f"{r.after:>9.4g}  {r.route:<8}  {r.reason}"
            )
        lines.append(
            "chi1 analytic {analytic_before:.4g} -> {analytic_after:.4g}, measured "
            "{measured_before:.4g} -> {measured_after:.4g}".format(**self.chi1)
        )
        for name, g in self.gains.items():
            lines.append(
                f"data route, {name}: measured Jacobian gain {g['chi1_before']:.4g} "
                f"-> {g['chi1_after']:.4g} +- {g['chi1_se']:.2g}"
            )
        lines.append("applied" if self.applied else "dry run: the model is unchanged")
        return "\n".join(lines)


def measured_chi1(model: nn.Module, x: torch.Tensor, seeds: int = 2) -> float:
    """chi1 of the model's current parameters, measured on one forward pass.

    A residual network: the per-block gain of the residual stream's gradient
    second moment in the measured Profile (``seeds`` output gradients; the
    definition ``analyze``'s summary uses for residual networks).  Otherwise the
    definition itself, ``chi1 = sigma_w2 E[phi'(h)^2]`` (Poole et al. 2016,
    eq. 7), with ``sigma_w2 = fan_in mean(W^2)`` of the actual tensor and the
    mean of ``phi'(h)^2`` over the pre-activations ``h`` of the forward pass of
    ``x``: the geometric mean over the Dense layers followed by an activation,
    the first excepted (its input is the data, not a layer's output).
    """
    from ..analytic import _residual_summary
    from ..meanfield import _dphi

    network, cov = read(model, x)
    if any(i.branch for i in network.infos):
        d = diagnose(model, x, seeds=seeds, resample=False, kernels=False)
        return float(_residual_summary(d.measured, {})["chi1"])
    by_key = {n.key: n for n in cov.mapping.nodes}
    wanted = {}
    for r, (info, key) in enumerate(
        zip(network.infos, cov.mapping.row_keys, strict=True)
    ):
        nxt = network.infos[r + 1].layer if r + 1 < len(network.infos) else None
        if info.kind == "dense" and nxt is not None and nxt.kind == "activation":
            wanted[r] = (by_key[key].target, nxt)
    targets = MS.occurrences(cov.mapping.nodes, cov.mapping.row_keys)
    want = {targets[r]: r for r in wanted}
    logs: dict[int, float] = {}
    seen: dict = {}

    def on_output(node: G.Node, out: torch.Tensor) -> None:
        sig = node.signature()
        r = want.get((sig, seen.get(sig, 0)))
        seen[sig] = seen.get(sig, 0) + 1
        if r is None:
            return
        m, act = wanted[r]
        fi = nn.init._calculate_fan_in_and_fan_out(m.weight)[0]
        w2 = fi * float(m.weight.detach().double().pow(2).mean())
        d2 = float(np.mean(_dphi(act, MS.rows_2d(out)) ** 2))
        logs[r] = math.log(w2 * d2)

    with torch.no_grad():
        G.record_forward(model, x, on_output)
    vals = [logs[r] for r in sorted(logs)][1:]
    return math.exp(sum(vals) / len(vals)) if vals else math.nan


def _plan(
    model: nn.Module, x: torch.Tensor, target: str, residual: Any, method: str = "auto"
) -> tuple:
    """(network, fixed network, FixRows, patch, route, gains) for the model's
    current tensors; ``route`` says which route set the scales and why, ``gains``
    the data route's measured gain per unit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read's warnings were given by fix
        network, cov = read(model, x)
    by_key = {n.key: n for n in cov.mapping.nodes}
    rows = {
        info.name: (by_key[k].qualname, by_key[k].target)
        for info, k in zip(network.infos, cov.mapping.row_keys, strict=True)
        if by_key[k].op == "module" and info.layer.slots()
    }
    q_in = _input_moments(x)["input_second_moment"]
    why = _needs_data(network, cov) if method == "auto" else ""
    if method == "analytic" or (method == "auto" and not why):
        fixes, fixed = plan_fix(network, rows, target, residual, q_in)
        route = "analytic: every scale from the mapped network's mean-field rules"
        gains: dict = {}
    else:
        route = "data: " + (why or "method='data' asked for")
        # the residual rules that zero a branch are structural (no measurement)
        fixes, fixed = [], network
        if residual is not None:
            fixes, fixed = plan_fix(network, rows, "none", residual, q_in)
        work = copy.deepcopy(model)
        _apply(work, _patch(model, fixes))
        zeroed = {f.tensor.rpartition(".")[0] for f in fixes}
        n_blocks = sum(1 for i in network.infos if i.branch)
        rho = None if residual is not None or not n_blocks else 1.0 / n_blocks
        scales, reasons, gains = LS.plan_data(work, x, target, rho, 0)
        for k in [k for k in scales if k.rpartition(".")[0] in zeroed]:
            del scales[k]
        row_of = {r.name: r.row for r in cov.rows if r.row and "," not in r.row}
        extra, fixed = data_rows(fixed, model, row_of, scales, reasons)
        fixes = fixes + extra
    return network, fixed, fixes, _patch(model, fixes), route, gains


def _patch(model: nn.Module, fixes: list[FixRow]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {f.tensor: state[f.tensor].detach() * f.scale for f in fixes}


def _needs_data(network: Network, cov: Coverage) -> str:
    """Why the analytic route cannot set the scales ("" when it can)."""
    bad = cov.unsupported()
    if bad:
        return "unsupported modules the mean-field rules cannot map: " + ", ".join(
            f"{r.name} ({r.type})" for r in bad
        )
    if cov.method == "module order":
        return "the residual structure is unknown (graph read as module order)"
    try:
        analyze(network, input_second_moment=1.0)
    except NotImplementedError as exc:
        return f"no mean-field rule: {exc}"
    return ""


def _chi1_ensemble(model, x, target, residual, method, seeds, init_fn, rng, fixed):
    """Mean and standard error of :func:`measured_chi1` over ``seeds`` fresh
    networks (re-initialised as :func:`diagnose` does; with ``fixed``, each draw
    then fixed by the same rule)."""
    vals = []
    for s in range(seeds):
        m = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng + s)
            _reinit(m, init_fn)
        if fixed:
            _apply(m, _plan(m, x, target, residual, method)[3])
        vals.append(measured_chi1(m, x))
    v = np.array(vals)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def fix(
    model: nn.Module,
    example_input: torch.Tensor,
    target: str = "edge_of_chaos",
    *,
    residual: str | None = None,
    method: str = "auto",
    dry_run: bool = True,
    seeds: int = 8,
    init_fn: Any = None,
    rng: int = 0,
) -> FixResult:
    """Rescale a model's initialisation: analytically on its mapped network
    (:mod:`initdiag.integrations._torch_fix` has the formulas) or, for what the
    theory cannot map, by measurement in execution order
    (:mod:`initdiag.integrations._torch_lsuv`).

    Parameters
    ----------
    model : torch.nn.Module
    example_input : torch.Tensor
        The batch the measurements use; its per-feature second moment sets the
        first layer's scale.
    target : {"edge_of_chaos", "unit_variance"}
        ``edge_of_chaos``: every Dense followed by an activation at chi1 = 1
        (the edge point with q* = 1; ReLU: sigma_w2 = 2, bias zeroed);
        ``unit_variance``: unit second moment of every such pre-activation.
    residual : {None, "zero_gamma", "fixup"}
        Also make every residual block start as its shortcut.  With None, the
        data route sets every branch's last scale so that the block adds 1/L of
        its shortcut's second moment (L blocks: the stream grows at most e-fold).
    method : {"auto", "analytic", "data"}
        ``analytic``: the mapped network's mean-field rules
        (:mod:`initdiag.integrations._torch_fix`); ``data``: measured rescaling
        in execution order (:mod:`initdiag.integrations._torch_lsuv`: the
        Jacobian gain chi1 = 1 through each nonlinearity, or E[h^2] = 1 for
        ``unit_variance``; residual branches at a 1/L share), for modules the
        rules cannot map, a ReLU after a residual add, or a convolution whose
        analytic column is an approximation; ``auto`` (default): ``analytic``
        unless the model has unsupported modules, no mean-field rule or an
        unknown residual structure, then ``data``.
    dry_run : bool
        True (default): compute the scales, the patch and the before / after
        profiles on copies; the model is not touched.  False: apply the patch to
        the model's parameters in place.
    seeds : int
        Fresh networks over which chi1 is measured before and after (each drawn
        as :func:`diagnose` re-initialises, then fixed by the same rule).
    init_fn : callable, optional
        The model's own init function (else every ``reset_parameters()``).

    Returns
    -------
    FixResult
        ``chi1`` holds ``analytic_before`` / ``analytic_after`` (``analyze``'s
        summary) and ``measured_before`` / ``measured_after`` (mean over the
        seeds of :func:`measured_chi1`) with ``*_se``.

    Raises
    ------
    ValueError
        For an unknown ``target`` / ``residual``.
    """
    model = _check_model(model)
    x = _as_input(example_input)
    if target not in ("edge_of_chaos", "unit_variance"):
        raise ValueError(
            f"target must be 'edge_of_chaos' or 'unit_variance', got {target!r}"
        )
    if residual not in (None, "zero_gamma", "fixup"):
        raise ValueError(
            f"residual must be None, 'zero_gamma' or 'fixup', got {residual!r}"
        )
    check_bool(dry_run, "dry_run")
    seeds = _check_count(seeds, "seeds", 2)
    if method not in ("auto", "analytic", "data"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'data', got {method!r}")
    read(model, x)  # its warnings (unsupported modules), once
    with warnings.catch_warnings():
        # the same warnings again from every measurement below: silenced
        warnings.simplefilter("ignore")
        return _fix(model, x, target, residual, method, dry_run, seeds, init_fn, rng)


def _fix(model, x, target, residual, method, dry_run, seeds, init_fn, rng):
    """:func:`fix` after its checks: the plan, the before / after profiles."""
    network, fixed, fixes, patch, route, gains = _plan(
        model, x, target, residual, method
    )
    after_model = copy.deepcopy(model)
    _apply(after_model, patch)
    analytic, measured, chi = {}, {}, {}
    for when, net, m in (("before", network, model), ("after", fixed, after_model)):
        analytic[when] = a = _analytic(net, x, None, {})
        d = diagnose(m, x, seeds=2, resample=False, kernels=False, rng=rng)
        measured[when] = d.measured
        chi[f"analytic_{when}"] = math.nan if a is None else float(a.summary["chi1"])
        mean, se = _chi1_ensemble(
            model, x, target, residual, method, seeds, init_fn, rng, when == "after"
        )
        chi[f"measured_{when}"], chi[f"measured_{when}_se"] = mean, se
    if not dry_run:
        _apply(model, patch)
    return FixResult(
        fixes,
        patch,
        network,
        fixed,
        analytic,
        measured,
        chi,
        not dry_run,
        route,
        gains,
    )


def _apply(model: nn.Module, patch: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for k, v in patch.items():
            state[k].copy_(v)


# -- the command line -------------------------------------------------------------
def load_factory(spec: str) -> nn.Module:
    """The model built by ``MODULE:FACTORY`` (imported by module path, no eval;
    the factory is called without arguments).

    Raises
    ------
    ValueError
        For a spec without ``:``, a missing module or attribute, or a factory
        that does not return an ``nn.Module``.
    """
    import importlib

    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(
            f"expected MODULE:FACTORY (e.g. mypkg.models:resnet), got {spec!r}"
        )
    try:
        obj = importlib.import_module(mod)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{spec} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 64,
    seeds: int = 4,
    out: str | None = None,
) -> tuple[str, list[str]]:
    """``initdiag torch``: coverage, diagnosis, verdicts and audit of ``model`` for
    a standard Gaussian batch of ``(batch_size, *input_shape)``; with ``out``, the
    plots of ``initdiag report`` (analytic and measured profiles overlaid) and
    ``report.json``.  Returns (the text, the files written)."""
    import json
    import os

    from ..verdicts import diagnose as verdicts

    x = torch.randn(
        (batch_size, *input_shape), generator=torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = diagnose(model, x, seeds=seeds, kernels=False)
    parts = [str(d.coverage), "", d.table(), ""]
    parts += [f"warning: {w.message}" for w in caught]
    found = verdicts(d.analytic or d.measured, d.network)
    parts += (
        ["verdicts:"] + [f"- {v}" for v in found] + ["", "audit:", str(audit(model))]
    )
    files: list[str] = []
    if out:
        from ..report.plots import write_plots

        profiles = [p for p in (d.analytic, d.measured) if p is not None]
        files = write_plots(profiles, out, title=d.network.name)
        path = os.path.join(out, "report.json")
        with open(path, "w") as fh:
            json.dump(
                {
                    k: (p.to_dict() if p is not None else None)
                    for k, p in (("analytic", d.analytic), ("measured", d.measured))
                },
                fh,
                indent=1,
            )
        files.append(path)
    return "\n".join(parts), files

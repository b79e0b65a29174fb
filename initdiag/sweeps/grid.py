"""Grids of network variants: parsing, expansion, validation and point keys.

A grid maps parameter paths to lists of values; the points are the Cartesian product
of the axes, except that the axes of one ``zip`` group walk together (one point per
position)::

    {"sigma_w2": [1.0, 1.5, 2.0],
     "sigma_b2": [0.0, 0.05],
     "zip": {"depth": [10, 20], "width": [64, 128]}}      # 3 x 2 x 2 = 12 points

``zip`` may also be a list of such groups.  A numeric axis may be written
``"a:b:n"`` (n evenly spaced values from a to b, both included).

Every point is built from the base network's dict form (:meth:`Network.to_dict`:
``input_dim``, ``layers``, ``init``) by patching it and calling
:meth:`Network.from_dict`, so whatever layer kinds the base holds are swept without
this module knowing them.  Parameter paths (:data:`PATHS` has the list and
:func:`describe_paths` the text):

- ``init.weight``, ``init.bias``, ``init.bn_weight``, ``init.bn_bias``: an
  initializer string (``"normal(0, 0.1)"``), replacing that slot of the base's
  :class:`~initdiag.initializers.InitScheme` (per-layer overrides stay);
- ``init.<slot>.<param>``: one parameter of the base's initializer in that slot
  (``init.weight.std`` for ``normal(0, 1)``, ``init.weight.gain``...);
- ``sigma_w2``: weights with variance ``sigma_w2 / fan_in``
  (``variance_scaling(scale=sigma_w2, mode='fan_in', distribution='normal')``), and
  ``sigma_b2``: biases ``normal(0, sqrt(sigma_b2))``, the units of the mean-field phase
  diagram (Poole et al. 2016; Schoenholz et al. 2017);
- ``depth``, ``width``, ``activation``, ``batchnorm``, ``input_dim``: rebuild the
  network with :func:`initdiag.mlp` from the base's own mlp parameters; only for a
  base that is exactly what ``mlp`` builds (its layer list is compared with mlp's);
  ``width`` moves ``input_dim`` with it when the base's input_dim equals its width
  (mlp's default);
- ``batch_size``, ``input_correlation`` (both engines), ``input_second_moment``
  (``analyze``) and ``dtype`` (``simulate``): measurement settings.

A point's key is the SHA-256 of its values, the base network's dict, the settings
that change its numbers (seeds, batch size, dtype, backend, ...) and the initdiag
version; the point's random seed is the key's first 63 bits.  The numbers of a point
therefore depend only on what it is, not on the executor, the chunking or the order
in which points finish, and a database keyed by it resumes and deduplicates exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PATHS",
    "Point",
    "SweepPlan",
    "GridError",
    "base_from",
    "build_network",
    "describe_paths",
    "expand",
    "mlp_parameters",
    "point_key",
]

_SLOTS = ("weight", "bias", "bn_weight", "bn_bias")
#: paths that rebuild the network with mlp()
_STRUCTURE = ("depth", "width", "activation", "batchnorm", "input_dim")
#: measurement settings: which engine each goes to
_SETTINGS = {
    "batch_size": ("analyze", "simulate"),
    "input_correlation": ("analyze", "simulate"),
    "input_second_moment": ("analyze",),
    "dtype": ("simulate",),
}
PATHS = (
    *(f"init.{s}" for s in _SLOTS),
    *(f"init.{s}.<param>" for s in _SLOTS),
    "sigma_w2",
    "sigma_b2",
    *_STRUCTURE,
    *_SETTINGS,
)
#: the simulate() / analyze() settings a sweep passes through (a study's [simulate]
#: and [analyze] tables); ``rng`` only enters the point key
SIMULATE_KEYS = ("batch_size", "backend", "dtype", "input_correlation", "rng")
ANALYZE_KEYS = ("input_second_moment", "input_correlation", "batch_size")


class GridError(ValueError):
    """A grid that cannot run; the message names the key."""


def describe_paths() -> str:
    """One line listing every parameter path, for error messages."""
    return (
        "valid keys: init.weight, init.bias, init.bn_weight, init.bn_bias (an "
        "initializer string), init.<slot>.<param> (e.g. init.weight.std), sigma_w2, "
        "sigma_b2, depth, width, activation, batchnorm, input_dim, batch_size, "
        "input_correlation, input_second_moment, dtype, and zip (linked axes)"
    )


# -- the base --------------------------------------------------------------------------


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def mlp_parameters(base: Mapping[str, Any]) -> dict[str, Any] | None:
    """The :func:`initdiag.mlp` keywords that rebuild ``base`` (a network dict), or
    None when ``base`` is not exactly an mlp.

    The candidate keywords are read off the layer list (the first dense layer's width
    and bias, the first layer that is neither dense nor BatchNorm as the activation,
    BatchNorm present and where, a trailing readout) and accepted only if ``mlp``
    rebuilds the very same layer list, so a network with any other structure
    (residual blocks, mixed widths...) is reported as not an mlp.
    """
    from ..network import Network, mlp

    layers = list(base.get("layers") or [])
    if not layers or layers[0].get("type") != "dense":
        return None
    types = [str(d.get("type")) for d in layers]
    act_at = next(
        (i for i, t in enumerate(types) if t not in ("dense", "batchnorm")), None
    )
    if act_at is None:
        return None
    act = {k: v for k, v in layers[act_at].items()}
    act_spec: Any = act["type"] if len(act) == 1 else act
    bn_at = next((i for i, t in enumerate(types) if t == "batchnorm"), None)
    n_dense = types.count("dense")
    width = layers[0].get("width")
    cands = []
    for readout in (False, True):
        depth = n_dense - int(readout)
        if depth < 1:
            continue
        kw: dict[str, Any] = {
            "depth": depth,
            "width": width,
            "activation": act_spec,
            "batchnorm": bn_at is not None,
            "bias": bool(layers[0].get("bias", True)),
            "input_dim": base.get("input_dim"),
        }
        if bn_at is not None:
            kw["bn_position"] = (
                "before_activation" if bn_at < act_at else "after_activation"
            )
        if readout:
            kw["output_dim"] = layers[-1].get("width")
        cands.append(kw)
    for kw in cands:
        try:
            built = mlp(**kw).to_dict()["layers"]
        except (TypeError, ValueError):
            continue
        if _canonical(built) == _canonical(layers):
            if bn_at is not None:
                # the BatchNorm settings mlp() does not take must be mlp's defaults
                bn = Network.from_dict({"input_dim": 1, "layers": [layers[bn_at]]})
                ref = mlp(1, 1, batchnorm=True).to_dict()["layers"][1]
                if _canonical(bn.to_dict()["layers"][0]) != _canonical(ref):
                    return None
            return kw
    return None


def base_from(base: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(network, simulate_settings, analyze_settings)`` from a Network, a study file
    or a study dict (its first and only network)."""
    from ..configfile import ConfigError, load_study
    from ..network import Network

    if isinstance(base, Network):
        return base, {}, {}
    if (
        isinstance(base, (str, bytes))
        or hasattr(base, "__fspath__")
        or isinstance(base, Mapping)
    ):
        try:
            study = load_study(base)
        except ConfigError as exc:
            raise GridError(f"base: {exc}") from None
        if len(study.networks) != 1:
            names = ", ".join(n.name for n in study.networks)
            raise GridError(
                f"base: {study.source or 'the study'} has {len(study.networks)} "
                f"networks ({names}); a sweep needs one base network: give it a "
                "study without [[variants]], or one Network"
            )
        return study.networks[0], dict(study.simulate), dict(study.analyze)
    raise TypeError(
        f"base must be an initdiag.Network, a study file path or a study dict, got "
        f"{type(base).__name__}"
    )


# -- the axes --------------------------------------------------------------------------


def _linspace(text: str, key: str) -> list[float]:
    parts = text.split(":")
    try:
        a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3 or n < 1 or not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError
    except (ValueError, IndexError):
        raise GridError(
            f"grid key {key!r}: expected a list of values or 'a:b:n' (n evenly "
            f"spaced numbers from a to b), got {text!r}"
        ) from None
    if n == 1:
        return [a]
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def _number(v: Any, key: str, *, integer: bool = False, minimum: float | None = None):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        # numpy scalars and the like
        try:
            import numbers

            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError
            v = int(v) if integer and float(v) == int(v) else float(v)
        except (TypeError, ValueError):
            want = "an integer" if integer else "a number"
            raise GridError(f"grid key {key!r}: expected {want}, got {v!r}") from None
    if integer:
        if isinstance(v, float):
            if not v.is_integer():
                raise GridError(f"grid key {key!r}: expected an integer, got {v!r}")
            v = int(v)
    else:
        v = float(v)
        if not math.isfinite(v):
            raise GridError(f"grid key {key!r}: expected a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise GridError(f"grid key {key!r}: expected a value >= {minimum}, got {v!r}")
    return v


def _spec(v: Any, key: str, want: str) -> Any:
    """A name / call string, or a table (keys sorted, so the key is canonical)."""
    if isinstance(v, Mapping):
        return {str(k): v[k] for k in sorted(v)}
    if not isinstance(v, str):
        raise GridError(f"grid key {key!r}: expected {want}, got {v!r}")
    return v


def _canonical_value(key: str, v: Any) -> Any:
    """One JSON-stable form per value, so that 2 and 2.0 name the same point."""
    if key in ("depth", "width", "input_dim"):
        return _number(v, key, integer=True, minimum=1)
    if key == "batch_size":
        return _number(v, key, integer=True, minimum=2)
    if key in ("sigma_w2", "sigma_b2", "input_second_moment"):
        return _number(v, key, minimum=0.0)
    if key == "input_correlation":
        x = _number(v, key, minimum=0.0)
        if x > 1:
            raise GridError(f"grid key {key!r}: expected a number in [0, 1], got {v!r}")
        return x
    if key == "batchnorm":
        if not isinstance(v, bool):
            raise GridError(f"grid key {key!r}: expected true or false, got {v!r}")
        return v
    if key == "dtype":
        if v not in ("float32", "float64"):
            raise GridError(
                f"grid key {key!r}: expected 'float32' or 'float64', got {v!r}"
            )
        return v
    if key == "activation":
        return _spec(
            v,
            key,
            "a name such as 'tanh' or a table such as "
            "{type = 'leaky_relu', negative_slope = 0.2}",
        )
    if key.count(".") == 1:  # init.<slot>: an initializer spec
        return _spec(v, key, "an initializer string such as 'normal(0, 0.1)'")
    # init.<slot>.<param>: numbers stay numbers (int 1 and 1.0 alike), strings strings
    if isinstance(v, bool) or isinstance(v, str):
        return v
    return _number(v, key)


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise GridError(f"grid keys must be strings, got {key!r}; {describe_paths()}")
    if key in _STRUCTURE or key in _SETTINGS or key in ("sigma_w2", "sigma_b2"):
        return key
    parts = key.split(".")
    if parts[0] == "init" and len(parts) in (2, 3) and parts[1] in _SLOTS:
        if len(parts) == 3 and not parts[2].isidentifier():
            raise GridError(f"unknown grid key {key!r}; {describe_paths()}")
        return key
    raise GridError(f"unknown grid key {key!r}; {describe_paths()}")


def _axis(key: str, values: Any) -> list[Any]:
    if isinstance(values, str) and key not in ("activation", "dtype") and ":" in values:
        values = _linspace(values, key)
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise GridError(
            f"grid key {key!r}: expected a list of values, got {values!r} (write "
            f"[{values!r}] for one value)"
        )
    vals = [_canonical_value(key, v) for v in values]
    if not vals:
        raise GridError(f"grid key {key!r}: the list of values is empty")
    seen: set[str] = set()
    for v in vals:
        c = _canonical(v)
        if c in seen:
            raise GridError(f"grid key {key!r}: the value {v!r} is listed twice")
        seen.add(c)
    return vals


def _groups(grid: Mapping[str, Any]) -> list[dict[str, list[Any]]]:
    """The grid as groups of linked axes: one group per plain axis, one per zip."""
    if not isinstance(grid, Mapping):
        raise TypeError(
            f"grid must be a mapping of parameter paths to lists of values, got "
            f"{type(grid).__name__}"
        )
    if not grid:
        raise GridError(f"the grid is empty; {describe_paths()}")
    groups: list[dict[str, list[Any]]] = []
    used: set[str] = set()

    def take(key: Any) -> str:
        k = _check_key(key)
        if k in used:
            raise GridError(f"grid key {k!r} appears twice (as an axis and in a zip)")
        used.add(k)
        return k

    for key, values in grid.items():
        if key == "zip":
            zips = [values] if isinstance(values, Mapping) else values
            if isinstance(zips, (str, bytes)) or not isinstance(zips, Sequence):
                raise GridError(
                    "grid key 'zip': expected a table of linked axes (or a list of "
                    f"them), such as {{depth = [10, 20], width = [64, 128]}}, got "
                    f"{values!r}"
                )
            for i, z in enumerate(zips):
                if not isinstance(z, Mapping) or not z:
                    raise GridError(
                        f"grid key 'zip' (group {i + 1}): expected a non-empty table "
                        f"of linked axes, got {z!r}"
                    )
                g = {take(k): _axis(k, v) for k, v in z.items()}
                lengths = {k: len(v) for k, v in g.items()}
                if len(set(lengths.values())) > 1:
                    raise GridError(
                        f"grid key 'zip' (group {i + 1}): linked axes need lists of "
                        f"one length, got {lengths}"
                    )
                groups.append(g)
        else:
            k = take(key)
            groups.append({k: _axis(k, values)})
    return groups


def _conflicts(keys: Iterable[str]) -> None:
    keys = set(keys)
    for conv, slot in (("sigma_w2", "weight"), ("sigma_b2", "bias")):
        if conv in keys:
            clash = sorted(k for k in keys if k.startswith(f"init.{slot}"))
            clash = [k for k in clash if k.split(".")[1] == slot]
            if clash:
                raise GridError(
                    f"grid keys {conv!r} and {clash[0]!r} both set the {slot} "
                    f"initializer; keep one"
                )


def count_points(grid: Mapping[str, Any]) -> int:
    """Number of points of a grid (after validating its keys and values)."""
    return math.prod(len(next(iter(g.values()))) for g in _groups(grid))


# -- points ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One grid point: its values (path -> value, in grid order), key and seed."""

    params: dict[str, Any]
    key: str
    seed: int


@dataclass
class SweepPlan:
    """A validated grid against its base: what workers need to build every point.

    ``base`` is the base network's dict (``Network.to_dict()``), ``mlp`` the mlp
    keywords that rebuild it (None when it is not an mlp), ``simulate`` / ``analyze``
    the engine settings shared by every point, ``points`` the expanded grid.
    """

    base: dict[str, Any]
    mlp: dict[str, Any] | None
    simulate: dict[str, Any]
    analyze: dict[str, Any]
    seeds: int
    axes: list[str]
    points: list[Point] = field(default_factory=list)
    base_hash: str = ""

    def payload(self) -> dict[str, Any]:
        """What a worker needs besides the points (plain data: pickles anywhere)."""
        return {
            "base": self.base,
            "mlp": self.mlp,
            "simulate": self.simulate,
            "analyze": self.analyze,
            "seeds": self.seeds,
        }


def point_key(params: Mapping[str, Any], base_hash: str) -> tuple[str, int]:
    """``(key, seed)`` of a point: SHA-256 hex of the canonical JSON of its values and
    ``base_hash`` (base network, settings, version); seed = first 63 bits."""
    h = hashlib.sha256(
        _canonical({"point": dict(params), "base": base_hash}).encode()
    ).hexdigest()
    return h, int(h[:16], 16) >> 1


def _base_hash(
    base: Mapping[str, Any], settings: Mapping[str, Any], version: str
) -> str:
    # the network's name labels reports only; it does not change a number
    b = {k: v for k, v in base.items() if k != "name"}
    blob = {"base": b, "settings": dict(settings), "initdiag": version}
    return hashlib.sha256(_canonical(blob).encode()).hexdigest()


def _set_param(spec: Any, param: str, value: Any, key: str) -> str:
    """The initializer spec with one parameter changed (through parse / to_dict)."""
    from ..initializers import parse

    init = parse(spec)
    d = init.to_dict()
    name = d.pop("name")
    if param not in d:
        valid = ", ".join(sorted(d)) or "none"
        raise GridError(
            f"grid key {key!r}: the base initializer {str(init)!r} has no parameter "
            f"{param!r}; its parameters: {valid}"
        )
    d[param] = value
    return str(parse({"name": name, **d}))


def build_network(
    base: Mapping[str, Any], mlp_kw: Mapping[str, Any] | None, params: Mapping[str, Any]
):
    """The Network of one point: ``base`` (a network dict) with ``params`` applied.

    Raises
    ------
    GridError
        For a structural key when the base is not an mlp.
    TypeError, ValueError
        When the network rejects a value (from :meth:`Network.from_dict`).
    """
    from ..network import Network, mlp

    d = {k: v for k, v in base.items()}
    init = dict(d.get("init") or {})
    structural = {k: params[k] for k in _STRUCTURE if k in params}
    if structural:
        if mlp_kw is None:
            raise GridError(
                f"grid key {next(iter(structural))!r}: the base network is not an mlp "
                "(depth x [Dense -> (BatchNorm) -> activation] blocks as mlp() builds "
                "them), so depth, width, activation, batchnorm and input_dim are not "
                "available; init.*, sigma_w2, sigma_b2 and the measurement settings "
                "work on any network"
            )
        kw = dict(mlp_kw)
        if "width" in structural and "input_dim" not in structural:
            if kw.get("input_dim") == kw.get("width"):
                kw["input_dim"] = structural["width"]
        kw.update(structural)
        if kw.get("batchnorm") and "bn_position" not in kw:
            kw["bn_position"] = "before_activation"
        if not kw.get("batchnorm"):
            kw.pop("bn_position", None)
        net = mlp(**kw)
        d["input_dim"] = net.input_dim
        d["layers"] = net.to_dict()["layers"]
    if "sigma_w2" in params:
        init["weight"] = (
            f"variance_scaling(scale={float(params['sigma_w2'])!r}, mode='fan_in', "
            "distribution='normal')"
        )
    if "sigma_b2" in params:
        init["bias"] = f"normal(0.0, {math.sqrt(float(params['sigma_b2']))!r})"
    for k, v in params.items():
        parts = k.split(".")
        if parts[0] == "init" and len(parts) == 2:
            init[parts[1]] = v
    for k, v in params.items():
        parts = k.split(".")
        if parts[0] == "init" and len(parts) == 3:
            slot, param = parts[1], parts[2]
            init[slot] = _set_param(init.get(slot, _default_slot(slot)), param, v, k)
    d["init"] = init
    return Network.from_dict(d)


def _default_slot(slot: str) -> str:
    from ..initializers import InitScheme

    return InitScheme().to_dict()[slot]


def point_settings(
    plan_simulate: Mapping[str, Any],
    plan_analyze: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The simulate() and analyze() keywords of one point."""
    sim = {k: v for k, v in plan_simulate.items() if k != "rng"}
    ana = dict(plan_analyze)
    for k, engines in _SETTINGS.items():
        if k in params:
            if "simulate" in engines:
                sim[k] = params[k]
            if "analyze" in engines:
                ana[k] = params[k]
    return sim, ana


def _check_settings(sim: Mapping[str, Any], ana: Mapping[str, Any]) -> None:
    bad = set(sim) - set(SIMULATE_KEYS) - {"seeds", "jacobian"}
    if bad:
        raise GridError(
            f"simulate settings {sorted(bad)} are not supported in a sweep; valid: "
            f"{', '.join(SIMULATE_KEYS)}, seeds"
        )
    if sim.get("jacobian"):
        raise GridError(
            "simulate setting 'jacobian': a sweep does not record the Jacobian "
            "spectrum; drop it (or run `initdiag report` on the points of interest)"
        )
    bad = set(ana) - set(ANALYZE_KEYS)
    if bad:
        raise GridError(
            f"analyze settings {sorted(bad)} are not supported in a sweep; valid: "
            f"{', '.join(ANALYZE_KEYS)}"
        )


def expand(
    network: Any,
    grid: Mapping[str, Any],
    *,
    seeds: int,
    simulate: Mapping[str, Any] | None = None,
    analyze: Mapping[str, Any] | None = None,
    max_points: int | None = None,
    version: str | None = None,
) -> SweepPlan:
    """Validate ``grid`` against ``network`` and expand it into points.

    Every key and value is checked, and every distinct network of the grid is built,
    before anything runs, so a bad grid fails at once.

    Parameters
    ----------
    network : Network
        The base network.
    grid : mapping
        See the module docstring.
    seeds : int
        Random networks per point (>= 2).
    simulate, analyze : mapping, optional
        Settings shared by every point (a study's ``[simulate]`` / ``[analyze]``).
    max_points : int, optional
        Refuse larger grids.
    version : str, optional
        The initdiag version in the point keys (default: this one).

    Raises
    ------
    GridError
        Naming the offending key: an unknown path, an empty or duplicated list, a
        value the network rejects, a zip of unequal lengths, more than
        ``max_points`` points.
    """
    from .. import __version__

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise GridError(f"seeds must be an integer >= 2, got {seeds!r}")
    sim = dict(simulate or {})
    ana = dict(analyze or {})
    sim.pop("seeds", None)
    _check_settings(sim, ana)
    sim.pop("jacobian", None)
    groups = _groups(grid)
    axes = [k for g in groups for k in g]
    _conflicts(axes)
    n = math.prod(len(next(iter(g.values()))) for g in groups)
    if max_points is not None and n > max_points:
        sizes = " x ".join(
            str(len(next(iter(g.values())))) + f" ({', '.join(g)})" for g in groups
        )
        raise GridError(
            f"the grid has {n} points ({sizes}), more than the limit of {max_points}; "
            "raise the limit (max_points= in Python, --yes or --max-points on the "
            "command line) or thin an axis"
        )
    base = network.to_dict()
    mlp_kw = mlp_parameters(base)
    version = version or __version__
    settings = {"seeds": seeds, "simulate": sim, "analyze": ana}
    bh = _base_hash(base, settings, version)
    plan = SweepPlan(
        base=base, mlp=mlp_kw, simulate=sim, analyze=ana, seeds=seeds, axes=axes
    )
    plan.base_hash = bh
    _validate(plan, groups)
    for combo in itertools.product(*(_rows(g) for g in groups)):
        params: dict[str, Any] = {}
        for part in combo:
            params.update(part)
        key, seed = point_key(params, bh)
        plan.points.append(Point(params, key, seed))
    return plan


def _rows(group: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(group)
    return [
        dict(zip(keys, vals, strict=True)) for vals in zip(*group.values(), strict=True)
    ]


def _families(group: Mapping[str, Any]) -> set[str]:
    """What a group's keys touch that another group's can clash with: the structure
    (override selectors depend on it) or an init slot (a parameter needs the slot's
    initializer to have it).  sigma_w2 / sigma_b2 and the settings build on any
    network and clash with nothing."""
    fam: set[str] = set()
    for k in group:
        if k in _STRUCTURE:
            fam.add("structure")
        elif k.startswith("init."):
            fam.add(k.split(".")[1])
    return fam


def _validate(plan: SweepPlan, groups: list[dict[str, list[Any]]]) -> None:
    """Build every network that can fail; name the key of the first failure.

    Each value is first tried alone on the base (so the message names the value
    that is bad by itself); then every combination of the groups that can clash
    (structural keys with each other, an init slot with its parameters).
    """
    slots = {k for g in groups for k in g if k.count(".") == 1}
    for g in groups:
        # a parameter of a slot that is an axis itself is checked against each of
        # that axis's initializers below, not against the base's
        gn = {
            k: v
            for k, v in g.items()
            if k not in _SETTINGS and k.rpartition(".")[0] not in slots
        }
        if gn:
            for row in _rows(gn):
                _try_build(plan, row, blame=row)
    comps: list[tuple[set[str], list[dict[str, list[Any]]]]] = []
    for g in groups:
        fam = _families(g)
        if not fam:
            continue
        merged = [c for c in comps if c[0] & fam]
        for c in merged:
            comps.remove(c)
            fam |= c[0]
        comps.append((fam, [g for c in merged for g in c[1]] + [g]))
    for _, gs in comps:
        if len(gs) < 2:
            continue
        for combo in itertools.product(*(_rows(g) for g in gs)):
            params: dict[str, Any] = {}
            for part in combo:
                params.update(part)
            _try_build(plan, params, blame=params)


def _try_build(plan: SweepPlan, params: dict[str, Any], blame: dict[str, Any]) -> None:
    try:
        build_network(plan.base, plan.mlp, params)
    except GridError as exc:
        if len(blame) < 2:
            raise
        what = ", ".join(f"{k} = {v!r}" for k, v in blame.items())
        raise GridError(f"{exc} (at {what})") from None
    except (TypeError, ValueError) as exc:
        what = ", ".join(f"{k} = {v!r}" for k, v in blame.items())
        first = next(iter(blame))
        raise GridError(
            f"grid key {first!r}: the network rejects {what}: {exc}"
        ) from None


# -- grid files ------------------------------------------------------------------------

#: keys of a grid file's [sweep] table
SWEEP_FILE_KEYS = ("base", "seeds", "analytic", "empirical", "chunk", "max_points")


def load_grid_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep file: ``[grid]`` (the axes), ``[sweep]`` (settings) and the base.

    The base is either ``[sweep] base = "study.toml"`` (a path relative to the grid
    file) or the study tables of the grid file itself (``[network]``, ``[init]``,
    ``[simulate]``, ``[analyze]``, ``[study]``)::

        [sweep]
        seeds = 4

        [network]
        depth = 20
        width = 128
        activation = "tanh"

        [simulate]
        batch_size = 64

        [grid]
        sigma_w2 = "0.5:3.0:11"
        sigma_b2 = [0.0, 0.05, 0.1]
        zip = { depth = [10, 20], width = [64, 128] }

    Returns
    -------
    dict
        ``base`` (a path or a study dict, for :func:`base_from`), ``grid`` and the
        ``[sweep]`` settings (``seeds``, ``analytic``, ``empirical``, ``chunk``,
        ``max_points``) that are present.

    Raises
    ------
    GridError
        A missing or malformed file, a missing ``[grid]``, an unknown key.
    """
    import tomllib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GridError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            d = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{path}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise GridError(f"{path}: cannot read: {exc.strerror}") from None
    grid = d.pop("grid", None)
    if not isinstance(grid, Mapping) or not grid:
        raise GridError(
            f"{path}: needs a [grid] table of parameter paths and lists of values, "
            f"e.g. sigma_w2 = [1.0, 1.5, 2.0]; {describe_paths()}"
        )
    settings = d.pop("sweep", {}) or {}
    if not isinstance(settings, Mapping):
        raise GridError(f"{path}: [sweep] must be a table")
    bad = set(settings) - set(SWEEP_FILE_KEYS)
    if bad:
        raise GridError(
            f"{path}: [sweep] unknown keys {sorted(bad)}; valid: "
            f"{', '.join(SWEEP_FILE_KEYS)}"
        )
    settings = dict(settings)
    base_path = settings.pop("base", None)
    if base_path is not None:
        if d:
            raise GridError(
                f"{path}: [sweep] base = {base_path!r} and study tables "
                f"({', '.join(sorted(d))}) in one file; keep one"
            )
        if not isinstance(base_path, str):
            raise GridError(f"{path}: [sweep] base must be a path, got {base_path!r}")
        base: Any = os.path.join(os.path.dirname(os.path.abspath(path)), base_path)
        if not os.path.isfile(base):
            raise GridError(f"{path}: [sweep] base: no such file {base}")
    else:
        if "network" not in d:
            raise GridError(
                f'{path}: no base network: add [sweep] base = "study.toml" or a '
                "[network] table (e.g. depth = 20, width = 128)"
            )
        base = d
    return {"base": base, "grid": dict(grid), **settings}

"""Studies from TOML files or dicts: a network, its :class:`InitScheme`, and variants.

A study file::

    [study]
    name = "bias_question"
    description = "Why zero bias?"

    [network]                      # mlp() keywords, or input_dim + layers
    depth = 30
    width = 512
    activation = "relu"

    [init]                         # InitScheme slots; strings or tables
    weight = "kaiming_normal(nonlinearity='relu')"
    bias = "zeros"
    [init.overrides]
    "dense[-1]" = { weight = "zeros" }

    [simulate]                     # optional settings for the empirical engine
    batch_size = 256
    seeds = 8

    [train]                        # optional: training runs per variant
    steps = 200                    # (initdiag.report.training; without steps the
    seeds = 2                      # table only sets defaults for --train STEPS)

    [[variants]]                   # optional: each one patches [network] and [init]
    name = "N(0, 0.1^2) bias"
    init = { bias = { name = "normal", std = 0.1 } }

Initializer strings such as ``"kaiming_uniform(a=2.23606797749979, mode='fan_in')"``
are parsed without ``eval`` (:func:`initdiag.initializers.parse`).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .initializers import InitScheme, fixup
from .network import Network, layer_from_dict, mlp, resnet_mlp

__all__ = ["ConfigError", "Study", "load_config", "load_study", "save_config"]

_MLP_KEYS = {
    "depth",
    "width",
    "activation",
    "batchnorm",
    "bn_position",
    "input_dim",
    "output_dim",
    "bias",
    "norm",
}
#: resnet_mlp() keywords (a [network] table with ``blocks``); ``fixup = true``
#: applies the Fixup preset over the [init] table
_RESNET_KEYS = {
    "blocks",
    "width",
    "branch_depth",
    "norm",
    "norm_position",
    "activation",
    "zero_init_residual",
    "skipinit",
    "input_dim",
    "output_dim",
    "bias",
    "fixup",
}
_LAYER_KEYS = {"input_dim", "layers"}
_TOP_KEYS = {"study", "network", "init", "simulate", "analyze", "train", "variants"}
_SIM_KEYS = {
    "batch_size",
    "seeds",
    "backend",
    "dtype",
    "rng",
    "input_correlation",
    "jacobian",
}
_ANA_KEYS = {"input_second_moment", "input_correlation", "batch_size"}
_BACKENDS = ("auto", "numba", "numpy", "c", "cuda")


def _int_at_least(minimum: int):
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            return f"an integer >= {minimum}"
        return None

    return check


def _number_in(lo: float, hi: float | None):
    def check(v: Any) -> str | None:
        want = f"a number > {lo:g}" if hi is None else f"a number in [{lo:g}, {hi:g}]"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return want
        try:
            x = float(v)
        except OverflowError:
            return want
        if not math.isfinite(x) or x < lo or (hi is not None and x > hi):
            return want
        if hi is None and x <= lo:
            return want
        return None

    return check


def _one_of(*choices: Any):
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or v not in choices:
            return "one of " + ", ".join(repr(c) for c in choices)
        return None

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


#: what every settings key accepts (the engines' own checks, stated with the
#: file and key so a bad value is reported where it was written)
_VALUE_CHECKS = {
    "simulate": {
        "batch_size": _int_at_least(2),
        "seeds": _int_at_least(1),
        "backend": _one_of(*_BACKENDS),
        "dtype": _one_of("float32", "float64"),
        "rng": _int_at_least(0),
        "input_correlation": _number_in(0.0, 1.0),
        "jacobian": _boolean,
    },
    "analyze": {
        "input_second_moment": _number_in(0.0, None),
        "input_correlation": _number_in(0.0, 1.0),
        "batch_size": _int_at_least(2),
    },
}


def _numbers_above_zero(v: Any) -> str | None:
    want = "a list of numbers > 0"
    if not isinstance(v, list) or not v:
        return want
    return want if any(_number_in(0.0, None)(x) for x in v) else None


_VALUE_CHECKS["train"] = {
    "steps": _int_at_least(1),
    "seeds": _int_at_least(1),
    "optimizer": _one_of("sgd", "adam", "adamw"),
    "lr": _number_in(0.0, None),
    "lr_grid": _numbers_above_zero,
    "momentum": _number_in(0.0, 1.0),
    "batch_size": _int_at_least(2),
    "eval_every": _int_at_least(1),
    "data": _one_of("synthetic", "digits"),
    "width": _int_at_least(1),
    "search_steps": _int_at_least(1),
    "workers": _int_at_least(1),
}
_TRAIN_KEYS = set(_VALUE_CHECKS["train"])


class ConfigError(ValueError):
    """A study file or table is malformed; the message names the file and the key."""


@dataclass
class Study:
    """A named set of networks (one per variant) and the settings to run them with."""

    name: str
    networks: list[Network]
    description: str = ""
    simulate: dict[str, Any] = field(default_factory=dict)
    analyze: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    #: the ``[train]`` table (:mod:`initdiag.report.training`); runs need ``steps``
    train: dict[str, Any] = field(default_factory=dict)


def _where(source: str | None, key: str) -> str:
    return f"{source}: [{key}]" if source else f"[{key}]"


#: what a [network] table is built by: its presence decides the family
_FAMILY_KEYS = ("layers", "blocks", "depth")
#: keys an mlp and a resnet_mlp table share, carried into a variant of the other kind
_SHARED_KEYS = {"width", "activation", "input_dim", "output_dim", "bias", "norm"}


def _merge_network(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict:
    """A variant's [network]: the base patched; a variant of another kind (``blocks``
    on an mlp base, ``depth`` on a resnet base, explicit ``layers``) keeps only the
    keys both kinds share (width, activation, ...)."""
    fam = next((k for k in _FAMILY_KEYS if k in patch), None)
    if fam is not None and fam not in base:
        base = {k: v for k, v in base.items() if k in _SHARED_KEYS | {"name"}}
        if fam == "layers":
            base = {}
    return _merge(base, patch)


def _merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if (
            isinstance(v, Mapping)
            and isinstance(out.get(k), Mapping)
            and k != "overrides"
        ):
            out[k] = _merge(out[k], v)
        elif k == "overrides" and isinstance(v, Mapping):
            out[k] = {**dict(out.get(k, {})), **dict(v)}
        else:
            out[k] = v
    return out


def _build_network(
    net: Mapping[str, Any],
    init: Mapping[str, Any] | None,
    name: str,
    source: str | None,
    key: str,
) -> Network:
    if not isinstance(net, Mapping):
        raise ConfigError(f"{_where(source, key)} must be a table, got {net!r}")
    try:
        scheme = InitScheme.from_spec(dict(init) if init else None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{_where(source, key.replace('network', 'init'))} {exc}"
        ) from None
    keys = set(net)
    try:
        if "layers" in keys:
            unknown = keys - _LAYER_KEYS - {"name"}
            if unknown:
                raise ConfigError(
                    f"{_where(source, key)} unknown keys {sorted(unknown)} next to "
                    f"'layers'; valid: input_dim, layers"
                )
            if "input_dim" not in net:
                raise ConfigError(f"{_where(source, key)} 'layers' needs 'input_dim'")
            layers = net["layers"]
            if not isinstance(layers, Sequence) or isinstance(layers, str):
                raise ConfigError(
                    f"{_where(source, key + '.layers')} must be an array of tables "
                    "such "
                    f'as {{type = "dense", width = 512}}'
                )
            built = []
            for i, t in enumerate(layers):
                if not isinstance(t, Mapping):
                    raise ConfigError(
                        f"{_where(source, f'{key}.layers[{i}]')} must be a table, "
                        f"got {t!r}"
                    )
                try:
                    built.append(layer_from_dict(t))
                except (TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"{_where(source, f'{key}.layers[{i}]')} {exc}"
                    ) from None
            return Network(net["input_dim"], tuple(built), init=scheme, name=name)
        if "blocks" in keys:
            return _build_resnet(net, scheme, name, source, key)
        unknown = keys - _MLP_KEYS - {"name"}
        if unknown:
            raise ConfigError(
                f"{_where(source, key)} unknown keys {sorted(unknown)}; valid keys: "
                f"{', '.join(sorted(_MLP_KEYS))} (or input_dim + layers)"
            )
        for req in ("depth", "width"):
            if req not in net:
                raise ConfigError(f"{_where(source, key)} missing '{req}'")
        kw = {k: v for k, v in net.items() if k in _MLP_KEYS}
        return mlp(init=scheme, name=name, **kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_where(source, key)} {exc}") from None


def _build_resnet(
    net: Mapping[str, Any], scheme: InitScheme, name: str, source: Any, key: str
) -> Network:
    unknown = set(net) - _RESNET_KEYS - {"name"}
    if unknown:
        raise ConfigError(
            f"{_where(source, key)} unknown keys {sorted(unknown)} next to 'blocks'; "
            f"valid keys: {', '.join(sorted(_RESNET_KEYS))}"
        )
    if "width" not in net:
        raise ConfigError(f"{_where(source, key)} missing 'width'")
    kw = {k: v for k, v in net.items() if k in _RESNET_KEYS and k != "fixup"}
    use_fixup = net.get("fixup", False)
    if not isinstance(use_fixup, bool):
        raise ConfigError(f"{_where(source, key)} fixup must be true or false")
    if use_fixup:
        scheme = fixup(kw["blocks"], kw.get("branch_depth", 2), base=scheme)
    return resnet_mlp(init=scheme, name=name, **kw)


def _check_settings(d: Any, allowed: set[str], source: str | None, key: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{_where(source, key)} must be a table, got {d!r}")
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(
            f"{_where(source, key)} unknown keys {sorted(unknown)}; valid keys: "
            f"{', '.join(sorted(allowed))}"
        )
    for k, v in d.items():
        want = _VALUE_CHECKS[key][k](v)
        if want is not None:
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise ConfigError(f"{_where(source, key)} {k} must be {want}, got {shown}")
    return dict(d)


def _study_from_dict(d: Mapping[str, Any], source: str | None) -> Study:
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"{source or 'config'}: expected a table, got {type(d).__name__}"
        )
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{source or 'config'}: unknown top-level keys {sorted(unknown)}; valid: "
            f"{', '.join(sorted(_TOP_KEYS))}"
        )
    meta = d.get("study", {}) or {}
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{_where(source, 'study')} must be a table")
    default_name = os.path.splitext(os.path.basename(source))[0] if source else "study"
    name = str(meta.get("name", default_name))
    if "network" not in d:
        raise ConfigError(
            f"{source or 'config'}: missing [network] table "
            "(e.g. depth = 30, width = 512)"
        )
    base_net = d["network"]
    base_init = d.get("init", {}) or {}
    if not isinstance(base_init, Mapping):
        raise ConfigError(f"{_where(source, 'init')} must be a table")
    variants = d.get("variants")
    networks: list[Network] = []
    if variants is None:
        networks.append(_build_network(base_net, base_init, name, source, "network"))
    else:
        if (
            not isinstance(variants, Sequence)
            or isinstance(variants, str)
            or not variants
        ):
            raise ConfigError(
                f"{_where(source, 'variants')} must be a non-empty array of tables "
                f"([[variants]])"
            )
        seen = set()
        for i, v in enumerate(variants):
            key = f"variants[{i}]"
            if not isinstance(v, Mapping):
                raise ConfigError(f"{_where(source, key)} must be a table")
            bad = set(v) - {"name", "network", "init"}
            if bad:
                raise ConfigError(
                    f"{_where(source, key)} unknown keys {sorted(bad)}; valid: name, "
                    f"network, init"
                )
            vname = str(v.get("name", f"variant {i + 1}"))
            if vname in seen:
                raise ConfigError(
                    f"{_where(source, key)} duplicate variant name {vname!r}"
                )
            seen.add(vname)
            net = _merge_network(base_net, v.get("network", {}) or {})
            init = _merge(base_init, v.get("init", {}) or {})
            networks.append(_build_network(net, init, vname, source, f"{key}.network"))
    return Study(
        name=name,
        networks=networks,
        description=str(meta.get("description", "")),
        simulate=_check_settings(d.get("simulate"), _SIM_KEYS, source, "simulate"),
        analyze=_check_settings(d.get("analyze"), _ANA_KEYS, source, "analyze"),
        source=source,
        train=_check_settings(d.get("train"), _TRAIN_KEYS, source, "train"),
    )


def _read(path_or_dict: Any) -> tuple[Mapping[str, Any], str | None]:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict, None
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError(
            f"load_config takes a path or a dict, got {type(path_or_dict).__name__}"
        )
    path = os.fspath(path_or_dict)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, not a TOML file")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh), path
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a TOML text file (byte {exc.start} is not UTF-8)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_study(path_or_dict: Any) -> Study:
    """Load a :class:`Study` (all variants and the settings) from TOML or a dict.

    Raises
    ------
    ConfigError
        A missing file, malformed TOML or a bad key; the message names the file and
        the key.
    """
    d, source = _read(path_or_dict)
    return _study_from_dict(d, source)


def load_config(path_or_dict: Any) -> Network | list[Network]:
    """Load a network and its init scheme from a TOML file or a dict.

    Returns one :class:`Network`, or a list of them when the file has
    ``[[variants]]``.  See the module docstring for the format.
    """
    d, source = _read(path_or_dict)
    study = _study_from_dict(d, source)
    return study.networks if "variants" in d else study.networks[0]


# -- writing --------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, Mapping):
        return (
            "{ "
            + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
            + " }"
        )
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def _network_table(net: Network) -> dict[str, Any]:
    return {
        "input_dim": net.input_dim,
        "layers": [layer.to_dict() for layer in net.layers],
    }


def save_config(
    networks: Network | Sequence[Network],
    path: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    description: str = "",
    simulate: Mapping[str, Any] | None = None,
) -> str:
    """Write networks (one, or several as ``[[variants]]``) as TOML.

    The layers are written explicitly, so ``load_config(save_config(x))`` gives back
    equal networks.  Returns the text; writes it to ``path`` when given.
    """
    nets = [networks] if isinstance(networks, Network) else list(networks)
    if not nets or not all(isinstance(n, Network) for n in nets):
        raise TypeError("save_config takes a Network or a list of Networks")
    lines = ["[study]", f"name = {_toml_value(name or nets[0].name)}"]
    if description:
        lines.append(f"description = {_toml_value(description)}")
    if simulate:
        lines += ["", "[simulate]"] + [
            f"{k} = {_toml_value(v)}" for k, v in simulate.items()
        ]

    def emit(prefix: str, net: Network, with_init: bool = True) -> list[str]:
        t = _network_table(net)
        out = ["", f"[{prefix}network]", f"input_dim = {t['input_dim']}", "layers = ["]
        out += [f"  {_toml_value(layer)}," for layer in t["layers"]]
        out += ["]"]
        if not with_init:
            return out
        out += ["", f"[{prefix}init]"]
        init = net.init.to_dict()
        overrides = init.pop("overrides", None)
        out += [f"{k} = {_toml_value(v)}" for k, v in init.items()]
        if overrides:
            out += ["", f"[{prefix}init.overrides]"]
            out += [
                f"{_toml_value(sel)} = {_toml_value(tab)}"
                for sel, tab in overrides.items()
            ]
        return out

    if len(nets) == 1:
        lines += emit("", nets[0])
    else:
        # the base [network] is the first one's; its init is left out so that no
        # override leaks into a variant; every variant restates network and init
        lines += emit("", nets[0], with_init=False)
        for net in nets:
            lines += ["", "[[variants]]", f"name = {_toml_value(net.name)}"]
            lines += [ln for ln in emit("variants.", net)[1:]]
    text = "\n".join(lines) + "\n"
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text

"""The ``initdiag`` command.

::

    initdiag report [CONFIG.toml] [options]     # no arguments: the default study
    initdiag compare A.toml [B.toml ...] [options]
    initdiag phase [CONFIG.toml] [--activation tanh] [--sigma-w2 a:b:n]
                   [--sigma-b2 a:b:n] [--depth L] [--quantity chi1|xi_c|corr]

``report`` without a CONFIG and without network options runs the default study (the
bias / BatchNorm question, ``examples/bias_question.toml``); with network options
(``--depth --width --activation --weight ...``) and no CONFIG it reports that one
network; with a CONFIG the options override every variant of the file.

Exit codes: 0 success, 2 bad input (one line on stderr naming the option or file),
130 interrupted (Ctrl-C: what was finished is written, marked ``"partial": true``),
1 internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]

PROG = "initdiag"
#: Monte Carlo settings when neither the study nor the command line gives them
DEFAULT_SIMULATE = {"batch_size": 256, "seeds": 4}
_NET_OPTS = ("depth", "width", "input_dim", "activation", "batchnorm")
_INIT_OPTS = ("weight", "bias", "bn_weight", "bn_bias")
_SIM_OPTS = (
    "batch_size",
    "seeds",
    "backend",
    "dtype",
    "rng",
    "input_correlation",
    "jacobian",
)


#: write errors that are the environment's, not ours: a closed or full output
_OUTPUT_ERRNOS = {errno.EBADF, errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT}


class BadInput(Exception):
    """Bad user input: reported in one line, exit code 2."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse quotes the user's text raw: a newline in it would break the
        # one-line error
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


# -- option types ---------------------------------------------------------------------


def _positive_int(minimum: int = 1):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if v < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {v}"
            )
        return v

    conv.__name__ = "integer"
    return conv


def _activation(text: str) -> str:
    from .network import activation

    try:
        return activation(text).name
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _initializer(text: str) -> str:
    from .initializers import parse

    try:
        parse(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1], got {text!r}"
        ) from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def _grid(positive: bool):
    """a:b:n with a > 0 (``positive``: the weight variance) or a >= 0 (the bias
    variance), as the mean-field engine requires."""
    low = "a > 0" if positive else "a >= 0"

    def conv(text: str) -> tuple[float, float, int]:
        parts = text.split(":")
        msg = (
            f"expected a:b:n (from a to b in n points, {low}, a < b, n >= 2), "
            f"got {text!r}"
        )
        if len(parts) != 3 or len(text) > 200:
            raise argparse.ArgumentTypeError(msg)
        try:
            a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(msg) from None
        if not (math.isfinite(a) and math.isfinite(b)) or a >= b or n < 2:
            raise argparse.ArgumentTypeError(msg)
        if a < 0 or (positive and a == 0):
            raise argparse.ArgumentTypeError(msg)
        if n > 2000:
            raise argparse.ArgumentTypeError(f"at most 2000 points per axis, got {n}")
        return a, b, n

    conv.__name__ = "grid"
    return conv


# -- parser ---------------------------------------------------------------------------


def _network_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (override every variant of CONFIG)")
    g.add_argument("--depth", type=_positive_int(), help="hidden blocks (default 30)")
    g.add_argument(
        "--width", type=_positive_int(), help="units per layer (default 512)"
    )
    g.add_argument(
        "--input-dim", type=_positive_int(), help="input features (default: the width)"
    )
    g.add_argument(
        "--activation",
        type=_activation,
        help="relu, leaky_relu, tanh, sigmoid, gelu, silu, selu, erf, identity",
    )
    g.add_argument(
        "--batchnorm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a BatchNorm in every block (Dense -> BN -> activation)",
    )
    g.add_argument(
        "--weight",
        type=_initializer,
        help="weight init, e.g. \"kaiming_normal(nonlinearity='relu')\"",
    )
    g.add_argument(
        "--bias", type=_initializer, help="bias init, e.g. zeros, 'normal(0, 0.1)'"
    )
    g.add_argument("--bn-weight", type=_initializer, help="BatchNorm gamma init (ones)")
    g.add_argument("--bn-bias", type=_initializer, help="BatchNorm beta init (zeros)")


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement (Monte Carlo)")
    g.add_argument(
        "--batch-size",
        type=_positive_int(2),
        help=f"inputs per batch (default {DEFAULT_SIMULATE['batch_size']})",
    )
    g.add_argument(
        "--seeds",
        type=_positive_int(2),
        help=f"random networks (default {DEFAULT_SIMULATE['seeds']})",
    )
    g.add_argument(
        "--backend",
        choices=("auto", "numba", "numpy", "c", "cuda"),
        help="kernel backend (default auto: numba, else numpy)",
    )
    g.add_argument("--dtype", choices=("float32", "float64"), help="default float32")
    g.add_argument(
        "--rng", type=_positive_int(0), help="seed of every random stream (default 0)"
    )
    g.add_argument(
        "--input-correlation",
        type=_unit_float,
        help="correlation of the default inputs (default 0)",
    )
    g.add_argument(
        "--jacobian",
        action="store_true",
        default=None,
        help="also estimate the input-output Jacobian spectrum",
    )
    g.add_argument(
        "--no-simulate",
        dest="simulate",
        action="store_false",
        help="theory only (no Monte Carlo)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write PNG plots and report.json here")
    o.add_argument(
        "--format",
        choices=("text", "json", "csv"),
        default="text",
        help="what to print on stdout (default text)",
    )
    o.add_argument(
        "--details",
        action="store_true",
        help="per-layer tables of every variant of a study",
    )
    o.add_argument(
        "--max-rows",
        type=_positive_int(3),
        default=21,
        help="longest per-layer table before the middle is elided",
    )
    o.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar and no messages on stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands report, compare, phase)."""
    parser = _Parser(
        prog=PROG,
        description="What an initialisation does to a deep network at step 0: "
        "mean-field theory and Monte Carlo side by side.",
    )
    from . import __version__

    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="{report,compare,phase,sweep,sweep-report,torch,monitor-report}",
    )
    r = sub.add_parser(
        "report",
        help="profile a network or a study (no arguments: the default study)",
        description="Analytic and empirical profiles side by side, verdicts and, for a "
        "study, a comparison table and its explanation.  Without CONFIG and without "
        "network options: the default study (why zero bias, why gamma=1 and beta=0).",
    )
    r.add_argument("config", nargs="?", metavar="CONFIG.toml")
    _network_options(r)
    _run_options(r)
    r.add_argument(
        "--train",
        type=_positive_int(1),
        metavar="STEPS",
        default=None,
        help="also train every variant for STEPS steps (initdiag.train; settings "
        "from the study's [train] table) and compare the curves; writes "
        "training.png with --out",
    )
    r.set_defaults(func=cmd_report)
    c = sub.add_parser(
        "compare",
        help="compare the networks of several TOML files",
        description="The same side-by-side for every network of the "
        "given files (all their variants), with overlaid plots.",
    )
    c.add_argument("configs", nargs="+", metavar="CONFIG.toml")
    _network_options(c)
    _run_options(c)
    c.set_defaults(func=cmd_compare)
    ph = sub.add_parser(
        "phase",
        help="order/chaos phase diagram",
        description="chi1 (or xi_c, or the layer-L correlation) on a "
        "(sigma_w2, sigma_b2) grid, the critical line and the networks "
        "of CONFIG marked.",
    )
    ph.add_argument("config", nargs="?", metavar="CONFIG.toml")
    ph.add_argument(
        "--activation", type=_activation, help="default: CONFIG's activation, else tanh"
    )
    ph.add_argument(
        "--sigma-w2",
        type=_grid(True),
        metavar="a:b:n",
        default=None,
        help="weight-variance axis (default 0.05:4:121)",
    )
    ph.add_argument(
        "--sigma-b2",
        type=_grid(False),
        metavar="a:b:n",
        default=None,
        help="bias-variance axis (default 0:0.5:101)",
    )
    ph.add_argument(
        "--depth",
        type=_positive_int(),
        default=None,
        help="layer of the 'corr' quantity (default CONFIG's depth, else 30)",
    )
    ph.add_argument("--quantity", choices=("chi1", "xi_c", "corr"), default="chi1")
    ph.add_argument("--out", metavar="DIR", help="write phase.png and phase.json here")
    ph.add_argument("--format", choices=("text", "json"), default="text")
    ph.add_argument("-q", "--quiet", action="store_true")
    ph.set_defaults(func=cmd_phase)
    t = sub.add_parser(
        "torch",
        help="diagnose and audit a PyTorch model built by MODULE:FACTORY",
        description="The model read as an initdiag network (coverage table), its "
        "profile analytic / measured side by side, verdicts and the audit of its "
        "parameters, for a standard Gaussian batch (needs the torch extra).",
    )
    t.add_argument("factory", metavar="MODULE:FACTORY")
    t.add_argument("--input-shape", required=True, metavar="N[,N...]")
    t.add_argument("--batch-size", type=_positive_int(2), default=64)
    t.add_argument("--seeds", type=_positive_int(2), default=4)
    t.add_argument("--out", metavar="DIR", help="write the plots and report.json here")
    t.set_defaults(func=cmd_torch)
    mr = sub.add_parser(
        "monitor-report",
        help="plot a training-monitor file (CSV or JSON lines)",
        description="Per-layer statistics against the step, from the file a "
        "Monitor sink wrote; writes DIR/monitor.png.",
    )
    mr.add_argument("file", metavar="FILE")
    mr.add_argument("--out", metavar="DIR", help="default: the directory of FILE")
    mr.set_defaults(func=cmd_monitor_report)
    from .sweeps.cli import register as register_sweep_commands

    register_sweep_commands(sub)
    return parser


# -- building networks ----------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    net = {k: getattr(args, k) for k in _NET_OPTS if getattr(args, k, None) is not None}
    init = {
        k: getattr(args, k) for k in _INIT_OPTS if getattr(args, k, None) is not None
    }
    return net, init


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")


def _load_study(path: str, net_over: dict, init_over: dict):
    """Load a study file, then apply the command-line overrides to every variant."""
    from .configfile import ConfigError, load_study

    try:
        study = load_study(path)
    except (ConfigError, ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from None
    if not net_over and not init_over:
        return study
    with open(path, "rb") as fh:
        d = tomllib.load(fh)
    return _patched(d, net_over, init_over, path)


def _patched(d: dict, net_over: dict, init_over: dict, where: str):
    from .configfile import ConfigError, load_study

    opts = ", ".join(_opt(k) for k in (*net_over, *init_over))
    if net_over and "layers" in (d.get("network") or {}):
        raise BadInput(
            f"{opts}: {where} lists its layers explicitly; network options "
            f"only apply to [network] tables with depth and width"
        )
    d = dict(d)
    d["network"] = {**(d.get("network") or {}), **net_over}
    d["init"] = {**(d.get("init") or {}), **init_over}
    if isinstance(d.get("variants"), list):
        vs = []
        for v in d["variants"]:
            v = dict(v)
            if net_over:
                v["network"] = {**(v.get("network") or {}), **net_over}
            if init_over:
                v["init"] = {**(v.get("init") or {}), **init_over}
            vs.append(v)
        d["variants"] = vs
    try:
        study = load_study(d)
    except (ConfigError, ValueError, TypeError) as exc:
        raise BadInput(f"{where} with {opts}: {exc}") from None
    study.source = where
    return study


def _default_study(net_over: dict, init_over: dict):
    from .configfile import ConfigError, load_study
    from .report.default_study import default_study_dict

    d = default_study_dict()
    if net_over or init_over:
        return _patched(d, net_over, init_over, "the default study")
    try:
        study = load_study(d)
    except ConfigError as exc:  # pragma: no cover - shipped file
        raise RuntimeError(f"the default study is broken: {exc}") from exc
    study.source = "default study (examples/bias_question.toml)"
    return study


def _single_network(net_over: dict, init_over: dict):
    from .configfile import ConfigError, Study, load_study

    d = {
        "network": {"depth": 30, "width": 512, "activation": "relu", **net_over},
        "init": dict(init_over),
    }
    try:
        study = load_study(d)
    except (ConfigError, ValueError, TypeError) as exc:
        opts = ", ".join(_opt(k) for k in (*net_over, *init_over))
        raise BadInput(f"{opts}: {exc}") from None
    net = study.networks[0]
    t = d["network"]
    act = net.activations[0].name if net.activations else "linear"
    bn = "-bn" if t.get("batchnorm") else ""
    name = f"mlp{t['depth']}x{t['width']}-{act}{bn}"
    net = net.with_name(name)
    return Study(name=name, networks=[net], source="command line")


def _settings(
    args: argparse.Namespace, study_sim: dict, where: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The simulate keywords (defaults < the study's [simulate] < the options) and,
    for each, where it came from (an option, ``FILE: [simulate] key`` or the
    default), so that a complaint about a value names where it was written."""
    sim = dict(DEFAULT_SIMULATE)
    origin = {k: f"the default {k} {v}" for k, v in sim.items()}
    for k, v in (study_sim or {}).items():
        sim[k] = v
        origin[k] = f"{where}: [simulate] {k}" if where else f"[simulate] {k}"
    for k in _SIM_OPTS:
        v = getattr(args, k, None)
        if v is not None:
            sim[k] = v
            origin[k] = _opt(k)
    if sim.get("backend") == "auto":
        sim["backend"] = None
    if sim.get("backend") is None:
        _check_env_backend()
    return sim, origin


def _check_env_backend() -> None:
    env = os.environ.get("INITDIAG_BACKEND", "").strip()
    valid = ("auto", "numba", "numpy", "c", "cuda")
    if env and env.lower() not in valid:
        raise BadInput(
            f"INITDIAG_BACKEND={env[:40]!r} is not a backend; valid: "
            f"{', '.join(valid)} (or unset it)"
        )


def _check_sizes(networks, sims, origins) -> None:
    """Every Monte Carlo run within the limits, blamed on the setting at fault."""
    from . import _limits

    for net, sim, origin in zip(networks, sims, origins, strict=True):
        try:
            _limits.check_simulate(net, int(sim["batch_size"]), int(sim["seeds"]))
        except _limits.LimitError as exc:
            where = origin.get(exc.key) or f"network {net.name!r}"
            raise BadInput(f"{where}: {exc}") from None


# -- running --------------------------------------------------------------------------


def _run(
    args: argparse.Namespace,
    networks,
    name: str,
    description: str,
    sims: list[dict],
    origins: list[dict],
    anas: list[dict],
    train: dict | None = None,
    train_networks=None,
):
    """Run the study; returns ``(result, interrupted)``: on Ctrl-C the result holds
    what was finished (``result.partial``)."""
    from ._interrupt import Interrupted
    from .report.progress import Progress
    from .report.study import progress_steps, run_study

    empirical = bool(getattr(args, "simulate", True))
    if empirical:
        _check_sizes(networks, sims, origins)
    total = progress_steps(networks, sims, empirical)
    if train is not None:
        from .report.training import total_steps

        total += total_steps(len(networks), train)
    prog = Progress(total, enabled=False if args.quiet else None)
    try:
        result = run_study(
            networks,
            name=name,
            description=description,
            per_network_analyze=anas,
            per_network_simulate=sims,
            empirical=empirical,
            progress=prog.update,
            train=train,
            train_networks=train_networks,
        )
    except Interrupted as exc:
        prog.close()
        return exc.partial, True
    except Exception as exc:
        prog.close()
        _engine_error(exc)
        raise
    prog.close()
    return result, False


def _engine_error(exc: BaseException) -> None:
    """Turn the engines' complaints about the request into BadInput."""
    name = type(exc).__name__
    if name == "BackendUnavailableError":
        raise BadInput(f"--backend: {exc}") from None
    if isinstance(exc, MemoryError):
        raise BadInput(
            f"out of memory: {exc}; try a smaller --batch-size or --width"
        ) from None
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, KeyError):
        raise BadInput(str(exc)) from None


def _emit(
    args: argparse.Namespace, result, config: dict[str, Any], interrupted: bool = False
) -> int:
    """Write the result: ``report.json`` (whole or not at all), stdout (Ctrl-C held
    back until it is whole), then the plots (each whole or not at all; Ctrl-C stops
    there).  130 when the run was interrupted: the output is then marked partial
    and the plots are skipped."""
    from ._interrupt import deferred
    from .report.writers import study_to_dict

    out_files: list[str] = []
    d = study_to_dict(result)
    d["config"] = config
    if args.out:
        out_files.append(_write_json(args.out, d))
    with deferred():
        _print(args, result, d, interrupted)
    if args.out and not interrupted:
        out_files += _write_plots(args.out, result)
    if out_files:
        with deferred():
            where = sys.stdout if args.format == "text" else sys.stderr
            if where is sys.stdout or not args.quiet:
                where.write(("\n" if where is sys.stdout else "") + "wrote ")
                where.write(", ".join(out_files) + "\n")
                where.flush()
    if interrupted:
        n = len(result.entries)
        sys.stderr.write(
            f"{PROG}: interrupted: wrote what was finished ({n} network(s), marked "
            f"partial)\n"
        )
        return 130
    return 0


def _print(args: argparse.Namespace, result, d: dict[str, Any], interrupted: bool):
    from .report import text
    from .report.writers import study_to_csv

    if args.format == "json":
        import json

        sys.stdout.write(json.dumps(d, indent=1) + "\n")
    elif args.format == "csv":
        sys.stdout.write(study_to_csv(result))
    else:
        color = text.use_color(sys.stdout)
        if not result.entries:
            body = "no network was finished"
        elif len(result.entries) == 1:
            e = result.entries[0]
            body = text.render_entry(e, color=color, max_rows=args.max_rows)
            sentences = result.explanation()
            body += "\n\nWhat the numbers say\n" + "\n".join(
                text._wrap(s.text, indent="- ") for s in sentences
            )
        else:
            body = text.render_study(
                result, color=color, details=args.details, max_rows=args.max_rows
            )
        if interrupted:
            body = "INTERRUPTED: partial result (what was finished)\n\n" + body
        sys.stdout.write(body + "\n")
    sys.stdout.flush()


def _prepare_out(out_dir: str | None) -> None:
    """Create ``--out`` before any computation, so a bad path fails at once."""
    if not out_dir:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise BadInput(
            f"--out {out_dir}: cannot create the directory: {exc.strerror}"
        ) from None
    if not os.access(out_dir, os.W_OK):
        raise BadInput(f"--out {out_dir}: the directory is not writable")


def _write_json(out_dir: str, d: dict[str, Any]) -> str:
    import json

    from .report.writers import atomic_open

    _prepare_out(out_dir)
    path = os.path.join(out_dir, "report.json")
    with atomic_open(path) as fh:
        json.dump(d, fh, indent=1)
    return path


def _write_plots(out_dir: str, result) -> list[str]:
    from .report.plots import write_plots
    from .report.training import write_training_plot

    profiles = [
        p for e in result.entries for p in (e.analytic, e.empirical) if p is not None
    ]
    paths = write_plots(profiles, out_dir, title=result.name)
    tp = write_training_plot(result.entries, out_dir, title=result.name)
    return paths + ([tp] if tp else [])


def _config_record(
    args: argparse.Namespace, source: str | None, sim: dict, ana: dict
) -> dict[str, Any]:
    net_over, init_over = _overrides(args)
    text = None
    if source and os.path.isfile(source):
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    elif source and source.startswith("default study"):
        from .report.default_study import DEFAULT_STUDY_TOML

        text = DEFAULT_STUDY_TOML
    return {
        "source": source,
        "toml": text,
        "overrides": {**net_over, **init_over},
        "simulate": sim,
        "analyze": ana,
        "argv": list(getattr(args, "_argv", [])),
    }


def _study_of(args: argparse.Namespace, net_over: dict, init_over: dict):
    """The study ``report`` runs: CONFIG, else the network options, else the
    default study."""
    if args.config:
        return _load_study(args.config, net_over, init_over)
    if net_over or init_over:
        return _single_network(net_over, init_over)
    return _default_study(net_over, init_over)


def cmd_report(args: argparse.Namespace) -> int:
    _prepare_out(args.out)
    net_over, init_over = _overrides(args)
    study = _study_of(args, net_over, init_over)
    sim, origin = _settings(args, study.simulate, study.source)
    ana = dict(study.analyze)
    n = len(study.networks)
    train, train_nets = _train_plan(args, study, net_over, init_over)
    result, stopped = _run(
        args,
        study.networks,
        study.name,
        study.description,
        [sim] * n,
        [origin] * n,
        [ana] * n,
        train,
        train_nets,
    )
    return _emit(args, result, _config_record(args, study.source, sim, ana), stopped)


def _train_plan(args: argparse.Namespace, study, net_over: dict, init_over: dict):
    """(training settings or None, the networks to train): the study's ``[train]``
    table, ``--train STEPS``; a ``width`` there rebuilds every variant at it."""
    from .report.training import train_settings

    train = train_settings(study.train, getattr(args, "train", None))
    if train is None:
        return None, None
    width = train.get("width")
    if not width or "width" in net_over:
        train.pop("width", None)  # --width decides for both
        return train, None
    rebuilt = _study_of(args, {**net_over, "width": width}, init_over)
    pairs = zip(study.networks, rebuilt.networks, strict=True)
    return train, [b.with_name(a.name) for a, b in pairs]


def cmd_compare(args: argparse.Namespace) -> int:
    _prepare_out(args.out)
    net_over, init_over = _overrides(args)
    networks = []
    names: set[str] = set()
    # each file's [simulate] applies to its own networks (options to all of them)
    sims: list[dict[str, Any]] = []
    origins: list[dict[str, str]] = []
    per_file: dict[str, dict[str, Any]] = {}
    anas: list[dict[str, Any]] = []
    for path in args.configs:
        study = _load_study(path, net_over, init_over)
        sim, origin = _settings(args, study.simulate, path)
        per_file[path] = sim
        sims += [sim] * len(study.networks)
        origins += [origin] * len(study.networks)
        anas += [dict(study.analyze)] * len(study.networks)
        stem = os.path.splitext(os.path.basename(path))[0]
        for net in study.networks:
            name = net.name
            if name in names:
                name = f"{stem}: {net.name}"
            k = 2
            while name in names:
                name = f"{stem}: {net.name} ({k})"
                k += 1
            names.add(name)
            networks.append(net if name == net.name else net.with_name(name))
    result, stopped = _run(
        args, networks, "compare", " vs ".join(args.configs), sims, origins, anas
    )
    config = _config_record(args, ";".join(args.configs), per_file, anas[0])
    return _emit(args, result, config, stopped)


# -- phase diagram --------------------------------------------------------------------


def cmd_monitor_report(args: argparse.Namespace) -> int:
    """``initdiag monitor-report FILE [--out DIR]``: the plot of a monitor file."""
    from .monitor import plot_rows, read_rows

    try:
        rows = read_rows(args.file)
        fig = plot_rows(rows)
    except OSError as exc:
        raise BadInput(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{args.file}: {exc}") from None
    out_dir = args.out or os.path.dirname(os.path.abspath(args.file))
    _prepare_out(out_dir)
    path = os.path.join(out_dir, "monitor.png")
    fig.savefig(path, dpi=110)
    steps = {r["step"] for r in rows}
    layers = {r["layer"] for r in rows}
    sys.stdout.write(f"{len(layers)} layers, {len(steps)} steps: {path}\n")
    return 0


def _phase_values(act: str, w: Any, b: Any, quantity: str, depth: int):
    import warnings

    import numpy as np

    from . import meanfield

    W, B = np.meshgrid(w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if hasattr(meanfield, "phase_diagram"):
            pd = meanfield.phase_diagram(act, w, b, depth)
            get = pd.get if isinstance(pd, dict) else (lambda k: getattr(pd, k, None))
            key = {"chi1": "chi1", "xi_c": "xi_c", "corr": "correlation"}[quantity]
            v = get(key)
            if v is None and quantity == "corr":
                v = get("c_depth") if get("c_depth") is not None else get("corr")
            if v is not None:
                v = np.asarray(v, dtype=float)
                if v.shape == W.shape:
                    return v
                if v.T.shape == W.shape:
                    return v.T
        if quantity == "chi1":
            return np.asarray(meanfield.chi1(act, W, B), dtype=float)
        if quantity == "xi_c":
            return np.asarray(meanfield.depth_scales(act, W, B)[1], dtype=float)
    raise BadInput("--quantity corr needs initdiag.meanfield.phase_diagram")


def _critical_curve(act: str, b: Any) -> Any:
    import warnings

    import numpy as np

    from . import meanfield

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return np.asarray(meanfield.critical_sigma_w2(act, b), dtype=float)
        except (ValueError, NotImplementedError, ArithmeticError):
            return np.full(len(b), np.nan)


def cmd_phase(args: argparse.Namespace) -> int:
    import numpy as np

    from .verdicts import critical_point, network_parameters, network_regime

    marks: list[tuple[float, float, str]] = []
    mark_nets: list[Any] = []
    act = args.activation
    depth = args.depth
    if args.config:
        study = _load_study(args.config, {}, {})
        for net in study.networks:
            p = network_parameters(net)
            act = act or p["activation"]
            depth = depth or p["n_blocks"]
            if p["activation"] == act and math.isfinite(p["sigma_w2"]):
                marks.append((p["sigma_w2"], p["sigma_b2"], net.name))
                mark_nets.append(net)
    act = act or "tanh"
    depth = depth or 30
    wa, wb, wn = args.sigma_w2 or (0.05, 4.0, 121)
    ba, bb, bn = args.sigma_b2 or (0.0, 0.5, 101)
    from . import _limits

    try:
        _limits.check_phase(wn, bn, depth)
    except _limits.LimitError as exc:
        raise BadInput(f"--depth: {exc}" if args.depth else str(exc)) from None
    w = np.linspace(wa, wb, wn)
    b = np.linspace(ba, bb, bn)
    from .report.progress import Progress

    t0 = time.perf_counter()
    with Progress(2, enabled=False if args.quiet else None) as prog:
        prog.set_label(f"phase: {wn} x {bn} grid")
        try:
            values = _phase_values(act, w, b, args.quantity, depth)
        except NotImplementedError as exc:
            raise BadInput(f"--activation {act}: {exc}") from None
        prog.update("phase: critical line")
        crit = _critical_curve(act, b)
    elapsed = time.perf_counter() - t0
    rows = []
    for (mw, mb, name), net in zip(marks, mark_nets, strict=True):
        # the same chi1 and regime as `report` and the verdicts (analyze's summary)
        reg = network_regime(net)
        rows.append(
            {
                "name": name,
                "sigma_w2": mw,
                "sigma_b2": mb,
                "chi1": reg["chi1"],
                "regime": reg["regime"],
                "regime_reason": reg["reason"],
                "critical_sigma_w2": critical_point(act, mb),
            }
        )
    record = {
        "activation": act,
        "quantity": args.quantity,
        "depth": depth,
        "sigma_w2": w,
        "sigma_b2": b,
        "values": values,
        "critical_sigma_w2": crit,
        "networks": rows,
        "seconds": elapsed,
        "partial": False,
    }
    _phase_emit(args, record, w, b, values, crit, marks, act)
    return 0


def _phase_emit(args, record, w, b, values, crit, marks, act) -> None:
    """phase.json (whole or not at all), stdout (Ctrl-C held back until it is
    whole), then phase.png (whole or not at all)."""
    import json

    from ._interrupt import deferred
    from .profile import _jsonable
    from .report.writers import atomic_open

    files = []
    if args.out:
        _prepare_out(args.out)
        path = os.path.join(args.out, "phase.json")
        with atomic_open(path) as fh:
            json.dump(_jsonable(record), fh)
        files.append(path)
    with deferred():
        if args.format == "json":
            sys.stdout.write(json.dumps(_jsonable(record)) + "\n")
        else:
            sys.stdout.write(_phase_text(record, []) + "\n")
        sys.stdout.flush()
    if args.out:
        from .report.plots import phase_plot, save_figure

        fig = phase_plot(
            w,
            b,
            values,
            quantity=args.quantity,
            activation=act,
            critical=(crit, b),
            marks=marks,
        )
        files.append(save_figure(fig, os.path.join(args.out, "phase.png")))
    if files:
        with deferred():
            if args.format == "text":
                sys.stdout.write("wrote " + ", ".join(files) + "\n")
                sys.stdout.flush()
            elif not args.quiet:
                sys.stderr.write("wrote " + ", ".join(files) + "\n")


def _phase_text(record: dict[str, Any], files: Sequence[str]) -> str:
    import numpy as np

    from .report.study import fmt

    act, q = record["activation"], record["quantity"]
    w, b, v = record["sigma_w2"], record["sigma_b2"], record["values"]
    crit = record["critical_sigma_w2"]
    lines = [
        f"{act} phase diagram: {q} on sigma_w2 in [{fmt(w[0])}, {fmt(w[-1])}] "
        f"({len(w)} points) x sigma_b2 in [{fmt(b[0])}, {fmt(b[-1])}] "
        f"({len(b)} points), {record['seconds']:.2f} s"
    ]
    ok = np.isfinite(v)
    if q == "chi1" and ok.any():
        frac = float(np.mean(v[ok] > 1))
        lines.append(f"chaotic (chi1 > 1) on {fmt(100 * frac)}% of the grid")
    lines.append("edge of chaos (critical sigma_w2 for sigma_b2):")
    for k in np.unique(np.linspace(0, len(b) - 1, min(6, len(b))).round().astype(int)):
        c = crit[k]
        lines.append(
            f"  sigma_b2 = {fmt(b[k]):>8}: "
            + (f"sigma_w2 = {fmt(c)}" if math.isfinite(c) else "none")
        )
    for r in record["networks"]:
        cw = r["critical_sigma_w2"]
        lines.append(
            f"{r['name']}: sigma_w2 = {fmt(r['sigma_w2'])}, sigma_b2 = "
            f"{fmt(r['sigma_b2'])}, chi1 = {fmt(r['chi1'])} ({r['regime']}); "
            + (
                f"critical sigma_w2 at this sigma_b2: {fmt(cw)}"
                if cw is not None
                else f"{act} has no edge of chaos at this sigma_b2"
            )
        )
    if files:
        lines.append("wrote " + ", ".join(files))
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------


def cmd_torch(args: argparse.Namespace) -> int:
    """``initdiag torch MODULE:FACTORY --input-shape 3,32,32 [--out DIR]``."""
    try:
        from .integrations import torch as itorch
    except ImportError as exc:
        raise BadInput(str(exc)) from None
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise BadInput(
            f"--input-shape: expected positive integers such as 3,32,32, got "
            f"{args.input_shape!r}"
        )
    _prepare_out(args.out)
    try:
        model = itorch.load_factory(args.factory)
        text, files = itorch.report(
            model, shape, batch_size=args.batch_size, seeds=args.seeds, out=args.out
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise BadInput(f"{args.factory}: {exc}") from None
    print(text)
    for f in files:
        print(f"wrote {f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 internal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None or sys.stderr is None:
        # started with a closed descriptor (`initdiag report >&-`): nowhere to say
        # anything; stderr, when open, gets the one line
        if sys.stderr is not None:
            sys.stderr.write(
                f"{PROG}: error: standard output is closed; redirect it instead "
                f"(e.g. >/dev/null, with --out DIR for the files)\n"
            )
        return 2
    parser = build_parser()
    try:
        if (
            not argv
            or argv[0].startswith("-")
            and argv[0] not in ("-h", "--help", "--version")
        ):
            argv = ["report", *argv]
        args = parser.parse_args(argv)
        args._argv = argv
    except _UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    try:
        return int(args.func(args) or 0)
    except BadInput as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader went away (`initdiag report | head`): not an error; point
        # stdout at /dev/null so the interpreter's final flush does not complain
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            return _internal(exc)
        sys.stderr.write(f"{PROG}: error: cannot write the output: {exc}\n")
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        return _internal(exc)


def _internal(exc: BaseException) -> int:
    if os.environ.get("INITDIAG_DEBUG"):
        raise exc
    sys.stderr.write(
        f"{PROG}: internal error: {type(exc).__name__}: {exc} (this is a bug; set "
        f"INITDIAG_DEBUG=1 for the traceback)\n"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Run a study (several networks), summarise each variant, and explain the result.

The explanation is built sentence by sentence from the numbers of the profiles just
computed: :func:`summarize` turns a pair of profiles into a flat dict of numbers and
:func:`explain` turns a list of such dicts into :class:`Sentence` objects, each naming
the numbers it was built from (``keys``), so that a test can change any of them and
see the sentence change.  Nothing in the explanation is fixed text about a specific
result: a word such as "grows" or "earlier" is chosen by comparing numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..profile import CORRELATION_THRESHOLD, Profile
from ..verdicts import (
    DYING_ACTIVATIONS,
    Verdict,
    diagnose,
    growth_law,
    identity_blocks,
    identity_cause,
    network_parameters,
    signal_gradient_ratio,
    signal_rows,
)

__all__ = [
    "Entry",
    "StudyResult",
    "Sentence",
    "run_study",
    "progress_steps",
    "summarize",
    "explain",
    "signal_rows",
    "fmt",
]

#: relative deviation from a theory value that still counts as "close to" it
CLOSE_TOLERANCE = 0.05


@dataclass
class Entry:
    """One variant of a study: its network, both profiles and the verdicts."""

    network: Any
    analytic: Profile | None
    empirical: Profile | None
    verdicts: list[Verdict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    #: the variant's :class:`~initdiag.training.TrainResult` (``--train``)
    training: Any = None

    @property
    def name(self) -> str:
        return str(self.network.name)

    @property
    def primary(self) -> Profile | None:
        """The analytic profile when there is one (exact, no noise), else empirical."""
        return self.analytic if self.analytic is not None else self.empirical


@dataclass
class StudyResult:
    """Everything :func:`run_study` computed."""

    name: str
    description: str
    entries: list[Entry]
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    #: True when Ctrl-C stopped the run: ``entries`` hold what was finished (the
    #: last one's empirical profile over the seeds that finished, marked partial)
    partial: bool = False

    def summaries(self) -> list[dict[str, Any]]:
        return [summarize(e) for e in self.entries]

    def explanation(self) -> list[Sentence]:
        return explain(self.summaries(), self.settings)


# -- running --------------------------------------------------------------------------


def run_study(
    networks: Sequence[Any],
    *,
    name: str = "study",
    description: str = "",
    analyze_kw: Mapping[str, Any] | None = None,
    simulate_kw: Mapping[str, Any] | None = None,
    empirical: bool = True,
    analytic: bool = True,
    progress: Callable[[str], None] | None = None,
    per_network_simulate: Sequence[Mapping[str, Any]] | None = None,
    per_network_analyze: Sequence[Mapping[str, Any]] | None = None,
    train: Mapping[str, Any] | None = None,
    train_networks: Sequence[Any] | None = None,
) -> StudyResult:
    """Analyse (and simulate) every network.

    Parameters
    ----------
    networks : sequence of Network
    analyze_kw, simulate_kw : mapping
        Keywords for :func:`initdiag.analyze` / :func:`initdiag.simulate`.  The
        analytic batch size and input correlation default to the simulated ones, so
        dead fractions and correlations are predicted for the batch that is measured.
    empirical, analytic : bool
        Which engines to run.
    progress : callable, optional
        Called with a label once per step: after each analysis and after each
        simulated seed, so a network of ``seeds`` seeds takes ``1 + seeds`` steps
        (:func:`progress_steps`).
    per_network_simulate, per_network_analyze : sequence of mapping, optional
        Keywords of each network (one mapping per network), e.g. from the
        ``[simulate]`` / ``[analyze]`` tables of the file each network came from;
        ``simulate_kw`` / ``analyze_kw`` are then ignored.
    train : mapping, optional
        Training settings (:func:`initdiag.report.training.train_settings`): after
        the step-0 profiles every variant is trained
        (:func:`initdiag.report.training.run_training`), ``progress(label, steps)``
        advancing by optimizer steps; ``train_networks`` (one per network, e.g.
        rebuilt at the ``[train]`` width) are trained instead when given.

    Returns
    -------
    StudyResult

    Raises
    ------
    initdiag._interrupt.Interrupted
        On Ctrl-C, carrying the :class:`StudyResult` of what was finished
        (``partial=True``).

    Notes
    -----
    ``NotImplementedError`` from :func:`analyze` (a layer theory cannot treat) leaves
    that variant's analytic profile empty and records the message in
    ``entry.errors``; every other exception propagates.
    """
    from .._interrupt import Interrupted

    if analytic:
        from .. import analytic as _analytic
    if empirical:
        from .. import empirical as _empirical

    train = dict(train) if train is not None else None
    sims = _per_network(networks, simulate_kw, per_network_simulate)
    anas = _per_network(networks, analyze_kw, per_network_analyze)
    entries: list[Entry] = []
    timings = {"analyze": 0.0, "simulate": 0.0}

    def result(partial: bool) -> StudyResult:
        settings: dict[str, Any] = {
            "analyze": _analysis_kw(anas[0], sims[0]),
            "simulate": sims[0],
            "empirical": empirical,
            "analytic": analytic,
        }
        if train is not None:
            settings["train"] = dict(train)
        for key, per in (("simulate", sims), ("analyze", anas)):
            if any(s != per[0] for s in per):
                settings[f"{key}_per_variant"] = {
                    str(net.name): s for net, s in zip(networks, per, strict=True)
                }
        return StudyResult(name, description, entries, settings, timings, partial)

    try:
        for net, sim, ana in zip(networks, sims, anas, strict=True):
            errors: dict[str, str] = {}
            a = e = None
            if analytic:
                t0 = time.perf_counter()
                try:
                    a = _analytic.analyze(net, **_analysis_kw(ana, sim))
                except NotImplementedError as exc:
                    errors["analytic"] = str(exc)
                timings["analyze"] += time.perf_counter() - t0
                if progress:
                    progress(f"{net.name}: analyze")
            if empirical:
                t0 = time.perf_counter()

                def seed_done(k: int, n: int, label: str = str(net.name)) -> None:
                    if progress:
                        progress(f"{label}: seed {k}/{n}")

                try:
                    e = _empirical.simulate(net, **sim, progress=seed_done)
                except Interrupted as exc:
                    timings["simulate"] += time.perf_counter() - t0
                    part = exc.partial
                    if part is not None and not part.meta.get("seeds_finished"):
                        part = None  # no seed finished: nothing was measured
                    if a is not None or part is not None:
                        entries.append(_entry(net, a, part, errors))
                    raise Interrupted(result(True)) from None
                timings["simulate"] += time.perf_counter() - t0
            entries.append(_entry(net, a, e, errors))
        if train is not None:
            _train_entries(entries, train, train_networks or networks, progress)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(result(True)) from None
    return result(False)


def _train_entries(entries, train, networks, progress) -> None:
    """Train every variant and attach the results; the target loss is set from
    all of them (:func:`initdiag.report.training.training_target`).  Ctrl-C keeps
    the results that finished."""
    from .training import run_training

    try:
        results = run_training(networks, train, progress)
    except KeyboardInterrupt as exc:
        results = getattr(exc, "partial", [])
        _attach(entries, results)
        raise
    _attach(entries, results)
    done = [r for r in results if r is not None]
    if done:
        train["data_description"] = done[0].data["description"]


def _attach(entries, results) -> None:
    from .training import training_target

    target = training_target(results)
    # (an interrupted run may hand back fewer results than entries)
    for e, r in zip(entries, results, strict=False):
        if r is not None:
            r.target = target
            e.training = r


def _per_network(
    networks: Sequence[Any],
    common: Mapping[str, Any] | None,
    per_network: Sequence[Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    if per_network is None:
        return [dict(common or {}) for _ in networks]
    out = [dict(s) for s in per_network]
    if len(out) != len(networks):
        raise ValueError(
            f"per-network settings need one mapping per network: got {len(out)} "
            f"for {len(networks)} networks"
        )
    return out


def _analysis_kw(ana: Mapping[str, Any], sim: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(ana)
    for k in ("batch_size", "input_correlation"):
        if k in sim:
            out.setdefault(k, sim[k])
    return out


def _entry(net: Any, a: Profile | None, e: Profile | None, errors: dict) -> Entry:
    # verdicts follow the measurement when there is one: it sees overflow and
    # the finite batch; the analytic profile stands in otherwise
    prof = e if e is not None else a
    verdicts = diagnose(prof, net) if prof is not None else []
    return Entry(net, a, e, verdicts, errors)


def progress_steps(
    networks: Sequence[Any], sims: Sequence[Mapping[str, Any]], empirical: bool
) -> int:
    """Progress steps of :func:`run_study`: one per analysis and one per seed."""
    return sum(
        1 + (int(s.get("seeds", 8)) if empirical else 0)
        for _, s in zip(networks, sims, strict=True)
    )


# -- summarising ----------------------------------------------------------------------


def _family(net: Any) -> tuple:
    return tuple(
        (
            info.kind,
            getattr(info.layer, "name", "") if info.kind == "activation" else "",
            info.width,
        )
        for info in net.infos
    )


def _last(profile: Profile, column: str, rows: np.ndarray) -> tuple[float, float, str]:
    col = profile.columns[column]
    se = profile.se(column)
    for i in rows[::-1]:
        if np.isfinite(col[i]):
            return (
                float(col[i]),
                (float(se[i]) if se is not None else math.nan),
                profile.name[i],
            )
    return math.nan, math.nan, ""


def summarize(entry: Entry) -> dict[str, Any]:
    """The numbers the comparison table and the explanation are built from.

    Keys ending in ``_meas`` (and ``_se``) come from the empirical profile, the others
    from the analytic one (the empirical one when there is no analytic profile).
    """
    net = entry.network
    p = network_parameters(net)
    s: dict[str, Any] = {
        "name": entry.name,
        "family": _family(net),
        "activation": p["activation"],
        "sigma_w2": p["sigma_w2"],
        "sigma_b2": p["sigma_b2"],
        "bias_mean": p["bias_mean"],
        "bias_var": p["bias_var"],
        "batchnorm": p["batchnorm"],
        "gamma2": p["gamma2"],
        "gamma_mean": p["gamma_mean"],
        "gamma_var": p["gamma_var"],
        "beta_mean": p["beta_mean"],
        "beta2": p["beta2"],
        "beta_var": p["beta_var"],
        "dense_bias_before_bn": p["dense_bias_before_bn"],
        "n_blocks": p["n_blocks"],
        "n_batchnorm": p["n_batchnorm"],
        "width": p["width"],
        "verdicts": [v.kind for v in entry.verdicts],
        "analytic_error": entry.errors.get("analytic", ""),
        "residual": p["residual"],
        "n_residual": sum(1 for r in net.top if net.infos[r].branch),
        "norm": p["norm"] or "",
    }
    if p["batchnorm"]:
        s.update(_bn_gains(p))
    for prof, suffix in ((entry.primary, ""), (entry.empirical, "_meas")):
        if prof is None:
            continue
        sig = signal_rows(prof)
        q = prof.columns["second_moment"][sig] if sig.size else np.array([])
        act_rows = np.asarray(
            [i for i, k in enumerate(prof.kind) if k == "activation"]
            or list(range(len(prof)))
        )
        q_last, q_last_se, _ = _last(prof, "second_moment", sig)
        dead, dead_se, dead_layer = _last(prof, "dead_fraction", act_rows)
        corr, corr_se, _ = _last(prof, "correlation", sig)
        dense_rows = np.asarray([i for i, k in enumerate(prof.kind) if k == "dense"])
        cd, cd_se, _ = (
            _last(prof, "correlation", dense_rows)
            if dense_rows.size
            else (math.nan, math.nan, "")
        )
        g = prof.columns["dead_fraction"]
        if p["activation"] not in DYING_ACTIVATIONS:
            # a unit of a smooth or odd activation with negative output still passes
            # gradient: "dead" does not apply
            dead = dead_se = math.nan
            g = np.full(1, math.nan)
        s.update(
            {
                f"q_first{suffix}": float(q[0]) if q.size else math.nan,
                f"q_last{suffix}": q_last,
                f"q_last_se{suffix}": q_last_se,
                f"corr_depth{suffix}": prof.correlation_depth(),
                f"corr_last{suffix}": corr,
                f"corr_last_se{suffix}": corr_se,
                f"corr_dense_last{suffix}": cd,
                f"corr_dense_last_se{suffix}": cd_se,
                f"dead_last{suffix}": dead,
                f"dead_last_se{suffix}": dead_se,
                f"dead_layer{suffix}": dead_layer,
                f"dead_max{suffix}": float(np.nanmax(g))
                if np.any(np.isfinite(g))
                else math.nan,
                f"grad_ratio{suffix}": _grad_ratio(prof),
                f"overflow{suffix}": next(
                    (
                        f.get("layer")
                        for f in prof.findings
                        if f.get("kind") in ("overflow", "nonfinite", "nan")
                    ),
                    None,
                ),
            }
        )
        if not suffix and p["residual"]:
            ident = identity_blocks(prof, net)
            s["identity_blocks"] = len(ident)
            s["identity_zero_grads"] = sum(len(b["upstream_zero"]) for b in ident)
            s["identity_cause"] = ident[0]["cause"] if ident else ""
            s["identity_cause_text"] = identity_cause(net, ident)
        if not suffix:
            kind, rate = growth_law(q)
            s["q_shape"] = kind
            s["q_rate"] = rate
            s["chi1"] = _num(prof.summary.get("chi1"))
            s["chi1_source"] = str(prof.summary.get("chi1_source") or "")
            s["regime"] = prof.summary.get("regime") or ""
            s["xi_c"] = _num(prof.summary.get("xi_c"))
            s["source"] = prof.source
        # per BatchNorm layer, between BatchNorm outputs (the signal rows)
        gr = s[f"grad_ratio{suffix}"]
        nbn = p["n_batchnorm"]
        s[f"bn_rate{suffix}"] = (
            float(gr ** (1.0 / (nbn - 1))) if nbn > 1 and gr > 0 else math.nan
        )
    if entry.training is not None:
        from .training import train_summary

        s.update(train_summary(entry.training))
    return s


def _bn_gains(p: Mapping[str, Any]) -> dict[str, float]:
    """Large-batch BatchNorm gradient gains (initdiag.analytic.bn_gradient_gain)
    at this network's gamma and beta and at the probes the explanation quotes:
    gamma halved, beta = +-0.5; and the active fraction Phi(-0.5/gamma) at beta =
    -0.5 (the fraction of a unit's inputs above 0, for ReLU)."""
    from scipy import special

    from ..analytic import bn_gradient_gain

    act = p["activation"]
    g = p["gamma_mean"] if p["gamma_var"] == 0 else math.sqrt(p["gamma2"])
    b = p["beta_mean"]
    out = {"bn_probe_gamma": float(g)}
    try:
        out["bn_gain_large"] = bn_gradient_gain(act, g, b)
        out["bn_gain_gamma_half"] = bn_gradient_gain(act, 0.5 * g, b)
        out["bn_gain_beta_pos"] = bn_gradient_gain(act, g, 0.5)
        out["bn_gain_beta_neg"] = bn_gradient_gain(act, g, -0.5)
    except (NotImplementedError, ValueError):
        out = {k: math.nan for k in ("bn_gain_large", "bn_gain_gamma_half")}
        out.update(bn_gain_beta_pos=math.nan, bn_gain_beta_neg=math.nan)
    out["active_beta_neg"] = (
        float(special.ndtr(-0.5 / g)) if act == "relu" and g > 0 else math.nan
    )
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _grad_ratio(prof: Profile) -> float:
    return signal_gradient_ratio(prof)


# -- explaining -----------------------------------------------------------------------


@dataclass
class Sentence:
    """A sentence of the explanation and the numbers it was built from.

    ``keys`` lists ``(variant_position, summary_key)`` pairs (``variant_position``
    None for a study setting): changing any of them changes ``text``.
    """

    id: str
    text: str
    keys: list[tuple[int | None, str]]

    def __str__(self) -> str:
        return self.text


def fmt(x: Any) -> str:
    """A number in a sentence or table: 3 significant figures, fixed or scientific."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    a = abs(x)
    if a == 0:
        return "0"
    if a < 0.01 or a >= 1e4:
        return f"{x:.2e}"
    if a < 0.1:
        return f"{x:.3g}"
    if a < 1:
        return f"{x:.3f}"
    if a < 10:
        return f"{x:.2f}"
    if a < 100:
        return f"{x:.1f}"
    return f"{x:.0f}"


def fmt_corr(x: Any) -> str:
    """A correlation: three decimals (they matter near 1)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{float(x):.3f}"


def _factor(x: float) -> str:
    return "x" + fmt(x)


def _batch(settings: Mapping[str, Any]) -> int | None:
    """The batch size the study measured (else the analytic one)."""
    b = (settings.get("simulate") or {}).get("batch_size") or (
        settings.get("analyze") or {}
    ).get("batch_size")
    return int(b) if b else None


def _corr_clause(
    s: Mapping[str, Any], settings: Mapping[str, Any] | None = None
) -> tuple[str, list[str]]:
    """The clause on correlation.  A BatchNorm network's pre-activations are its
    BatchNorm outputs, centred over the batch, so their correlation is -1/(B-1)
    by construction; the clause quotes the uncentred cosine of the dense rows
    (before BatchNorm), the quantity a plain network's clause quotes."""
    if s.get("batchnorm"):
        own, own_keys = _bn_output_corr(s, settings or {})
        return (
            f"unrelated inputs are at correlation {fmt_corr(s.get('corr_dense_last'))} "
            f"at the last dense layer, before BatchNorm ({own})",
            ["corr_dense_last", *own_keys],
        )
    d = s.get("corr_depth")
    if d is None:
        return (
            f"unrelated inputs stay below correlation {CORRELATION_THRESHOLD} "
            f"({fmt_corr(s.get('corr_last'))} at block {s['n_blocks']})",
            ["corr_depth", "corr_last"],
        )
    return (
        f"unrelated inputs reach correlation {CORRELATION_THRESHOLD} at block {d}",
        ["corr_depth"],
    )


def _bn_output_corr(
    s: Mapping[str, Any], settings: Mapping[str, Any]
) -> tuple[str, list[str]]:
    """BatchNorm's own output correlation and what forces it: centring a batch of
    B gives gamma's part the cosine -1/(B-1) whatever the input; beta adds the
    shared E[beta^2], so the uncentred cosine is
    (E[gamma^2] (-1/(B-1)) + E[beta^2]) / (E[gamma^2] + E[beta^2])."""
    c = fmt_corr(s.get("corr_last"))
    B = _batch(settings)
    if not (B and B > 1):
        return f"BatchNorm's own output sits at {c}, set by its centring", ["corr_last"]
    f = -1.0 / (B - 1)
    g2, b2 = s.get("gamma2", 1.0), s.get("beta2", 0.0)
    if not b2:
        return (
            f"BatchNorm's own output sits at {c}, the -1/(B-1) = {fmt(f)} that "
            f"centring a batch of {B} forces",
            ["corr_last", "beta2"],
        )
    pred = (g2 * f + b2) / (g2 + b2)
    return (
        f"BatchNorm's own output sits at {c}: centring a batch of {B} forces "
        f"-1/(B-1) = {fmt(f)} on gamma's part and beta adds E[beta^2] = {fmt(b2)}, "
        f"(E[gamma^2] (-1/(B-1)) + E[beta^2])/(E[gamma^2] + E[beta^2]) = {fmt(pred)}",
        ["corr_last", "beta2", "gamma2"],
    )


def _forward_clause(s: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The clause on the second moment, and the summary keys it shows."""
    n = s["n_blocks"]
    q0, q1 = s.get("q_first", math.nan), s.get("q_last", math.nan)
    kind, rate = s.get("q_shape", "flat"), s.get("q_rate", 0.0)
    keys = ["q_last"]
    verb = "grows" if q1 > q0 else "shrinks"
    if kind == "flat":
        text = f"the pre-activation second moment stays at {fmt(q1)} over {n} blocks"
    elif kind == "linear":
        keys += ["q_first", "q_rate"]
        text = (
            f"the pre-activation second moment {verb} linearly from {fmt(q0)} to "
            f"{fmt(q1)} over {n} blocks ({'+' if rate > 0 else ''}{fmt(rate)} per "
            f"block"
        )
        sb2 = s.get("sigma_b2", 0.0)
        if (
            sb2 > 0
            and s.get("bias_mean", 0.0) == 0
            and not s.get("batchnorm")
            and s.get("activation") == "relu"
        ):
            keys.append("sigma_b2")
            near = abs(rate / sb2 - 1) <= CLOSE_TOLERANCE
            text += (
                f", {'the' if near else 'not the'} q_l = q_0 + l sigma_b2 growth "
                f"of a ReLU net at sigma_w2 = 2 with sigma_b2 = {fmt(sb2)}, which has "
                "no fixed point (so the regime column says ordered)"
            )
        text += ")"
    elif kind == "quadratic":
        keys += ["q_first", "q_rate"]
        text = (
            f"the pre-activation second moment {verb} quadratically from {fmt(q0)} "
            f"to {fmt(q1)} over {n} blocks (sqrt(q) changes linearly, "
            f"{'+' if rate > 0 else ''}{fmt(rate)} per block)"
        )
    else:
        keys += ["q_first", "q_rate"]
        text = (
            f"the pre-activation second moment {verb} exponentially from {fmt(q0)} "
            f"to {fmt(q1)} over {n} blocks ({_factor(rate)} per block)"
        )
    meas = s.get("q_last_meas")
    if meas is not None and not math.isnan(meas):
        keys.append("q_last_meas")
        text += f" (measured at the last block: {fmt(meas)}"
        se = s.get("q_last_se_meas", math.nan)
        text += f" +- {fmt(se)})" if se == se else ")"
    return text, keys


def _describe_init(s: Mapping[str, Any]) -> tuple[str, list[str]]:
    if s["batchnorm"]:
        if s.get("gamma_var", 0.0) == 0 and s.get("beta_var", 0.0) == 0:
            return (
                f"gamma = {fmt(s['gamma_mean'])}, beta = {fmt(s['beta_mean'])}",
                ["gamma_mean", "beta_mean", "gamma_var", "beta_var"],
            )
        return (
            f"E[gamma] = {fmt(s['gamma_mean'])}, Var[gamma] = "
            f"{fmt(s['gamma_var'])}, E[beta] = {fmt(s['beta_mean'])}, Var[beta] = "
            f"{fmt(s['beta_var'])}"
        ), ["gamma_mean", "gamma_var", "beta_mean", "beta_var"]
    m, v = s.get("bias_mean", 0.0), s.get("bias_var", 0.0)
    if m == 0:
        return f"zero-mean bias, sigma_b2 = {fmt(v)}", ["bias_mean", "bias_var"]
    if v == 0:
        # a constant: its value, not a variance
        return f"constant bias {fmt(m)}", ["bias_mean", "bias_var"]
    return f"bias mean {fmt(m)}, variance {fmt(v)}", ["bias_mean", "bias_var"]


def _like_corr(s: Mapping[str, Any]) -> float:
    """The correlation compared across variants: the dense rows' uncentred cosine
    (a BatchNorm output's centred one is forced by the centring)."""
    return s.get("corr_dense_last" if s.get("batchnorm") else "corr_last", math.nan)


def _compare_depth(
    s: Mapping[str, Any], ref: Mapping[str, Any]
) -> tuple[str, list[str]]:
    if s.get("batchnorm") or ref.get("batchnorm"):
        ks = "corr_dense_last" if ref.get("batchnorm") else "corr_last"
        return (
            f", against {fmt_corr(_like_corr(ref))} with {ref['name']} (dense rows)",
            [ks],
        )
    d, r = s.get("corr_depth"), ref.get("corr_depth")
    if d is None and r is None:
        return (
            f", against {fmt_corr(ref.get('corr_last'))} with {ref['name']}",
            ["corr_depth", "corr_last"],
        )
    if r is None:
        return f", while with {ref['name']} they never do", ["corr_depth"]
    return f", against block {r} with {ref['name']}", ["corr_depth"]


def _z(delta: float, se: float) -> str:
    """How far a change is from the measurement's noise, as a clause."""
    if not (se == se and se > 0 and delta == delta):
        return ""
    return f" ({fmt(abs(delta) / se)} standard errors of the measurement)"


def _pct(x: float) -> str:
    return f"{'+' if x > 0 else ''}{fmt(100 * x)}%"


def _flat(summaries: Sequence[Mapping[str, Any]]) -> list[int]:
    """The variants without residual blocks (the residual ones have their own
    sentences, :func:`_residual_answer`)."""
    return [i for i, s in enumerate(summaries) if not s.get("residual")]


def _stream_law(s: Mapping[str, Any]) -> tuple[str, list[str]]:
    """How the stream's second moment changes over the blocks, and the keys shown."""
    q0, q1 = s.get("q_first", math.nan), s.get("q_last", math.nan)
    kind, rate = s.get("q_shape", "flat"), s.get("q_rate", 0.0)
    if kind == "flat":
        return f"the stream's second moment stays at {fmt(q1)}", ["q_last", "q_shape"]
    keys = ["q_first", "q_last", "q_shape", "q_rate"]
    if kind == "linear":
        law = f"grows linearly, {'+' if rate > 0 else ''}{fmt(rate)} per block"
    elif kind == "quadratic":
        sign = "+" if rate > 0 else ""
        law = f"grows quadratically ({sign}{fmt(rate)} per block in sqrt(q))"
    else:
        law = f"changes {_factor(rate)} per block"
    return f"the stream's second moment {law} ({fmt(q0)} -> {fmt(q1)})", keys


def _residual_law(s: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The stream's law, its gradient and the identity blocks, as one clause."""
    text, keys = _stream_law(s)
    keys += ["n_residual", "grad_ratio"]
    g = s.get("grad_ratio", math.nan)
    text += (
        f" over {s['n_residual']} blocks, and its gradient changes {_factor(g)} "
        "from the last block back to the first"
    )
    meas = s.get("q_last_meas", math.nan)
    if meas == meas:
        keys.append("q_last_meas")
        text += f" (measured at the last block: {fmt(meas)})"
    if s.get("identity_blocks"):
        keys += ["identity_blocks", "identity_zero_grads", "identity_cause_text"]
        text += (
            f"; {s['identity_blocks']} of {s['n_residual']} blocks start as the "
            f"identity ({s['identity_cause_text']}), and the "
            f"{s['identity_zero_grads']} parameter gradients upstream of the zeros "
            "are exactly 0 at step 0 by design"
        )
    return text, keys


def _residual_answer(summaries: Sequence[Mapping[str, Any]]) -> list[Sentence]:
    """The residual half of the answer: the variants whose stream changes (its law
    and its gradient's) against those whose blocks all start as the identity."""
    res = [i for i, s in enumerate(summaries) if s.get("residual")]
    if not res:
        return []
    ident = [
        i
        for i in res
        if summaries[i].get("q_shape") == "flat"
        and summaries[i].get("identity_blocks") == summaries[i]["n_residual"]
    ]
    keys: list[tuple[int | None, str]] = []
    parts = []
    for i in (i for i in res if i not in ident):
        s = summaries[i]
        law, k = _stream_law(s)
        parts.append(
            f"with {s['name']} {law} and its gradient changes "
            f"{_factor(s['grad_ratio'])} from the last block back to the first"
        )
        keys += [(i, key) for key in (*k, "grad_ratio")]
    if ident:
        names = ", ".join(
            f"{summaries[i]['name']} ({summaries[i]['identity_cause_text']})"
            for i in ident
        )
        values = sorted({fmt(summaries[i]["q_last"]) for i in ident})
        grads = sorted({_factor(summaries[i]["grad_ratio"]) for i in ident})
        parts.append(
            f"starting every branch at zero holds it at {' / '.join(values)} and "
            f"its gradient changes {' / '.join(grads)}: {names}, every block "
            "starting as the identity"
        )
        for i in ident:
            keys += [
                (i, k)
                for k in (
                    "q_shape",
                    "q_last",
                    "grad_ratio",
                    "identity_blocks",
                    "n_residual",
                    "identity_cause_text",
                )
            ]
    text = "In the residual networks, " + "; ".join(parts) + "."
    return [Sentence("answer:residual", text[0].upper() + text[1:], keys)]


def _answer(
    summaries: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> list[Sentence]:
    """The short direct answer the report opens with, from the numbers: what the
    zero-mean random biases change against zero bias, what a constant bias does,
    what BatchNorm with its gamma and beta variants changes and what it does
    not."""
    out: list[Sentence] = []
    plain = [i for i in _flat(summaries) if not summaries[i]["batchnorm"]]
    zero = [i for i in plain if summaries[i]["sigma_b2"] == 0]
    if zero:
        z0 = zero[0]
        r = summaries[z0]
        rand = [
            i
            for i in plain
            if summaries[i]["bias_mean"] == 0 and summaries[i]["bias_var"] > 0
        ]
        if rand:
            parts, keys = [], [(z0, "q_last"), (z0, "corr_last")]
            big = False
            for i in rand:
                s = summaries[i]
                dq = s["q_last"] / r["q_last"] - 1 if r["q_last"] else math.nan
                dc = s["corr_last"] - r["corr_last"]
                zq = _z(s["q_last"] - r["q_last"], s.get("q_last_se_meas", math.nan))
                zc = _z(dc, s.get("corr_last_se_meas", math.nan))
                se_c = s.get("corr_last_se_meas", math.nan)
                se_q = s.get("q_last_se_meas", math.nan)
                # against the noise where it was measured, else a plain size rule
                big |= (
                    abs(s["q_last"] - r["q_last"]) > 3 * se_q
                    if se_q == se_q
                    else abs(dq) > CLOSE_TOLERANCE
                )
                big |= abs(dc) > 3 * se_c if se_c == se_c else abs(dc) > 0.01
                parts.append(
                    f"{s['name']} (sigma_b2 = {fmt(s['bias_var'])}) moves the "
                    f"last-block second moment {_pct(dq)}{zq} and the correlation "
                    f"of unrelated inputs by {'+' if dc > 0 else ''}{fmt(dc)}{zc}"
                )
                keys += [(i, "q_last"), (i, "corr_last"), (i, "bias_var")]
                keys += [
                    (i, k)
                    for k in ("q_last_se_meas", "corr_last_se_meas")
                    if s.get(k, math.nan) == s.get(k, math.nan)
                ]
            measured = any(
                summaries[i].get(k, math.nan) > 0
                for i in rand
                for k in ("q_last_se_meas", "corr_last_se_meas")
            )
            if measured:
                verdict = (
                    "change the step-0 signal beyond the measurement's noise (more "
                    "than 3 standard errors)"
                    if big
                    else "change the step-0 signal only within the measurement's "
                    "noise (under 3 standard errors)"
                )
            else:
                verdict = (
                    "change the step-0 signal by more than 5% of q or 0.01 in "
                    "correlation"
                    if big
                    else "change the step-0 signal by under 5% of q and 0.01 in "
                    "correlation"
                )
            out.append(
                Sentence(
                    "answer:bias",
                    f"Against zero bias ({r['name']}), zero-mean random biases "
                    f"{verdict}: " + "; ".join(parts) + ".",
                    keys,
                )
            )
        const = [
            i
            for i in plain
            if summaries[i]["bias_mean"] != 0 and summaries[i]["bias_var"] == 0
        ]
        for i in const:
            s = summaries[i]
            fwd, fk = _forward_clause(s)
            dd = s.get("dead_last", math.nan)
            d0 = r.get("dead_last", math.nan)
            tail = ""
            keys = [(i, "bias_mean"), (i, "corr_last"), (z0, "corr_last")]
            keys += [(i, k) for k in fk]
            if dd == dd and d0 == d0:
                tail = (
                    f", and the last layer's dead fraction "
                    f"{'rises' if dd > d0 else 'falls'} from {fmt(100 * d0)}% to "
                    f"{fmt(100 * dd)}%"
                )
                keys += [(i, "dead_last"), (z0, "dead_last")]
            out.append(
                Sentence(
                    f"answer:constant:{s['name']}",
                    f"A constant bias of {fmt(s['bias_mean'])} (a mean shared by "
                    f"every unit, not a variance) is carried forward by every block: "
                    f"{fwd}; the last-block correlation is "
                    f"{fmt_corr(s['corr_last'])} against {fmt_corr(r['corr_last'])}"
                    f"{tail}.",
                    keys,
                )
            )
    bn = [i for i in _flat(summaries) if summaries[i]["batchnorm"]]
    if bn:
        b0 = bn[0]
        sb = summaries[b0]
        keys = [(b0, "q_last"), (b0, "corr_dense_last"), (b0, "bn_rate")]
        text = (
            f"BatchNorm ({sb['name']}) holds the pre-activation second moment at "
            f"{fmt(sb['q_last'])} and the dense rows' correlation at "
            f"{fmt_corr(sb.get('corr_dense_last'))}"
        )
        if plain:
            text += f" (against {fmt_corr(summaries[plain[0]]['corr_last'])} without)"
            keys.append((plain[0], "corr_last"))
        text += (
            f"; the price is a gradient growing {_factor(sb['bn_rate'])} per "
            f"BatchNorm layer"
        )
        m = sb.get("bn_rate_meas", math.nan)
        if m == m:
            text += f" (measured {_factor(m)})"
            keys.append((b0, "bn_rate_meas"))
        for i in bn[1:]:
            s = summaries[i]
            what, wk = _describe_init(s)
            same = abs(s["bn_rate"] / sb["bn_rate"] - 1) <= 0.01
            text += (
                f"; {s['name']} ({what}) "
                + (
                    f"leaves the rate at {_factor(s['bn_rate'])}"
                    if same
                    else f"changes the rate to {_factor(s['bn_rate'])}"
                )
                + f", with the second moment at {fmt(s['q_last'])}"
            )
            keys += [(i, "bn_rate"), (i, "q_last")] + [(i, k) for k in wk]
        out.append(Sentence("answer:batchnorm", text + ".", keys))
    return out


def explain(
    summaries: Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None = None
) -> list[Sentence]:
    """Sentences that explain a study, each computed from ``summaries``.

    Parameters
    ----------
    summaries : sequence of dict
        :func:`summarize` of each variant, in study order; the first one is the
        reference the others are compared with (the first variant of each network
        layout is compared with the first variant overall, every other variant with
        the first variant of its own layout).
    settings : mapping, optional
        ``StudyResult.settings`` (batch size and seeds for the sentence on
        measurement).

    Returns
    -------
    list of Sentence
        First the short answer (ids ``answer:*``), then one sentence per variant,
        then the synthesis (ranking, BatchNorm, dead units).
    """
    if not summaries:
        return []
    settings = settings or {}
    out: list[Sentence] = _answer(summaries, settings) + _residual_answer(summaries)
    ref = summaries[0]
    text_init, init_keys = _describe_init(ref)
    chi = ref.get("chi1", math.nan)
    reg = ref.get("regime") or "unknown"
    fwd, fwd_keys = _forward_clause(ref)
    corr, corr_keys = _corr_clause(ref, settings)
    who = f"The reference, {ref['name']}," if len(summaries) > 1 else f"{ref['name']}"
    if ref.get("analytic_error"):
        who += f" (measured only, no prediction: {ref['analytic_error']})"
    text = (
        f"{who} is a {ref['n_blocks']}-block, width-"
        f"{ref['width']} {ref['activation']} network with sigma_w2 = "
        f"{fmt(ref['sigma_w2'])} and {text_init}: chi1 = {fmt(chi)}, the {reg} regime; "
        f"{fwd}, and {corr}."
    )
    out.append(
        Sentence(
            "reference",
            text,
            [
                (0, k)
                for k in (
                    "n_blocks",
                    "width",
                    "sigma_w2",
                    "chi1",
                    "regime",
                    *init_keys,
                    *fwd_keys,
                    *corr_keys,
                    "analytic_error",
                )
            ],
        )
    )
    first_of: dict[tuple, int] = {}
    for i, s in enumerate(summaries):
        first_of.setdefault(s["family"], i)
    for i, s in enumerate(summaries[1:], start=1):
        if s.get("residual"):
            law, k = _residual_law(s)
            out.append(
                Sentence(
                    f"variant:{s['name']}", f"{s['name']}: {law}.", [(i, x) for x in k]
                )
            )
            continue
        j = first_of[s["family"]]
        j = 0 if j == i else j
        cmp = summaries[j]
        text_init, init_keys = _describe_init(s)
        fwd, fwd_keys = _forward_clause(s)
        corr, corr_keys = _corr_clause(s, settings)
        cmp_text, cmp_keys = _compare_depth(s, cmp)
        text = f"{s['name']} ({text_init}): {fwd}, and {corr}{cmp_text}"
        keys = [(i, k) for k in (*init_keys, *fwd_keys, *corr_keys)]
        keys += [(j, k) for k in cmp_keys]
        if s.get("analytic_error"):
            text = (
                f"{s['name']} (measured only, no prediction: "
                f"{s['analytic_error']}): {fwd}"
            )
            keys = [(i, "analytic_error")] + [(i, k) for k in fwd_keys]
        g, gc = s.get("grad_ratio", math.nan), cmp.get("grad_ratio", math.nan)
        if s["batchnorm"] or (g == g and not 0.5 <= g <= 2.0):
            per = g ** (1.0 / max(s["n_blocks"] - 1, 1)) if g > 0 else math.nan
            text += (
                f"; the gradient second moment changes {_factor(g)} from the output "
                f"back to the first layer ({_factor(per)} per block, against "
                f"{_factor(gc)} with {cmp['name']})"
            )
            keys += [(i, "grad_ratio"), (j, "grad_ratio")]
        out.append(Sentence(f"variant:{s['name']}", text + ".", keys))
    out += _synthesis(summaries, settings)
    from .training import training_sentences

    out += training_sentences(summaries, settings or {})
    return out


def _synthesis(
    summaries: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> list[Sentence]:
    out: list[Sentence] = []
    plain = [i for i in _flat(summaries) if not summaries[i]["batchnorm"]]
    bn = [i for i in _flat(summaries) if summaries[i]["batchnorm"]]

    def depth_key(i: int) -> float:
        d = summaries[i].get("corr_depth")
        return math.inf if d is None else float(d)

    # which plain variant keeps inputs apart longest / shortest
    if len(plain) >= 2:

        def order(i: int) -> tuple[float, float]:
            c = summaries[i].get("corr_last", math.nan)
            return (depth_key(i), -(c if c == c else 1.0))

        best = max(plain, key=order)
        worst = min(plain, key=order)
        sb, sw = summaries[best], summaries[worst]
        n = sb["n_blocks"]
        if sb.get("corr_depth") is None and sw.get("corr_depth") is None:
            text = (
                f"Without BatchNorm no variant reaches correlation "
                f"{CORRELATION_THRESHOLD} within {n} blocks; the last-block "
                f"correlation ranges from {fmt_corr(sb.get('corr_last'))} "
                f"({sb['name']}) to {fmt_corr(sw.get('corr_last'))} ({sw['name']})."
            )
            keys = [(best, "corr_last"), (worst, "corr_last")]
        else:
            db = (
                "never"
                if sb.get("corr_depth") is None
                else f"only at block {sb['corr_depth']}"
            )
            ib, kb = _describe_init(sb)
            iw, kw = _describe_init(sw)
            text = (
                f"Without BatchNorm, {sb['name']} ({ib}) "
                f"keeps unrelated inputs apart longest (correlation "
                f"{CORRELATION_THRESHOLD} {db}) and {sw['name']} ({iw}) "
                f"shortest (block {sw['corr_depth']})."
            )
            keys = [(best, "corr_depth"), (worst, "corr_depth")]
            keys += [(best, k) for k in kb] + [(worst, k) for k in kw]
        out.append(Sentence("plain_ranking", text, keys))
    if bn:
        out += _batchnorm_sentences(summaries, plain, bn, settings)
    out += _dead_sentence(summaries, settings)
    return out


def _batchnorm_sentences(
    summaries: Sequence[Mapping[str, Any]],
    plain: list[int],
    bn: list[int],
    settings: Mapping[str, Any],
) -> list[Sentence]:
    out: list[Sentence] = []
    b = bn[0]
    sbn = summaries[b]
    B = _batch(settings)
    per = (
        sbn["grad_ratio"] ** (1.0 / max(sbn["n_blocks"] - 1, 1))
        if sbn.get("grad_ratio", math.nan) > 0
        else math.nan
    )
    keys: list[tuple[int | None, str]] = [
        (b, "corr_dense_last"),
        (b, "corr_last"),
        (b, "grad_ratio"),
    ]
    if plain:
        p0 = plain[0]
        sp = summaries[p0]
        c_bn, c_p = sbn.get("corr_dense_last", 1), sp.get("corr_last", 1)
        verb = (
            "keeps unrelated inputs further apart than"
            if c_bn < c_p
            else "does not keep unrelated inputs further apart than"
        )
        text = (
            f"BatchNorm ({sbn['name']}) {verb} {sp['name']}: at the last dense layer "
            f"(uncentred cosines on both sides) the correlation is "
            f"{fmt_corr(c_bn)} against {fmt_corr(c_p)}"
        )
        keys.append((p0, "corr_last"))
    else:
        text = (
            f"BatchNorm ({sbn['name']}) ends with correlation "
            f"{fmt_corr(sbn.get('corr_dense_last'))} at the last dense layer"
        )
    own, own_keys = _bn_output_corr(sbn, settings)
    text += f"; {own}"
    keys += [(b, k) for k in own_keys]
    text += (
        f". Its gradient second moment grows {_factor(per)} per block "
        f"({_factor(sbn.get('grad_ratio'))} over {sbn['n_blocks']} blocks)"
    )
    large = sbn.get("bn_gain_large", math.nan)
    meas = sbn.get("bn_rate_meas", math.nan)
    src = sbn.get("chi1_source", "")
    keys += [(b, "bn_gain_large"), (b, "chi1"), (b, "chi1_source")]
    text += (
        f"; analyze gives chi1 = {fmt(sbn.get('chi1'))} per block ({src}), and "
        f"the large-batch limit is {fmt(large)} (bn_gradient_gain"
        + (", Yang et al.'s pi/(pi-1) for ReLU" if sbn["activation"] == "relu" else "")
        + ")"
    )
    if meas == meas and large == large:
        keys.append((b, "bn_rate_meas"))
        cmp = (
            "above"
            if meas > large * (1 + 0.01)
            else ("below" if meas < large * (1 - 0.01) else "at")
        )
        text += (
            f"; measured at B = {B}: {_factor(meas)} per BatchNorm layer, {cmp} the "
            f"large-batch rate"
            + (" (smaller batches explode faster)" if cmp == "above" else "")
        )
    out.append(Sentence("batchnorm", text + ".", keys))
    # gamma and beta: what they change and what they do not (large-batch gains)
    gh, g1 = sbn.get("bn_gain_gamma_half", math.nan), large
    bp = sbn.get("bn_gain_beta_pos", math.nan)
    bm = sbn.get("bn_gain_beta_neg", math.nan)
    if gh == gh and g1 == g1:
        dep = abs(gh / g1 - 1) <= 1e-9
        gam = sbn.get("bn_probe_gamma", math.nan)
        text = (
            f"For {sbn['activation']} the rate "
            + ("does not depend on gamma" if dep else "depends on gamma")
            + f" (large-batch {fmt(g1)} at gamma = {fmt(gam)}, {fmt(gh)} at gamma = "
            f"{fmt(0.5 * gam)}); beta = +0.5 "
            + ("lowers" if bp < g1 else "raises")
            + f" it to {fmt(bp)} and beta = -0.5 "
            + ("raises" if bm > g1 else "lowers")
            + f" it to {fmt(bm)}"
        )
        keys = [
            (b, "bn_gain_gamma_half"),
            (b, "bn_gain_large"),
            (b, "bn_gain_beta_pos"),
            (b, "bn_gain_beta_neg"),
            (b, "bn_probe_gamma"),
        ]
        act_neg = sbn.get("active_beta_neg", math.nan)
        if act_neg == act_neg:
            text += (
                f", while only {fmt(100 * act_neg)}% of a unit's inputs stay "
                f"positive there (beta < 0 kills units)"
            )
            keys.append((b, "active_beta_neg"))
        out.append(Sentence("batchnorm_gamma_beta", text + ".", keys))
    dense_bias = sbn.get("dense_bias_before_bn")
    out.append(
        Sentence(
            "batchnorm_dense_bias",
            (
                "The dense bias before each BatchNorm is cancelled exactly by the "
                "centring (its gradient is 0): the bias question does not arise "
                "there, beta takes its place."
                if dense_bias
                else "No dense bias feeds a BatchNorm here; beta plays the bias's role."
            ),
            [(b, "dense_bias_before_bn")],
        )
    )
    return out


def _dead_sentence(
    summaries: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> list[Sentence]:
    dmax = [
        (summaries[i].get("dead_last", math.nan), i)
        for i in range(len(summaries))
        if summaries[i].get("activation") in DYING_ACTIVATIONS
    ]
    dmax = [(d, i) for d, i in dmax if d == d]
    if not dmax:
        return []
    d, i = max(dmax)
    s = summaries[i]
    batch = _batch(settings)
    btxt = f" of {batch} inputs" if batch else ""
    if d <= 0:
        return [
            Sentence(
                "dead",
                f"No variant has dead units at its last layer for a batch{btxt}.",
                [(i, "dead_last")],
            )
        ]
    text = (
        f"The most dead units at the last layer are with {s['name']}: "
        f"{fmt(100 * d)}% of {s['dead_layer']} is zero for a whole batch{btxt}"
    )
    keys: list[tuple[int | None, str]] = [(i, "dead_last")]
    m = s.get("dead_last_meas", math.nan)
    if m == m:
        text += f" (measured {fmt(100 * m)}%)"
        keys.append((i, "dead_last_meas"))
    zero = [
        j
        for j in _flat(summaries)
        if not summaries[j]["batchnorm"] and summaries[j]["sigma_b2"] == 0
    ]
    if (
        zero
        and zero[0] != i
        and summaries[zero[0]].get("dead_last") == summaries[zero[0]].get("dead_last")
    ):
        z = summaries[zero[0]]
        d0 = z["dead_last"]
        keys += [(zero[0], "dead_last")]
        text += f", against {fmt(100 * d0)}% with {z['name']}"
        if d0 >= 0.5 * d:
            text += ": the bias is not what kills them"
    c = s.get("corr_last", math.nan)
    if c == c and c > 0.5:
        keys.append((i, "corr_last"))
        text += (
            f". The cause is alignment: at correlation {fmt_corr(c)} between "
            f"unrelated inputs a unit's pre-activations share one sign across the "
            f"batch, which infinite-width theory predicts for a batch of this size "
            f"(not a finite-width effect)"
        )
    return [Sentence("dead", text + ".", keys)]

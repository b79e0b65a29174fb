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

#: relative change of the pre-activation second moment below which it "stays"
FLAT_TOLERANCE = 0.02
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
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(result(True)) from None
    return result(False)


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


def _shape(q: np.ndarray) -> tuple[str, float]:
    """Classify a sequence of second moments: ("flat", 0), ("linear", increment per
    block) or ("exponential", factor per block), by the better of a straight-line fit
    of q and of log q."""
    q = np.asarray(q, dtype=float)
    ok = np.isfinite(q) & (q > 0)
    q = q[ok]
    if q.size < 2:
        return "flat", 0.0
    rel = abs(q[-1] / q[0] - 1.0)
    if rel < FLAT_TOLERANCE and np.all(np.abs(q / q[0] - 1.0) < FLAT_TOLERANCE):
        return "flat", 0.0
    x = np.arange(q.size, dtype=float)
    if q.size < 3:
        return "exponential", float((q[-1] / q[0]) ** (1.0 / (q.size - 1)))
    lin = np.polyfit(x, q, 1)
    r_lin = np.sqrt(np.mean(((np.polyval(lin, x) - q) / q) ** 2))
    lg = np.polyfit(x, np.log(q), 1)
    r_exp = np.sqrt(np.mean((np.exp(np.polyval(lg, x)) / q - 1.0) ** 2))
    if r_lin <= r_exp:
        return "linear", float(lin[0])
    # the rate quoted is the endpoints' geometric mean, as in the verdicts
    return "exponential", float((q[-1] / q[0]) ** (1.0 / (q.size - 1)))


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
        "batchnorm": p["batchnorm"],
        "gamma2": p["gamma2"],
        "beta_mean": p["beta_mean"],
        "beta2": p["beta2"],
        "n_blocks": p["n_blocks"],
        "width": p["width"],
        "verdicts": [v.kind for v in entry.verdicts],
    }
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
        if not suffix:
            kind, rate = _shape(q)
            s["q_shape"] = kind
            s["q_rate"] = rate
            s["chi1"] = _num(prof.summary.get("chi1"))
            s["regime"] = prof.summary.get("regime") or ""
            s["xi_c"] = _num(prof.summary.get("xi_c"))
            s["source"] = prof.source
    return s


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


def _corr_clause(s: Mapping[str, Any]) -> tuple[str, list[str]]:
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


def _forward_clause(s: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The clause on the second moment, and the summary keys it shows."""
    n = s["n_blocks"]
    q0, q1 = s.get("q_first", math.nan), s.get("q_last", math.nan)
    kind, rate = s.get("q_shape", "flat"), s.get("q_rate", 0.0)
    keys = ["q_last"]
    if kind == "flat":
        text = f"the pre-activation second moment stays at {fmt(q1)} over {n} blocks"
    elif kind == "linear":
        keys += ["q_first", "q_rate"]
        verb = "grows" if q1 > q0 else "shrinks"
        text = (
            f"the pre-activation second moment {verb} linearly from {fmt(q0)} to "
            f"{fmt(q1)} over {n} blocks ({'+' if rate > 0 else ''}{fmt(rate)} per "
            f"block"
        )
        sb2 = s.get("sigma_b2", 0.0)
        if sb2 > 0 and not s.get("batchnorm") and s.get("activation") == "relu":
            keys.append("sigma_b2")
            near = abs(rate / sb2 - 1) <= CLOSE_TOLERANCE
            text += (
                f", {'the' if near else 'not the'} q_l = q_0 + l sigma_b2 growth "
                f"of a critical ReLU net with sigma_b2 = {fmt(sb2)}"
            )
        text += ")"
    else:
        keys += ["q_first", "q_rate"]
        verb = "grows" if q1 > q0 else "shrinks"
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
        return (
            f"E[gamma^2] = {fmt(s['gamma2'])}, E[beta] = {fmt(s['beta_mean'])}, "
            f"E[beta^2] = {fmt(s['beta2'])}"
        ), ["gamma2", "beta_mean", "beta2"]
    return (
        f"sigma_b2 = {fmt(s['sigma_b2'])}, bias mean {fmt(s['bias_mean'])}",
        ["sigma_b2", "bias_mean"],
    )


def _compare_depth(
    s: Mapping[str, Any], ref: Mapping[str, Any]
) -> tuple[str, list[str]]:
    d, r = s.get("corr_depth"), ref.get("corr_depth")
    if d is None and r is None:
        return (
            f", against {fmt_corr(ref.get('corr_last'))} with {ref['name']}",
            ["corr_depth", "corr_last"],
        )
    if r is None:
        return f", while with {ref['name']} they never do", ["corr_depth"]
    return f", against block {r} with {ref['name']}", ["corr_depth"]


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
    """
    if not summaries:
        return []
    out: list[Sentence] = []
    settings = settings or {}
    ref = summaries[0]
    text_init, init_keys = _describe_init(ref)
    chi = ref.get("chi1", math.nan)
    reg = ref.get("regime") or "unknown"
    fwd, fwd_keys = _forward_clause(ref)
    corr, corr_keys = _corr_clause(ref)
    who = f"The reference, {ref['name']}," if len(summaries) > 1 else f"{ref['name']}"
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
                )
            ],
        )
    )
    first_of: dict[tuple, int] = {}
    for i, s in enumerate(summaries):
        first_of.setdefault(s["family"], i)
    for i, s in enumerate(summaries[1:], start=1):
        j = first_of[s["family"]]
        j = 0 if j == i else j
        cmp = summaries[j]
        text_init, init_keys = _describe_init(s)
        fwd, fwd_keys = _forward_clause(s)
        corr, corr_keys = _corr_clause(s)
        cmp_text, cmp_keys = _compare_depth(s, cmp)
        text = f"{s['name']} ({text_init}): {fwd}, and {corr}{cmp_text}"
        keys = [(i, k) for k in (*init_keys, *fwd_keys, *corr_keys)]
        keys += [(j, k) for k in cmp_keys]
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
    return out


def _synthesis(
    summaries: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> list[Sentence]:
    out: list[Sentence] = []
    idx = list(range(len(summaries)))
    plain = [i for i in idx if not summaries[i]["batchnorm"]]
    bn = [i for i in idx if summaries[i]["batchnorm"]]

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
            text = (
                f"Without BatchNorm, {sb['name']} (sigma_b2 = {fmt(sb['sigma_b2'])}) "
                f"keeps unrelated inputs apart longest (correlation "
                f"{CORRELATION_THRESHOLD} {db}) and {sw['name']} (sigma_b2 = "
                f"{fmt(sw['sigma_b2'])}) shortest (block {sw['corr_depth']})."
            )
            keys = [
                (best, "corr_depth"),
                (worst, "corr_depth"),
                (best, "sigma_b2"),
                (worst, "sigma_b2"),
            ]
        out.append(Sentence("plain_ranking", text, keys))
    # BatchNorm: correlation kept vs gradient explosion
    if bn:
        b = bn[0]
        sbn = summaries[b]
        per = (
            sbn["grad_ratio"] ** (1.0 / max(sbn["n_blocks"] - 1, 1))
            if sbn.get("grad_ratio", math.nan) > 0
            else math.nan
        )
        keys: list[tuple[int | None, str]] = [(b, "corr_last"), (b, "grad_ratio")]
        if plain:
            p0 = plain[0]
            sp = summaries[p0]
            verb = (
                "keeps unrelated inputs further apart than"
                if sbn.get("corr_last", 1) < sp.get("corr_last", 1)
                else "does not keep unrelated inputs further apart than"
            )
            text = (
                f"BatchNorm ({sbn['name']}) {verb} {sp['name']} (correlation "
                f"{fmt_corr(sbn.get('corr_last'))} against "
                f"{fmt_corr(sp.get('corr_last'))} at "
                f"the last block)"
            )
            keys.append((p0, "corr_last"))
        else:
            text = (
                f"BatchNorm ({sbn['name']}) ends with correlation "
                f"{fmt_corr(sbn.get('corr_last'))} at the last block"
            )
        text += (
            f", and its gradient second moment grows {_factor(per)} per block "
            f"({_factor(sbn.get('grad_ratio'))} over {sbn['n_blocks']} blocks)"
        )
        if sbn["activation"] == "relu":
            theory = math.pi / (math.pi - 1)
            close = abs(per / theory - 1) <= CLOSE_TOLERANCE
            text += (
                f", {'close to' if close else 'away from'} Yang et al.'s "
                f"large-batch rate pi/(pi-1) = {fmt(theory)}"
            )
        out.append(Sentence("batchnorm", text + ".", keys))
    # dead units
    dmax = [
        (summaries[i].get("dead_last", math.nan), i)
        for i in idx
        if summaries[i].get("activation") in DYING_ACTIVATIONS
    ]
    dmax = [(d, i) for d, i in dmax if d == d]
    if dmax:
        d, i = max(dmax)
        s = summaries[i]
        batch = settings.get("simulate", {}).get("batch_size") or settings.get(
            "analyze", {}
        ).get("batch_size")
        btxt = f" of {batch} inputs" if batch else ""
        if d <= 0:
            text = f"No variant has dead units at its last layer for a batch{btxt}."
            keys = [(i, "dead_last")]
        else:
            text = (
                f"The most dead units at the last layer are with {s['name']}: "
                f"{fmt(100 * d)}% of {s['dead_layer']} is zero for a whole "
                f"batch{btxt}"
            )
            keys = [(i, "dead_last")]
            m = s.get("dead_last_meas", math.nan)
            if m == m:
                text += f" (measured {fmt(100 * m)}%)"
                keys.append((i, "dead_last_meas"))
            text += "."
        out.append(Sentence("dead", text, keys))
    return out

"""Diagnosis rules on a :class:`~initdiag.profile.Profile`: what is wrong, and the fix.

:func:`diagnose` reads a profile (analytic or empirical) and returns a list of
:class:`Verdict` objects, each with the numbers that triggered it and a suggestion
computed for this network (its activation, its weight variance ``sigma_w2`` and its
bias variance ``sigma_b2``, read from the network's :class:`InitScheme`).

Every threshold lives in :data:`THRESHOLDS`, defined once here:

- ``q_growth_warning`` = 1.02: geometric-mean growth per block of the pre-activation
  second moment above which the forward signal is said to explode (below its
  inverse: to vanish); 1.02 is x1.8 over 30 blocks.
- ``q_growth_problem`` = 1.10: the same, severe (x17 over 30 blocks).
- ``correlation_problem_fraction`` = 0.5: correlation collapse (unrelated inputs at
  correlation >= ``profile.CORRELATION_THRESHOLD``) within this fraction of the
  blocks is severe; later, but before the last block, a warning.
- ``gradient_warning`` = 10: gradient ratio (gradient second moment at the first
  pre-activation over the last one) above which gradients explode, below whose
  inverse they vanish.
- ``gradient_problem`` = 1e3: the same, severe.
- ``dead_warning`` = 0.05: fraction of units dead for the whole batch (ReLU only).
- ``dead_problem`` = 0.5: the same, severe.
- ``bn_growth_budget`` = 1e3: the gradient growth used to compute how many BatchNorm
  layers a network can afford.

References: Poole et al. (2016), Schoenholz et al. (2017) for chi1 and the depth
scales; Hayou, Doucet & Rousseau (2019) for ReLU's edge of chaos at sigma_b2 = 0;
Yang et al. (2019) for BatchNorm's gradient explosion (pi/(pi-1) per layer for ReLU).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from .analytic import network_parameters
from .profile import CORRELATION_THRESHOLD, Profile

__all__ = [
    "THRESHOLDS",
    "Verdict",
    "diagnose",
    "network_parameters",
    "network_regime",
    "critical_point",
    "signal_rows",
    "signal_gradient_ratio",
]

#: The thresholds of every rule (see the module docstring for their meaning).
THRESHOLDS: dict[str, float] = {
    "q_growth_warning": 1.02,
    "q_growth_problem": 1.10,
    "correlation_problem_fraction": 0.5,
    "gradient_warning": 10.0,
    "gradient_problem": 1e3,
    "dead_warning": 0.05,
    "dead_problem": 0.5,
    "bn_growth_budget": 1e3,
}

#: activations whose units stop passing gradient when their input is negative: the
#: dying-units rule applies to these only (a tanh unit with a negative output is alive)
DYING_ACTIVATIONS = ("relu",)

#: relative change of a second moment along the rows below which it "stays"
FLAT_TOLERANCE = 0.02

#: relative distance to the critical sigma_w2 within which a network counts as critical
CRITICAL_TOLERANCE = 0.01

Severity = Literal["note", "warning", "problem"]


@dataclass
class Verdict:
    """One diagnosis.

    Attributes
    ----------
    kind : str
        ``forward_explosion``, ``forward_vanishing``, ``correlation_collapse``,
        ``gradient_explosion``, ``gradient_vanishing``,
        ``batchnorm_gradient_explosion``,
        ``dying_units`` or ``overflow``.
    severity : {"warning", "problem"}
    message : str
        What happens, with the numbers.
    suggestion : str
        A fix computed for this network.
    layer : str or None
        The layer where it shows first (or happens), when there is one.
    evidence : dict
        The numbers behind the verdict.
    """

    kind: str
    severity: Severity
    message: str
    suggestion: str
    layer: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message} -> {self.suggestion}"


# -- what the network is --------------------------------------------------------------


def network_regime(network: Any, profile: Profile | None = None) -> dict[str, Any]:
    """chi1, the regime and its reason for a network: the summary of
    :func:`initdiag.analyze` (``profile``'s summary when it carries a regime), whose
    label comes from :func:`initdiag.meanfield.regime`, the one classification
    every command uses.

    Returns
    -------
    dict
        ``chi1`` (float, NaN when unknown), ``regime`` (str or None), ``reason``.
    """
    summ = profile.summary if profile is not None else {}
    if not summ.get("regime"):
        from .analytic import analyze

        try:
            summ = analyze(network).summary
        except NotImplementedError as exc:
            return {"chi1": math.nan, "regime": None, "reason": str(exc)}
    chi = summ.get("chi1")
    return {
        "chi1": float(chi) if isinstance(chi, (int, float)) else math.nan,
        "regime": summ.get("regime"),
        "reason": str(summ.get("regime_reason") or ""),
    }


@functools.lru_cache(maxsize=256)
def critical_point(activation: str, sigma_b2: float) -> float | None:
    """The critical ``sigma_w2`` for ``sigma_b2`` (None where there is no edge of
    chaos, e.g. ReLU with ``sigma_b2 > 0``), from
    :func:`initdiag.meanfield.critical_sigma_w2`."""
    import warnings

    from . import meanfield

    try:
        with warnings.catch_warnings():
            # NaN is the answer "no edge of chaos"; the warning repeats it
            warnings.simplefilter("ignore", RuntimeWarning)
            v = meanfield.critical_sigma_w2(activation, sigma_b2)
    except (ValueError, NotImplementedError, ArithmeticError):
        return None
    if v is None:
        return None
    v = float(np.asarray(v))
    return v if math.isfinite(v) and v > 0 else None


def _g(x: float) -> str:
    """A number for a sentence."""
    if x is None or not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1e4 or a < 1e-3:
        return f"{x:.2e}"
    if a >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _fix_weights(p: Mapping[str, Any]) -> str:
    """The concrete change of initialisation that puts this network at criticality."""
    act, sb2, sw2 = p["activation"], p["sigma_b2"], p["sigma_w2"]
    if act in ("relu", "leaky_relu") and sb2 > 0:
        crit0 = critical_point(act, 0.0)
        tail = ""
        if crit0 and math.isfinite(sw2) and abs(sw2 / crit0 - 1) < CRITICAL_TOLERANCE:
            tail = f" and keep sigma_w2 = {_g(crit0)} (Kaiming)"
        elif crit0:
            tail = f" and use sigma_w2 = {_g(crit0)} (Kaiming) instead of {_g(sw2)}"
        here = (
            f"here a constant bias of {_g(p['bias_mean'])}"
            if p.get("bias_var", sb2) == 0 and p.get("bias_mean", 0.0) != 0
            else f"here sigma_b2 = {_g(sb2)}"
        )
        return (
            f"set the bias to zero: {act} has no edge of chaos with a bias "
            f"({here}){tail}"
        )
    crit = critical_point(act, sb2)
    if crit is None:
        return (
            f"{act} has no edge of chaos at sigma_b2 = {_g(sb2)}; lower the bias "
            f"variance or change the activation"
        )
    if math.isfinite(sw2) and abs(sw2 / crit - 1) < CRITICAL_TOLERANCE:
        return (
            f"the initialisation is already at the edge of chaos "
            f"(sigma_w2 = {_g(sw2)}, "
            f"critical {_g(crit)} at sigma_b2 = {_g(sb2)}); what remains comes from "
            f"depth and finite width: use fewer blocks, BatchNorm or residual "
            f"connections"
        )
    return (
        f"use weight variance sigma_w2 = {_g(crit)} / fan_in (gain "
        f"{_g(math.sqrt(crit))}) instead of {_g(sw2)} / fan_in: the edge of chaos of "
        f"{act} at sigma_b2 = {_g(sb2)}"
    )


# -- the rules ------------------------------------------------------------------------


def growth_law(q: np.ndarray) -> tuple[str, float]:
    """Classify a sequence of second moments: ("flat", 0), ("linear", increment of q
    per block), ("quadratic", increment of sqrt(q) per block) or ("exponential",
    factor per block), by the best of straight-line fits of q, sqrt(q) and log q
    (relative residuals of q; ties go to the simpler law, in that order).  A
    zero-mean bias at the ReLU edge of chaos adds sigma_b2 to q per block (linear);
    a constant bias adds to sqrt(q) (quadratic)."""
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
    sq = np.polyfit(x, np.sqrt(q), 1)
    r_sq = np.sqrt(np.mean((np.polyval(sq, x) ** 2 / q - 1.0) ** 2))
    lg = np.polyfit(x, np.log(q), 1)
    r_exp = np.sqrt(np.mean((np.exp(np.polyval(lg, x)) / q - 1.0) ** 2))
    # a relative margin keeps rounding from preferring the more flexible law
    if r_lin <= 1.05 * min(r_sq, r_exp) + 1e-12:
        return "linear", float(lin[0])
    if r_sq <= r_exp:
        return "quadratic", float(sq[0])
    # the rate quoted is the endpoints' geometric mean, as in the verdicts
    return "exponential", float((q[-1] / q[0]) ** (1.0 / (q.size - 1)))


def signal_rows(profile: Profile) -> np.ndarray:
    """Rows whose output feeds an activation: the pre-activations (dense rows, or
    BatchNorm rows in ``Dense -> BN -> act`` blocks); dense rows when there is no
    activation.  Rules compare like with like along these rows, so a ReLU halving
    the second moment between a dense row and its activation row is not mistaken
    for vanishing."""
    kinds = profile.kind
    stream = [
        i
        for i, k in enumerate(kinds)
        if k == "residual" and profile.name[i].count(".") == 1
    ]
    if stream:
        # a residual network: the stream after each top-level block's add
        return np.asarray(stream, dtype=np.int64)
    rows = [
        i - 1
        for i in range(1, len(kinds))
        if kinds[i] == "activation" and kinds[i - 1] != "activation"
    ]
    if not rows:
        rows = [i for i, k in enumerate(kinds) if k == "dense"]
    if not rows:
        rows = list(range(len(kinds)))
    return np.asarray(rows, dtype=np.int64)


def signal_gradient_ratio(profile: Profile) -> float:
    """Gradient second moment at the first pre-activation over that at the last one
    (:func:`signal_rows`): the growth of the gradient from the output back to the
    input, like for like.  ``profile.summary["gradient_ratio"]`` uses the dense
    rows instead, which differ from these in ``Dense -> BN -> act`` blocks."""
    return profile.gradient_ratio(signal_rows(profile))


def _dense_q(profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    rows = signal_rows(profile)
    return rows, profile.columns["second_moment"][rows]


def _forward(profile: Profile, p: Mapping[str, Any]) -> list[Verdict]:
    rows, q = _dense_q(profile)
    ok = np.isfinite(q) & (q > 0)
    if ok.sum() < 2:
        return []
    rows, q = rows[ok], q[ok]
    n = len(q) - 1
    total = float(q[-1] / q[0])
    rate = total ** (1.0 / n)
    t_w, t_p = THRESHOLDS["q_growth_warning"], THRESHOLDS["q_growth_problem"]
    if 1 / t_w <= rate <= t_w:
        return []
    se = profile.se("second_moment")
    if se is not None:
        # a measured change smaller than 3 standard errors is not evidence
        err = math.hypot(*(float(se[r]) for r in (rows[0], rows[-1])))
        if math.isfinite(err) and abs(float(q[-1] - q[0])) <= 3 * err:
            return []
    up = rate > 1
    sev: Severity = "problem" if (rate > t_p or rate < 1 / t_p) else "warning"
    first = profile.name[rows[0]]
    last = profile.name[rows[-1]]
    kind = "forward_explosion" if up else "forward_vanishing"
    law, step = growth_law(q)
    how = (
        f"linearly, by {_g(step)} per block"
        if law == "linear"
        else f"by x{_g(rate)} per block"
    )
    msg = (
        f"the forward signal {'grows' if up else 'shrinks'} {how}: "
        f"second moment {_g(float(q[0]))} at {first} -> {_g(float(q[-1]))} at {last} "
        f"(x{_g(total)})"
    )
    if p["residual"]:
        sug = (
            "each block adds its branch's second moment to the stream; start the "
            "branches at zero (zero_init_residual=True on the last norm, "
            "skipinit=True, or init='fixup') or scale them by 1/sqrt(blocks)"
        )
    elif p["batchnorm"]:
        sug = "check gamma and beta: BatchNorm should hold the scale fixed"
    else:
        sug = _fix_weights(p)
    return [
        Verdict(
            kind,
            sev,
            msg,
            sug,
            layer=last,
            evidence={
                "rate_per_block": rate,
                "total_factor": total,
                "q_first": float(q[0]),
                "q_last": float(q[-1]),
            },
        )
    ]


def _correlation(profile: Profile, p: Mapping[str, Any]) -> list[Verdict]:
    depth = profile.correlation_depth()
    n_blocks = int(np.nanmax(profile.block)) if len(profile) else 0
    if depth is None or n_blocks == 0:
        return []
    c = profile.columns["correlation"]
    frac = THRESHOLDS["correlation_problem_fraction"]
    sev: Severity = "problem" if depth <= frac * n_blocks else "warning"
    hit = int(np.flatnonzero(np.nan_to_num(c, nan=-1) >= CORRELATION_THRESHOLD)[0])
    summ = profile.summary
    xi_c = summ.get("xi_c")
    msg = (
        f"unrelated inputs reach correlation {CORRELATION_THRESHOLD} at block "
        f"{depth} of "
        f"{n_blocks} ({profile.name[hit]}); the last layer cannot tell them apart "
        f"(correlation {float(c[np.isfinite(c)][-1]):.3f})"
    )
    if xi_c is not None and isinstance(xi_c, (int, float)) and math.isfinite(xi_c):
        msg += f"; correlation depth scale xi_c = {_g(float(xi_c))} blocks"
    act, sb2 = p["activation"], p["sigma_b2"]
    regime = summ.get("regime")
    if p["batchnorm"]:
        sug = (
            f"BatchNorm should decorrelate the batch; check beta (mean "
            f"{_g(p['beta_mean'])}) and gamma (E[gamma^2] = {_g(p['gamma2'])})"
        )
    elif act in ("relu", "leaky_relu") and sb2 > 0:
        sug = _fix_weights(p)
    elif regime == "ordered":
        sug = _fix_weights(p)
    else:
        alt = critical_point("tanh", sb2)
        sug = (
            f"{act} is at its edge of chaos, where correlations still converge "
            f"polynomially with depth; use fewer than {depth} blocks, add BatchNorm or "
            f"residual connections"
        )
        if act in ("relu", "leaky_relu") and alt is not None:
            sug += (
                f", or a smooth activation at criticality (tanh: sigma_w2 = "
                f"{_g(alt)} at sigma_b2 = {_g(sb2)})"
            )
    return [
        Verdict(
            "correlation_collapse",
            sev,
            msg,
            sug,
            layer=profile.name[hit],
            evidence={"correlation_depth": depth, "n_blocks": n_blocks},
        )
    ]


def _gradients(profile: Profile, p: Mapping[str, Any]) -> list[Verdict]:
    ratio = signal_gradient_ratio(profile)
    if not math.isfinite(ratio) or ratio <= 0:
        return []
    t_w, t_p = THRESHOLDS["gradient_warning"], THRESHOLDS["gradient_problem"]
    if 1 / t_w <= ratio <= t_w:
        return []
    up = ratio > 1
    sev: Severity = "problem" if (ratio > t_p or ratio < 1 / t_p) else "warning"
    sig = signal_rows(profile)
    residual = profile.kind[int(sig[0])] == "residual"
    n_blocks = max(len(sig) if residual else p["n_blocks"], 2)
    per = ratio ** (1.0 / (n_blocks - 1))
    first = profile.name[int(sig[0])]
    ev = {"gradient_ratio": ratio, "rate_per_block": per}
    if up and p["batchnorm"] and p["n_batchnorm"] > 1 and not residual:
        per_bn = ratio ** (1.0 / (p["n_batchnorm"] - 1))
        budget = THRESHOLDS["bn_growth_budget"]
        afford = int(math.log(budget) / math.log(per_bn)) + 1 if per_bn > 1 else 0
        theory = ""
        if p["activation"] == "relu":
            lam = math.pi / (math.pi - 1)
            theory = f"; theory for ReLU at large batch: pi/(pi-1) = {_g(lam)}"
        msg = (
            f"BatchNorm gradient explosion: the gradient second moment grows "
            f"x{_g(per_bn)} "
            f"per BatchNorm layer, x{_g(ratio)} from the output back to {first}{theory}"
        )
        sug = (
            f"keep at most {afford} BatchNorm layers for growth under "
            f"{_g(budget)}, add "
            f"residual connections, or move the activation toward its linear regime "
            f"(Yang et al. 2019)"
        )
        ev["rate_per_batchnorm"] = per_bn
        ev["affordable_batchnorm_layers"] = afford
        return [
            Verdict(
                "batchnorm_gradient_explosion", sev, msg, sug, layer=first, evidence=ev
            )
        ]
    kind = "gradient_explosion" if up else "gradient_vanishing"
    top = f"that at {profile.name[int(sig[-1])]}" if residual else "that at the output"
    msg = (
        f"gradients {'explode' if up else 'vanish'}: the gradient second moment at "
        f"{first} is x{_g(ratio)} {top} (x{_g(per)} per block)"
    )
    if residual:
        sug = (
            "the stream's gradient gains each branch's share on the way down; start "
            "the branches at zero (zero_init_residual=True, skipinit=True or "
            "init='fixup') or scale them by 1/sqrt(blocks)"
        )
    elif p["batchnorm"]:
        sug = f"check gamma (E[gamma^2] = {_g(p['gamma2'])}) and beta"
    else:
        sug = _fix_weights(p)
    return [Verdict(kind, sev, msg, sug, layer=first, evidence=ev)]


def identity_blocks(profile: Profile, network: Any) -> list[dict[str, Any]]:
    """Residual blocks whose branch output is exactly zero in ``profile`` (zero
    gamma on the last norm, SkipInit's alpha = 0, Fixup's zero last layer): for
    each, the block row, the first branch row whose output is zero by design (the
    cause), the rows after it (zero by design) and the parameter-gradient columns
    upstream of it that are exactly 0."""
    out = []
    q = profile.columns["second_moment"]
    inits = network.param_inits()
    for info in network.infos:
        if not info.branch or q[info.branch[-1]] != 0.0:
            continue
        zero = next(
            (
                r
                for r in info.branch
                if network.infos[r].layer.output_zero_by_design(
                    inits[r], network.infos[r].fan_in, network.infos[r].width
                )
                and q[r] == 0.0
            ),
            None,
        )
        if zero is None:
            continue
        k = info.branch.index(zero)
        upstream = [
            (profile.name[r], c)
            for r in info.branch[:k]
            for c in ("weight_grad_norm2", "bias_grad_norm2", "gamma_grad_norm2")
            if profile.columns[c][r] == 0.0
        ]
        out.append(
            {
                "block": info.name,
                "cause": profile.name[zero],
                "after": list(info.branch[k:]),
                "upstream_zero": upstream,
            }
        )
    return out


def _cause(network: Any, name: str) -> str:
    info = next(i for i in network.infos if i.name == name)
    if info.kind in ("batchnorm", "layernorm"):
        return f"gamma = beta = 0 on {name}"
    if info.kind == "scale":
        return f"alpha = 0 on {name}"
    return f"zero weights in {name}"


def identity_cause(network: Any, blocks: list[dict[str, Any]]) -> str:
    """What zeroes the branches of :func:`identity_blocks`, as a phrase: one
    ``block*.`` pattern when every block's cause is the same row of its branch
    ("gamma = beta = 0 on block*.bn2"), else the first two causes; "" for none."""
    if not blocks:
        return ""
    local = {b["cause"].rpartition(".")[2] for b in blocks}
    if len(local) == 1:
        first = blocks[0]["cause"]
        return _cause(network, first).replace(first, f"block*.{local.pop()}")
    return ", ".join(_cause(network, b["cause"]) for b in blocks[:2]) + ", ..."


def _identity(
    profile: Profile, network: Any, blocks: list[dict[str, Any]]
) -> list[Verdict]:
    if not blocks:
        return []
    total = sum(1 for i in network.infos if i.branch)
    shown = identity_cause(network, blocks)
    n_zero = sum(len(b["upstream_zero"]) for b in blocks)
    msg = (
        f"{len(blocks)} of {total} residual blocks start as the identity: their "
        f"branch output is exactly 0 ({shown})"
    )
    if n_zero:
        ex = blocks[0]["upstream_zero"][0][0]
        msg += (
            f"; the {n_zero} parameter gradients upstream of the zero in the "
            f"branches (e.g. {ex}) are exactly 0 at step 0 by design, not vanishing"
        )
    sug = (
        "nothing to fix: the zeroed parameter gets a non-zero gradient at step 0, "
        "so the branch opens after the first update (Goyal et al. 2017; De & Smith "
        "2020; Zhang et al. 2019)"
    )
    return [
        Verdict(
            "identity_blocks",
            "note",
            msg,
            sug,
            layer=blocks[0]["block"],
            evidence={"blocks": len(blocks), "upstream_zero_gradients": n_zero},
        )
    ]


def _dead(
    profile: Profile, p: Mapping[str, Any], by_design: set[int] | None = None
) -> list[Verdict]:
    if p["activation"] not in DYING_ACTIVATIONS:
        return []
    d = profile.columns["dead_fraction"].copy()
    for r in by_design or ():
        d[r] = np.nan  # zero by design in an identity block: not dying units
    if not np.any(np.isfinite(d)):
        return []
    t_w, t_p = THRESHOLDS["dead_warning"], THRESHOLDS["dead_problem"]
    worst = int(np.nanargmax(d))
    dmax = float(d[worst])
    if dmax <= t_w:
        return []
    first = int(np.flatnonzero(np.nan_to_num(d, nan=0) > t_w)[0])
    sev: Severity = "problem" if dmax > t_p else "warning"
    batch = profile.meta.get("batch_size")
    batch_txt = f" of {batch}" if batch else ""
    msg = (
        f"dying units: {_g(100 * dmax)}% of the units of {profile.name[worst]} "
        f"are zero "
        f"for every input of the batch{batch_txt} (more than {_g(100 * t_w)}% from "
        f"{profile.name[first]} on)"
    )
    depth = profile.correlation_depth()
    corr = profile.columns["correlation"]
    sig = signal_rows(profile)
    before = sig[sig <= worst]
    c_worst = float(corr[before[-1]]) if before.size else math.nan
    if p["batchnorm"] and p["beta_mean"] < 0:
        sug = f"set beta to zero (its mean is {_g(p['beta_mean'])})"
    elif p["bias_mean"] < 0:
        sug = f"set the bias to zero (its mean is {_g(p['bias_mean'])})"
    elif math.isfinite(c_worst) and c_worst > 0.5:
        at = (
            f"correlation {CORRELATION_THRESHOLD} is reached at block {depth}"
            if depth is not None
            else f"they are at correlation {c_worst:.3f} there"
        )
        # infinite-width theory predicts this: with every pair of inputs at
        # correlation c, P(a unit is <= 0 for all B inputs) stays finite at finite
        # B; neither width nor a zero-mean bias is the cause
        sug = (
            f"units die because unrelated inputs become aligned ({at}): a unit's "
            f"pre-activations then share one sign across the batch{batch_txt}, "
            "which infinite-width theory predicts at this correlation and batch "
            "size (it is not a finite-width effect); "
            + (
                "BatchNorm would hold the batch's centred correlation at -1/(B-1); "
                + (
                    "or use fewer blocks"
                    if p["residual"]
                    else "or use fewer blocks or residual connections"
                )
                if not p["batchnorm"]
                else "check gamma and beta"
            )
        )
    else:
        sug = _fix_weights(p)
    return [
        Verdict(
            "dying_units",
            sev,
            msg,
            sug,
            layer=profile.name[worst],
            evidence={"max_dead_fraction": dmax, "first_layer": profile.name[first]},
        )
    ]


def _overflow(profile: Profile, p: Mapping[str, Any]) -> list[Verdict]:
    out = []
    seen = set()
    for f in profile.findings:
        kind = str(f.get("kind", ""))
        if kind not in ("overflow", "nonfinite", "nan", "underflow"):
            continue
        key = (kind, f.get("layer"), f.get("pass"))
        if key in seen:
            continue
        seen.add(key)
        layer = f.get("layer")
        where = f" at {layer}" if layer else ""
        pas = f.get("pass")
        msg = str(f.get("message") or f"the signal hit {kind}{where}")
        if pas and pas not in msg:
            msg += f" ({pas} pass)"
        if kind == "underflow":
            sug = _fix_weights(p) if not p["batchnorm"] else "check gamma and beta"
        else:
            sug = (
                _fix_weights(p) if not p["batchnorm"] else "check gamma and beta"
            ) + ("; float64 postpones the overflow but does not remove it")
        out.append(
            Verdict(
                "overflow" if kind != "underflow" else "underflow",
                "problem",
                msg,
                sug,
                layer=layer,
                evidence=dict(f),
            )
        )
    return out


def diagnose(profile: Profile, network: Any = None) -> list[Verdict]:
    """Diagnose a profile: forward explosion/vanishing, correlation collapse, gradient
    explosion/vanishing, BatchNorm gradient explosion, dying units and overflow.

    Parameters
    ----------
    profile : Profile
        From :func:`initdiag.analyze` or :func:`initdiag.simulate`.
    network : Network, optional
        The network the profile describes (default: ``profile.network``); its init
        scheme gives the suggestions their numbers.

    Returns
    -------
    list of Verdict
        Empty when nothing crosses a threshold of :data:`THRESHOLDS`.

    Raises
    ------
    TypeError
        When ``profile`` is not a Profile or no network is known.
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"diagnose() takes a Profile, got {type(profile).__name__}")
    network = network if network is not None else profile.network
    if network is None or not hasattr(network, "infos"):
        raise TypeError(
            "diagnose() needs the network (pass network=..., or a profile whose "
            ".network is set)"
        )
    p = network_parameters(network)
    out: list[Verdict] = []
    out += _overflow(profile, p)
    out += _forward(profile, p)
    out += _correlation(profile, p)
    out += _gradients(profile, p)
    ident = identity_blocks(profile, network)
    out += _dead(profile, p, {r for b in ident for r in b["after"]})
    out += _identity(profile, network, ident)
    return out

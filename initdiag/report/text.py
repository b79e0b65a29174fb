"""Terminal output: per-layer tables (predicted vs measured), summaries, verdicts and
the study's comparison table.  Colour only when asked for (the CLI asks on a TTY)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

from ..profile import SUMMARY_KEYS, Profile
from ..verdicts import Verdict
from .study import Entry, Sentence, StudyResult, fmt

__all__ = [
    "LAYER_COLUMNS",
    "use_color",
    "elide",
    "layer_table",
    "summary_lines",
    "verdict_lines",
    "comparison_table",
    "render_entry",
    "render_study",
    "describe_network",
    "terminal_width",
]

#: the columns of the per-layer table: (column, header)
LAYER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("second_moment", "q"),
    ("mean", "mean"),
    ("correlation", "corr"),
    ("dead_fraction", "dead"),
    ("grad_second_moment", "grad q"),
    ("weight_grad_norm2", "|dW|^2"),
)

_CODES = {
    "bold": "1",
    "red": "31",
    "yellow": "33",
    "green": "32",
    "dim": "2",
    "cyan": "36",
}


def use_color(stream: IO[str]) -> bool:
    """Colour on a TTY unless ``NO_COLOR`` is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\033[{codes}m{text}\033[0m"


def elide(n: int, max_rows: int) -> list[int | None]:
    """Row positions to show: all when ``n <= max_rows``, else the first and last
    rows with ``None`` marking the elided middle."""
    if max_rows < 3 or n <= max_rows:
        return list(range(n))
    head = (max_rows - 1) // 2
    tail = max_rows - 1 - head
    return [*range(head), None, *range(n - tail, n)]


def _cell(v: float, se: float | None = None) -> str:
    s = fmt(v)
    if se is not None and np.isfinite(se):
        s += f" +-{fmt(se)}"
    return s


def terminal_width(default: int = 100) -> int:
    """Columns of the terminal (``COLUMNS`` when set), ``default`` when the output
    is not a terminal; at least 40."""
    import shutil

    return max(40, shutil.get_terminal_size((default, 24)).columns)


def _grid(
    head: Sequence[str],
    body: Sequence[Sequence[str]],
    style: _Style,
    left: int = 1,
    width: int | None = None,
) -> list[str]:
    """Aligned columns; a table wider than ``width`` is cut into several tables
    stacked vertically, each repeating the ``left`` label columns."""
    widths = [max(len(r[k]) for r in [head, *body]) for k in range(len(head))]
    limit = terminal_width() if width is None else width
    label = sum(widths[:left]) + 2 * left
    groups: list[list[int]] = [[]]
    used = label
    for k in range(left, len(head)):
        if groups[-1] and used + widths[k] > limit:
            groups.append([])
            used = label
        groups[-1].append(k)
        used += widths[k] + 2

    def line(r: Sequence[str], cols: Sequence[int]) -> str:
        return "  ".join(
            r[k].ljust(widths[k]) if k < left else r[k].rjust(widths[k]) for k in cols
        ).rstrip()

    out: list[str] = []
    for g, group in enumerate(groups):
        cols = [*range(left), *group]
        if g:
            out.append("")
        out.append(style(line(head, cols), "bold"))
        for r in body:
            text = line(r, cols)
            out.append(style(text, "dim") if r and r[0] == "..." else text)
    return out


def _blocks(tokens: Sequence[str], longest: int = 8) -> list[str]:
    """Run-length encode repeated groups: ``a b a b a b c`` -> ``3 x [a b]``, ``c``.
    At each position the group (of up to ``longest`` tokens) repeated over the most
    tokens wins; groups seen once stay as they are."""
    out: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        best_len, best_k = 1, 1
        for size in range(1, min(longest, (n - i) // 2) + 1):
            k = 1
            while tokens[i + k * size : i + (k + 1) * size] == tokens[i : i + size]:
                k += 1
            if k > 1 and k * size > best_k * best_len:
                best_len, best_k = size, k
        group = " ".join(tokens[i : i + best_len])
        out.append(f"{best_k} x [{group}]" if best_k > 1 else group)
        i += best_len * best_k
    return out


def describe_network(network: Any, width: int | None = None) -> str:
    """``network.describe()`` with repeated blocks summarised (``30 x [Dense(512->512)
    relu]``) and wrapped to ``width`` (default: the terminal's)."""
    import textwrap

    text = network.describe()
    prefix = f"{network.name}: in={network.input_dim} "
    if text.startswith(prefix):
        text = prefix + " ".join(_blocks(text[len(prefix) :].split()))
    limit = terminal_width() if width is None else width
    return "\n".join(textwrap.wrap(text, width=limit, subsequent_indent="    "))


def layer_table(
    analytic: Profile | None,
    empirical: Profile | None,
    *,
    columns: Sequence[tuple[str, str]] = LAYER_COLUMNS,
    max_rows: int = 21,
    rows: str = "all",
    color: bool = False,
    width: int | None = None,
) -> str:
    """Predicted vs measured +- standard error, one line per layer output.

    Parameters
    ----------
    analytic, empirical : Profile or None
        Either may be missing; with both, each column shows ``pred`` and ``meas``.
    columns : sequence of (column, header)
    max_rows : int
        Longer tables keep the first and last rows and elide the middle.
    rows : {"all", "dense", "activation", "batchnorm"}
        Which layer kinds to list.
    width : int, optional
        Wider tables are cut into stacked parts (default: the terminal width).
    """
    style = _Style(color)
    base = analytic if analytic is not None else empirical
    if base is None:
        return "(no profile)"
    sel = [i for i, k in enumerate(base.kind) if rows == "all" or k == rows]
    head = ["layer"]
    for _, h in columns:
        if analytic is not None:
            head.append(f"{h} pred")
        if empirical is not None:
            head.append(f"{h} meas")
    body: list[list[str]] = []
    for pos in elide(len(sel), max_rows):
        if pos is None:
            body.append(["..."] + [""] * (len(head) - 1))
            continue
        i = sel[pos]
        cells = [base.name[i]]
        for c, _ in columns:
            if analytic is not None:
                cells.append(_cell(analytic.columns[c][i]))
            if empirical is not None:
                se = empirical.se(c)
                cells.append(
                    _cell(empirical.columns[c][i], None if se is None else se[i])
                )
        body.append(cells)
    # drop columns that are n/a everywhere (e.g. a column theory does not predict),
    # unless that would drop them all: after an overflow every value is n/a, and
    # the table should say so rather than lose its columns
    keep = [0] + [
        k for k in range(1, len(head)) if any(r[k] not in ("n/a", "") for r in body)
    ]
    note = []
    if len(keep) == 1:
        keep = list(range(len(head)))
        note = ["(no finite value in any column: see the verdicts)"]
    head = [head[k] for k in keep]
    body = [[r[k] for k in keep] for r in body]
    return "\n".join([*_grid(head, body, style, width=width), *note])


def _summary_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str):
        return v
    try:
        return fmt(float(v))
    except (TypeError, ValueError):
        return str(v)


def summary_lines(analytic: Profile | None, empirical: Profile | None) -> list[str]:
    """``key  predicted  measured`` for the summary keys both engines report."""
    lines = []
    for k in SUMMARY_KEYS:
        a = analytic.summary.get(k, "-") if analytic is not None else None
        e = empirical.summary.get(k, "-") if empirical is not None else None
        parts = [f"  {k:<18}"]
        if analytic is not None:
            parts.append(f"{_summary_value(a) if a != '-' else '-':>12}")
        if empirical is not None:
            parts.append(f"{_summary_value(e) if e != '-' else '-':>12}")
        lines.append(" ".join(parts))
    head = "  " + " " * 18
    if analytic is not None:
        head += f" {'predicted':>12}"
    if empirical is not None:
        head += f" {'measured':>12}"
    return [head, *lines]


def verdict_lines(
    verdicts: Sequence[Verdict], *, color: bool = False, width: int | None = None
) -> list[str]:
    style = _Style(color)
    if not verdicts:
        return [
            style("  ok: no rule of initdiag.verdicts.THRESHOLDS is crossed", "green")
        ]
    import textwrap

    # messages are indented by 10 columns; 78 columns of text on a wide terminal
    wrap = max(30, min(78, (terminal_width() if width is None else width) - 10))
    out = []
    for v in verdicts:
        tag = style(
            f"{v.severity.upper():<7}",
            {"problem": "red", "warning": "yellow"}.get(v.severity, "cyan"),
        )
        body = textwrap.wrap(v.message, width=wrap)
        out.append(f"  {tag} {body[0]}")
        out += [f"          {ln}" for ln in body[1:]]
        fix = textwrap.wrap("fix: " + v.suggestion, width=wrap)
        out += [f"          {ln}" for ln in fix]
    return out


def render_entry(
    entry: Entry, *, color: bool = False, max_rows: int = 21, width: int | None = None
) -> str:
    """The full report of one network: table, summary, verdicts (tables and the
    network's description fitted to ``width``, default the terminal's)."""
    style = _Style(color)
    net = entry.network
    parts = [style(f"== {net.name} ==", "bold", "cyan"), describe_network(net, width)]
    parts.append("")
    meta = entry.empirical.meta if entry.empirical is not None else {}
    if meta:
        info = ", ".join(
            f"{k} {meta[k]}"
            for k in ("batch_size", "seeds", "backend", "dtype")
            if k in meta
        )
        parts.append(f"measured: {info}")
    parts.append(
        layer_table(
            entry.analytic, entry.empirical, max_rows=max_rows, color=color, width=width
        )
    )
    parts += [
        "",
        style("summary", "bold"),
        *summary_lines(entry.analytic, entry.empirical),
    ]
    for k, msg in entry.errors.items():
        parts.append(f"  ({k} profile unavailable: {msg})")
    parts += [
        "",
        style("verdicts", "bold"),
        *verdict_lines(entry.verdicts, color=color, width=width),
    ]
    return "\n".join(parts)


def comparison_table(
    summaries: Sequence[Mapping[str, Any]],
    *,
    color: bool = False,
    width: int | None = None,
) -> str:
    """One row per variant: final-layer second moment, correlation depth and last
    correlation, dead fraction, gradient ratio, chi1 and regime; each cell
    ``predicted / measured`` (measured second moment +- its standard error)."""
    style = _Style(color)
    have_pred = any("q_last" in s and s.get("source") == "analytic" for s in summaries)
    have_meas = any("q_last_meas" in s for s in summaries)

    def num(s: Mapping[str, Any], k: str, se: str | None = None) -> str:
        v = s.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        t = fmt(v)
        sv = s.get(se) if se else None
        if sv is not None and np.isfinite(sv):
            t += f"+-{fmt(sv)}"
        return t

    def corr(s: Mapping[str, Any], k: str) -> str:
        v = s.get(k)
        return "-" if v is None or v != v else f"{v:.3f}"

    def depth(s: Mapping[str, Any], k: str) -> str:
        if k not in s:
            return "-"
        return "never" if s[k] is None else str(s[k])

    def pair(a: str, b: str) -> str:
        if have_pred and have_meas:
            return f"{a} / {b}"
        return a if have_pred else b

    which = (
        "pred / meas" if have_pred and have_meas else ("pred" if have_pred else "meas")
    )
    head = [
        "variant",
        "q last",
        "corr depth",
        "corr last",
        "dead",
        "grad ratio",
        "regime (chi1)",
    ]
    body = []
    for s in summaries:
        reg = str(s.get("regime") or "-")
        chi = s.get("chi1", math.nan)
        if chi == chi:
            reg += f" ({chi:.3f})"
        body.append(
            [
                s["name"],
                pair(num(s, "q_last"), num(s, "q_last_meas", "q_last_se_meas")),
                pair(depth(s, "corr_depth"), depth(s, "corr_depth_meas")),
                pair(corr(s, "corr_last"), corr(s, "corr_last_meas")),
                pair(num(s, "dead_last"), num(s, "dead_last_meas")),
                pair(num(s, "grad_ratio"), num(s, "grad_ratio_meas")),
                reg,
            ]
        )
    lines = _grid(head, body, style, width=width)
    return "\n".join([style(f"(each cell: {which})", "dim"), *lines])


def _wrap(text: str, width: int | None = None, indent: str = "") -> str:
    """Fill a paragraph to ``width`` (default: 88 columns, or the terminal's when
    narrower)."""
    import textwrap

    if width is None:
        width = min(88, terminal_width())
    return textwrap.fill(
        text, width=width, initial_indent=indent, subsequent_indent=" " * len(indent)
    )


def render_study(
    result: StudyResult,
    *,
    color: bool = False,
    details: bool = False,
    explanation: Sequence[Sentence] | None = None,
    max_rows: int = 21,
    width: int | None = None,
) -> str:
    """A study: comparison table, explanation, per-variant verdicts (and, with
    ``details``, every variant's per-layer table)."""
    style = _Style(color)
    summaries = result.summaries()
    parts = [style(f"initdiag study: {result.name}", "bold")]
    if result.description:
        parts.append(result.description)
    sim = result.settings.get("simulate", {})
    legend = (
        "pred = mean-field theory (infinite width); q last = second moment of the "
        "last pre-activation; corr depth = first block where unrelated inputs "
        "reach correlation 0.99; corr last = their correlation at the last "
        "pre-activation; dead = fraction of the last layer's units that are zero "
        "for a whole batch; grad ratio = gradient second moment at the first "
        "pre-activation over the last one"
    )
    if any(s.get("residual") for s in summaries):
        legend += (
            " (in residual networks: the stream after each block's add in place of "
            "the pre-activations)"
        )
    if result.settings.get("empirical"):
        legend += (
            f"; meas = Monte Carlo over {sim.get('seeds', '?')} random networks, "
            f"batch {sim.get('batch_size', '?')} (+- one standard error)"
        )
    parts.append(_wrap(legend, width))
    parts += ["", comparison_table(summaries, color=color, width=width), ""]
    if any(e.training is not None for e in result.entries):
        from .training import training_rows, training_table

        rows = training_rows(result.entries)
        parts.append(style(f"Training ({rows[0]['train_steps']} steps)", "bold"))
        parts += [training_table(rows), ""]
    sentences = explanation if explanation is not None else explain_result(result)
    parts.append(style("What the numbers say", "bold"))
    for s in sentences:
        parts.append(_wrap(s.text, width, indent="- "))
    parts += ["", style("Verdicts", "bold")]
    for e in result.entries:
        parts.append(f" {e.name}:")
        w = None if width is None else width - 2
        parts += [("  " + ln) for ln in verdict_lines(e.verdicts, color=color, width=w)]
    if details:
        for e in result.entries:
            parts += ["", render_entry(e, color=color, max_rows=max_rows, width=width)]
    return "\n".join(parts)


def explain_result(result: StudyResult) -> list[Sentence]:
    return result.explanation()

"""JSON and CSV output of a study: every number of both profiles, the verdicts, the
explanation and the configuration that produced them."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from typing import IO, Any

from ..profile import ID_COLUMNS, Profile, _jsonable
from .study import StudyResult

__all__ = [
    "study_to_dict",
    "study_to_json",
    "study_to_csv",
    "write_json",
    "atomic_open",
]

SCHEMA = "initdiag.report/1"


def study_to_dict(result: StudyResult) -> dict[str, Any]:
    """A JSON-ready dict: ``{"schema", "partial", "study", "description",
    "settings", "timings", "explanation", "variants": [{"name", "network",
    "analytic", "empirical", "summary", "verdicts", "errors"}]}``; each profile as
    :meth:`Profile.to_dict` (NaN -> null, inf -> "inf").  ``partial`` is true when
    Ctrl-C stopped the run (the variants are those finished; an interrupted
    empirical profile has ``meta.partial`` and ``meta.seeds_finished``)."""
    summaries = result.summaries()
    variants = []
    for e, s in zip(result.entries, summaries, strict=True):
        s = {k: v for k, v in s.items() if k != "family"}
        variants.append(
            {
                "name": e.name,
                "network": e.network.to_dict(),
                "analytic": e.analytic.to_dict() if e.analytic is not None else None,
                "empirical": e.empirical.to_dict() if e.empirical is not None else None,
                "summary": s,
                "verdicts": [v.to_dict() for v in e.verdicts],
                "errors": dict(e.errors),
                "training": _training(e.training),
            }
        )
    return _jsonable(
        {
            "schema": SCHEMA,
            "partial": bool(getattr(result, "partial", False)),
            "study": result.name,
            "description": result.description,
            "settings": result.settings,
            "timings": result.timings,
            "explanation": [s.text for s in result.explanation()],
            "variants": variants,
        }
    )


def _training(r: Any) -> dict[str, Any] | None:
    """A variant's training in the report: everything but the per-step batch
    losses and per-tensor statistics (:meth:`TrainResult.to_json` has those)."""
    if r is None:
        return None
    d = r.to_dict()
    for k in ("step_loss", "layer_stats"):
        d.pop(k, None)
    return d


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears whole or not at all: the data
    goes to a temporary file in the same directory, renamed over ``path`` only
    when the block completes (``os.replace`` is atomic on POSIX and Windows), so an
    interrupted run never leaves a truncated report behind."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    enc = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=enc) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def study_to_json(result: StudyResult, indent: int | None = 1) -> str:
    return json.dumps(study_to_dict(result), indent=indent)


def write_json(result: StudyResult, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    with atomic_open(path) as fh:
        fh.write(study_to_json(result))
    return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return repr(v)
    s = str(v)
    return f'"{s}"' if ("," in s or '"' in s) else s


def study_to_csv(result: StudyResult) -> str:
    """One line per (variant, engine, layer) with every column of both profiles."""
    profiles: list[tuple[str, Profile]] = []
    for e in result.entries:
        for p in (e.analytic, e.empirical):
            if p is not None:
                profiles.append((e.name, p))
    cols: list[str] = []
    for _, p in profiles:
        for c in p.columns:
            if c not in cols:
                cols.append(c)
    head = ["variant", "source", *ID_COLUMNS, *cols]
    lines = [",".join(head)]
    for name, p in profiles:
        for i in range(len(p)):
            r = p.row(i)
            cells = [_cell(name), p.source, *(_cell(r[c]) for c in ID_COLUMNS)]
            cells += [_cell(r.get(c, math.nan)) for c in cols]
            lines.append(",".join(cells))
    return "\n".join(lines) + "\n"

"""Reports of profiles: terminal tables (:mod:`.text`), plots (:mod:`.plots`),
JSON / CSV (:mod:`.writers`), studies and their explanation (:mod:`.study`).

Importing this package imports none of its modules (and so neither matplotlib
nor the engines): :mod:`.plots` depends on :mod:`initdiag.profile` only, so
``Profile.plot`` does not pull the study runner in; the names below load on use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Entry",
    "Sentence",
    "StudyResult",
    "explain",
    "run_study",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".study", __name__), name)
    raise AttributeError(f"module 'initdiag.report' has no attribute {name!r}")

"""Reports of profiles: terminal tables (:mod:`.text`), plots (:mod:`.plots`),
JSON / CSV (:mod:`.writers`), studies and their explanation (:mod:`.study`).

Importing this package does not import matplotlib; :mod:`.plots` does, on use.
"""

from __future__ import annotations

from .study import Entry, Sentence, StudyResult, explain, run_study, summarize

__all__ = [
    "Entry",
    "Sentence",
    "StudyResult",
    "explain",
    "run_study",
    "summarize",
]

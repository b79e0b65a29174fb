"""Integrations with other frameworks, each behind its optional extra.

Importing :mod:`initdiag.integrations` imports no framework; each submodule
imports its own (``initdiag.integrations.torch`` needs the ``torch`` extra) and
says what to install when it is missing.  The rest of initdiag never imports
these modules.
"""

from __future__ import annotations

__all__: list[str] = []

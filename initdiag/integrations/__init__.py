"""Integrations with other frameworks, each behind its optional extra.

Importing :mod:`initdiag.integrations` imports no framework; each submodule
imports its own (``initdiag.integrations.torch`` needs the ``torch`` extra) and
says what to install when it is missing.  The rest of initdiag never imports
these modules (``initdiag torch`` imports its module when run).

- :mod:`initdiag.integrations.torch`: read a PyTorch model as an initdiag
  network (``read``), audit its parameters (``audit``), profile it analytically,
  measured and through the kernels (``diagnose``) and rescale its initialisation
  (``fix``); private helpers in ``_torch_graph`` (the model's graph: fx or a
  recorded forward), ``_torch_map`` (graph -> layers, coverage), ``_torch_laws``
  (a tensor's law), ``_torch_audit``, ``_torch_measure``, ``_torch_fix``.
"""

from __future__ import annotations

__all__: list[str] = []

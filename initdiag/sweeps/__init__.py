"""Sweeps: grids of initialisations on a local process pool or a Dask cluster, with
resumable results in SQLite.

- :mod:`~initdiag.sweeps.grid`: grid syntax, parameter paths, expansion, validation,
  point keys and seeds;
- :mod:`~initdiag.sweeps.store`: the database schema, reading and exports;
- :mod:`~initdiag.sweeps.executors`: the local pool and Dask behind one interface;
- :mod:`~initdiag.sweeps.compute`: what a worker runs;
- :mod:`~initdiag.sweeps.run`: :func:`sweep`, the driver;
- :mod:`~initdiag.sweeps.report`: heatmaps and line plots from a database;
- :mod:`~initdiag.sweeps.cli`: ``initdiag sweep`` and ``initdiag sweep-report``.

The function is ``initdiag.sweep``; the package is named ``sweeps`` so that
importing one of its modules never replaces that attribute with a module.
"""

from __future__ import annotations

from .grid import GridError
from .run import DEFAULT_MAX_POINTS, SweepResult, sweep
from .store import export_csv, export_parquet, read_points, to_frame

__all__ = [
    "DEFAULT_MAX_POINTS",
    "GridError",
    "SweepResult",
    "export_csv",
    "export_parquet",
    "read_points",
    "sweep",
    "to_frame",
]

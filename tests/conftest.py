"""Test-session setup.

The CUDA kernels are tested under numba's CUDA simulator, which must be switched on
before numba is first imported; nothing else in numba looks at this variable, so the
CPU kernels are unaffected.  The PTX compile test runs in a subprocess without it.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Matplotlib must never try to open a display in the tests.
os.environ.setdefault("MPLBACKEND", "Agg")

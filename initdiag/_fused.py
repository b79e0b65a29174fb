"""Former home of the fused passes, now :mod:`initdiag.kernels.fused`.

Kept so that existing imports (``from initdiag import _fused``: tests/test_empirical.py)
keep working until they are ported: the name is bound to the new module itself, so
monkeypatching through it patches the kernels.  Delete once nothing imports it.
"""

import sys

from .kernels import fused as _fused

sys.modules[__name__] = _fused

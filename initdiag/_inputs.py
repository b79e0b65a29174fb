"""The default inputs both engines describe: every input feature has second moment
``input_second_moment`` and every pair of inputs correlation ``input_correlation``
(``x_b = sqrt(q0) (sqrt(c) z_0 + sqrt(1 - c) z_b)`` per feature for the Monte
Carlo).  One validator, so both engines accept the same values."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_input_moments"]


def check_input_moments(q0: Any, c0: Any) -> tuple[float, float]:
    """``(q0, c0)`` as floats, or ValueError / TypeError naming the argument.

    ``input_second_moment`` must be finite and > 0; ``input_correlation`` in
    [0, 1] (a negative correlation shared by every pair of a batch is not a
    distribution for B > 2)."""
    out = []
    for value, what in ((q0, "input_second_moment"), (c0, "input_correlation")):
        if isinstance(value, bool):
            raise TypeError(f"{what} must be a number, got {value!r}")
        try:
            out.append(float(value))
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"{what} must be a number, got {value!r}") from None
    q, c = out
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"input_second_moment must be a finite number > 0, got {q0!r}")
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"input_correlation must be in [0, 1], got {c0!r}")
    return q, c

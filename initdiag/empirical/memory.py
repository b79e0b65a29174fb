"""How much memory ``simulate`` needs, checked before anything large exists."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

__all__ = ["parse_bytes", "available_memory", "estimate_memory", "fmt_bytes"]

#: widest network whose exact Jacobian singular values are computed (SVD)
EXACT_JACOBIAN_MAX_WIDTH = 512

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"2GB"``, ``"512 MiB"``, ``"1.5e9"``."""
    if isinstance(value, bool):
        raise TypeError(
            f"memory_limit must be bytes or a string like '2GB', got {value!r}"
        )
    if isinstance(value, (int, np.integer)):
        out = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"memory_limit must be finite, got {value!r}")
        out = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value
        )
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read memory_limit {value!r}; use bytes or a string like "
                f"'2GB', '512MiB'"
            )
        out = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(
            "memory_limit must be bytes or a string like '2GB', got "
            f"{type(value).__name__}"
        )
    if out <= 0:
        raise ValueError(f"memory_limit must be positive, got {value!r}")
    return out


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where unreadable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate_memory(
    network: Any, batch_size: int, dtype: Any = "float32", jacobian: bool = False
) -> dict[str, int]:
    """Peak bytes ``simulate`` needs for one seed, by part.

    Parts: ``parameters`` (every parameter tensor, kept for backward), ``saved``
    (what backward keeps per layer, :meth:`initdiag.layers.Layer.memory`),
    ``workspace`` (live batch buffers, gradients and dW when formed) and ``total``.
    Seeds that run concurrently need this much each; ``simulate`` runs fewer at
    once when their total would exceed the available memory or ``memory_limit``.
    """
    item = np.dtype(dtype).itemsize
    B = int(batch_size)
    params = saved = 0
    widest = network.input_dim
    work_extra = 0
    for info in network.infos:
        layer = info.layer
        widest = max(widest, info.width)
        for slot in layer.slots():
            params += math.prod(layer.param_shape(slot, info.fan_in, info.width)) * item
        kept, work = layer.memory(B, info.fan_in, info.width, item)
        saved += kept
        work_extra = max(work_extra, work)
    # forward: input, output, pre-activation; backward: gradient in/out + tangent;
    # a lone seed on several lanes: two gradient copies and two B x B Grams
    # (empirical.fused.FusedExecutor._dx_then_norm)
    workspace = 6 * B * widest * item + 2 * B * B * item + work_extra
    if jacobian:
        workspace += 4 * B * widest * item
        if widest <= EXACT_JACOBIAN_MAX_WIDTH:
            workspace += 3 * widest * widest * 8
    return {
        "parameters": params,
        "saved": saved,
        "workspace": workspace,
        "total": params + saved + workspace,
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover

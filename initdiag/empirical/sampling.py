"""Every random number of ``simulate``: parameters, default inputs, output gradients.

Parameters come from :mod:`initdiag._rng` (counter-based Philox4x32-10), one key
per ``(rng, seed, layer)`` and one stream per parameter slot (the slot's position
in the layer's ``slot_table``), so results are bit-identical whatever the thread
count.  Initializers without a closed-form distribution (truncated normal,
orthogonal) use their own ``sample`` with a numpy Generator seeded from the same
stream name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _rng

__all__ = [
    "sample_param",
    "fill_param",
    "layer_params",
    "output_grad",
    "default_inputs",
    "check_array",
]

# key words naming the non-parameter streams (parameters use the layer index)
INPUT_STREAM = 2**31
OUTGRAD_STREAM = 2**31 + 1
PROBE_STREAM = 2**31 + 2


def check_array(a: Any, shape: tuple[int, int], what: str, dt: np.dtype) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(
            f"{what} must be a numpy array, got {type(a).__name__}"
        ) from exc
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if (
        arr.ndim != 2
        or arr.shape[1] != shape[1]
        or (shape[0] and arr.shape[0] != shape[0])
    ):
        want = f"({shape[0] or 'B'}, {shape[1]})"
        raise ValueError(f"{what} must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or inf")
    return np.ascontiguousarray(arr, dtype=dt)


def sample_param(
    init: Any,
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    dt: np.dtype,
    entropy: int,
    seed: int,
    layer: int,
    slot: int,
) -> np.ndarray:
    """One parameter tensor from its own stream (seed, layer, slot): Philox for the
    closed-form distributions, a numpy Generator on the same stream otherwise."""
    if init.distribution(fan_in, fan_out) is None:
        gen = _rng.numpy_generator(entropy, seed, layer, slot)
        arr = init.sample(shape, fan_in, fan_out, gen, dt)
        return np.ascontiguousarray(arr, dtype=dt)
    out = np.empty(shape, dtype=dt)
    return fill_param(out, init, fan_in, fan_out, dt, entropy, seed, layer, slot)


def layer_params(
    info: Any,
    p: dict[str, Any],
    dt: np.dtype,
    entropy: int,
    seed: int,
    buf: Any = None,
) -> dict[str, np.ndarray]:
    """Every parameter tensor of layer ``info`` by slot name, each from its stream
    (slot ``k`` of the layer's ``slot_table``), with the layer's fans and shapes;
    into ``buf(slot_name, shape)`` when given (kept buffers, same values)."""
    layer = info.layer
    fi, fo = info.fans
    out = {}
    for k, slot in enumerate(layer.slot_table):
        if p.get(slot.name) is None:
            continue
        shape = layer.param_shape(slot, info.fan_in, info.width)
        args = (p[slot.name], fi, fo, dt, entropy, seed, info.index, k)
        if buf is None:
            out[slot.name] = sample_param(args[0], shape, *args[1:])
        else:
            out[slot.name] = fill_param(buf(slot.name, shape), *args)
    return out


def fill_param(
    out: np.ndarray,
    init: Any,
    fan_in: int,
    fan_out: int,
    dt: np.dtype,
    entropy: int,
    seed: int,
    layer: int,
    slot: int,
) -> np.ndarray:
    """:func:`sample_param` into a preallocated buffer (same values)."""
    dist = init.distribution(fan_in, fan_out)
    if dist is None:
        out[...] = sample_param(
            init, out.shape, fan_in, fan_out, dt, entropy, seed, layer, slot
        )
        return out
    if dist[0] == "constant":  # no key needed
        out.fill(dist[1])
        return out
    return _rng.fill(out, dist, _rng.derive_key(entropy, seed, layer), slot)


def output_grad(
    spec: Any,
    y: np.ndarray,
    dt: np.dtype,
    entropy: int,
    seed: int,
    out: np.ndarray | None = None,
):
    """The output gradient of one seed: fresh standard Gaussian (into ``out`` when
    given), the user's array, or the user's callable applied to the network output."""
    if spec is None:
        key = _rng.derive_key(entropy, seed, OUTGRAD_STREAM)
        if out is None:
            out = np.empty(y.shape, dtype=dt)
        return _rng.fill_normal(out, key, 0)
    if callable(spec):
        return check_array(spec(y.copy()), y.shape, "output_grad(output)", dt)
    return spec


def default_inputs(
    B: int,
    d: int,
    q: float,
    c: float,
    dt: np.dtype,
    entropy: int,
    seed: int,
    out: np.ndarray | None = None,
):
    key = _rng.derive_key(entropy, seed, INPUT_STREAM)
    if out is None:
        out = np.empty((B, d), dtype=dt)
    x = _rng.fill_normal(out, key, 0)
    if c > 0.0:
        z0 = _rng.fill_normal(np.empty((1, d), dtype=dt), key, 1)
        x *= dt.type(math.sqrt(1.0 - c))
        x += dt.type(math.sqrt(c)) * z0
    if q != 1.0:
        x *= dt.type(math.sqrt(q))
    return x

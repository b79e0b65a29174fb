"""Fast, parallel, reproducible parameter sampling (counter-based Philox4x32-10).

Every entry ``i`` of a sampled tensor is a pure function of ``(key, stream, i)``: the
Philox4x32-10 block cipher (Salmon, Moraes, Dror, Shaw 2011, "Parallel random numbers:
as easy as 1, 2, 3", SC'11) encrypts the counter ``(i // 4, stream)`` under a 64-bit
key and yields four 32-bit words for entries ``4 (i // 4) .. 4 (i // 4) + 3``.  The
output therefore does not depend on how the work is split between threads: results
are bit-identical whatever ``numba.set_num_threads`` says.

Normals come from the Box-Muller transform (Box & Muller 1958) of two 32-bit words,
``z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)`` with ``u1 = (k + 1) / 2^32``, evaluated
in float64 with branch-free polynomial ``log`` / ``sin`` / ``cos`` (absolute error
< 1e-10, far below float32 rounding) so that the loop vectorises without a vector math
library; the largest |z| is sqrt(64 ln 2) = 6.66.  Uniforms use the top 24 bits
(``u = (k + 0.5) / 2^24``, never exactly 0 or 1).

Keys: :func:`derive_key` hashes ``(entropy, *words)`` with numpy's
:class:`~numpy.random.SeedSequence` (so ``(rng, seed, layer)`` give independent keys).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

__all__ = [
    "derive_key",
    "entropy_of",
    "fill",
    "fill_normal",
    "fill_uniform",
    "numpy_generator",
    "philox4x32",
]

_MASK = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_U32 = np.uint64(32)
# entries per prange task: big enough to amortise scheduling, small enough to balance
_CHUNK = 1 << 15


@njit(cache=True, inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 words holding 32-bit values."""
    for r in range(10):
        if r > 0:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0 = p0 >> _U32
        lo0 = p0 & _MASK
        hi1 = p1 >> _U32
        lo1 = p1 & _MASK
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
    return c0, c1, c2, c3


@njit(cache=True)
def philox4x32(counter, key):
    """Philox4x32-10 of one counter (4 uint32) under a key (2 uint32), for tests."""
    c = _philox(
        np.uint64(counter[0]),
        np.uint64(counter[1]),
        np.uint64(counter[2]),
        np.uint64(counter[3]),
        np.uint64(key[0]),
        np.uint64(key[1]),
    )
    out = np.empty(4, np.uint32)
    for i in range(4):
        out[i] = np.uint32(c[i])
    return out


_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_HALF_PI = 0.5 * math.pi


@njit(cache=True, inline="always")
def _neg2log(a):
    """-2 ln((a + 1) / 2^32) for a 32-bit word ``a`` (uint64), branch-free."""
    k = a + np.uint64(1)
    t = k
    e = np.uint64(0)
    for sh in (16, 8, 4, 2, 1):
        s = np.uint64(sh) if t >= (np.uint64(1) << np.uint64(sh)) else np.uint64(0)
        t = t >> s
        e = e + s
    # m = k / 2^e in [1, 2]
    m = float(k) * (float(np.uint64(1) << (np.uint64(32) - e)) * 2.3283064365386963e-10)
    ef = float(e)
    if m > _SQRT2:
        m = 0.5 * m
        ef = ef + 1.0
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    # 2 atanh(s), |s| <= 0.1716: truncation error < 1e-11
    lm = 2.0 * s * (
        1.0
        + s2 * (1.0 / 3.0 + s2 * (0.2 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 / 11.0))))
    )
    v = -2.0 * ((ef - 32.0) * _LN2 + lm)
    return v if v > 0.0 else 0.0


@njit(cache=True, inline="always")
def _sincos_uniform(b):
    """(cos t, sin t) for t uniform on the circle, from a 32-bit word (uint64)."""
    q = b >> np.uint64(30)
    f = (float(b & np.uint64(0x3FFFFFFF)) + 0.5) * 9.313225746154785e-10
    a = (f - 0.5) * _HALF_PI
    a2 = a * a
    sn = a * (
        1.0
        - a2
        * (
            1.0 / 6.0
            - a2 * (1.0 / 120.0 - a2 * (1.0 / 5040.0 - a2 * (1.0 / 362880.0 - a2 / 39916800.0)))
        )
    )
    cs = 1.0 - a2 * (
        0.5
        - a2
        * (
            1.0 / 24.0
            - a2
            * (1.0 / 720.0 - a2 * (1.0 / 40320.0 - a2 * (1.0 / 3628800.0 - a2 / 479001600.0)))
        )
    )
    # rotate by q quarter turns
    if q == np.uint64(0):
        return cs, sn
    if q == np.uint64(1):
        return -sn, cs
    if q == np.uint64(2):
        return -cs, -sn
    return sn, -cs


@njit(cache=True, inline="always")
def _normal4(j, stream, k0, k1):
    x0, x1, x2, x3 = _philox(
        j & _MASK, j >> _U32, stream, np.uint64(0), k0, k1
    )
    r0 = math.sqrt(_neg2log(x0))
    c0, s0 = _sincos_uniform(x1)
    r1 = math.sqrt(_neg2log(x2))
    c1, s1 = _sincos_uniform(x3)
    return r0 * c0, r0 * s0, r1 * c1, r1 * s1


@njit(cache=True, parallel=True)
def _fill_normal_kernel(out, k0, k1, stream, mean, std):
    """out[i] = mean + std * N(0, 1)_(key, stream, i)."""
    n = out.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nchunks):
        start = c * _CHUNK
        stop = min(start + _CHUNK, n)
        for j in range(start // 4, (stop + 3) // 4):
            z0, z1, z2, z3 = _normal4(np.uint64(j), stream, k0, k1)
            i = 4 * j
            if i + 3 < stop:
                out[i] = mean + std * z0
                out[i + 1] = mean + std * z1
                out[i + 2] = mean + std * z2
                out[i + 3] = mean + std * z3
            else:
                if i < stop:
                    out[i] = mean + std * z0
                if i + 1 < stop:
                    out[i + 1] = mean + std * z1
                if i + 2 < stop:
                    out[i + 2] = mean + std * z2


@njit(cache=True, parallel=True)
def _fill_uniform_kernel(out, k0, k1, stream, lo, hi):
    """out[i] = lo + (hi - lo) * U(0, 1)_(key, stream, i), 24-bit uniforms."""
    n = out.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    w = (hi - lo) * 5.960464477539063e-08
    for c in prange(nchunks):
        start = c * _CHUNK
        stop = min(start + _CHUNK, n)
        for j in range(start // 4, (stop + 3) // 4):
            x0, x1, x2, x3 = _philox(
                np.uint64(j) & _MASK, np.uint64(j) >> _U32, stream, np.uint64(0), k0, k1
            )
            i = 4 * j
            sh = np.uint64(8)
            if i < stop:
                out[i] = lo + w * (float(x0 >> sh) + 0.5)
            if i + 1 < stop:
                out[i + 1] = lo + w * (float(x1 >> sh) + 0.5)
            if i + 2 < stop:
                out[i + 2] = lo + w * (float(x2 >> sh) + 0.5)
            if i + 3 < stop:
                out[i + 3] = lo + w * (float(x3 >> sh) + 0.5)


def entropy_of(rng: Any) -> int:
    """A non-negative integer that seeds every stream of one ``simulate`` call.

    ``int`` -> itself; ``numpy.random.Generator`` -> one draw from it; ``None`` -> fresh
    OS entropy; a ``SeedSequence`` -> its entropy.
    """
    if rng is None:
        return int(np.random.SeedSequence().entropy)
    if isinstance(rng, np.random.SeedSequence):
        return int(rng.entropy)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63 - 1))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"rng must be a non-negative integer, got {rng}")
        return int(rng)
    raise TypeError(
        f"rng must be an int, a numpy Generator, a SeedSequence or None, got "
        f"{type(rng).__name__}"
    )


def derive_key(entropy: int, *words: int) -> tuple[int, int]:
    """Philox key (two uint32) for the stream named by ``(entropy, *words)``."""
    state = np.random.SeedSequence([int(entropy), *[int(w) for w in words]])
    k = state.generate_state(2, np.uint32)
    return int(k[0]), int(k[1])


def numpy_generator(entropy: int, *words: int) -> np.random.Generator:
    """A numpy Generator for the same stream name (for initializers that only
    implement ``sample``: truncated normal, orthogonal)."""
    return np.random.Generator(
        np.random.Philox(np.random.SeedSequence([int(entropy), *[int(w) for w in words]]))
    )


def fill_normal(
    out: np.ndarray, key: tuple[int, int], stream: int = 0, mean: float = 0.0,
    std: float = 1.0,
) -> np.ndarray:
    """Fill a contiguous float32/float64 array with N(mean, std^2) entries in place."""
    flat = out.reshape(-1)
    _fill_normal_kernel(
        flat, np.uint64(key[0]), np.uint64(key[1]), np.uint64(stream),
        flat.dtype.type(mean), flat.dtype.type(std),
    )
    return out


def fill_uniform(
    out: np.ndarray, key: tuple[int, int], stream: int = 0, low: float = 0.0,
    high: float = 1.0,
) -> np.ndarray:
    """Fill a contiguous float32/float64 array with U(low, high) entries in place."""
    flat = out.reshape(-1)
    _fill_uniform_kernel(
        flat, np.uint64(key[0]), np.uint64(key[1]), np.uint64(stream),
        float(low), float(high),
    )
    return out


def fill(
    out: np.ndarray, dist: tuple[str, float, float], key: tuple[int, int],
    stream: int = 0,
) -> np.ndarray:
    """Fill ``out`` from an ``Initializer.distribution()`` triple."""
    kind, p, q = dist
    if kind == "normal":
        return fill_normal(out, key, stream, p, q)
    if kind == "uniform":
        return fill_uniform(out, key, stream, p, q)
    if kind == "constant":
        out.fill(p)
        return out
    raise ValueError(f"unknown distribution kind {kind!r}")

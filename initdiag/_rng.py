"""Fast, parallel, reproducible parameter sampling (counter-based Philox4x32-10).

Every entry ``i`` of a sampled tensor is a pure function of ``(key, stream, i)``: the
Philox4x32-10 block cipher (Salmon, Moraes, Dror, Shaw 2011, "Parallel random numbers:
as easy as 1, 2, 3", SC'11) encrypts the counter ``(i // 4, stream)`` under a 64-bit
key and yields four 32-bit words for entries ``4 (i // 4) .. 4 (i // 4) + 3``.  The
output therefore does not depend on how the work is split between threads: results
are bit-identical whatever ``numba.set_num_threads`` says.

Normals come from the Box-Muller transform (Box & Muller 1958) of two 32-bit words,
``z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)`` with ``u1 = (k + 1) / 2^32``,
evaluated
in float64 with branch-free polynomial ``log`` / ``sin`` / ``cos`` (absolute error
< 1e-10, far below float32 rounding) so that the loop vectorises without a vector math
library; the largest |z| is sqrt(64 ln 2) = 6.66.  float32 outputs use the same
Philox words with float32 arithmetic throughout (16 SIMD lanes instead of 8: 0.58 vs
1.1 ns per sample per thread): ``u1 = ((k >> 8) + 1) / 2^24`` (largest |z|
sqrt(48 ln 2) = 5.77) and polynomials accurate to ~1e-8, so float32 normals are not
the float64 ones rounded: they agree to float32 rounding except in the far tail
(tests/test_empirical.py).  Uniforms use the top 24 bits
(``u = (k + 0.5) / 2^24``, never exactly 0 or 1).

Dropout keep masks (:func:`fill_keep_mask`) read the same words as the float64
uniforms: entry ``i`` is kept (1) iff ``u_i >= p`` with ``u_i = (m_i + 0.5) / 2^24``,
``m_i`` the top 24 bits of word ``i``; compared as integers, ``m_i >= ceil(p 2^24 -
0.5)``, which is the same test exactly (``p 2^24`` and the subtraction are exact in
float64), so ``fill_keep_mask(out, key, s, p)`` equals ``fill_uniform(u, key, s) >= p``
for a float64 ``u`` (a float32 ``u`` rounds ``u_i`` to 24 bits and may differ at
ties).  P(keep) = ``(2^24 - t) / 2^24`` with ``t = ceil(p 2^24 - 0.5)``, i.e. 1 - p
to within 2^-25.

Keys: :func:`derive_key` hashes ``(entropy, *words)`` with numpy's
:class:`~numpy.random.SeedSequence` (so ``(rng, seed, layer)`` give independent keys).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .kernels._threading import ensure_configured, njit, prange

__all__ = [
    "derive_key",
    "entropy_of",
    "fill",
    "fill_keep_mask",
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


@njit(cache=True, inline="always", error_model="numpy")
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


@njit(cache=True, error_model="numpy")
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


@njit(cache=True, inline="always", error_model="numpy")
def _sincos_uniform(b):
    """(cos t, sin t) for t uniform on the circle, from a 32-bit word (as int64).

    The top two bits pick the quadrant, the other 30 the angle inside it (Taylor
    series on [-pi/4, pi/4], error < 1e-12); the quadrant rotation is written with
    selects (no branch).
    """
    q = b >> 30
    f = (float(b & 0x3FFFFFFF) + 0.5) * 9.313225746154785e-10
    a = (f - 0.5) * _HALF_PI
    a2 = a * a
    sn = a * (
        1.0
        - a2
        * (
            1.0 / 6.0
            - a2
            * (
                1.0 / 120.0
                - a2 * (1.0 / 5040.0 - a2 * (1.0 / 362880.0 - a2 / 39916800.0))
            )
        )
    )
    cs = 1.0 - a2 * (
        0.5
        - a2
        * (
            1.0 / 24.0
            - a2
            * (
                1.0 / 720.0
                - a2 * (1.0 / 40320.0 - a2 * (1.0 / 3628800.0 - a2 / 479001600.0))
            )
        )
    )
    # rotate by q quarter turns: q=0 (c, s), 1 (-s, c), 2 (-c, -s), 3 (s, -c)
    odd = (q & 1) == 1
    x = sn if odd else cs
    y = cs if odd else sn
    negx = (q == 1) | (q == 2)
    negy = q >= 2
    return (-x if negx else x), (-y if negy else y)


@njit(cache=True, error_model="numpy")
def _philox_block(j0, nb, stream, k0, k1, w0, w1, w2, w3):
    """Words of counters ``(j0 + t, stream)``, t < nb, into four uint32 arrays
    (straight-line loop over independent counters: vectorises)."""
    for t in range(nb):
        j = j0 + np.uint64(t)
        x0, x1, x2, x3 = _philox(j & _MASK, j >> _U32, stream, np.uint64(0), k0, k1)
        w0[t] = np.uint32(x0)
        w1[t] = np.uint32(x1)
        w2[t] = np.uint32(x2)
        w3[t] = np.uint32(x3)


@njit(cache=True, error_model="numpy")
def _chunk_words(c, n, stream, k0, k1):
    """(start, stop, w0, w1, w2, w3): entries start .. stop - 1 of chunk ``c`` (of
    ``_CHUNK`` entries, the last one shorter) and the Philox words covering them;
    entry ``start + i`` takes :func:`_word` ``i``."""
    start = c * _CHUNK
    stop = min(start + _CHUNK, n)
    nb = (stop - start + 3) // 4
    w0 = np.empty(nb, np.uint32)
    w1 = np.empty(nb, np.uint32)
    w2 = np.empty(nb, np.uint32)
    w3 = np.empty(nb, np.uint32)
    _philox_block(np.uint64(start // 4), nb, stream, k0, k1, w0, w1, w2, w3)
    return start, stop, w0, w1, w2, w3


@njit(cache=True, inline="always", error_model="numpy")
def _word(w0, w1, w2, w3, i):
    """Word ``i % 4`` of counter ``i // 4`` of a chunk (selects: no branch)."""
    t = i >> 2
    q = i & 3
    return w0[t] if q == 0 else (w1[t] if q == 1 else (w2[t] if q == 2 else w3[t]))


@njit(cache=True, error_model="numpy")
def _radius_block(w, nb, d, r):
    """r[t] = sqrt(-2 ln((w[t] + 1) / 2^32)) for 32-bit words ``w`` (d: scratch).

    ``(w + 1)`` is exact in float64; its exponent and mantissa are read from the bits
    (int64 view), so the loops are integer / float arithmetic only and vectorise.
    ``ln m`` for ``m in [1/sqrt2, sqrt2)`` uses ``2 atanh((m - 1) / (m + 1))``
    (series, truncation error < 1e-11)."""
    for t in range(nb):
        d[t] = float(np.int64(w[t])) + 1.0
    di = d.view(np.int64)
    for t in range(nb):
        bits = di[t]
        r[t] = float((bits >> 52) - 1023)
        di[t] = (bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000  # mantissa in [1, 2)
    for t in range(nb):
        m = d[t]
        ef = r[t] - 32.0
        hi = m > _SQRT2
        m = 0.5 * m if hi else m
        ef = ef + 1.0 if hi else ef
        s = (m - 1.0) / (m + 1.0)
        s2 = s * s
        lm = (
            2.0
            * s
            * (
                1.0
                + s2
                * (
                    1.0 / 3.0
                    + s2 * (0.2 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 / 11.0)))
                )
            )
        )
        r[t] = math.sqrt(max(-2.0 * (ef * _LN2 + lm), 0.0))


@njit(cache=True, error_model="numpy")
def _box_muller_block(w0, w1, w2, w3, nb, z, d, r0, r1, mean, std):
    """z[4t + k] = mean + std * (Box-Muller of word pairs (w0, w1), (w2, w3)), k < 4
    (straight-line loops; d, r0, r1 are float64 scratch; z may be the output)."""
    _radius_block(w0, nb, d, r0)
    _radius_block(w2, nb, d, r1)
    for t in range(nb):
        c0, s0 = _sincos_uniform(np.int64(w1[t]))
        c1, s1 = _sincos_uniform(np.int64(w3[t]))
        z[4 * t] = mean + std * (r0[t] * c0)
        z[4 * t + 1] = mean + std * (r0[t] * s0)
        z[4 * t + 2] = mean + std * (r1[t] * c1)
        z[4 * t + 3] = mean + std * (r1[t] * s1)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _fill_normal_kernel(out, k0, k1, stream, mean, std):
    """out[i] = mean + std * N(0, 1)_(key, stream, i).

    Chunks of ``_CHUNK`` entries (a multiple of 4, so chunk boundaries never split a
    counter) are independent tasks; inside a chunk straight-line passes (Philox
    words; radius; angle, scale and store) let LLVM vectorise.
    Entry i depends only on (key, stream, i): identical for any thread count.
    """
    n = out.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nchunks):
        start, stop, w0, w1, w2, w3 = _chunk_words(c, n, stream, k0, k1)
        nb = w0.size
        d = np.empty(nb, np.float64)
        r0 = np.empty(nb, np.float64)
        r1 = np.empty(nb, np.float64)
        if stop - start == 4 * nb:  # whole counters: straight into the output
            _box_muller_block(w0, w1, w2, w3, nb, out[start:stop], d, r0, r1, mean, std)
        else:
            z = np.empty(4 * nb, np.float64)
            _box_muller_block(w0, w1, w2, w3, nb, z, d, r0, r1, mean, std)
            for i in range(stop - start):
                out[start + i] = z[i]


_F32 = np.float32
_LN2_HI32 = np.float32(0.693359375)  # 9 significant bits: e * _LN2_HI32 is exact
_LN2_LO32 = np.float32(math.log(2.0) - 0.693359375)
_SQRT2_32 = np.float32(math.sqrt(2.0))
_HALF_PI32 = np.float32(0.5 * math.pi)
_TWO_M30_32 = np.float32(2.0**-30)


@njit(cache=True, error_model="numpy")
def _radius_block32(w, nb, d, r):
    """float32 ``r[t] = sqrt(-2 ln u)``, ``u = ((w[t] >> 8) + 1) / 2^24`` (24-bit
    uniform on (0, 1], exact in float32); ``ln`` from the exponent / mantissa bits and
    ``2 atanh((m - 1) / (m + 1))`` on ``[1/sqrt2, sqrt2)`` (series to s^9, truncation
    < 3e-9 relative), ``e ln 2`` in two parts (no cancellation loss near u = 1)."""
    di = d.view(np.int32)
    for t in range(nb):
        d[t] = _F32(np.int32(w[t] >> np.uint32(8)) + np.int32(1))
    for t in range(nb):
        bits = di[t]
        r[t] = _F32((bits >> 23) - 127 - 24)
        di[t] = (bits & 0x7FFFFF) | 0x3F800000  # mantissa in [1, 2)
    for t in range(nb):
        m = d[t]
        ef = r[t]
        hi = m > _SQRT2_32
        m = _F32(0.5) * m if hi else m
        ef = ef + _F32(1.0) if hi else ef
        s = (m - _F32(1.0)) / (m + _F32(1.0))
        s2 = s * s
        lm = (
            _F32(2.0)
            * s
            * (
                _F32(1.0)
                + s2
                * (
                    _F32(1.0 / 3.0)
                    + s2 * (_F32(0.2) + s2 * (_F32(1.0 / 7.0) + s2 * _F32(1.0 / 9.0)))
                )
            )
        )
        lu = ef * _LN2_HI32 + (ef * _LN2_LO32 + lm)
        r[t] = math.sqrt(max(_F32(-2.0) * lu, _F32(0.0)))


@njit(cache=True, inline="always", error_model="numpy")
def _sincos_uniform32(b):
    """float32 (cos t, sin t), t uniform on the circle, from a 32-bit word (int32
    arithmetic on the low 30 bits; Taylor series on [-pi/4, pi/4], error < 2e-9)."""
    q = b >> np.uint32(30)
    f = (_F32(np.int32(b & np.uint32(0x3FFFFFFF))) + _F32(0.5)) * _TWO_M30_32
    a = (f - _F32(0.5)) * _HALF_PI32
    a2 = a * a
    sn = a * (
        _F32(1.0)
        - a2
        * (
            _F32(1.0 / 6.0)
            - a2 * (_F32(1.0 / 120.0) - a2 * (_F32(1.0 / 5040.0) - a2 / _F32(362880.0)))
        )
    )
    cs = _F32(1.0) - a2 * (
        _F32(0.5)
        - a2
        * (
            _F32(1.0 / 24.0)
            - a2
            * (_F32(1.0 / 720.0) - a2 * (_F32(1.0 / 40320.0) - a2 / _F32(3628800.0)))
        )
    )
    odd = (q & np.uint32(1)) == np.uint32(1)
    x = sn if odd else cs
    y = cs if odd else sn
    negx = (q == np.uint32(1)) | (q == np.uint32(2))
    negy = q >= np.uint32(2)
    return (-x if negx else x), (-y if negy else y)


@njit(cache=True, error_model="numpy")
def _box_muller_block32(w0, w1, w2, w3, nb, z, d, r0, r1, mean, std):
    """:func:`_box_muller_block` in float32 arithmetic (float32 outputs)."""
    _radius_block32(w0, nb, d, r0)
    _radius_block32(w2, nb, d, r1)
    for t in range(nb):
        c0, s0 = _sincos_uniform32(w1[t])
        c1, s1 = _sincos_uniform32(w3[t])
        z[4 * t] = mean + std * (r0[t] * c0)
        z[4 * t + 1] = mean + std * (r0[t] * s0)
        z[4 * t + 2] = mean + std * (r1[t] * c1)
        z[4 * t + 3] = mean + std * (r1[t] * s1)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _fill_normal_kernel32(out, k0, k1, stream, mean, std):
    """:func:`_fill_normal_kernel` for float32 ``out`` with float32 Box-Muller
    (:func:`_box_muller_block32`); entry i depends only on (key, stream, i)."""
    n = out.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nchunks):
        start, stop, w0, w1, w2, w3 = _chunk_words(c, n, stream, k0, k1)
        nb = w0.size
        d = np.empty(nb, np.float32)
        r0 = np.empty(nb, np.float32)
        r1 = np.empty(nb, np.float32)
        if stop - start == 4 * nb:
            _box_muller_block32(
                w0, w1, w2, w3, nb, out[start:stop], d, r0, r1, mean, std
            )
        else:
            z = np.empty(4 * nb, np.float32)
            _box_muller_block32(w0, w1, w2, w3, nb, z, d, r0, r1, mean, std)
            for i in range(stop - start):
                out[start + i] = z[i]


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _fill_uniform_kernel(out, k0, k1, stream, lo, hi):
    """out[i] = lo + (hi - lo) * U(0, 1)_(key, stream, i), 24-bit uniforms."""
    n = out.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    w = (hi - lo) * 5.960464477539063e-08
    sh = np.uint32(8)
    for c in prange(nchunks):
        start, stop, w0, w1, w2, w3 = _chunk_words(c, n, stream, k0, k1)
        for i in range(stop - start):
            x = _word(w0, w1, w2, w3, i)
            out[start + i] = lo + w * (float(x >> sh) + 0.5)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _fill_keep_mask_kernel(out, k0, k1, stream, thr):
    """out[i] = 1 if the 24-bit uniform of (key, stream, i) is kept (its top 24
    bits >= ``thr``), else 0; out uint8."""
    n = out.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    sh = np.uint32(8)
    one = np.uint8(1)
    zero = np.uint8(0)
    for c in prange(nchunks):
        start, stop, w0, w1, w2, w3 = _chunk_words(c, n, stream, k0, k1)
        for i in range(stop - start):
            x = _word(w0, w1, w2, w3, i)
            out[start + i] = one if (x >> sh) >= thr else zero


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
        np.random.Philox(
            np.random.SeedSequence([int(entropy), *[int(w) for w in words]])
        )
    )


def fill_normal(
    out: np.ndarray,
    key: tuple[int, int],
    stream: int = 0,
    mean: float = 0.0,
    std: float = 1.0,
) -> np.ndarray:
    """Fill a contiguous float32/float64 array with N(mean, std^2) entries in place."""
    # the wait policy must be in force before Numba's pool starts (sampling may be
    # the first parallel call of a process): spinning workers halve the BLAS rate
    ensure_configured()
    flat = out.reshape(-1)
    kernel = _fill_normal_kernel32 if flat.dtype == np.float32 else _fill_normal_kernel
    kernel(
        flat,
        np.uint64(key[0]),
        np.uint64(key[1]),
        np.uint64(stream),
        flat.dtype.type(mean),
        flat.dtype.type(std),
    )
    return out


def fill_uniform(
    out: np.ndarray,
    key: tuple[int, int],
    stream: int = 0,
    low: float = 0.0,
    high: float = 1.0,
) -> np.ndarray:
    """Fill a contiguous float32/float64 array with U(low, high) entries in place."""
    ensure_configured()
    flat = out.reshape(-1)
    _fill_uniform_kernel(
        flat,
        np.uint64(key[0]),
        np.uint64(key[1]),
        np.uint64(stream),
        float(low),
        float(high),
    )
    return out


def fill_keep_mask(
    out: np.ndarray,
    key: tuple[int, int],
    stream: int = 0,
    p: float = 0.5,
) -> np.ndarray:
    """Fill a dropout keep mask in place: 1 where entry i is kept, 0 where dropped.

    Entry ``i`` is kept iff ``u_i >= p``, ``u_i`` the 24-bit uniform of
    ``(key, stream, i)`` that :func:`fill_uniform` draws (module docstring), so
    P(keep) = 1 - p (to within 2^-25) independently per entry, as the Bernoulli(1 - p)
    mask of inverted dropout (Srivastava et al. 2014).  Bit-identical for any
    ``numba.set_num_threads``.

    Parameters
    ----------
    out : ndarray, uint8, C-contiguous, any shape
    key : (int, int)
        Philox key (:func:`derive_key`).
    stream : int
        Counter word 2 (independent streams under one key).
    p : float in [0, 1)
        Drop probability; 0 keeps every entry.

    Returns
    -------
    ndarray
        ``out``.

    Raises
    ------
    TypeError
        ``out`` not a C-contiguous uint8 ndarray, or ``p`` not a real number.
    ValueError
        ``p`` outside [0, 1).
    """
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
        got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
        raise TypeError(
            f"out must be a NumPy uint8 array; got {got}; allocate it with "
            "np.empty(shape, dtype=np.uint8)"
        )
    if not out.flags.c_contiguous:
        raise TypeError(
            "out must be C-contiguous (it is written in place); pass "
            "np.ascontiguousarray(out) and use that array"
        )
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number in [0, 1); got {p!r}")
    pf = float(p)
    if not 0.0 <= pf < 1.0:
        raise ValueError(
            f"p (the drop probability) must be in [0, 1); got {pf}; p = 1 would "
            "drop everything and make the inverted-dropout scale 1 / (1 - p) infinite"
        )
    ensure_configured()
    # u = (m + 0.5) 2^-24 >= p  <=>  m >= p 2^24 - 0.5 (exact in float64)
    thr = max(0, math.ceil(pf * 16777216.0 - 0.5))
    _fill_keep_mask_kernel(
        out.reshape(-1),
        np.uint64(key[0]),
        np.uint64(key[1]),
        np.uint64(stream),
        np.uint32(thr),
    )
    return out


def fill(
    out: np.ndarray,
    dist: tuple[str, float, float],
    key: tuple[int, int],
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



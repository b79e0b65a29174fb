"""Numba device-side helpers shared by several kernel families.

One home for the scalar activation formulas (the generic branch of the activation,
BatchNorm and fused kernels), the float64 row sum of squares (statistics and fused
passes) and the four-row BatchNorm backward column sums (BatchNorm backward and the
fused unit backward).  Formulas: ``initdiag.kernels.activation`` and
``initdiag.kernels.batchnorm``.  Names carry no underscore: they are shared inside
the package (the kernel modules import them, nothing outside ``kernels/`` should).
"""

from __future__ import annotations

import math

import numpy as np

from ._names import (
    _INV_SQRT2,
    _INV_SQRT2PI,
    _TWO_OVER_SQRTPI,
    ERF,
    GELU,
    LEAKY,
    RELU,
    SELU,
    SELU_ALPHA,
    SELU_SCALE,
    SIGMOID,
    SILU,
    TANH,
)
from ._threading import njit

# FMA contraction only (a * b + c in one rounding): no reassociation, NaN / inf
# semantics untouched
_CONTRACT = {"contract"}


@njit(cache=True, error_model="numpy", inline="always")
def act_nb(v, code, slope):
    """Scalar act(v) (generic branch; hot activations have their own loops)."""
    if code == RELU:
        return 0.0 if v <= 0 else v
    if code == LEAKY:
        return v * slope if v < 0 else v
    if code == TANH:
        return math.tanh(v)
    if code == SIGMOID:
        return 1.0 / (1.0 + math.exp(-v))
    if code == GELU:
        return v * (0.5 * math.erfc(-v * _INV_SQRT2))
    if code == SILU:
        return v * (1.0 / (1.0 + math.exp(-v)))
    if code == SELU:
        return SELU_SCALE * v if v > 0 else (SELU_SCALE * SELU_ALPHA) * math.expm1(v)
    if code == ERF:
        return math.erf(v)
    return v


@njit(cache=True, error_model="numpy", inline="always")
def act_grad_nb(g, v, code, slope):
    """Scalar g * act'(v)."""
    if code == RELU:
        if v > 0:
            return g
        return 0.0 if v <= 0 else v
    if code == LEAKY:
        if v < 0:
            return g * slope
        return g if v >= 0 else v
    if code == TANH:
        t = math.tanh(v)
        return g * (1.0 - t * t)
    if code == SIGMOID:
        s = 1.0 / (1.0 + math.exp(-v))
        return g * (s * (1.0 - s))
    if code == GELU:
        return g * (
            0.5 * math.erfc(-v * _INV_SQRT2)
            + v * (_INV_SQRT2PI * math.exp(-0.5 * v * v))
        )
    if code == SILU:
        s = 1.0 / (1.0 + math.exp(-v))
        return g * (s + v * s * (1.0 - s))
    if code == SELU:
        return (
            g * SELU_SCALE if v > 0 else g * ((SELU_SCALE * SELU_ALPHA) * math.exp(v))
        )
    if code == ERF:
        return g * (_TWO_OVER_SQRTPI * math.exp(-v * v))
    return g


# reassoc only: lets LLVM vectorise this one sum of squares (non-negative terms,
# so the order hardly matters); NaN / inf semantics are untouched (no nnan / ninf)
@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def sumsq_nb(r):
    """sum_j r_j^2 in float64."""
    s = 0.0
    for j in range(r.shape[0]):
        v = np.float64(r[j])
        s += v * v
    return s


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def bn_bwd_acc4_nb(dy, x, i, j0, j1, mu, inv, ga, be, relu, ab, ag, zero):
    """Rows i..i+3: ab += sum g, ag += sum g xhat in the dtype of x, with
    g = dy (identity) or dy relu'(z) (``relu``), z = gamma xhat + beta; relu's
    derivative as selects (no branch on random signs), NaN z propagating."""
    w = j1 - j0
    d0 = dy[i, j0:j1]
    d1 = dy[i + 1, j0:j1]
    d2 = dy[i + 2, j0:j1]
    d3 = dy[i + 3, j0:j1]
    r0 = x[i, j0:j1]
    r1 = x[i + 1, j0:j1]
    r2 = x[i + 2, j0:j1]
    r3 = x[i + 3, j0:j1]
    if relu:
        for j in range(w):
            m = mu[j]
            iv = inv[j]
            gm = ga[j]
            bt = be[j]
            h0 = (r0[j] - m) * iv
            h1 = (r1[j] - m) * iv
            h2 = (r2[j] - m) * iv
            h3 = (r3[j] - m) * iv
            z0 = gm * h0 + bt
            z1 = gm * h1 + bt
            z2 = gm * h2 + bt
            z3 = gm * h3 + bt
            k0 = d0[j] if z0 > zero else zero
            k1 = d1[j] if z1 > zero else zero
            k2 = d2[j] if z2 > zero else zero
            k3 = d3[j] if z3 > zero else zero
            g0 = k0 if z0 == z0 else z0
            g1 = k1 if z1 == z1 else z1
            g2 = k2 if z2 == z2 else z2
            g3 = k3 if z3 == z3 else z3
            ab[j] += (g0 + g1) + (g2 + g3)
            ag[j] += (g0 * h0 + g1 * h1) + (g2 * h2 + g3 * h3)
    else:
        for j in range(w):
            m = mu[j]
            iv = inv[j]
            ab[j] += (d0[j] + d1[j]) + (d2[j] + d3[j])
            ag[j] += (d0[j] * ((r0[j] - m) * iv) + d1[j] * ((r1[j] - m) * iv)) + (
                d2[j] * ((r2[j] - m) * iv) + d3[j] * ((r3[j] - m) * iv)
            )

"""Mean-field signal propagation: Gaussian expectations of activations and the maps.

Everything here is float64 and vectorised over numpy arrays (arguments broadcast).

Gaussian expectations
---------------------
For ``u ~ N(mu, var)`` (1-D) and ``(u, v)`` jointly Gaussian with means ``mu1, mu2``,
variances ``var1, var2`` and correlation ``rho`` of the centred parts (2-D):

- :func:`expect_phi` E[phi(u)], :func:`expect_phi2` E[phi(u)^2],
  :func:`expect_dphi2` E[phi'(u)^2], :func:`expect_d2phi_phi` E[phi''(u) phi(u)];
- :func:`expect_phi_phi` E[phi(u) phi(v)], :func:`expect_dphi_dphi`
  E[phi'(u) phi'(v)].

Closed forms (zero means, 2-D):

- ReLU, arc-cosine kernel (Cho & Saul 2009, halved, see THEORY.md section 2), with
  theta = arccos(rho): E[relu(u) relu(v)] = s1 s2 (sin theta + (pi - theta) rho)/(2 pi),
  E[relu'(u) relu'(v)] = (pi - theta)/(2 pi);
- leaky ReLU with slope a = a u + (1 - a) relu(u):
  E[phi phi] = a rho s1 s2 + (1 - a)^2 E[relu relu],
  E[phi' phi'] = a + (1 - a)^2 (pi - theta)/(2 pi);
- erf (Williams 1997): E[erf erf] = (2/pi) arcsin(2 S12 / sqrt((1 + 2 S11)(1 + 2 S22))),
  E[erf' erf'] = (4/pi) / sqrt((1 + 2 S11)(1 + 2 S22) - 4 S12^2);
- identity: E[u v] = mu1 mu2 + rho s1 s2.

1-D closed forms with a mean (alpha = mu/s, Phi/varphi the normal cdf/pdf):
E[relu(u)] = mu Phi(alpha) + s varphi(alpha),
E[relu(u)^2] = (mu^2 + s^2) Phi(alpha) + mu s varphi(alpha), E[relu'(u)^2] = Phi(alpha);
E[erf(u)] = erf(mu / sqrt(1 + 2 s^2)),
E[erf'(u)^2] = (4/pi) exp(-2 mu^2/(1 + 4 s^2)) / sqrt(1 + 4 s^2).

Everything else is quadrature.  1-D: composite Gauss-Legendre on panels centred at
the activation's kink / transition point x = 0 (z = -mu/s), geometrically refined
towards it down to the scale 1/s, and extended to +-21 standard deviations; so kinks
(ReLU, SELU) are integrated piecewise-smoothly and the steep transition of tanh or
sigmoid at large variance is resolved.  2-D: u is integrated by that rule and the
conditional expectation E[phi(v) | u] (v | u Gaussian with mean
mu2 + rho s2 (u - mu1)/s1 and variance s2^2 (1 - rho^2)) either in closed form
(ReLU, leaky ReLU, erf, identity) or by the same rule centred at v's own kink.
Measured accuracy: ~1e-13 relative for 1-D; ~1e-11 for 2-D except with non-zero
means and 1 - rho^2 small (< 1e-4), where the two kinks almost coincide as lines and
the error grows towards ~1e-7.

Maps (Poole et al. 2016, eqs. 3, 5, 7; Schoenholz et al. 2017, section 3)
-------------------------------------------------------------------------
Weights N(0, sigma_w2 / N), biases N(0, sigma_b2):

- length map  q' = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2  (:func:`qmap`);
- correlation map c' = (sigma_w2 E[phi(u) phi(v)] + sigma_b2) / q', (u, v) with
  variances q and correlation c (:func:`cmap`);
- chi1 = sigma_w2 E[phi'(sqrt(q*) z)^2] (:func:`chi1`);
- xi_q^-1 = -log(chi1 + sigma_w2 E[phi'' phi]) and
  xi_c^-1 = -log(sigma_w2 E[phi'(u) phi'(v)] at (q*, c*)) (:func:`depth_scales`).

Activations are given by name ("relu", "leaky_relu", "tanh", "sigmoid", "gelu",
"silu", "selu", "erf", "identity") or as :class:`initdiag.layers.Activation`
objects (needed for a leaky ReLU slope other than 0.01).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy import special

if TYPE_CHECKING:  # the layer modules import this one
    from .layers.activation import Activation

__all__ = [
    "NoEdgeOfChaosWarning",
    "PhaseDiagram",
    "chi1",
    "cmap",
    "critical_sigma_w2",
    "depth_scales",
    "expect_d2phi_phi",
    "expect_dphi2",
    "expect_dphi_dphi",
    "expect_phi",
    "expect_phi2",
    "expect_phi_phi",
    "fixed_point_c",
    "fixed_point_q",
    "phase_diagram",
    "qmap",
]

ArrayLike = npt.ArrayLike
_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_CLOSED = ("relu", "leaky_relu", "identity", "erf")
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
#: q above which the length map is declared to have overflowed (no fixed point)
Q_OVERFLOW = 1e200


class NoEdgeOfChaosWarning(RuntimeWarning):
    """Emitted by :func:`critical_sigma_w2` when some ``sigma_b2`` has no edge of
    chaos (the result is NaN there)."""


def _act(activation: str | Activation | Any) -> Activation:
    from .layers.activation import activation as make_activation

    if isinstance(activation, str) or hasattr(activation, "name"):
        return make_activation(activation)
    raise TypeError(
        "activation must be a name such as 'relu' or 'tanh' or an "
        f"initdiag Activation, got {type(activation).__name__}"
    )


def _slope(act: Activation) -> float:
    return float(getattr(act, "negative_slope", 0.0))


# -- the activations and their derivatives -------------------------------------------


def _phi(act: Activation, x: np.ndarray) -> np.ndarray:
    n = act.name
    if n == "relu":
        return np.maximum(x, 0.0)
    if n == "leaky_relu":
        return np.where(x > 0, x, _slope(act) * x)
    if n == "identity":
        return x
    if n == "tanh":
        return np.tanh(x)
    if n == "sigmoid":
        return special.expit(x)
    if n == "gelu":
        return x * special.ndtr(x)
    if n == "silu":
        return x * special.expit(x)
    if n == "selu":
        return _SELU_SCALE * np.where(
            x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))
        )
    if n == "erf":
        return special.erf(x)
    raise NotImplementedError(f"no mean-field rule for activation {n!r}")


def _dphi(act: Activation, x: np.ndarray) -> np.ndarray:
    n = act.name
    if n == "relu":
        return (x > 0).astype(np.float64)
    if n == "leaky_relu":
        return np.where(x > 0, 1.0, _slope(act))
    if n == "identity":
        return np.ones_like(x)
    if n == "tanh":
        t = np.tanh(x)
        return 1.0 - t * t
    if n == "sigmoid":
        s = special.expit(x)
        return s * (1.0 - s)
    if n == "gelu":
        return special.ndtr(x) + x * _INV_SQRT2PI * np.exp(-0.5 * x * x)
    if n == "silu":
        s = special.expit(x)
        return s + x * s * (1.0 - s)
    if n == "selu":
        return _SELU_SCALE * np.where(
            x > 0, 1.0, _SELU_ALPHA * np.exp(np.minimum(x, 0.0))
        )
    if n == "erf":
        return (2.0 / math.sqrt(math.pi)) * np.exp(-x * x)
    raise NotImplementedError(f"no mean-field rule for activation {n!r}")


def _d2phi(act: Activation, x: np.ndarray) -> np.ndarray:
    # the delta functions of piecewise-linear activations multiply phi(0) = 0 in
    # E[phi'' phi], so only the smooth part is returned
    n = act.name
    if n in ("relu", "leaky_relu", "identity"):
        return np.zeros_like(x)
    if n == "tanh":
        t = np.tanh(x)
        return -2.0 * t * (1.0 - t * t)
    if n == "sigmoid":
        s = special.expit(x)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    if n == "gelu":
        return _INV_SQRT2PI * np.exp(-0.5 * x * x) * (2.0 - x * x)
    if n == "silu":
        s = special.expit(x)
        d = s * (1.0 - s)
        return 2.0 * d + x * d * (1.0 - 2.0 * s)
    if n == "selu":
        return np.where(
            x > 0, 0.0, _SELU_SCALE * _SELU_ALPHA * np.exp(np.minimum(x, 0.0))
        )
    if n == "erf":
        return -(4.0 / math.sqrt(math.pi)) * x * np.exp(-x * x)
    raise NotImplementedError(f"no mean-field rule for activation {n!r}")


def _phi0(act: Activation) -> tuple[float, float]:
    """phi(0), phi'(0) (right derivative for kinks)."""
    x = np.array([0.0])
    return float(_phi(act, x)[0]), float(_dphi(act, x + 0.0)[0])


# -- quadrature rules -----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _offsets(n_fine: int, npp: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (for plain dt) of a composite Gauss-Legendre rule on
    [-21, 21] with panel edges 0, +-2^-n_fine, ..., +-1/2, +-1 and coarse panels
    beyond, so that an integrand smooth on each side of t = 0 is integrated to
    near machine precision."""
    x, w = np.polynomial.legendre.leggauss(npp)
    edges = [0.0] + [2.0**-k for k in range(n_fine, -1, -1)]
    edges += [1.5, 2.0, 3.0, 4.0, 5.5, 7.0, 9.0, 11.5, 14.5, 17.5, 21.0]
    ts, ws = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        ts.append(0.5 * (a + b) + 0.5 * (b - a) * x)
        ws.append(0.5 * (b - a) * w)
    t = np.concatenate(ts)
    wt = np.concatenate(ws)
    return np.concatenate([-t[::-1], t]), np.concatenate([wt[::-1], wt])


def _n_fine(s_max: float) -> int:
    # panels down to ~1/(4 s): the transition of tanh(s z) (poles at distance
    # pi/(2 s)) is then resolved by every panel it touches
    if not np.isfinite(s_max) or s_max <= 0.5:
        return 1
    return int(min(60, max(1, math.ceil(math.log2(4.0 * s_max)))))


def _gauss_1d(f, mu: np.ndarray, s: np.ndarray, npp: int = 16) -> np.ndarray:
    """E[f(mu + s z)], z ~ N(0, 1), with a kink/transition of f allowed at 0.

    ``f`` maps an array of shape (P, n) to the same shape; mu, s are (P,).
    """
    mu = np.asarray(mu, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    out = np.empty(mu.shape)
    zero = s <= 0
    if np.any(zero):
        out[zero] = f(mu[zero][:, None])[:, 0]
    pos = ~zero
    if np.any(pos):
        m, sd = mu[pos], s[pos]
        t, w = _offsets(_n_fine(float(np.max(sd))), npp)
        zc = np.clip(-m / sd, -10.0, 10.0)
        z = zc[:, None] + t[None, :]
        wz = w[None, :] * _INV_SQRT2PI * np.exp(-0.5 * z * z)
        x = m[:, None] + sd[:, None] * z
        out[pos] = np.sum(wz * f(x), axis=1)
    return out


def _chunks(n: int, per: int) -> list[slice]:
    step = max(1, per)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


# -- 1-D expectations -----------------------------------------------------------------


def _bcast(*args: ArrayLike) -> tuple[tuple[int, ...], list[np.ndarray]]:
    arrs = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in args])
    shape = arrs[0].shape
    return shape, [a.ravel().copy() for a in arrs]


def _check_var(var: np.ndarray, what: str = "var") -> None:
    if np.any(var < 0):
        raise ValueError(f"{what} must be >= 0, got a minimum of {np.min(var)}")


def _relu_moments(mu: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, ...]:
    """E[relu], E[relu^2], P(u > 0) for u ~ N(mu, s^2), s >= 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = mu / s
        a = np.where(s > 0, a, np.where(mu > 0, np.inf, -np.inf))
    cdf = special.ndtr(a)
    pdf = np.where(
        np.isfinite(a), _INV_SQRT2PI * np.exp(-0.5 * np.minimum(a * a, 1e4)), 0.0
    )
    m1 = mu * cdf + s * pdf
    m2 = (mu * mu + s * s) * cdf + mu * s * pdf
    return m1, m2, cdf


def _expect_1d(
    act: Activation, which: str, mu: np.ndarray, var: np.ndarray
) -> np.ndarray:
    s = np.sqrt(var)
    n = act.name
    if n in ("relu", "leaky_relu"):
        a = 0.0 if n == "relu" else _slope(act)
        m1, m2, p = _relu_moments(mu, s)
        if which == "phi":
            return a * mu + (1 - a) * m1
        if which == "phi2":
            return a * a * (mu * mu + var) + (1 - a * a) * m2
        if which == "dphi2":
            return a * a + (1 - a * a) * p
        return np.zeros_like(mu)
    if n == "identity":
        return {
            "phi": mu,
            "phi2": mu * mu + var,
            "dphi2": np.ones_like(mu),
            "d2phi_phi": np.zeros_like(mu),
        }[which]
    if n == "erf":
        if which == "phi":
            return special.erf(mu / np.sqrt(1.0 + 2.0 * var))
        if which == "dphi2":
            d = 1.0 + 4.0 * var
            return (4.0 / math.pi) * np.exp(-2.0 * mu * mu / d) / np.sqrt(d)
    if which == "phi":

        def f(x):
            return _phi(act, x)
    elif which == "phi2":

        def f(x):
            return _phi(act, x) ** 2
    elif which == "dphi2":

        def f(x):
            return _dphi(act, x) ** 2
    else:

        def f(x):
            return _d2phi(act, x) * _phi(act, x)

    return _gauss_1d(f, mu, s)


def _public_1d(which: str, activation, mean, var) -> np.ndarray | float:
    act = _act(activation)
    shape, (mu, v) = _bcast(mean, var)
    _check_var(v)
    out = _expect_1d(act, which, mu, v).reshape(shape)
    return out if shape else float(out)


def expect_phi(
    activation: str | Activation, mean: ArrayLike = 0.0, var: ArrayLike = 1.0
) -> np.ndarray | float:
    """E[phi(u)] for u ~ N(mean, var).

    Closed forms for relu / leaky_relu / identity / erf (module docstring),
    kink-centred composite Gauss-Legendre quadrature otherwise.
    """
    return _public_1d("phi", activation, mean, var)


def expect_phi2(
    activation: str | Activation, mean: ArrayLike = 0.0, var: ArrayLike = 1.0
) -> np.ndarray | float:
    """E[phi(u)^2] for u ~ N(mean, var) (closed form for relu-like and identity)."""
    return _public_1d("phi2", activation, mean, var)


def expect_dphi2(
    activation: str | Activation, mean: ArrayLike = 0.0, var: ArrayLike = 1.0
) -> np.ndarray | float:
    """E[phi'(u)^2] for u ~ N(mean, var) (closed form for relu-like, identity,
    erf: (4/pi) exp(-2 mean^2/(1 + 4 var))/sqrt(1 + 4 var))."""
    return _public_1d("dphi2", activation, mean, var)


def expect_d2phi_phi(
    activation: str | Activation, mean: ArrayLike = 0.0, var: ArrayLike = 1.0
) -> np.ndarray | float:
    """E[phi''(u) phi(u)] for u ~ N(mean, var); 0 for piecewise-linear phi (its
    delta function meets phi(0) = 0)."""
    return _public_1d("d2phi_phi", activation, mean, var)


# -- 2-D expectations -----------------------------------------------------------------


def _cond_closed(act: Activation, deriv: bool, m: np.ndarray, sc: np.ndarray):
    """E[phi(v)] or E[phi'(v)] for v ~ N(m, sc^2) in closed form, or None."""
    n = act.name
    if n in ("relu", "leaky_relu"):
        a = 0.0 if n == "relu" else _slope(act)
        m1, _, p = _relu_moments(m, sc)
        return a + (1 - a) * p if deriv else a * m + (1 - a) * m1
    if n == "identity":
        return np.ones_like(m) if deriv else m
    if n == "erf":
        d = 1.0 + 2.0 * sc * sc
        if deriv:
            return (2.0 / math.sqrt(math.pi)) * np.exp(-m * m / d) / np.sqrt(d)
        return special.erf(m / np.sqrt(d))
    return None


def _expect_2d_quad(act: Activation, deriv: bool, mu1, mu2, v1, v2, rho) -> np.ndarray:
    f = (lambda x: _dphi(act, x)) if deriv else (lambda x: _phi(act, x))
    s1, s2 = np.sqrt(v1), np.sqrt(v2)
    sc = s2 * np.sqrt(np.maximum(1.0 - rho * rho, 0.0))
    closed = act.name in _CLOSED
    npp = 16 if closed else 10
    out = np.empty(mu1.shape)
    # conditional on z1 (u = mu1 + s1 z1): v | z1 ~ N(mu2 + rho s2 z1, sc^2)
    t, w = _offsets(_n_fine(float(np.max(s1, initial=0.0))), npp)
    nin = (
        1 if closed else len(_offsets(_n_fine(float(np.max(sc, initial=0.0))), npp)[0])
    )
    for sl in _chunks(mu1.size, 2_000_000 // (len(t) * nin)):
        m1, sd1 = mu1[sl], s1[sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            zc = np.where(sd1 > 0, np.clip(-m1 / sd1, -10.0, 10.0), 0.0)
        z = zc[:, None] + t[None, :]
        wz = w[None, :] * _INV_SQRT2PI * np.exp(-0.5 * z * z)
        u = m1[:, None] + sd1[:, None] * z
        mc = mu2[sl][:, None] + (rho[sl] * s2[sl])[:, None] * z
        scc = np.broadcast_to(sc[sl][:, None], mc.shape)
        g = _cond_closed(act, deriv, mc, scc)
        if g is None:
            g = _gauss_1d(f, mc.ravel(), scc.ravel(), npp).reshape(mc.shape)
        val = np.sum(wz * f(u) * g, axis=1)
        # a zero-variance u is a constant
        zero = sd1 <= 0
        if np.any(zero):
            gz = _cond_closed(act, deriv, mu2[sl][zero], s2[sl][zero])
            if gz is None:
                gz = _gauss_1d(f, mu2[sl][zero], s2[sl][zero])
            val[zero] = f(m1[zero]) * gz
        out[sl] = val
    return out


def _expect_2d(act: Activation, deriv: bool, mu1, mu2, v1, v2, rho) -> np.ndarray:
    n = act.name
    s1, s2 = np.sqrt(v1), np.sqrt(v2)
    rho = np.clip(rho, -1.0, 1.0)
    if n == "identity":
        return np.ones_like(mu1) if deriv else mu1 * mu2 + rho * s1 * s2
    centred = (mu1 == 0) & (mu2 == 0)
    out = np.empty(mu1.shape)
    if n in ("relu", "leaky_relu", "erf") and np.any(centred):
        r, a1, a2 = rho[centred], s1[centred], s2[centred]
        if n == "erf":
            s12 = r * a1 * a2
            q1, q2 = a1 * a1, a2 * a2
            d = (1.0 + 2.0 * q1) * (1.0 + 2.0 * q2)
            if deriv:
                val = (4.0 / math.pi) / np.sqrt(d - 4.0 * s12 * s12)
            else:
                val = (2.0 / math.pi) * np.arcsin(
                    np.clip(2.0 * s12 / np.sqrt(d), -1, 1)
                )
        else:
            a = 0.0 if n == "relu" else _slope(act)
            th = np.arccos(r)
            if deriv:
                val = a + (1 - a) ** 2 * (math.pi - th) / (2.0 * math.pi)
            else:
                k = (
                    a1
                    * a2
                    * (np.sqrt(np.maximum(1.0 - r * r, 0.0)) + (math.pi - th) * r)
                )
                val = a * r * a1 * a2 + (1 - a) ** 2 * k / (2.0 * math.pi)
        out[centred] = val
        rest = ~centred
    else:
        rest = np.ones(mu1.shape, dtype=bool)
    if np.any(rest):
        out[rest] = _expect_2d_quad(
            act, deriv, mu1[rest], mu2[rest], v1[rest], v2[rest], rho[rest]
        )
    return out


def _public_2d(deriv, activation, var1, var2, corr, mean1, mean2):
    act = _act(activation)
    shape, (v1, v2, r, m1, m2) = _bcast(var1, var2, corr, mean1, mean2)
    _check_var(v1, "var1")
    _check_var(v2, "var2")
    if np.any(np.abs(r) > 1 + 1e-12):
        raise ValueError(f"corr must lie in [-1, 1], got {r[np.abs(r) > 1][0]}")
    out = _expect_2d(act, deriv, m1, m2, v1, v2, r).reshape(shape)
    return out if shape else float(out)


def expect_phi_phi(
    activation: str | Activation,
    var1: ArrayLike = 1.0,
    var2: ArrayLike = 1.0,
    corr: ArrayLike = 0.0,
    mean1: ArrayLike = 0.0,
    mean2: ArrayLike = 0.0,
) -> np.ndarray | float:
    """E[phi(u) phi(v)] for jointly Gaussian (u, v).

    Parameters
    ----------
    activation : str or Activation
    var1, var2 : array_like
        Variances of u and v (the second moments when the means are 0).
    corr : array_like
        Correlation of the centred parts, in [-1, 1].
    mean1, mean2 : array_like
        Means of u and v.

    Notes
    -----
    Zero means: the arc-cosine kernel (Cho & Saul 2009) for relu/leaky_relu and
    Williams (1997) for erf; otherwise, and for the smooth activations, nested
    kink-centred quadrature (module docstring).
    """
    return _public_2d(False, activation, var1, var2, corr, mean1, mean2)


def expect_dphi_dphi(
    activation: str | Activation,
    var1: ArrayLike = 1.0,
    var2: ArrayLike = 1.0,
    corr: ArrayLike = 0.0,
    mean1: ArrayLike = 0.0,
    mean2: ArrayLike = 0.0,
) -> np.ndarray | float:
    """E[phi'(u) phi'(v)] for jointly Gaussian (u, v) (arguments as
    :func:`expect_phi_phi`; relu at zero means: (pi - arccos(corr)) / (2 pi))."""
    return _public_2d(True, activation, var1, var2, corr, mean1, mean2)


# -- maps -----------------------------------------------------------------------------


def qmap(
    activation: str | Activation,
    q: ArrayLike,
    sigma_w2: ArrayLike,
    sigma_b2: ArrayLike = 0.0,
) -> np.ndarray | float:
    """Length map q' = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2 (Poole et al. 2016,
    eq. 3)."""
    act = _act(activation)
    shape, (qq, w, b) = _bcast(q, sigma_w2, sigma_b2)
    _check_var(qq, "q")
    out = (w * _expect_1d(act, "phi2", np.zeros_like(qq), qq) + b).reshape(shape)
    return out if shape else float(out)


def cmap(
    activation: str | Activation,
    c: ArrayLike,
    q: ArrayLike,
    sigma_w2: ArrayLike,
    sigma_b2: ArrayLike = 0.0,
) -> np.ndarray | float:
    """Correlation map for two inputs of equal length q (Poole et al. 2016, eq. 5):
    c' = (sigma_w2 E[phi(u) phi(v)] + sigma_b2) / qmap(q), Var u = Var v = q,
    corr(u, v) = c."""
    act = _act(activation)
    shape, (cc, qq, w, b) = _bcast(c, q, sigma_w2, sigma_b2)
    _check_var(qq, "q")
    z = np.zeros_like(qq)
    num = w * _expect_2d(act, False, z, z, qq, qq, cc) + b
    den = w * _expect_1d(act, "phi2", z, qq) + b
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / den, cc).reshape(shape)
    return out if shape else float(out)


def _fixed_point_q(
    act: Activation,
    w: np.ndarray,
    b: np.ndarray,
    q0: np.ndarray,
    tol: float,
    max_iter: int,
) -> np.ndarray:
    """Stable fixed point reached from q0 (vectorised), inf where q diverges."""
    n = act.name
    q = q0.copy()
    if n in ("relu", "leaky_relu", "identity"):
        k = 1.0 if n == "identity" else 0.5 * (1.0 + _slope(act) ** 2)
        g = w * k
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(g < 1, b / (1 - g), np.inf)
            # sigma_w2 at the critical value with no bias: every q is fixed
            q = np.where((g == 1) & (b == 0), q0, q)
            q = np.where((g > 1) & (b == 0) & (q0 == 0), 0.0, q)
        return q
    z = np.zeros_like(q)
    active = np.ones(q.shape, dtype=bool)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        qa = q[idx]
        v = _expect_1d(act, "phi2", z[idx], qa)
        new = w[idx] * v + b[idx]
        # Newton polish once the plain iteration has settled near a fixed point;
        # slope of the map: sigma_w2 dV/dq = sigma_w2 E[phi'^2 + phi phi'']/2
        if it >= 20:
            d = (
                0.5
                * w[idx]
                * (
                    _expect_1d(act, "dphi2", z[idx], qa)
                    + _expect_1d(act, "d2phi_phi", z[idx], qa)
                )
            )
            with np.errstate(divide="ignore", invalid="ignore"):
                nt = qa - (new - qa) / (d - 1.0)
            ok = (
                np.isfinite(nt)
                & (nt >= 0)
                & (np.abs(nt - new) < 0.5 * np.abs(new - qa) + 1e-300)
                & (d < 1)
            )
            new = np.where(ok, nt, new)
        new = np.where(new > Q_OVERFLOW, np.inf, new)
        done = (
            (np.abs(new - qa) <= tol * np.maximum(np.abs(new), 1e-300))
            | ~np.isfinite(new)
            | (new < 1e-300)
        )
        q[idx] = np.where(new < 1e-300, 0.0, new)
        active[idx[done]] = False
    return q


def fixed_point_q(
    activation: str | Activation,
    sigma_w2: ArrayLike,
    sigma_b2: ArrayLike = 0.0,
    q0: ArrayLike = 1.0,
    *,
    tol: float = 1e-14,
    max_iter: int = 5000,
) -> np.ndarray | float:
    """The stable fixed point q* = sigma_w2 E[phi(sqrt(q*) z)^2] + sigma_b2 reached
    by iterating the length map from ``q0`` (Poole et al. 2016).

    Closed form for relu-like and identity: q* = sigma_b2 / (1 - sigma_w2 k) with
    k = (1 + a^2)/2 (relu: 1/2; identity: 1) when sigma_w2 k < 1; ``inf`` when
    sigma_w2 k > 1 (q grows without bound) or when sigma_w2 k = 1 and sigma_b2 > 0
    (q grows linearly); ``q0`` itself when sigma_w2 k = 1 and sigma_b2 = 0 (every q
    is fixed).  Other activations: plain iteration, then Newton steps; ``inf``
    when q passes 1e200.  Near criticality with sigma_b2 = 0 (q -> 0 like 1/l)
    the iteration is slow; ``max_iter`` bounds it.
    """
    act = _act(activation)
    shape, (w, b, q0a) = _bcast(sigma_w2, sigma_b2, q0)
    _check_var(w, "sigma_w2")
    _check_var(b, "sigma_b2")
    out = _fixed_point_q(act, w, b, q0a, tol, max_iter).reshape(shape)
    return out if shape else float(out)


def _chi1_at(act: Activation, w: np.ndarray, q: np.ndarray) -> np.ndarray:
    n = act.name
    if n in ("relu", "leaky_relu", "identity"):
        k = 1.0 if n == "identity" else 0.5 * (1.0 + _slope(act) ** 2)
        return w * k
    qf = np.where(np.isfinite(q), q, 0.0)
    out = w * _expect_1d(act, "dphi2", np.zeros_like(q), qf)
    return np.where(np.isfinite(q), out, np.nan)


def chi1(
    activation: str | Activation,
    sigma_w2: ArrayLike,
    sigma_b2: ArrayLike = 0.0,
    q: ArrayLike | None = None,
) -> np.ndarray | float:
    """chi1 = sigma_w2 E[phi'(sqrt(q) z)^2], at q = q* unless ``q`` is given (Poole et
    al. 2016, eq. 7; Schoenholz et al. 2017, section 3).

    ReLU: sigma_w2 / 2 for every q; leaky ReLU: sigma_w2 (1 + a^2)/2.  NaN where q* is
    infinite for a bounded-derivative activation whose chi1 depends on q.
    """
    act = _act(activation)
    if q is None:
        shape, (w, b) = _bcast(sigma_w2, sigma_b2)
        qq = _fixed_point_q(act, w, b, np.ones_like(w), 1e-14, 5000)
    else:
        shape, (w, b, qq) = _bcast(sigma_w2, sigma_b2, q)
    out = _chi1_at(act, w, qq).reshape(shape)
    return out if shape else float(out)


def _fixed_point_c(act, w, b, q, c0, tol=1e-14, max_iter=20000) -> np.ndarray:
    c = c0.copy()
    z = np.zeros_like(q)
    chi = _chi1_at(act, w, q)
    den = w * _expect_1d(act, "phi2", z, np.where(np.isfinite(q), q, 0.0)) + b
    active = np.isfinite(q) & (den > 0)
    c[~np.isfinite(q)] = np.nan
    # ordered phase and critical line: c* = 1 is the (marginally) stable fixed
    # point (Poole et al. 2016); on the line the iteration would only converge
    # polynomially
    ordered = active & (chi <= 1 + 1e-12)
    c[ordered] = 1.0
    active &= ~ordered
    idx = np.flatnonzero(active)
    if idx.size == 0:
        return c
    # Chaotic phase: g(c) = f(c) - c vanishes at the unstable c = 1 (slope chi1 > 1,
    # so g < 0 just below 1) and at the stable c* < 1, with g > 0 below c*.  A fixed
    # point iteration converges like chi_c^l, i.e. arbitrarily slowly near the
    # critical line, so bracket c* and bisect (vectorised; ~55 steps to 1e-16).
    wi, bi, qi, di, zi = w[idx], b[idx], q[idx], den[idx], z[idx]

    def g(cc: np.ndarray, sel: np.ndarray) -> np.ndarray:
        num = wi[sel] * _expect_2d(act, False, zi[sel], zi[sel], qi[sel], qi[sel], cc)
        return (num + bi[sel]) / di[sel] - cc

    n = idx.size
    hi = np.full(n, np.nan)
    pending = np.ones(n, dtype=bool)
    for delta in np.geomspace(0.5, 1e-13, 40):
        sel = np.flatnonzero(pending)
        if sel.size == 0:
            break
        cc = np.full(sel.size, 1.0 - delta)
        neg = g(cc, sel) < 0
        hi[sel[neg]] = cc[neg]
        pending[sel[neg]] = False
    lo = np.full(n, -1.0)
    ok = np.isfinite(hi)
    sel = np.flatnonzero(ok)
    for _ in range(80):
        if sel.size == 0:
            break
        mid = 0.5 * (lo[sel] + hi[sel])
        pos = g(mid, sel) > 0
        lo[sel[pos]] = mid[pos]
        hi[sel[~pos]] = mid[~pos]
        if np.all(hi[sel] - lo[sel] <= tol):
            break
    # no sign change down to 1 - 1e-13: numerically critical, c* = 1
    c[idx] = np.where(ok, 0.5 * (lo + hi), 1.0)
    return c


def fixed_point_c(
    activation: str | Activation,
    sigma_w2: ArrayLike,
    sigma_b2: ArrayLike = 0.0,
    c0: ArrayLike = 0.5,
) -> np.ndarray | float:
    """The stable fixed point c* of the correlation map at q = q*.

    c* = 1 in the ordered phase (chi1 < 1); in the chaotic phase the iteration from
    ``c0`` converges to the stable c* < 1 (Poole et al. 2016; for odd phi and
    sigma_b2 = 0 that is c* = 0).  NaN where q* is infinite; at exact criticality
    c* is found by bisection of f(c) - c, which converges whatever the slope.
    """
    act = _act(activation)
    shape, (w, b, c0a) = _bcast(sigma_w2, sigma_b2, c0)
    q = _fixed_point_q(act, w, b, np.ones_like(w), 1e-14, 5000)
    out = _fixed_point_c(act, w, b, q, c0a).reshape(shape)
    return out if shape else float(out)


def depth_scales(
    activation: str | Activation, sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Depth scales (xi_q, xi_c) of Schoenholz et al. (2017), section 3.

    xi_q^-1 = -log(chi1 + sigma_w2 E[phi''(u) phi(u)]) at q* (the slope of the length
    map, by Stein's lemma); xi_c^-1 = -log(sigma_w2 E[phi'(u) phi'(v)]) at (q*, c*),
    which is -log(chi1) in the ordered phase.  ``inf`` where the slope is 1
    (criticality), NaN where q* does not exist.
    """
    act = _act(activation)
    shape, (w, b) = _bcast(sigma_w2, sigma_b2)
    q = _fixed_point_q(act, w, b, np.ones_like(w), 1e-14, 5000)
    fin = np.isfinite(q)
    qf = np.where(fin, q, 0.0)
    z = np.zeros_like(q)
    chi = _chi1_at(act, w, q)
    slope_q = chi + w * _expect_1d(act, "d2phi_phi", z, qf)
    c = _fixed_point_c(act, w, b, q, np.full_like(q, 0.5))
    cf = np.where(np.isfinite(c), c, 1.0)
    slope_c = np.where(c >= 1.0, chi, w * _expect_2d(act, True, z, z, qf, qf, cf))
    with np.errstate(divide="ignore"):
        xq = np.where(fin, -1.0 / np.log(np.abs(slope_q)), np.nan)
        xc = np.where(fin, -1.0 / np.log(slope_c), np.nan)
    xq = np.where(np.abs(slope_q) == 1, np.inf, xq)
    xc = np.where(slope_c == 1, np.inf, xc)
    xq, xc = xq.reshape(shape), xc.reshape(shape)
    if not shape:
        return float(xq), float(xc)
    return xq, xc


def critical_sigma_w2(
    activation: str | Activation,
    sigma_b2: ArrayLike = 0.0,
    *,
    sigma_w2_max: float = 100.0,
    tol: float = 1e-12,
) -> np.ndarray | float:
    """The edge of chaos: the sigma_w2 with chi1(sigma_w2, sigma_b2) = 1.

    Returns NaN where there is none, and then emits a :class:`NoEdgeOfChaosWarning`
    saying why (the choice made for vectorised use: an exception would abort a
    whole curve).  ReLU-like activations (slopes 1 and a) and identity have no
    edge of chaos for sigma_b2 > 0: chi1 = sigma_w2 (1 + a^2)/2 is 1 exactly where the
    length map q' = q + sigma_b2 has no fixed point (Hayou et al. 2019), so their only
    critical point is (sigma_b2 = 0, sigma_w2 = 2/(1 + a^2)).  For odd phi with
    phi(0) = 0 (tanh, erf) at sigma_b2 = 0, q* = 0 for sigma_w2 phi'(0)^2 <= 1, so the
    edge is sigma_w2 = 1/phi'(0)^2 (tanh 1, erf pi/4).  Otherwise bisection on
    sigma_w2 in (0, sigma_w2_max], q* from :func:`fixed_point_q`.
    """
    act = _act(activation)
    shape, (b,) = _bcast(sigma_b2)
    _check_var(b, "sigma_b2")
    n = act.name
    out = np.full(b.shape, np.nan)
    reason = None
    if n in ("relu", "leaky_relu", "identity"):
        k = 1.0 if n == "identity" else 0.5 * (1.0 + _slope(act) ** 2)
        out = np.where(b == 0, 1.0 / k, np.nan)
        reason = (
            f"{n} has no edge of chaos for sigma_b2 > 0: chi1 = 1 forces "
            "q' = q + sigma_b2, which has no fixed point (Hayou et al. 2019)"
        )
    else:
        p0, d0 = _phi0(act)
        odd = n in ("tanh", "erf")
        todo = np.ones(b.shape, dtype=bool)
        if odd:
            out[b == 0] = 1.0 / d0**2
            todo = b != 0
        idx = np.flatnonzero(todo)
        if idx.size:
            lo = np.full(idx.size, 1e-6)
            hi = np.full(idx.size, float(sigma_w2_max))
            bb = b[idx]

            def f(w):
                q = _fixed_point_q(act, w, bb, np.ones_like(w), 1e-15, 5000)
                return _chi1_at(act, w, q) - 1.0

            flo, fhi = f(lo), f(hi)
            ok = (flo < 0) & (fhi > 0)
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                fm = f(mid)
                up = fm > 0
                hi = np.where(up, mid, hi)
                lo = np.where(up, lo, mid)
                if np.all((hi - lo) <= tol * hi):
                    break
            out[idx] = np.where(ok, 0.5 * (lo + hi), np.nan)
            reason = (
                f"chi1 - 1 does not change sign for sigma_w2 in (0, "
                f"{sigma_w2_max}] with a finite q*"
            )
    bad = np.isnan(out)
    if np.any(bad) and reason:
        warnings.warn(
            f"no edge of chaos at sigma_b2 = {b[bad][:3].tolist()}...: {reason}",
            NoEdgeOfChaosWarning,
            stacklevel=2,
        )
    out = out.reshape(shape)
    return out if shape else float(out)


# -- phase diagram --------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseDiagram:
    """Order/chaos phase diagram on a (sigma_b2, sigma_w2) grid.

    Arrays have shape ``(len(sigma_b2), len(sigma_w2))``: rows follow sigma_b2 and
    columns sigma_w2 (``imshow``-ready with sigma_w2 on the x axis).

    Attributes
    ----------
    chi1, q_star, c_star, xi_c : ndarray
        As :func:`chi1`, :func:`fixed_point_q`, :func:`fixed_point_c`,
        :func:`depth_scales` (inf / NaN where q* does not exist).
    correlation : ndarray
        c^depth, the correlation after ``depth`` layers for two inputs of second
        moment ``q0`` and correlation ``c0`` (q and c propagated together).
    """

    activation: str
    sigma_w2: np.ndarray
    sigma_b2: np.ndarray
    depth: int
    q0: float
    c0: float
    chi1: np.ndarray
    q_star: np.ndarray
    c_star: np.ndarray
    xi_c: np.ndarray
    correlation: np.ndarray

    def regime(self, tol: float = 1e-3) -> np.ndarray:
        """-1 (ordered), 0 (critical, |chi1 - 1| <= tol), 1 (chaotic); NaN where
        chi1 is NaN."""
        r = np.sign(self.chi1 - 1.0)
        return np.where(np.abs(self.chi1 - 1.0) <= tol, 0.0, r)


class _Fast:
    """Length / correlation map ingredients at zero means, fast and vectorised:
    V(q) = E[phi^2], V'(q), D(q) = E[phi'^2], F(q, c) = E[phi(u) phi(v)] and
    F_c = dF/dc = q E[phi'(u) phi'(v)] (Price's theorem)."""

    q_max = 1e8

    def __init__(self, act: Activation) -> None:
        self.act = act
        self.name = act.name
        if self.name in ("relu", "leaky_relu"):
            self.k = 0.5 * (1.0 + _slope(act) ** 2)
        elif self.name == "identity":
            self.k = 1.0
        elif self.name != "erf":
            self._build_table()

    # Smooth activations: cubic splines in log q of V, D and of the Mehler
    # coefficients a_k(q) = E[phi(sqrt(q) z) He_k(z)]/sqrt(k!), so that
    # F(q, c) = sum_k a_k(q)^2 c^k (Mehler's formula), the tail beyond K being
    # put on c^K so that F(q, 1) = V(q) exactly.  Relative accuracy ~1e-8.
    K = 48

    def _build_table(self) -> None:
        from scipy.interpolate import CubicSpline

        act = self.act
        self.lq_min, self.lq_max = math.log(1e-12), math.log(self.q_max)
        lq = np.linspace(self.lq_min, self.lq_max, 1537)
        q = np.exp(lq)
        t, w = _offsets(_n_fine(math.sqrt(self.q_max)), 16)
        wz = w * _INV_SQRT2PI * np.exp(-0.5 * t * t)
        x = np.sqrt(q)[:, None] * t[None, :]
        ph = _phi(act, x)
        dp = _dphi(act, x)
        V = (ph * ph) @ wz
        D = (dp * dp) @ wz
        H = np.empty((t.size, self.K))
        H[:, 0] = 1.0
        H[:, 1] = t
        for k in range(1, self.K - 1):
            H[:, k + 1] = (t * H[:, k] - math.sqrt(k) * H[:, k - 1]) / math.sqrt(k + 1)
        A = (ph * wz[None, :]) @ H
        A2 = A * A
        tail = V - A2.sum(axis=1)
        self.zero_at_0 = _phi0(act)[0] == 0.0
        self._V = CubicSpline(lq, V)
        self._D = CubicSpline(lq, D)
        self._A2 = CubicSpline(lq, np.column_stack([A2, tail]))

    def _clamp(self, q):
        qc = np.clip(q, math.exp(self.lq_min), self.q_max)
        r = q / qc if self.zero_at_0 else np.ones_like(q)
        return np.log(qc), r

    def V(self, q):
        n = self.name
        if n == "erf":
            return (2 / math.pi) * np.arcsin(2 * q / (1 + 2 * q))
        if n in ("relu", "leaky_relu", "identity"):
            return self.k * q
        lq, r = self._clamp(q)
        return self._V(lq) * r

    def Vp(self, q):
        n = self.name
        if n == "erf":
            return (4 / math.pi) / ((1 + 2 * q) * np.sqrt(1 + 4 * q))
        if n in ("relu", "leaky_relu", "identity"):
            return np.full_like(q, self.k)
        lq, r = self._clamp(q)
        # dV/dq = (dV/dlog q) / q
        return np.where(r != 1, self._V(lq) / np.exp(lq), self._V(lq, 1) / q)

    def D(self, q):
        n = self.name
        if n == "erf":
            return (4 / math.pi) / np.sqrt(1 + 4 * q)
        if n in ("relu", "leaky_relu", "identity"):
            return np.full_like(q, self.k)
        return self._D(self._clamp(q)[0])

    def coef(self, q):
        """What F needs at q (for the table-based activations: the Mehler
        coefficients), so that a loop at fixed q evaluates the splines once."""
        if self.name in ("identity", "relu", "leaky_relu", "erf"):
            return q
        lq, r = self._clamp(q)
        # (K + 1, P), contiguous along the grid for the Horner loops
        return np.ascontiguousarray((self._A2(lq) * r[:, None]).T)

    def F(self, q, c, deriv=False, coef=None):
        n = self.name
        c = np.clip(c, -1.0, 1.0)
        if n == "identity":
            return q if deriv else q * c
        if n in ("relu", "leaky_relu"):
            a = _slope(self.act) if n == "leaky_relu" else 0.0
            th = np.arccos(c)
            if deriv:
                return q * (a + (1 - a) ** 2 * (math.pi - th) / (2 * math.pi))
            k = np.sqrt(np.maximum(1 - c * c, 0.0)) + (math.pi - th) * c
            return q * (a * c + (1 - a) ** 2 * k / (2 * math.pi))
        if n == "erf":
            if deriv:
                return q * (4 / math.pi) / np.sqrt((1 + 2 * q) ** 2 - 4 * (q * c) ** 2)
            return (2 / math.pi) * np.arcsin(2 * q * c / (1 + 2 * q))
        a2 = self.coef(q) if coef is None else coef  # (K + 1, P)
        out = np.zeros_like(c)
        if deriv:
            for k in range(self.K, 0, -1):
                out *= c
                out += k * a2[k]
        else:
            for k in range(self.K, -1, -1):
                out *= c
                out += a2[k]
        return out


def phase_diagram(
    activation: str | Activation,
    sigma_w2_grid: ArrayLike,
    sigma_b2_grid: ArrayLike,
    depth: int = 50,
    *,
    q0: float = 1.0,
    c0: float = 0.5,
) -> PhaseDiagram:
    """chi1, q*, c*, xi_c and the layer-``depth`` correlation on a grid.

    Parameters
    ----------
    activation : str or Activation
    sigma_w2_grid, sigma_b2_grid : 1-D array_like
        Weight and bias variances (sigma_b2 >= 0, sigma_w2 > 0).
    depth : int
        Number of layers for ``correlation``.
    q0, c0 : float
        Second moment and correlation of the two inputs.

    Returns
    -------
    PhaseDiagram
        Arrays of shape (len(sigma_b2_grid), len(sigma_w2_grid)).

    Notes
    -----
    The maps of Poole et al. (2016) and the depth scale of Schoenholz et al. (2017),
    vectorised over the whole grid.  Closed forms for relu, leaky_relu, identity and
    erf; for the other activations the Gaussian expectations come from cubic-spline
    tables in log q (q in [1e-12, 1e8]) built once per activation with the module's
    quadrature, and E[phi(u) phi(v)] from Mehler's expansion with 48 Hermite
    terms: relative accuracy about 1e-8 (the exact per-point functions of this
    module are 1e-11 but far too slow for 40000 points x depth layers).  q above
    1e8 counts as diverged (q* = inf, other entries NaN).  For ReLU-like and
    identity at sigma_b2 = 0 the normalised correlation map does not depend on q,
    its slope at c = 1 is 1, and xi_c = inf whatever sigma_w2.
    """
    act = _act(activation)
    w1 = np.asarray(sigma_w2_grid, dtype=np.float64)
    b1 = np.asarray(sigma_b2_grid, dtype=np.float64)
    if w1.ndim != 1 or b1.ndim != 1 or w1.size == 0 or b1.size == 0:
        raise ValueError("sigma_w2_grid and sigma_b2_grid must be non-empty 1-D arrays")
    if np.any(w1 <= 0) or np.any(b1 < 0):
        raise ValueError("need sigma_w2 > 0 and sigma_b2 >= 0 on the grid")
    if isinstance(depth, bool) or int(depth) != depth or depth < 0:
        raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    depth = int(depth)
    fast = _fast(act)
    bb, ww = np.meshgrid(b1, w1, indexing="ij")
    w, b = ww.ravel(), bb.ravel()
    qs = _pd_fixed_q(fast, w, b)
    fin = np.isfinite(qs)
    qf = np.where(fin, qs, 1.0)
    chi = np.where(fin, w * fast.D(qf), np.nan)
    # c*: 1 in the ordered phase, else iterate the correlation map at q*
    den = w * fast.V(qf) + b
    cs = np.where(fin, 1.0, np.nan)
    ch = fin & (chi >= 1) & (den > 0)
    if np.any(ch):
        idx = np.flatnonzero(ch)
        co = fast.coef(qf[idx])

        def g(cc, sel):
            # f(c) - c: > 0 below the stable c*, < 0 between c* and the unstable 1
            gi = idx[sel]
            cf = co[:, sel] if co.ndim == 2 else co[sel]
            return (w[gi] * fast.F(qf[gi], cc, coef=cf) + b[gi]) / den[gi] - cc

        # bracket c* from above (1 - delta, delta -> 0), then bisect: a fixed-point
        # iteration converges like slope^l, arbitrarily slowly near the critical line
        n = idx.size
        lo = np.full(n, -1.0)
        hi = np.full(n, np.nan)
        pending = np.arange(n)
        for delta in np.geomspace(0.5, 1e-13, 40):
            if pending.size == 0:
                break
            cc = np.full(pending.size, 1.0 - delta)
            neg = g(cc, pending) < 0
            hi[pending[neg]] = cc[neg]
            lo[pending[~neg]] = cc[~neg]
            pending = pending[~neg]
        sel = np.flatnonzero(np.isfinite(hi))
        for _ in range(64):
            if sel.size == 0:
                break
            mid = 0.5 * (lo[sel] + hi[sel])
            pos = g(mid, sel) > 0
            lo[sel[pos]] = mid[pos]
            hi[sel[~pos]] = mid[~pos]
            sel = sel[hi[sel] - lo[sel] > 1e-15]
        # no sign change down to 1 - 1e-13: numerically critical, c* = 1
        cs[idx] = np.where(np.isfinite(hi), 0.5 * (lo + hi), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope_c = np.where(
            cs >= 1.0, chi, w * fast.F(qf, np.nan_to_num(cs), deriv=True) / qf
        )
        xi = np.where(fin, -1.0 / np.log(slope_c), np.nan)
    xi = np.where(fin & (slope_c == 1.0), np.inf, xi)
    if act.name in ("relu", "leaky_relu", "identity"):
        xi = np.where(b == 0, np.inf, xi)
    # correlation after `depth` layers, q and c together from (q0, c0)
    q = np.full(w.shape, float(q0))
    c = np.full(w.shape, float(c0))
    co = None
    qprev = np.full(w.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(depth):
            ok = np.isfinite(q) & (q <= fast.q_max)
            qq = np.where(ok, q, 1.0)
            qn = w * fast.V(qq) + b
            # the Mehler coefficients are re-evaluated only where q moved
            if co is None or co.ndim == 1:
                co = fast.coef(qq)
            else:
                moved = np.flatnonzero(qq != qprev)
                if moved.size:
                    co[:, moved] = fast.coef(qq[moved])
            qprev = qq
            num = w * fast.F(qq, c, coef=co) + b
            c = np.where(ok, np.where(qn > 0, num / qn, c), np.nan)
            q = np.where(ok, qn, np.inf)
    c = np.where(np.isfinite(q) & (q <= fast.q_max), c, np.nan)
    shape = bb.shape
    return PhaseDiagram(
        activation=act.name,
        sigma_w2=w1,
        sigma_b2=b1,
        depth=depth,
        q0=float(q0),
        c0=float(c0),
        chi1=chi.reshape(shape),
        q_star=qs.reshape(shape),
        c_star=cs.reshape(shape),
        xi_c=xi.reshape(shape),
        correlation=c.reshape(shape),
    )


@functools.lru_cache(maxsize=32)
def _fast(act: Activation) -> _Fast:
    return _Fast(act)


def _pd_fixed_q(fast: _Fast, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    if fast.name in ("relu", "leaky_relu", "identity"):
        return _fixed_point_q(fast.act, w, b, np.ones_like(w), 0.0, 0)
    q = np.ones_like(w)
    act_ = np.arange(w.size)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for it in range(300):
            qq, wa, ba = q[act_], w[act_], b[act_]
            new = wa * fast.V(qq) + ba
            if it >= 30:
                d = wa * fast.Vp(qq)
                nt = qq - (new - qq) / (d - 1.0)
                acc = (
                    np.isfinite(nt)
                    & (nt >= 0)
                    & (d < 1)
                    & (np.abs(nt - new) < np.abs(new - qq))
                )
                new = np.where(acc, nt, new)
            new = np.where(new <= fast.q_max, new, np.inf)
            new = np.where(new < 1e-300, 0.0, new)
            conv = (
                ~np.isfinite(new)
                | (np.abs(new - qq) <= 1e-14 * np.abs(new))
                | (new == 0)
            )
            q[act_] = new
            act_ = act_[~conv]
            if act_.size == 0:
                break
    return q

"""Finite-batch BatchNorm at infinite width: per-unit batch statistics and the
backward map of the batch kernel of gradients.

Derivations and sources: ``docs/theory.md``, section "Finite-batch BatchNorm"
(Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz 2019, "A mean field theory of
batch normalization", ICLR).  Everything here is a pure function of numbers (an
activation, the batch size ``B``, the laws of gamma and beta, the moments of the
BatchNorm input, ``eps``); nothing reads a network.

At infinite width every unit of a layer sees the same law of its batch vector
``h in R^B``.  Three situations:

- **BatchNorm before the activation, exchangeable batch** (:func:`bn_pre_exchangeable`):
  the input is an exchangeable Gaussian, so the normalised vector
  ``n = C h / sqrt(s + eps)`` is ``sqrt(B) r u`` with ``u`` uniform on the unit
  sphere of the centred subspace, independent of the batch variance ``s`` and of
  ``r^2 = s/(s + eps)``.  Every quantity is a 1-D or 2-D marginal integral over
  the sphere, done by deterministic quadrature (:func:`sphere_rule_1d`,
  :func:`sphere_rule_2d`), and 1-D integrals over the chi-square law of ``s``
  (:func:`batch_variance_moments`).
- **BatchNorm after the activation, or a non-exchangeable batch (``inputs``)**
  (:class:`BNMonteCarlo`): the input ``phi(h)`` of a Gaussian ``h`` has no such
  structure; the expectations are a seeded Monte Carlo integration over the
  Gaussian ``h`` (not a simulation of a network), with standard errors.
- **Dead fractions** ``P(h_a <= 0 for every a)``: Gaussian batches
  (:func:`dead_exchangeable`, :func:`dead_gaussian`) and BatchNorm outputs
  (:func:`dead_bn_sphere`), the latter two through the law of the largest
  coordinate of the centred sphere (:func:`sphere_max_samples`).

Gradient kernels
----------------
Under gradient independence (Schoenholz et al. 2017; Yang et al. 2019) the
gradient ``g`` arriving at a unit's output is independent of the unit's forward
values; its batch covariance ``G[a, b] = E[g_a g_b]`` is the backward state.  An
exchangeable ``G`` is stored as ``G = cen C + mean J/B`` (:class:`ExchKernel`;
``C = I - J/B``, ``J = 1 1^T``), two orthogonal projections, so that a kernel
centred by a BatchNorm above has ``mean == 0`` exactly (the dense bias and, in a
linear network, beta then get exactly zero gradient).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import integrate, special

from . import meanfield as mf
from .network import Activation

__all__ = [
    "BNMonteCarlo",
    "BNPreStats",
    "ExchKernel",
    "Law",
    "batch_variance_moments",
    "bn_pre_exchangeable",
    "dead_bn_sphere",
    "dead_exchangeable",
    "dead_gaussian",
    "sphere_max_samples",
    "sphere_rule_1d",
    "sphere_rule_2d",
]

#: Gauss-Legendre nodes per quadrature panel of the sphere rules
NODES_PER_PANEL = 10
#: panels of a parameter law (gamma, beta) between its breakpoints
LAW_NODES = 10
#: -log of the relative weight below which the sphere's angular weight is dropped
_TAIL = 46.0
#: total (samples x batch) of the sphere-maximum table
_MAX_TABLE_WORK = 1 << 21
#: total (samples x batch^2) of a Monte Carlo backward through a full kernel
_MC_WORK = 1 << 24
#: activations with phi(x) <= 0 exactly when x <= 0 (dead = pre-activation <= 0)
_SIGN_PRESERVING = (
    "relu",
    "leaky_relu",
    "identity",
    "tanh",
    "gelu",
    "silu",
    "selu",
    "erf",
)
#: activations that are linear on each side of 0 (no grading needed at the kink)
_PIECEWISE_LINEAR = ("relu", "leaky_relu", "identity")


# -- parameter laws -----------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """The law of a per-unit BatchNorm parameter (gamma or beta).

    ``kind`` is ``"constant"`` (``p`` the value), ``"normal"`` (mean ``p``, std
    ``q``), ``"uniform"`` (``[p, q]``) or ``"trunc_normal"`` (``p, q`` mean and std
    of the parent normal, ``lo, hi`` the bounds).
    """

    kind: str
    p: float
    q: float = 0.0
    lo: float = -math.inf
    hi: float = math.inf

    @classmethod
    def of(cls, init: Any, n_features: int) -> Law:
        """The law of an initializer's entries (``distribution()``, or a truncated
        normal's parameters, or a constant when the variance is 0).

        Raises
        ------
        NotImplementedError
            For an initializer of non-zero variance whose law is not one of these.
        """
        if isinstance(init, (int, float)):
            return cls("constant", float(init))
        dist = init.distribution(n_features, n_features)
        if dist is not None:
            kind, p, q = dist
            if kind == "normal" and q == 0:
                return cls("constant", float(p))
            if kind == "uniform" and q == p:
                return cls("constant", float(p))
            return cls(kind, float(p), float(q))
        if getattr(init, "name", "") == "trunc_normal":
            pr = init.params()
            if pr["std"] == 0:
                return cls("constant", float(init.mean(n_features, n_features)))
            return cls("trunc_normal", pr["mean"], pr["std"], pr["a"], pr["b"])
        if init.variance(n_features, n_features) == 0:
            return cls("constant", float(init.mean(n_features, n_features)))
        raise NotImplementedError(
            f"the law of {init} is not known in closed form (finite-batch BatchNorm "
            "theory needs normal, uniform, truncated normal or constant gamma / beta)"
        )

    # support of the law
    def support(self) -> tuple[float, float]:
        if self.kind == "constant":
            return self.p, self.p
        if self.kind == "uniform":
            return self.p, self.q
        lo, hi = self.p - 12.0 * self.q, self.p + 12.0 * self.q
        return max(lo, self.lo), min(hi, self.hi)

    def nodes(self, breaks: tuple[float, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature nodes and weights (summing to 1) of the law.

        Without ``breaks`` inside the support: Gauss-Hermite (normal) or
        Gauss-Legendre (uniform, truncated normal) with ``LAW_NODES`` nodes, for
        an integrand smooth in the parameter.  Otherwise composite Gauss-Legendre
        with panel edges at ``breaks`` (where the integrand has a kink or a
        singular derivative) and in the density's bulk."""
        if self.kind == "constant":
            return np.array([self.p]), np.ones(1)
        lo, hi = self.support()
        inside = sorted({float(x) for x in breaks if lo < x < hi})
        if not inside and self.kind == "normal":
            x, w = special.roots_hermitenorm(LAW_NODES)
            return self.p + self.q * x, w / w.sum()
        edges = [lo, hi, *inside]
        if inside:
            if self.kind != "uniform":
                edges += [self.p + k * self.q for k in (-5, -3, -1.5, 0, 1.5, 3, 5)]
            x, w = _gl(6)
        else:
            x, w = _gl(LAW_NODES if self.kind == "uniform" else 2 * LAW_NODES)
        e = np.unique(np.clip(np.array(edges, dtype=float), lo, hi))
        xs = (0.5 * (e[1:] + e[:-1]))[:, None] + 0.5 * (e[1:] - e[:-1])[:, None] * x
        ws = 0.5 * (e[1:] - e[:-1])[:, None] * w
        xs, ws = xs.ravel(), ws.ravel()
        ws = ws * self.pdf(xs)
        return xs, ws / ws.sum()

    def pdf(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "uniform":
            return np.full_like(x, 1.0 / (self.q - self.p))
        z = (x - self.p) / self.q
        return np.exp(-0.5 * z * z)  # normalised by nodes()

    def cdf(self, t: np.ndarray) -> np.ndarray:
        """P(X <= t), elementwise."""
        t = np.asarray(t, dtype=float)
        if self.kind == "constant":
            return (self.p <= t).astype(float)
        if self.kind == "uniform":
            return np.clip((t - self.p) / (self.q - self.p), 0.0, 1.0)
        if self.kind == "normal":
            return special.ndtr((t - self.p) / self.q)
        a = special.ndtr((self.lo - self.p) / self.q)
        b = special.ndtr((self.hi - self.p) / self.q)
        tt = np.clip(t, self.lo, self.hi)
        return np.clip((special.ndtr((tt - self.p) / self.q) - a) / (b - a), 0.0, 1.0)

    @property
    def mean(self) -> float:
        x, w = self.nodes()
        return (
            float(np.dot(w, x))
            if self.kind == "trunc_normal"
            else _MEANS[self.kind](self)
        )

    @property
    def second(self) -> float:
        """E[X^2]."""
        if self.kind == "constant":
            return self.p * self.p
        if self.kind == "normal":
            return self.p * self.p + self.q * self.q
        if self.kind == "uniform":
            return (self.p * self.p + self.p * self.q + self.q * self.q) / 3.0
        x, w = self.nodes()
        return float(np.dot(w, x * x))

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "constant":
            return np.full(size, self.p)
        if self.kind == "normal":
            return self.p + self.q * rng.standard_normal(size)
        if self.kind == "uniform":
            return rng.uniform(self.p, self.q, size)
        a = special.ndtr((self.lo - self.p) / self.q)
        b = special.ndtr((self.hi - self.p) / self.q)
        return np.clip(
            self.p + self.q * special.ndtri(rng.uniform(a, b, size)), self.lo, self.hi
        )


_MEANS = {
    "constant": lambda law: law.p,
    "normal": lambda law: law.p,
    "uniform": lambda law: 0.5 * (law.p + law.q),
}


@functools.lru_cache(maxsize=16)
def _gl(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


# -- quadrature over the centred sphere ---------------------------------------------


def _cos_power_norm(m: int) -> float:
    """int_{-pi/2}^{pi/2} cos(t)^m dt = sqrt(pi) Gamma((m+1)/2) / Gamma(m/2 + 1)."""
    return math.sqrt(math.pi) * math.exp(
        special.gammaln((m + 1) / 2) - special.gammaln(m / 2 + 1)
    )


def _angle_range(m: int) -> float:
    """Half-width beyond which cos(t)^m < exp(-_TAIL) (the rest is dropped)."""
    if m <= 0:
        return 0.5 * math.pi
    return min(0.5 * math.pi, math.acos(math.exp(-_TAIL / m)))


def _panels(
    edges: list[float], tangent: set[float], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre on consecutive ``edges``; each interval is halved
    and, next to an edge in ``tangent``, mapped t = e + (mid - e) w^2 so that a
    (t - e)^(1/2) singularity there becomes smooth."""
    x, w = _gl(n)
    w01, x01 = 0.5 * w, 0.5 * (x + 1.0)  # rule on [0, 1]
    ts, ws = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b - a <= 0:
            continue
        mid = 0.5 * (a + b)
        for e, f in ((a, mid), (b, mid)):
            if e in tangent:
                ts.append(e + (f - e) * x01 * x01)
                ws.append(2.0 * abs(f - e) * x01 * w01)
            else:
                ts.append(e + (f - e) * x01)
                ws.append(abs(f - e) * w01)
    return np.concatenate(ts), np.concatenate(ws)


def _bulk(m: int, T: float, ks: tuple[float, ...] = (1, 2, 3, 4.5, 6.5, 9)):
    """Edges at multiples ``ks`` of the width 1/sqrt(m + 1) of the weight
    cos(t)^m, so a concentrated weight (large batch) gets enough nodes."""
    sig = 1.0 / math.sqrt(m + 1.0)
    return [s * k * sig for k in ks for s in (-1, 1) if k * sig < T] + [0.0]


def _graded(center: float, width: float, lo: float, hi: float) -> list[float]:
    """Edges at center +- width 2^j inside (lo, hi): resolves a transition of
    ``width`` (a steep tanh / sigmoid) without resolving the whole range finely."""
    out = []
    if not (width > 0 and math.isfinite(width)):
        return out
    d = width
    while d < hi - lo:
        for v in (center - d, center + d):
            if lo < v < hi:
                out.append(v)
        d *= 2.0
    return out


def sphere_rule_1d(
    B: int, kink: float = math.inf, width: float = 0.0, n: int = NODES_PER_PANEL
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``x`` and weights ``w`` with ``E f(n_a) ~ sum w f(x)``, where
    ``n = sqrt(B) u`` and ``u`` is uniform on the unit sphere of the centred
    subspace of R^B (one coordinate of a BatchNorm output at gamma = 1, beta = 0,
    eps = 0).

    ``n_a = sqrt(B - 1) sin(t)``, t with density proportional to cos(t)^(B-3) on
    [-pi/2, pi/2] (docs/theory.md); panels split at ``kink`` (where f may be
    non-smooth) and graded around it down to ``width`` (in units of n).
    """
    if B < 2:
        raise ValueError(f"batch size must be >= 2, got {B}")
    R = math.sqrt(B - 1)
    if B == 2:
        return np.array([-1.0, 1.0]), np.array([0.5, 0.5])
    m = B - 3
    T = _angle_range(m)
    edges = [-T, T, *_bulk(m, T)]
    if abs(kink) < R:
        tk = math.asin(kink / R)
        if -T < tk < T:
            edges.append(tk)
            edges += _graded(tk, width / (R * math.cos(tk)), -T, T)
    t, w = _panels(sorted(set(edges)), set(), n)
    w = w * np.cos(t) ** m / _cos_power_norm(m)
    return R * np.sin(t), w


def sphere_rule_2d(
    B: int, kink: float = math.inf, width: float = 0.0, n: int = NODES_PER_PANEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes ``(xa, xb)`` and weights ``w`` with ``E f(n_a, n_b) ~ sum w f(xa, xb)``
    for two coordinates a != b of ``n = sqrt(B) u`` (u uniform on the unit sphere
    of the centred subspace).

    Nested angles (docs/theory.md): ``n_a = sqrt(B-1) sin t1`` (density ~
    cos(t1)^(B-3)), ``n_b = sqrt(B-1) (sin t1 cw + cos t1 sw sin t2)`` (density ~
    cos(t2)^(B-4)), cw = -1/(B-1) the cosine between the centred unit vectors of a
    and b, sw = sqrt(1 - cw^2).  f may have a kink where n_a or n_b equals
    ``kink``: the inner rule splits at it; the outer rule splits at it and where
    the inner kink leaves the sphere (tangency, a square-root singularity of the
    inner integral, mapped away by :func:`_panels`).
    """
    if B < 2:
        raise ValueError(f"batch size must be >= 2, got {B}")
    R = math.sqrt(B - 1)
    if B == 2:
        return np.array([-1.0, 1.0]), np.array([1.0, -1.0]), np.array([0.5, 0.5])
    cw = -1.0 / (B - 1)
    sw = math.sqrt(1.0 - cw * cw)
    w0 = math.acos(cw)
    m1 = B - 3
    T1 = _angle_range(m1)
    edges = [-T1, T1, *_bulk(m1, T1)]
    tangent: set[float] = set()
    kc = kink / R if math.isfinite(kink) else math.inf
    if abs(kc) < 1:
        tk = math.asin(kc)
        edges.append(tk)
        edges += _graded(tk, width / (R * math.cos(tk)), -T1, T1)
        # sin(t1 +- w0) = kc: the inner kink reaches t2 = +-pi/2
        for base in (math.asin(kc), math.pi - math.asin(kc)):
            for sgn in (1.0, -1.0):
                t = base - sgn * w0
                t = (t + math.pi) % (2 * math.pi) - math.pi
                if -T1 < t < T1:
                    edges.append(t)
                    tangent.add(t)
    t1, wt1 = _panels(sorted(set(edges)), tangent, n)
    wt1 = wt1 * np.cos(t1) ** m1 / _cos_power_norm(m1)
    s1, c1 = np.sin(t1), np.cos(t1)
    if B == 3:
        # the inner sphere is S^0: sin t2 = +-1 with probability 1/2 each
        s2 = np.array([-1.0, 1.0])[None, :]
        w2 = np.full((t1.size, 2), 0.5)
    else:
        m2 = B - 4
        T2 = _angle_range(m2)
        with np.errstate(divide="ignore", invalid="ignore"):
            sk = (kc - s1 * cw) / (c1 * sw) if abs(kc) < 1 else np.full_like(s1, 2.0)
        tk2 = np.arcsin(np.clip(np.nan_to_num(sk, nan=2.0), -1.0, 1.0))
        tk2 = np.clip(tk2, -T2, T2)
        cols = [np.full_like(t1, -T2), tk2, np.full_like(t1, T2)]
        cols += [np.full_like(t1, e) for e in _bulk(m2, T2, (1.5, 3.5, 6.5))]
        if width > 0 and abs(kc) < 1:
            with np.errstate(divide="ignore"):
                d = width / (R * np.maximum(c1 * sw * np.cos(tk2), 1e-300))
            j = 1.0
            while j * float(np.min(d)) < 2 * T2:
                cols += [np.clip(tk2 - j * d, -T2, T2), np.clip(tk2 + j * d, -T2, T2)]
                j *= 2.0
        E = np.sort(np.stack(cols, axis=1), axis=1)
        x, w = _gl(n)
        a, b = E[:, :-1, None], E[:, 1:, None]
        t2 = 0.5 * (a + b) + 0.5 * (b - a) * x
        w2 = (0.5 * (b - a) * w) * np.cos(t2) ** m2 / _cos_power_norm(m2)
        t2 = t2.reshape(t1.size, -1)
        w2 = w2.reshape(t1.size, -1)
        s2 = np.sin(t2)
    xa = np.broadcast_to((R * s1)[:, None], w2.shape)
    xb = R * (s1[:, None] * cw + c1[:, None] * sw * s2)
    ww = wt1[:, None] * w2
    return xa.ravel(), np.broadcast_to(xb, ww.shape).ravel(), ww.ravel()


# -- the batch variance ---------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _chi2_moments(k: int, c: float) -> tuple[tuple[float, ...], float]:
    """E over X ~ chi2_k of 1/(X+c), X/(X+c)^2, X^2/(X+c)^3, X/(X+c),
    sqrt(X/(X+c)); and the largest quadrature error."""
    if c == 0.0:
        inv = 1.0 / (k - 2) if k > 2 else math.inf
        return (inv, inv, inv, 1.0, 1.0), 0.0
    logn = -(k / 2) * math.log(2.0) - special.gammaln(k / 2)

    def dens(x: float) -> float:
        return math.exp(logn + (k / 2 - 1) * math.log(x) - x / 2) if x > 0 else 0.0

    fs = (
        lambda x: 1.0 / (x + c),
        lambda x: x / (x + c) ** 2,
        lambda x: x * x / (x + c) ** 3,
        lambda x: x / (x + c),
        lambda x: math.sqrt(x / (x + c)),
    )
    top = k + 40.0 * math.sqrt(2.0 * k) + 200.0
    pts = sorted({min(c * f, top / 2) for f in (0.1, 1.0, 10.0, 100.0)} | {1.0})
    out, err = [], 0.0
    for f in fs:
        total = 0.0
        edges = [0.0, *[p for p in pts if 0 < p < top], top]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            v, e = integrate.quad(
                lambda x, f=f: f(x) * dens(x), a, b, limit=200, epsabs=0, epsrel=1e-12
            )
            total += v
            err = max(err, e / max(abs(total), 1e-300))
        out.append(total)
    return tuple(out), err


@dataclass(frozen=True)
class BatchVarianceMoments:
    """Moments of one unit's batch variance ``s`` (biased, over B inputs) for a
    Gaussian input of centred per-example variance ``a``: ``s = a X / B``,
    X ~ chi2_(B-1); r^2 = s/(s + eps).

    ``e0 = E[1/(s+eps)]``, ``kappa = E[(2 r^2 - r^4)/(s+eps)]``,
    ``rho = E[r^2]``, ``r = E[r]``; ``rel_error`` the largest relative quadrature
    error.  With eps = 0: e0 = kappa = B/(a (B-3)) (infinite for B <= 3)."""

    e0: float
    kappa: float
    rho: float
    r: float
    rel_error: float


def batch_variance_moments(B: int, a: float, eps: float) -> BatchVarianceMoments:
    """:class:`BatchVarianceMoments` of a BatchNorm fed by an exchangeable Gaussian
    batch (Yang et al. 2019; docs/theory.md)."""
    if not a > 0:
        raise ValueError(
            f"the BatchNorm input has no variance over the batch (a = {a}); "
            "finite-batch BatchNorm needs a > 0"
        )
    k = B - 1
    c = float(eps) * B / float(a)
    (m0, m1, m2, rho, r), err = _chi2_moments(k, c)
    scale = B / a
    return BatchVarianceMoments(
        e0=scale * m0, kappa=scale * (2 * m1 - m2), rho=rho, r=r, rel_error=err
    )


# -- exchangeable kernels -------------------------------------------------------------


@dataclass(frozen=True)
class ExchKernel:
    """An exchangeable B x B kernel ``cen C + mean J / B``.

    ``diag = cen (1 - 1/B) + mean/B``, ``off = (mean - cen)/B``; ``mean / B`` is
    the second moment of the batch average, ``cen`` that of the centred part per
    centred direction."""

    B: int
    cen: float
    mean: float

    @classmethod
    def from_diag_off(cls, B: int, diag: float, off: float) -> ExchKernel:
        return cls(B, diag - off, diag + (B - 1) * off)

    @property
    def diag(self) -> float:
        return self.cen * (1 - 1 / self.B) + self.mean / self.B

    @property
    def off(self) -> float:
        return (self.mean - self.cen) / self.B

    def scaled(self, f: float) -> ExchKernel:
        return ExchKernel(self.B, self.cen * f, self.mean * f)

    def matrix(self) -> np.ndarray:
        B = self.B
        return self.cen * (np.eye(B) - 1.0 / B) + self.mean / B


# -- BatchNorm before the activation, exchangeable batch ----------------------------


def bn_row_kernel(gamma: Law, beta: Law, rho: float, B: int) -> tuple[float, float]:
    """(K_d, K_o) of an exchangeable BatchNorm output x = gamma n + beta:
    ``E[gamma^2] rho + E[beta^2]`` and ``-E[gamma^2] rho/(B - 1) + E[beta^2]``
    (E n_a = 0, E n_a^2 = rho = E[s/(s + eps)], sum_a n_a = 0)."""
    g2 = gamma.second * rho
    return g2 + beta.second, -g2 / (B - 1) + beta.second


def _act_funcs(act: Activation | None):
    if act is None or act.name == "identity":
        return None
    return (lambda x: mf._phi(act, x)), (lambda x: mf._dphi(act, x))


@dataclass(frozen=True)
class BNPreStats:
    """Per-unit statistics of ``y = phi(gamma n + beta)`` (BatchNorm, then the
    activation) over an exchangeable batch of size B at infinite width.

    Forward, for the BatchNorm row (``x = gamma n + beta``) and the activation row
    (``y``): ``*_mean`` E[x_a], ``*_kd`` E[x_a^2], ``*_ko`` E[x_a x_b] (a != b),
    ``*_active`` P(x_a > 0) (``y_active`` P(y_a > 0)), ``dead`` P(x_a <= 0 for
    every a) and ``dead_se`` its Monte Carlo error (the sphere-maximum table;
    0 where exact).

    Backward coefficients (per unit of the upstream kernel ``G = cen C + mean J/B``
    at the activation output, gradient independence; docs/theory.md):
    ``dd = E[d^2]``, ``qq = E[d_a d_b]``, ``ddn = E[d^2 n^2]``,
    ``qn = E[d_a n_a d_b n_b]`` (d = phi'(x)), ``t1`` and ``t2`` the gamma^2-
    weighted traces of the BatchNorm Jacobian sandwich, ``rho = E[r^2]``.
    ``error`` bounds the quadrature error (relative, from a coarser rule) and the
    neglected eps terms.
    """

    B: int
    bn_mean: float
    bn_kd: float
    bn_ko: float
    bn_active: float
    y_mean: float
    y_kd: float
    y_ko: float
    y_active: float
    dead: float
    dead_se: float
    dd: float
    qq: float
    ddn: float
    qn: float
    t1: float
    t2: float
    rho: float
    error: float

    def backward(self, G: ExchKernel) -> tuple[ExchKernel, ExchKernel, float, float]:
        """Gradient kernels at the BatchNorm output (activation input) and at the
        BatchNorm input, and the per-unit gamma and beta gradient second moments
        ``(1/B) E[(dL/dgamma)^2]``, ``(1/B) E[(dL/dbeta)^2]``, for the upstream
        kernel ``G`` at the activation output.

        With g1 = G.cen, g2 = G.off (G = g1 I + g2 J):
        ``G_bn = (g1 + g2) dd I + g2 qq (J - I)``;
        ``G_in = (g1 t1 + g2 t2)/(B - 1) C`` (centred: the BatchNorm projection);
        gamma: ``rho (g1 ddn + g2 (ddn + (B-1) qn))``;
        beta: ``g1 dd + g2 (dd + (B-1) qq)`` = ``cen (B-1)(dd-qq)/B +
        mean (dd + (B-1) qq)/B``.
        """
        B = self.B
        g1, g2 = G.cen, G.off
        bn = ExchKernel.from_diag_off(B, (g1 + g2) * self.dd, g2 * self.qq)
        alpha = (g1 * self.t1 + g2 * self.t2) / (B - 1)
        gin = ExchKernel(B, alpha, 0.0)
        gam = self.rho * (g1 * self.ddn + g2 * (self.ddn + (B - 1) * self.qn))
        beta = (
            G.cen * (B - 1) * (self.dd - self.qq)
            + G.mean * (self.dd + (B - 1) * self.qq)
        ) / B
        return bn, gin, gam, beta


def bn_pre_exchangeable(
    act: Activation | str | None,
    B: int,
    gamma: Law,
    beta: Law,
    a: float,
    eps: float,
) -> BNPreStats:
    """:class:`BNPreStats` of ``Dense -> BatchNorm(gamma, beta, eps) -> act`` for a
    BatchNorm input that is an exchangeable Gaussian batch of centred per-example
    variance ``a`` (``act=None``: no activation, the BatchNorm output itself).

    Deterministic: sphere quadrature (:func:`sphere_rule_1d`, :func:`sphere_rule_2d`)
    times the laws of gamma and beta (:meth:`Law.nodes`), and the chi-square law
    of the batch variance (:func:`batch_variance_moments`); cached per
    (activation, B, laws, moments) so the blocks of a network share one evaluation.
    """
    if isinstance(act, str):
        act = mf._act(act)
    if B < 2:
        raise ValueError(f"batch size must be >= 2, got {B}")
    mom = batch_variance_moments(B, a, eps)
    I, qerr = _bn_pre_cached(act, B, gamma, beta, float(f"{mom.r:.13g}"))
    e0, kappa, rho = mom.e0, mom.kappa, mom.rho
    t1 = e0 * (B - 1) * I["g2dd"] - kappa * I["g2ddn"]
    t2 = e0 * (B - 1) * (I["g2dd"] - I["g2qq"]) - kappa * (
        I["g2ddn"] + (B - 1) * I["g2qn"]
    )
    dead, dead_se = dead_bn_sphere(B, gamma, beta, mom.r, act)
    # the activation's argument uses the mean radius E[r]; the neglected
    # covariance of r with the rest is O(eps E[1/s]) relative (docs/theory.md)
    eps_term = float(eps) * e0
    bn_kd, bn_ko = bn_row_kernel(gamma, beta, rho, B)
    return BNPreStats(
        B=B,
        bn_mean=beta.mean,
        bn_kd=bn_kd,
        bn_ko=bn_ko,
        bn_active=I["pos"],
        y_mean=I["m1"],
        y_kd=I["m2"],
        y_ko=I["pp"],
        y_active=I["ypos"],
        dead=dead,
        dead_se=dead_se,
        dd=I["dd"],
        qq=I["qq"],
        ddn=I["ddn"],
        qn=I["qn"],
        t1=t1,
        t2=t2,
        rho=rho,
        error=qerr
        + mom.rel_error
        + (eps_term if act is not None and act.name != "identity" else 0.0),
    )


@functools.lru_cache(maxsize=512)
def _bn_pre_cached(act, B, gamma, beta, r) -> tuple[dict, float]:
    """The sphere integrals (network-independent given the mean radius r) and
    their relative error, estimated from a coarser rule at the heaviest
    (gamma, beta) node (every node uses the same construction)."""
    fine = _bn_pre_integrals(act, B, gamma, beta, r, NODES_PER_PANEL)
    single = gamma.kind == "constant" and beta.kind == "constant"
    ref = (
        fine
        if single
        else _bn_pre_integrals(act, B, gamma, beta, r, NODES_PER_PANEL, heaviest=True)
    )
    coarse = _bn_pre_integrals(
        act, B, gamma, beta, r, NODES_PER_PANEL - 3, heaviest=True
    )
    errs = [
        abs(ref[k] - coarse[k]) / max(abs(ref[k]), 1e-300)
        for k in ref
        if abs(ref[k]) > 1e-12
    ]
    return fine, max([*errs, 1e-14])


def _bn_pre_integrals(
    act, B, gamma: Law, beta: Law, r: float, n: int, heaviest: bool = False
) -> dict:
    """Sphere integrals of the BN-then-activation unit, averaged over gamma, beta
    (``heaviest``: at the node of largest weight only)."""
    bn_, bw = beta.nodes()
    if heaviest:
        bn_, bw = bn_[[np.argmax(bw)]], np.ones(1)
    R = math.sqrt(B - 1)
    funcs = _act_funcs(act)
    acc: dict[str, float] = {}

    def add(k: str, v: float) -> None:
        acc[k] = acc.get(k, 0.0) + v

    sign_y = act is None or act.name in _SIGN_PRESERVING
    steep = act is not None and act.name not in _PIECEWISE_LINEAR
    for b, wb in zip(bn_, bw, strict=True):
        # the kink -b/(g r) enters the sphere's support |n| <= sqrt(B-1) at
        # |g| = |b|/(r sqrt(B-1)): the integrand is not smooth in g there
        gb = abs(b) / (r * R)
        gn, gw = gamma.nodes(breaks=(0.0, gb, -gb))
        if heaviest:
            gn, gw = gn[[np.argmax(gw)]], np.ones(1)
        for g, wg in zip(gn, gw, strict=True):
            gr = g * r
            w = wg * wb
            if gr != 0:
                kink = -b / gr
                # grade only a transition steeper than the sphere's bulk
                width = 0.5 / abs(gr) if steep and abs(gr) > 2.0 else 0.0
            else:
                kink, width = math.inf, 0.0
            x1, w1 = sphere_rule_1d(B, kink, width, n)
            xa, xb, w2 = sphere_rule_2d(B, kink, width, n)
            za = gr * x1 + b
            pos = float(np.dot(w1, za > 0))
            add("pos", w * pos)
            if funcs is None:
                # linear: y = x, d = 1; exact sphere moments E n = 0, E n^2 = 1,
                # E n_a n_b = -1/(B-1) (so beta of a linear BN net is exactly 0)
                y1, y2 = b, gr * gr + b * b
                ypp = -gr * gr / (B - 1) + b * b
                dd = qq = 1.0
                ddn, qn = 1.0, -1.0 / (B - 1)
                ypos = pos
            else:
                phi, dphi = funcs
                fa = phi(za)
                da = dphi(za)
                y1, y2 = float(np.dot(w1, fa)), float(np.dot(w1, fa * fa))
                dd = float(np.dot(w1, da * da))
                ddn = float(np.dot(w1, da * da * x1 * x1))
                zA, zB = gr * xa + b, gr * xb + b
                ypp = float(np.dot(w2, phi(zA) * phi(zB)))
                dA, dB = dphi(zA), dphi(zB)
                qq = float(np.dot(w2, dA * dB))
                qn = float(np.dot(w2, dA * xa * dB * xb))
                ypos = pos if sign_y else float(np.dot(w1, fa > 0))
            add("ypos", w * ypos)
            add("m1", w * y1)
            add("m2", w * y2)
            add("pp", w * ypp)
            add("dd", w * dd)
            add("qq", w * qq)
            add("ddn", w * ddn)
            add("qn", w * qn)
            g2 = w * g * g
            add("g2", g2)
            add("g2dd", g2 * dd)
            add("g2qq", g2 * qq)
            add("g2ddn", g2 * ddn)
            add("g2qn", g2 * qn)
    return acc


# -- dead fractions -------------------------------------------------------------------


def _one_blas_thread(f):
    """Run ``f`` with one BLAS thread: the Monte Carlo units multiply tall, thin
    matrices (samples x B), where a threaded BLAS gains nothing and, on a loaded
    machine, loses several times over to oversubscription."""

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: then BLAS keeps its own threads
            return f(*args, **kwargs)
        with threadpool_limits(1, user_api="blas"):
            return f(*args, **kwargs)

    return wrapped


@functools.lru_cache(maxsize=32)
def sphere_max_samples(B: int) -> np.ndarray:
    """Sorted samples of ``max_a u_a`` for u uniform on the unit sphere of the
    centred subspace of R^B (seeded by B: deterministic), as many as
    ``2^23 / B`` (at least 16384).  Its empirical CDF is the law of the largest
    normalised deviation of a Gaussian sample (Grubbs' statistic / sqrt(B)).
    Probabilities below ~1/len(table) are not resolved: the dead fractions built
    on it add 1/len(table) to their stated error."""
    M = max(16384, _MAX_TABLE_WORK // B)
    rng = np.random.default_rng([0x1D6, B])
    out = np.empty(M)
    per = max(1, (1 << 20) // B)
    for i in range(0, M, per):
        z = rng.standard_normal((min(per, M - i), B))
        z -= z.mean(axis=1, keepdims=True)
        out[i : i + z.shape[0]] = z.max(axis=1) / np.sqrt(np.einsum("ij,ij->i", z, z))
    out.sort()
    return out


def dead_bn_sphere(
    B: int, gamma: Law, beta: Law, r: float = 1.0, act: Activation | None = None
) -> tuple[float, float]:
    """P(gamma r sqrt(B) u_a + beta <= 0 for every a) and its standard error, u
    uniform on the centred unit sphere: the dead fraction of a BatchNorm output
    (and of a sign-preserving activation after it).

    For gamma != 0 the event is ``beta <= -|gamma| r sqrt(B) max_a u_a``: averaged
    exactly over beta (its CDF) and gamma (quadrature), and over the law of the
    maximum by the seeded table :func:`sphere_max_samples`.  Exactly 0 when beta
    >= 0 and gamma != 0 almost surely (a centred batch has a positive entry); 0 for
    sigmoid (never <= 0)."""
    if act is not None and act.name not in _SIGN_PRESERVING:
        return 0.0, 0.0
    g_lo, g_hi = gamma.support()
    b_lo, _ = beta.support()
    zero_gamma = gamma.kind == "constant" and gamma.p == 0.0
    if zero_gamma:
        return float(beta.cdf(np.array(0.0))), 0.0
    if b_lo >= 0.0:
        return 0.0, 0.0
    if B == 2:
        m = np.array([1.0 / math.sqrt(2.0)])
    else:
        m = sphere_max_samples(B)
    gn, gw = gamma.nodes(breaks=(0.0,))
    if gn.size > 1 and m.size > 16384:
        # evenly spaced order statistics: a stratified subsample of the table
        m = m[np.linspace(0, m.size - 1, 16384).astype(int)]
    k = math.sqrt(B) * r
    h = np.zeros(m.size)
    for g, w in zip(gn, gw, strict=True):
        h += w * beta.cdf(-abs(g) * k * m)
    p = float(h.mean())
    se = float(h.std() / math.sqrt(m.size)) + 1.0 / m.size if m.size > 1 else 0.0
    return p, se


def dead_exchangeable(B: int, mean: float, d: float, o: float) -> tuple[float, float]:
    """P(h_a <= 0 for every a) and its error for an exchangeable Gaussian batch:
    E[h_a] = mean, Var[h_a] = d, Cov(h_a, h_b) = o (a != b).

    o >= 0: ``P = int phi(z) Phi(-(mean + sqrt(o) z)/sqrt(d - o))^B dz`` (adaptive
    quadrature; its error estimate).  o < 0 (a centred batch, e.g. after a
    BatchNorm): ``h = mean + sqrt(d - o) (w + sqrt(eta/B) Z 1)``, w centred with
    ``w = R u``, R ~ chi_(B-1), eta = 1 + o B/(d - o); the event is
    ``R max_a u_a <= -(mean/sqrt(d-o) + sqrt(eta/B) Z)``, averaged exactly over R
    (chi CDF) and Z (quadrature) and over the sphere maximum's seeded table
    (standard error)."""
    if not d > 0:
        return float(mean <= 0), 0.0
    ve = d - o
    if ve <= 1e-14 * d:
        return float(special.ndtr(-mean / math.sqrt(d))), 0.0
    if o < -ve / B * (1 + 1e-9):
        raise ValueError(f"not a covariance: d={d}, o={o} at batch size {B}")
    if o >= 0:
        so, sv = math.sqrt(o), math.sqrt(ve)

        def f(z: float) -> float:
            lp = B * special.log_ndtr(-(mean + so * z) / sv)
            return math.exp(lp - 0.5 * z * z) / math.sqrt(2 * math.pi)

        if so == 0:
            return float(math.exp(B * special.log_ndtr(-mean / sv))), 0.0
        # the product drops from 1 to 0 where (mean + so z)/sv ~ -Phi^-1(2^(-1/B))
        z0 = (-sv * special.ndtri(2.0 ** (-1.0 / B)) - mean) / so
        pts = sorted({min(max(z0, -37.0), 37.0), 0.0})
        total, err = 0.0, 0.0
        edges = [-38.0, *pts, 38.0]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            v, e = integrate.quad(f, lo, hi, limit=200, epsabs=1e-15, epsrel=1e-10)
            total += v
            err += e
        return float(min(max(total, 0.0), 1.0)), float(err)
    eta = max(0.0, 1.0 + o * B / ve)
    t0 = -mean / math.sqrt(ve)
    if eta == 0.0 and t0 <= 0.0:
        return 0.0, 0.0  # a centred batch with mean >= 0 always has an entry > 0
    m = sphere_max_samples(B) if B > 2 else np.array([1.0 / math.sqrt(2.0)])
    if eta == 0.0:
        zs, wz = np.zeros(1), np.ones(1)
    else:
        x, w = special.roots_hermitenorm(24)
        zs, wz = x, w / w.sum()
    tau = t0 - math.sqrt(eta / B) * zs  # (nz,)
    arg = np.maximum(tau[None, :], 0.0) / m[:, None]
    h = np.dot(special.gammainc((B - 1) / 2.0, 0.5 * arg * arg), wz)
    return float(h.mean()), float(h.std() / math.sqrt(m.size)) + 1.0 / m.size


@_one_blas_thread
def dead_gaussian(
    mean: np.ndarray, S: np.ndarray, samples: int | None = None, seed: int = 0
) -> tuple[float, float]:
    """P(h_a <= 0 for every a) for h ~ N(mean, S) (any B x B covariance, singular
    allowed) and its standard error.

    Genz's separation of variables (Genz 1992, "Numerical computation of
    multivariate normal probabilities", J. Comput. Graph. Stat.): with S = L L^T
    (pivoted Cholesky, most constraining variable first), the probability is
    E over uniforms of prod_i Phi(b_i(z_<i) / L_ii); O(samples B^2) work,
    vectorised over samples, seeded."""
    mean = np.asarray(mean, dtype=float)
    S = np.asarray(S, dtype=float)
    B = mean.size
    if samples is None:
        samples = int(min(8192, max(512, (1 << 22) // max(B * B // 8, 1))))
    sd = np.sqrt(np.maximum(np.diag(S), 0.0))
    L, order = _pivoted_cholesky(S, mean, sd)
    rng = np.random.default_rng([0x0DEAD, seed, B])
    lp = np.zeros(samples)
    Z = np.zeros((samples, B))
    alive = np.ones(samples, dtype=bool)
    for j, i in enumerate(order):
        lij = L[j, :j]
        shift = np.dot(Z[:, :j], lij) if j else np.zeros(samples)
        bound = -mean[i] - shift
        piv = L[j, j]
        if piv > 0:
            c = special.ndtr(bound / piv)
            with np.errstate(divide="ignore"):
                lp += np.log(c)
            u = rng.random(samples)
            Z[:, j] = special.ndtri(np.clip(u * c, 1e-300, 1.0 - 1e-16))
        else:
            alive &= bound >= -1e-5 * max(sd[i], 1e-300)
    vals = np.where(alive, np.exp(lp), 0.0)
    return float(vals.mean()), float(vals.std() / math.sqrt(samples))


def _pivoted_cholesky(S: np.ndarray, mean: np.ndarray, sd: np.ndarray):
    """S = L L^T in a reordered basis (row j of L belongs to variable order[j]):
    outer-product Cholesky on the Schur complement, choosing next the variable
    with the smallest probability Phi(-mean_i / sqrt(conditional variance_i))
    (Genz & Bretz 2009's ordering with the prior means); pivots below 1e-10 of
    the variable's variance are zero (a singular S, e.g. a centred batch)."""
    B = S.shape[0]
    A = S.astype(float).copy()
    L = np.zeros((B, B))
    rest = np.ones(B, dtype=bool)
    order: list[int] = []
    for j in range(B):
        v = np.maximum(np.diag(A), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(
                v > 0, -mean / np.sqrt(v), np.where(mean <= 0, np.inf, -np.inf)
            )
        idx = np.flatnonzero(rest)
        i = int(idx[np.argmin(z[idx])])
        rest[i] = False
        order.append(i)
        piv = A[i, i]
        # a conditional variance below 1e-10 of the variable's own is rounding
        # (a singular S): the variable is then fixed by the earlier ones
        if piv > 1e-10 * max(S[i, i], 1e-300):
            col = A[:, i] / math.sqrt(piv)
        else:
            col = np.zeros(B)
        L[:, j] = col
        A -= np.outer(col, col)
    # rows in conditioning order; L[order] is lower triangular
    return L[order], order


# -- Monte Carlo integration over a Gaussian batch ------------------------------------


@dataclass(frozen=True)
class Moments:
    """First and second moments of one row's per-unit batch vector ``x``:
    ``mean`` E[x_a] (B,), ``K`` E[x_a x_b] (B, B) (exchangeable: ``kd``, ``ko``
    and ``K`` built from them), ``active`` P(x_a > 0), ``dead`` P(x_a <= 0 for
    every a); ``*_se`` standard errors of the Monte Carlo integration."""

    mean: np.ndarray
    K: np.ndarray
    active: float
    dead: float
    K_se: float = 0.0
    active_se: float = 0.0
    dead_se: float = 0.0


class BNMonteCarlo:
    """One BatchNorm unit over a Gaussian batch ``h ~ N(mean, S)``, integrated by
    seeded Monte Carlo (not a simulation of a network: one unit's batch vector,
    docs/theory.md).

    ``position="pre"``: ``x = gamma BN(h) + beta`` (the BatchNorm row), ``y =
    act(x)`` (the activation row).  ``position="post"``: ``x = act(h)`` (the
    activation row, Gaussian input), ``y = gamma BN(x) + beta`` (the BatchNorm
    row).  ``BN(v) = C v / sqrt(s + eps)``, ``s = |C v|^2 / B``.

    ``exchangeable=True`` (S = (d - o) I + o J, constant mean) reduces every
    kernel to its diagonal / off-diagonal averages, O(B) work per sample, and the
    backward takes and returns :class:`ExchKernel`; otherwise kernels are B x B
    arrays (O(B^2) per sample).  ``samples`` defaults to a fixed amount of work.

    Attributes ``rows``: ``{"bn": Moments, "act": Moments}``.
    """

    def __init__(
        self,
        act: Activation | str | None,
        position: str,
        mean: np.ndarray,
        S: np.ndarray,
        gamma: Law,
        beta: Law,
        eps: float,
        *,
        exchangeable: bool = False,
        samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(act, str):
            act = mf._act(act)
        if position not in ("pre", "post"):
            raise ValueError(f"position must be 'pre' or 'post', got {position!r}")
        mean = np.asarray(mean, dtype=float)
        S = np.asarray(S, dtype=float)
        B = mean.size
        if B < 2:
            raise ValueError(f"batch size must be >= 2, got {B}")
        self.act, self.position, self.B = act, position, B
        self.gamma, self.beta, self.eps = gamma, beta, float(eps)
        self.exchangeable = exchangeable
        if samples is None:
            # the forward costs O(B) per sample; a full-kernel backward O(B^2)
            # (it uses the first ``M_back`` samples)
            samples = int(min(1 << 19, max(4096, (1 << 21) // B)))
        self.M = samples + samples % 2
        self.M_back = (
            self.M if exchangeable else int(min(self.M, max(512, _MC_WORK // (B * B))))
        )
        rng = np.random.default_rng([0xB17, seed, B])
        self._draw(rng, mean, S)

    # forward ------------------------------------------------------------------------
    def _draw(self, rng, mean, S) -> None:
        _one_blas_thread(self._draw_samples)(rng, mean, S)

    def _draw_samples(self, rng, mean, S) -> None:
        B, M = self.B, self.M
        if self.exchangeable:
            d, o = float(S[0, 0]), float(S[0, 1]) if B > 1 else 0.0
            e = rng.standard_normal((M, B))
            e -= e.mean(axis=1, keepdims=True)
            zeta = rng.standard_normal((M, 1))
            h = (
                float(mean[0])
                + math.sqrt(max(d - o, 0.0)) * e
                + math.sqrt(max(d + (B - 1) * o, 0.0) / B) * zeta
            )
        else:
            lam, V = np.linalg.eigh(S)
            Lm = V * np.sqrt(np.maximum(lam, 0.0))
            # antithetic pairs (z, -z), beta mirrored about its mean: halves the
            # error of odd parts and keeps the symmetries of a symmetric law exact
            z = np.dot(rng.standard_normal((M // 2, B)), Lm.T)
            h = mean + np.concatenate([z, -z])
        phi = _act_funcs(self.act)
        g = self.gamma.sample(M, rng)[:, None]
        b = self.beta.sample(M, rng)[:, None]
        if not self.exchangeable:
            half = M // 2
            g[half:] = g[:half]
            b[half:] = 2 * self.beta.mean - b[:half]
        if self.position == "pre":
            n, inv, rho = _normalise(h, self.eps)
            x = g * n + b
            y, dy = (x, np.ones_like(x)) if phi is None else (phi[0](x), phi[1](x))
            sign = self.act is None or self.act.name in _SIGN_PRESERVING
            self.rows = {
                "bn": self._moments(x, x),
                "act": self._moments(y, y if not sign else x),
            }
            self._n, self._inv, self._rho = n, inv * g[:, 0] ** 2, rho
            self._d = dy
            self._dn = dy * n
        else:
            x, dx = (h, np.ones_like(h)) if phi is None else (phi[0](h), phi[1](h))
            n, inv, rho = _normalise(x, self.eps)
            y = g * n + b
            self.rows = {"act": self._moments(x, x), "bn": self._moments(y, y)}
            self._n, self._inv, self._rho = n, inv, rho
            self._d = dx
            self._g2 = self.gamma.second
        self.rho = float(rho.mean())

    def _moments(self, v: np.ndarray, sgn: np.ndarray) -> Moments:
        """Moments of the rows of ``v``; ``sgn`` decides active / dead."""
        M, B = v.shape
        pos = (sgn > 0).mean(axis=1)
        dead = np.all(sgn <= 0, axis=1).astype(float)
        if self.exchangeable:
            sq = np.einsum("ma,ma->m", v, v) / B
            tot = v.sum(axis=1)
            off = (tot * tot - B * sq) / (B * (B - 1))
            kd, ko = float(sq.mean()), float(off.mean())
            K = np.full((B, B), ko)
            np.fill_diagonal(K, kd)
            se = float(max(sq.std(), off.std()) / math.sqrt(M))
            mu = np.full(B, float(v.mean()))
        else:
            K = np.dot(v.T, v) / M
            se = float(np.sqrt(np.mean(np.var(v * v, axis=0))) / math.sqrt(M))
            mu = v.mean(axis=0)
        return Moments(
            mean=mu,
            K=K,
            active=float(pos.mean()),
            dead=float(dead.mean()),
            K_se=se,
            active_se=float(pos.std() / math.sqrt(M)),
            dead_se=float(dead.std() / math.sqrt(M)),
        )

    # backward -----------------------------------------------------------------------
    def pre_stats(self) -> BNPreStats:
        """The exchangeable "pre" unit as :class:`BNPreStats` (the same backward
        map as the quadrature), from the samples."""
        if not (self.exchangeable and self.position == "pre"):
            raise ValueError("pre_stats() needs an exchangeable 'pre' unit")
        B = self.B
        d, n, inv = self._d, self._n, self._inv
        kap = 2 * self._rho - self._rho**2
        nn = np.sqrt(np.maximum(np.einsum("ma,ma->m", n, n), 1e-300))
        ut = n / nn[:, None]
        d2 = d * d
        dd = float(d2.mean())
        sd = d.sum(axis=1)
        qq = float(((sd * sd - d2.sum(axis=1)) / (B * (B - 1))).mean())
        dn = self._dn
        ddn = float((dn * dn).mean())
        sdn = dn.sum(axis=1)
        qn = float(((sdn * sdn - (dn * dn).sum(axis=1)) / (B * (B - 1))).mean())
        tr = d2.sum(axis=1) * (1 - 1 / B) - kap * np.einsum("ma,ma->m", d2, ut * ut)
        cd = d - d.mean(axis=1, keepdims=True)
        ud = np.einsum("ma,ma->m", ut, d)
        pd2 = np.einsum("ma,ma->m", cd, cd) - kap * ud * ud
        bn, ac = self.rows["bn"], self.rows["act"]
        return BNPreStats(
            B=B,
            bn_mean=float(bn.mean.mean()),
            bn_kd=float(bn.K[0, 0]),
            bn_ko=float(bn.K[0, 1]),
            bn_active=bn.active,
            y_mean=float(ac.mean.mean()),
            y_kd=float(ac.K[0, 0]),
            y_ko=float(ac.K[0, 1]),
            y_active=ac.active,
            dead=ac.dead,
            dead_se=ac.dead_se,
            dd=dd,
            qq=qq,
            ddn=ddn / self.rho,
            qn=qn / self.rho,
            t1=float((inv * tr).mean()),
            t2=float((inv * pd2).mean()),
            rho=self.rho,
            error=float((inv * tr).std() / math.sqrt(self.M))
            / max(abs(float((inv * tr).mean())), 1e-300),
        )

    def backward(self, G):
        """Gradient kernels below the unit for the upstream kernel ``G`` at the
        unit's output, and the per-unit gamma / beta gradient second moments
        ``(1/B) E[(dL/dgamma)^2]``, ``(1/B) E[(dL/dbeta)^2]``.

        Returns a dict: ``"mid"`` the kernel between the two rows (pre: at the
        BatchNorm output; post: at the activation output = BatchNorm input),
        ``"in"`` the kernel at the unit's input ``h``, ``"gamma"``, ``"beta"``.
        (docs/theory.md: G_in = E[gamma^2/(s+eps) P D G D P] (pre), E[gamma^2/
        (s+eps) D P G P D] (post), P = C - n n^T/B.)"""
        return _one_blas_thread(self._backward)(G)

    def _backward(self, G):
        if self.exchangeable:
            if not isinstance(G, ExchKernel):
                raise TypeError("an exchangeable unit takes an ExchKernel")
            if self.position == "pre":
                bn, gin, gam, bet = self.pre_stats().backward(G)
                return {"mid": bn, "in": gin, "gamma": gam, "beta": bet}
            return self._post_exch(G)
        G = np.asarray(G, dtype=float)
        if self.position == "pre":
            return self._pre_full(G)
        return self._post_full(G)

    def _post_exch(self, G: ExchKernel) -> dict:
        B = self.B
        n, inv, d = self._n, self._inv, self._d
        kap = 2 * self._rho - self._rho**2
        nn = np.sqrt(np.maximum(np.einsum("ma,ma->m", n, n), 1e-300))
        ut = n / nn[:, None]
        g2 = self._g2 * G.cen
        alpha = g2 * float((inv * ((B - 1) - kap)).mean()) / (B - 1)
        d2 = d * d
        diag = d2.sum(axis=1) * (1 - 1 / B) - kap * np.einsum("ma,ma->m", d2, ut * ut)
        cd = d - d.mean(axis=1, keepdims=True)
        ud = np.einsum("ma,ma->m", ut, d)
        tot = np.einsum("ma,ma->m", cd, cd) - kap * ud * ud
        dg = g2 * float((inv * diag).mean()) / B
        of = g2 * float((inv * (tot - diag)).mean()) / (B * (B - 1))
        self.rel_se = max(
            _rel_se(inv * ((B - 1) - kap)), _rel_se(inv * diag), _rel_se(inv * tot)
        )
        return {
            "mid": ExchKernel(B, alpha, 0.0),
            "in": ExchKernel.from_diag_off(B, dg, of),
            "gamma": G.cen * self.rho,
            "beta": G.mean,
        }

    def _chunks(self):
        step = max(1, (1 << 21) // (self.B * self.B))
        M = self.M_back
        return [slice(i, min(M, i + step)) for i in range(0, M, step)]

    def pre_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """E[d d^T] and E[(d n)(d n)^T] of a "pre" unit (B x B, cached)."""
        if not hasattr(self, "_pre_mom"):
            M = self.M
            self._pre_mom = (
                np.dot(self._d.T, self._d) / M,
                np.dot(self._dn.T, self._dn) / M,
            )
        return self._pre_mom

    def mid_kernel(self, G: np.ndarray) -> np.ndarray:
        """The kernel at the BatchNorm output of a "pre" unit: G o E[d d^T]."""
        return G * _one_blas_thread(self.pre_moments)()[0]

    def _pre_full(self, G: np.ndarray) -> dict:
        B, M = self.B, self.M_back
        d, n, inv = self._d, self._n, self._inv
        Gin = np.zeros((B, B))
        for sl in self._chunks():
            A = d[sl, :, None] * G[None] * d[sl, None, :]
            A = _centre2(A)
            ns = n[sl]
            v = (A * ns[:, None, :]).sum(axis=2)  # C A C n = C A n (n centred)
            w = np.einsum("ma,ma->m", ns, v)
            c = inv[sl]
            Gin += np.dot(c, A.reshape(c.size, -1)).reshape(B, B)
            t = np.dot((c[:, None] * v).T, ns) / B
            Gin -= t + t.T
            Gin += np.dot(((c * w)[:, None] * ns).T, ns) / (B * B)
        Gin /= M
        Edd, Edn = self.pre_moments()
        return {
            "mid": G * Edd,
            "in": Gin,
            "gamma": float(np.sum(G * Edn)) / B,
            "beta": float(np.sum(G * Edd)) / B,
        }

    def _post_full(self, G: np.ndarray) -> dict:
        B, M = self.B, self.M
        d, n, inv = self._d, self._n, self._inv
        CGC = _centre2(G[None])[0]
        v = np.dot(n, CGC)  # (M, B): C G n for centred n
        w = np.einsum("ma,ma->m", n, v)
        g2 = self._g2
        t = np.dot((inv[:, None] * v).T, n) / (B * M)
        mid = g2 * (
            inv.mean() * CGC
            - t
            - t.T
            + np.dot(((inv * w)[:, None] * n).T, n) / (B * B * M)
        )
        dn = d * n
        dv = d * v
        Edd = np.dot((inv[:, None] * d).T, d) / M
        t2 = np.dot((inv[:, None] * dv).T, dn) / (B * M)
        gin = g2 * (
            CGC * Edd
            - t2
            - t2.T
            + np.dot(((inv * w)[:, None] * dn).T, dn) / (B * B * M)
        )
        Enn = np.dot(n.T, n) / M
        return {
            "mid": mid,
            "in": gin,
            "gamma": float(np.sum(G * Enn)) / B,
            "beta": float(np.sum(G)) / B,
        }


def _rel_se(v: np.ndarray) -> float:
    m = abs(float(v.mean()))
    return float(v.std() / math.sqrt(v.size)) / m if m > 0 else 0.0


def _normalise(v: np.ndarray, eps: float):
    """Rows of v -> BN(v) = C v / sqrt(s + eps), 1/(s + eps), s/(s + eps)."""
    c = v - v.mean(axis=1, keepdims=True)
    s = np.einsum("ma,ma->m", c, c) / v.shape[1]
    inv = 1.0 / (s + eps)
    return c * np.sqrt(inv)[:, None], inv, s * inv


def _centre2(A: np.ndarray) -> np.ndarray:
    """C A C for a stack of square matrices (C = I - J/B)."""
    return (
        A
        - A.mean(axis=1, keepdims=True)
        - A.mean(axis=2, keepdims=True)
        + A.mean(axis=(1, 2), keepdims=True)
    )


# -- per-block gradient growth -------------------------------------------------------


def bn_block_gain(
    act: Activation | str | None,
    B: int,
    gamma: Law,
    beta: Law,
    *,
    position: str = "pre",
    eps: float = 0.0,
    sigma_w2: float = 1.0,
    sigma_b2: float = 0.0,
) -> tuple[float, float]:
    """Per-block growth of the gradient second moment in a deep BatchNorm network
    at batch size B, and its numerical error (relative).

    ``position="pre"``: ``Dense -> BN -> act``,
    ``lambda(B) = (t1 - t2/B) / ((B - 1)(K_d - K_o))`` at unit input variance
    (docs/theory.md; identity: (B-2)/(B-3); ReLU at gamma = 1, beta = 0: 1.788 at
    B = 8, 1.522 at 32, -> pi/(pi - 1) = 1.4669 as B -> infinity; independent of
    sigma_w2 when eps = 0).  ``position="post"``: ``Dense -> act -> BN``, the
    ratio of the centred gradient kernel from one BatchNorm output to the next
    (Monte Carlo over the Gaussian, :class:`BNMonteCarlo`); the dense layer has
    weight variance sigma_w2 / fan_in and bias variance sigma_b2.
    """
    if isinstance(act, str):
        act = mf._act(act)
    if position == "pre":
        s = bn_pre_exchangeable(act, B, gamma, beta, 1.0, 0.0)
        if eps > 0:
            a = sigma_w2 * (s.y_kd - s.y_ko)
            s = bn_pre_exchangeable(act, B, gamma, beta, a, eps)
            return (s.t1 - s.t2 / B) * a / ((B - 1) * (s.y_kd - s.y_ko)), s.error
        return (s.t1 - s.t2 / B) / ((B - 1) * (s.y_kd - s.y_ko)), s.error
    if position != "post":
        raise ValueError(f"position must be 'pre' or 'post', got {position!r}")
    kd, ko = bn_row_kernel(gamma, beta, 1.0, B)
    S = np.full((B, B), sigma_w2 * ko + sigma_b2)
    np.fill_diagonal(S, sigma_w2 * kd + sigma_b2)
    u = BNMonteCarlo(act, "post", np.zeros(B), S, gamma, beta, eps, exchangeable=True)
    out = u.backward(ExchKernel(B, 1.0, 0.0))
    g = sigma_w2 * out["in"].cen
    return float(g), 2.0 * u.rel_se  # the centred part mixes two sample means


def bn_post_exchangeable(
    act: Activation | str | None,
    B: int,
    mean: float,
    d: float,
    o: float,
    gamma: Law,
    beta: Law,
    eps: float,
) -> BNMonteCarlo:
    """The exchangeable ``Dense -> act -> BatchNorm`` unit (:class:`BNMonteCarlo`,
    position "post") for a Gaussian dense output of mean ``mean``, variance ``d``
    and covariance ``o``; cached on the arguments rounded to 12 digits, so the
    blocks of a deep network (the same input law from the second block on) share
    one integration."""
    if isinstance(act, str):
        act = mf._act(act)
    r = [float(f"{v:.12g}") for v in (mean, d, o, eps)]
    return _bn_post_cached(act, B, *r, gamma, beta)


@functools.lru_cache(maxsize=64)
def _bn_post_cached(act, B, mean, d, o, eps, gamma, beta) -> BNMonteCarlo:
    S = np.full((B, B), o)
    np.fill_diagonal(S, d)
    return BNMonteCarlo(
        act, "post", np.full(B, mean), S, gamma, beta, eps, exchangeable=True
    )


def clear_caches() -> None:
    """Forget every cached integration (benchmarks time a cold first call)."""
    for f in (_gl, _chi2_moments, _bn_pre_cached, sphere_max_samples, _bn_post_cached):
        f.cache_clear()

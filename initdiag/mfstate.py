"""The mean-field state the analytic rules pass along (see :mod:`initdiag.analytic`).

Forward, every unit of a layer sees its batch values ``h[a]`` (a = 1..B); the
:class:`State` keeps ``ex[a] = E[h[a]]``, the second-moment kernel
``K[a, b] = E[h[a] h[b]]`` (the NNGP kernel of Lee et al. 2018, uncentred) and, when
the values are Gaussian, a mixture of Gaussians :class:`Gauss` (one component, or
one per quadrature node of a normalisation layer's random gamma / beta).

Backward, :class:`GradState` carries the gradient second moment at a row's output
per mixture component of the forward state there, and two facts the parameter
gradients need: whether a normalisation above has centred the gradient over the
batch, and whether the gradient is independent of the row's values (no
nonlinearity between them and the loss).

:class:`Batch` holds the batch bookkeeping (an exchangeable pair or a full batch)
and the Profile statistics of a state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from . import meanfield as mf

#: quadrature nodes per random normalisation parameter
NQ = 20


@dataclass
class Gauss:
    """Mixture of Gaussians over the batch: weights (k,), means (k, B), covs
    (k, B, B); ``gamma2`` (k,) the squared BN gain of each component (1 when the
    mixture does not come from a BatchNorm), ``n_mean``/``n_var`` of the
    normalised variable for BN gamma gradients."""

    w: np.ndarray
    m: np.ndarray
    S: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray


@dataclass
class State:
    """``unit``: at a finite batch, what the next rule needs to integrate over one
    unit's batch vector when the state is not Gaussian (:mod:`initdiag.finite_batch`):
    ``{"kind": "bn_pre", ...}`` on a BatchNorm output (the sphere law, or a Monte
    Carlo over the Gaussian input with ``inputs``), ``{"kind": "act_of", "act":
    layer, "gauss": Gauss}`` on an activation output (phi of a Gaussian)."""

    ex: np.ndarray
    K: np.ndarray
    gauss: Gauss | None
    why_not_gauss: str = ""
    unit: dict[str, Any] | None = None


def single(m: np.ndarray, S: np.ndarray) -> Gauss:
    return Gauss(np.ones(1), m[None], S[None], np.ones(1), np.zeros(1))


def moments(g: Gauss) -> tuple[np.ndarray, np.ndarray]:
    ex = np.einsum("k,ka->a", g.w, g.m)
    K = np.einsum("k,kab->ab", g.w, g.S + g.m[:, :, None] * g.m[:, None, :])
    return ex, K


def param_law(init: Any, fi: int, fo: int, what: str) -> tuple:
    """The law of one parameter entry, as :func:`initdiag.meanfield.law_nodes`
    takes it (the initializer's closed-form distribution, or its truncated normal).
    A bias or beta enters every unit directly, so its law matters, not only its
    variance (docs/theory.md section 3)."""
    from .initializers import TruncNormal, VarianceScaling

    dist = init.distribution(fi, fo)
    if dist is not None:
        return dist
    if isinstance(init, TruncNormal):
        return ("truncated_normal", init.mean_, init.std, init.a, init.b)
    if isinstance(init, VarianceScaling) and init.distribution_ == "truncated_normal":
        s, bound = init._trunc(fi, fo)
        return ("truncated_normal", 0.0, s, -bound, bound)
    raise NotImplementedError(
        f"{what} initializer {init} has no known distribution; its law enters every "
        "unit directly (use normal, uniform, constant or trunc_normal)"
    )


def param_nodes(init: Any, nf: int, what: str, layer: str):
    """Quadrature nodes and weights of a normalisation parameter's distribution."""
    mean = init.mean(nf, nf)
    var = init.variance(nf, nf)
    if var == 0:
        return np.array([mean]), np.ones(1)
    dist = param_law(init, nf, nf, f"{layer}: {what}")
    if dist[0] == "truncated_normal":
        return mf.law_nodes(dist)
    kind, p, q = dist
    if kind == "normal":
        x, w = special.roots_hermitenorm(NQ)
        return p + q * x, w / w.sum()
    if kind == "uniform":
        x, w = np.polynomial.legendre.leggauss(NQ)
        return 0.5 * (p + q) + 0.5 * (q - p) * x, w / w.sum()
    return np.array([p]), np.ones(1)


class Batch:
    """Batch bookkeeping: exchangeable pair (``equi``) or a full batch."""

    def __init__(self, equi: bool, B: int | None) -> None:
        self.equi = equi
        self.B = B  # None: infinite

    def centre(self, K: np.ndarray) -> np.ndarray:
        if self.equi:
            d, o = K[0, 0], K[0, 1]
            if self.B is None:
                cd, co = d - o, 0.0
            else:
                cd, co = (d - o) * (self.B - 1) / self.B, -(d - o) / self.B
            return np.array([[cd, co], [co, cd]])
        C = np.eye(K.shape[0]) - 1.0 / K.shape[0]
        return C @ K @ C

    def centre_vec(self, ex: np.ndarray) -> np.ndarray:
        return np.zeros_like(ex) if self.equi else ex - ex.mean()

    def stats(self, ex: np.ndarray, K: np.ndarray) -> dict[str, float]:
        d = np.diag(K)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.equi:
                o = K[0, 1]
                B = self.B
                sq = o if B is None else (K[0, 0] + (B - 1) * o) / B
                corr = o / K[0, 0]
            else:
                sq = K.mean()
                B = K.shape[0]
                sd = np.sqrt(d)
                cos = K / np.outer(sd, sd)
                corr = (cos.sum() - np.trace(cos)) / (B * (B - 1)) if B > 1 else np.nan
        second = float(d.mean())
        return {
            "mean": float(ex.mean()),
            "second_moment": second,
            "variance": second - float(sq),
            "squared_mean": float(sq),
            "correlation": float(corr),
        }


def orthant(g: Gauss, batch: Batch) -> float:
    """P(h[a] <= 0 for every a of the batch) under the mixture."""
    total = 0.0
    for wk, m, S in zip(g.w, g.m, g.S, strict=True):
        total += wk * orthant_one(m, S, batch)
    return float(total)


def orthant_one(m: np.ndarray, S: np.ndarray, batch: Batch) -> float:
    """P(h[a] <= 0 for every a) for one Gaussian component (docs/theory.md,
    "Dead fractions"): the large batch gives 0 unless fully correlated; an
    exchangeable batch the 1-D integral (o >= 0) or the sphere representation
    (o < 0); a full batch Genz's separation of variables."""
    from . import finite_batch as fb

    if batch.equi:
        mu, d, o = m[0], S[0, 0], S[0, 1]
        if batch.B is None:
            if d <= 0:
                return float(mu <= 0)
            if d - o <= 1e-15 * d:
                return float(special.ndtr(-mu / math.sqrt(d)))
            return 0.0  # large batch: some input is positive almost surely
        return fb.dead_exchangeable(batch.B, float(mu), float(d), float(o))[0]
    return fb.dead_gaussian(m, S)[0]


def act_expect(act: Any, g: Gauss, batch: Batch):
    """ex, K, E[phi'^2] per component (mean over inputs), P(h > 0) mean."""
    k, B = g.m.shape
    iu, ju = np.triu_indices(B)
    v = np.diagonal(g.S, axis1=1, axis2=2)  # (k, B)
    vi, vj = v[:, iu], v[:, ju]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # sqrt before the product: vi * vj overflows from q ~ 1e154 on
        sij = np.sqrt(vi) * np.sqrt(vj)
        rho = np.where(sij > 0, g.S[:, iu, ju] / sij, 0.0)
    mi, mj = g.m[:, iu], g.m[:, ju]
    pp = mf._expect_2d(
        act, False, mi.ravel(), mj.ravel(), vi.ravel(), vj.ravel(), rho.ravel()
    ).reshape(k, -1)
    # diagonal entries from the 1-D rule (more accurate than 2-D at rho = 1)
    diag = iu == ju
    e2 = mf._expect_1d(act, "phi2", g.m.ravel(), v.ravel()).reshape(k, B)
    pp[:, diag] = e2
    Kc = np.zeros((k, B, B))
    Kc[:, iu, ju] = pp
    Kc[:, ju, iu] = pp
    e1 = mf._expect_1d(act, "phi", g.m.ravel(), v.ravel()).reshape(k, B)
    d2 = mf._expect_1d(act, "dphi2", g.m.ravel(), v.ravel()).reshape(k, B)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(v)
        ppos = np.where(
            sd > 0, special.ndtr(g.m / np.where(sd > 0, sd, 1)), (g.m > 0).astype(float)
        )
    ex = np.einsum("k,ka->a", g.w, e1)
    K = np.einsum("k,kab->ab", g.w, Kc)
    return ex, K, d2.mean(axis=1), float(g.w @ ppos.mean(axis=1))


def gamma_moment(act: Any, g: Gauss) -> np.ndarray:
    """Per component: E[phi'(h)^2 n^2] (mean over inputs), n = (h - beta)/gamma the
    normalised BatchNorm output; E[n^2] when no activation follows."""
    k, B = g.m.shape
    v = np.diagonal(g.S, axis1=1, axis2=2)
    gam = np.where(g.gamma != 0, g.gamma, 1.0)[:, None]
    nm = (g.m - g.beta[:, None]) / gam
    nv = v / gam**2
    if act is None:
        return (nm**2 + nv).mean(axis=1)
    out = np.empty((k, B))
    mu, s = g.m.ravel(), np.sqrt(v).ravel()
    bet = np.repeat(g.beta, B)
    gg = np.repeat(gam[:, 0], B)

    # E[phi'(h)^2 ((h - beta)/gamma)^2], h ~ N(mu, s^2): kink-centred quadrature
    vals = np.empty(mu.size)
    for i in range(mu.size):

        def f(x, i=i):
            return mf._dphi(act, x) ** 2 * ((x - bet[i]) / gg[i]) ** 2

        vals[i] = mf._gauss_1d(f, mu[i : i + 1], s[i : i + 1])[0]
    out[:] = vals.reshape(k, B)
    return out.mean(axis=1)


def pfrac(g: Gauss) -> float:
    v = np.diagonal(g.S, axis1=1, axis2=2)
    sd = np.sqrt(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(
            sd > 0, special.ndtr(g.m / np.where(sd > 0, sd, 1)), (g.m > 0).astype(float)
        )
    return float(g.w @ p.mean(axis=1))


@dataclass
class GradState:
    """Backward state at a row's output: ``comp`` the gradient second moment per
    mixture component of the row's forward :class:`Gauss` state (one entry when
    that state is not a mixture), ``centred`` whether a normalisation layer above
    projected the gradient onto zero batch-sum, ``independent`` whether the
    gradient is independent of the row's values (gradient independence with no
    nonlinearity in between: the output gradient, a dense layer's input
    gradient)."""

    comp: np.ndarray
    centred: bool = False
    independent: bool = True
    #: ``(activation, q~ at its output)`` when the gradient reached this row
    #: through an activation directly above (``g = phi'(h) g_above``)
    through: tuple | None = None
    #: at a finite batch, the batch kernel of gradients ``G[a, b] = E[g_a g_b]``
    #: (:class:`initdiag.finite_batch.ExchKernel` without ``inputs``, a B x B array
    #: with them); ``through_kernel`` the kernel at the output of the activation
    #: directly above; ``below`` the kernel a BatchNorm after an activation already
    #: computed for that activation's input (its projection and phi' are not
    #: independent: docs/theory.md, "Finite-batch BatchNorm")
    kernel: Any = None
    through_kernel: Any = None
    below: Any = None

    def total(self, state: State) -> float:
        """E[g^2] at the row: the component weights of ``state`` when they match."""
        if self.kernel is not None:
            return kernel_diag(self.kernel)
        w = self.weights(state)
        return float(w @ self.comp) if w is not None else float(np.mean(self.comp))

    def weights(self, state: State) -> np.ndarray | None:
        g = state.gauss
        if g is not None and g.w.size == self.comp.size:
            return g.w
        if self.comp.size == 1:
            return np.ones(1)
        return None


def kernel_diag(G: Any) -> float:
    """Mean diagonal E[g_a^2] of a gradient kernel (ExchKernel or B x B array)."""
    if isinstance(G, np.ndarray):
        return float(np.mean(np.diag(G)))
    return float(G.diag)


def kernel_scaled(G: Any, f: float) -> Any:
    return G * f if isinstance(G, np.ndarray) else G.scaled(f)


def kernel_add(G1: Any, G2: Any) -> Any:
    """The kernel of the sum of two independent gradients (a residual block's
    skip and branch paths)."""
    if isinstance(G1, np.ndarray) or isinstance(G2, np.ndarray):
        m1 = G1 if isinstance(G1, np.ndarray) else G1.matrix()
        m2 = G2 if isinstance(G2, np.ndarray) else G2.matrix()
        return m1 + m2
    return type(G1)(G1.B, G1.cen + G2.cen, G1.mean + G2.mean)


def kernel_sums(G: Any, K: np.ndarray, B: int) -> tuple[float, float]:
    """``(1/B) sum_ab G_ab K_ab`` and ``(1/B) sum_ab G_ab`` (the dense weight and
    bias gradient norms per unit; K the input's kernel, 2 x 2 when exchangeable)."""
    if isinstance(G, np.ndarray):
        return float(np.sum(G * K)) / B, float(np.sum(G)) / B
    return G.diag * K[0, 0] + (B - 1) * G.off * K[0, 1], G.mean


def kernel_from_scalar(q: float, batch: Batch, centred: bool) -> Any:
    """A gradient kernel for a rule that only returns E[g^2]: independent examples,
    or centred over the batch."""
    from . import finite_batch as fb

    B = batch.B
    if batch.equi:
        if centred:
            return fb.ExchKernel(B, q * B / (B - 1), 0.0)
        return fb.ExchKernel.from_diag_off(B, q, 0.0)
    if centred:
        return q * B / (B - 1) * (np.eye(B) - 1.0 / B)
    return q * np.eye(B)


def dphi_kernel(act: Any, g: Gauss) -> np.ndarray:
    """E[phi'(h_a) phi'(h_b)] under the Gaussian (mixture) state, B x B (2 x 2 for
    an exchangeable pair): the activation's backward map of a gradient kernel."""
    k, B = g.m.shape
    iu, ju = np.triu_indices(B)
    v = np.diagonal(g.S, axis1=1, axis2=2)
    vi, vj = v[:, iu], v[:, ju]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        rho = np.where(vi * vj > 0, g.S[:, iu, ju] / np.sqrt(vi * vj), 0.0)
    rho = np.clip(rho, -1.0, 1.0)
    qq = mf._expect_2d(
        act,
        True,
        g.m[:, iu].ravel(),
        g.m[:, ju].ravel(),
        vi.ravel(),
        vj.ravel(),
        rho.ravel(),
    ).reshape(k, -1)
    d2 = mf._expect_1d(act, "dphi2", g.m.ravel(), v.ravel()).reshape(k, B)
    qq[:, iu == ju] = d2
    E = np.zeros((k, B, B))
    E[:, iu, ju] = qq
    E[:, ju, iu] = qq
    return np.einsum("k,kab->ab", g.w, E)

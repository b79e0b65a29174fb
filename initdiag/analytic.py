"""``analyze(network) -> Profile``: infinite-width (mean-field) predictions.

A fold of per-layer pure rules over ``network.infos`` (the neural-tangents pattern):
the forward pass carries, for a batch of inputs, the per-unit moments of the
layer output over random networks, and a Gaussian description of pre-activations;
the backward pass carries the gradient second moment from the output down.

State
-----
Every unit of a layer sees its batch values ``h[a]`` (a = 1..B).  The state keeps

- ``ex[a] = E[h[a]]`` and the second-moment kernel ``K[a, b] = E[h[a] h[b]]``
  (the NNGP kernel of Lee et al. 2018 / neural-tangents, uncentred);
- when the values are Gaussian (dense outputs; BatchNorm outputs of a Gaussian
  input) a mixture of Gaussians ``(weight, mean vector, covariance)``: one
  component, or one per quadrature node of BatchNorm's random gamma / beta.

Without ``inputs`` the batch is exchangeable: every input has second moment
``input_second_moment`` and every pair correlation ``input_correlation``; the state
is then the 2 x 2 kernel of one pair, and batch statistics use ``batch_size``
(``None``: the large-batch limit).

Rules (forward)
---------------
Dense, weight entries of mean ``mu_w`` and variance ``v_w``, bias ``mu_b, v_b``,
from ``init.mean(fan_in, fan_out)`` / ``init.variance(fan_in, fan_out)`` only:
``m[a] = fan_in mu_w ex_x[a] + mu_b``, ``S = fan_in v_w K_x + v_b``, K = S + m m^T
(Poole et al. 2016 eq. 3-5 with means; first layer
K = sigma_w2 <x_a, x_b>/d_in + sigma_b2 as in neural-tangents).  A weight mean
mu_w != 0 is refused (NotImplementedError naming the layer): it adds one
component mu_w sum_j x_j shared by every unit, whose fluctuation over networks
is O(1) relative to the Gaussian part at any width.  A uniform or truncated-normal
bias enters as a mixture over the nodes of its law (one draw per unit, shared by
the batch); orthogonal weights are treated as Gaussian of the same variance (exact
for these second moments, Pennington et al. 2017 differ only in higher moments).

Activation: ``ex[a] = E[phi(h_a)]``, ``K[a, b] = E[phi(h_a) phi(h_b)]`` under the
Gaussian state (:mod:`initdiag.meanfield`).  An activation whose input is not
Gaussian (an activation after an activation, or after a BatchNorm fed by an
activation) has no rule: NotImplementedError.

BatchNorm (large-batch limit, docs/theory.md section 4; Yang et al. 2019): with the
centring C = I - 11^T/B and s2 = mean(diag(C K C)) the per-unit batch variance,
``n = C h / sqrt(s2 + eps)`` and
``K_BN = E[gamma^2] C K C/(s2 + eps) + mu_g mu_b (C ex 1^T + 1 (C ex)^T)/sqrt(s2 + eps)
+ E[beta^2] 11^T``, ``ex_BN = mu_g C ex / sqrt(s2 + eps) + mu_b``.  A Dense bias
directly before a BatchNorm is cancelled exactly by the centring, which the rule
does automatically.  For the activation after it, gamma and beta are integrated
by quadrature over their distribution (``initializer.distribution()``; Gauss-
Legendre for uniform, Gauss-Hermite for normal); an initializer without a
closed-form distribution and non-zero variance raises NotImplementedError there.

Rules (backward; gradient independence, Schoenholz et al. 2017 section 5)
------------------------------------------------------------------------
Output gradient second moment 1.  Dense: ``q~_in = fan_out E[W^2] q~_out``
(cross-unit gradient correlations neglected, exact for zero-mean weights).
Activation: ``q~_in = E[phi'(h)^2] q~_out``, per mixture component.  BatchNorm:
``q~_in = E[gamma^2 q~_out | gamma] / (s2 + eps)`` (Yang et al. 2019; per block this
gives the gain gamma^2 E[phi'^2]/Var[phi], pi/(pi - 1) for ReLU), times
(B - 2)/(B - 3) for a finite ``batch_size`` when the BatchNorm output feeds a
linear layer directly and its input is an exchangeable Gaussian batch (the exact
finite-batch result for linear BN networks, docs/theory.md section 6); otherwise the
large-batch limit.  Parameter gradients, normalised as in :mod:`initdiag.profile`
(independent examples): dense ``||dW||^2 = fan_out fan_in q~ E[x^2]`` (with a
following BatchNorm the gradient is centred over the batch, so E[x^2] becomes the
input's per-unit batch variance), ``||db||^2 = fan_out q~`` (0 before a
BatchNorm); BatchNorm ``||dgamma||^2 = N E[g^2 n^2]`` and ``||dbeta||^2 = N q~``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from . import meanfield as mf
from .network import Activation, BatchNorm, Dense, Network
from .profile import Profile

__all__ = ["analyze", "bn_gradient_gain", "REGIME_TOL"]

#: |chi1 - 1| below which the summary calls the network critical (meanfield.regime)
REGIME_TOL = mf.REGIME_TOL
# a gain read off a profile (not a fixed point) is a finite-depth average: call it
# critical within 0.1 % per layer (30 layers at 1.001 change the gradient by 3 %)
REGIME_TOL_GAIN = 1e-3
_NQ = 20  # quadrature nodes per random BatchNorm parameter
#: largest full batch whose dead fraction is computed (Genz's algorithm, scipy)
_MVN_MAX = 12


@dataclass
class _Gauss:
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
class _State:
    ex: np.ndarray
    K: np.ndarray
    gauss: _Gauss | None
    why_not_gauss: str = ""


def _single(m: np.ndarray, S: np.ndarray) -> _Gauss:
    return _Gauss(np.ones(1), m[None], S[None], np.ones(1), np.zeros(1))


def _moments(g: _Gauss) -> tuple[np.ndarray, np.ndarray]:
    ex = np.einsum("k,ka->a", g.w, g.m)
    K = np.einsum("k,kab->ab", g.w, g.S + g.m[:, :, None] * g.m[:, None, :])
    return ex, K


def _param_nodes(init: Any, nf: int, what: str, layer: str):
    """Quadrature nodes and weights of a BatchNorm parameter's distribution."""
    mean = init.mean(nf, nf)
    var = init.variance(nf, nf)
    if var == 0:
        return np.array([mean]), np.ones(1)
    dist = _param_law(init, nf, nf, f"{layer}: {what}")
    if dist[0] == "truncated_normal":
        return mf.law_nodes(dist)
    kind, p, q = dist
    if kind == "normal":
        x, w = special.roots_hermitenorm(_NQ)
        return p + q * x, w / w.sum()
    if kind == "uniform":
        x, w = np.polynomial.legendre.leggauss(_NQ)
        return 0.5 * (p + q) + 0.5 * (q - p) * x, w / w.sum()
    return np.array([p]), np.ones(1)


def _refuse_weight_mean(layer: str, init: Any, mw: float, fi: int) -> None:
    """A weight mean mu_w makes h_i = mu_w sum_j x_j + (zero-mean part) + b_i: every
    unit of the layer shares the scalar mu_w sum_j x_j per input.  Over random
    networks that sum fluctuates by mu_w sqrt(fan_in) std(x), the same order as the
    Gaussian part sqrt(fan_in Var[w] E[x^2]) at every width, so the law of large
    numbers the Gaussian state rests on does not remove it; the rules here carry
    no such shared component, and refuse rather than answer wrongly."""
    raise NotImplementedError(
        f"{layer}: the weight initializer {init} has mean {mw:.4g} (not 0); a weight "
        f"mean gives every unit of {layer} one shared rank-one component of the "
        f"signal (fan_in * mean = {fi * mw:.4g} times the input's average over "
        "units), whose fluctuation over networks is as large as the Gaussian part "
        "at any width; the mean-field rules do not treat it: use simulate() for "
        "this network, or a zero-mean weight initializer"
    )


def _param_law(init: Any, fi: int, fo: int, what: str) -> tuple:
    """The law of one parameter entry, as :func:`initdiag.meanfield.law_nodes`
    takes it (the initializer's closed-form distribution, or its truncated normal).
    A bias or beta enters every unit directly, so its law matters, not only its
    variance."""
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


def _bias_law(init: Any, fi: int, fo: int, layer: str) -> tuple | None:
    """The law of a Dense bias when it is neither normal nor constant (those fold
    into the Gaussian state exactly): ``("uniform", lo, hi)`` or
    ``("truncated_normal", mean, std, a, b)``; None otherwise."""
    if init.variance(fi, fo) == 0:
        return None
    law = _param_law(init, fi, fo, f"{layer}: the bias")
    return law if law[0] in ("uniform", "truncated_normal") else None


class _Batch:
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


def _orthant(g: _Gauss, batch: _Batch) -> float:
    """P(h[a] <= 0 for every a of the batch) under the mixture."""
    total = 0.0
    for wk, m, S in zip(g.w, g.m, g.S, strict=True):
        total += wk * _orthant_one(m, S, batch)
    return float(total)


def _orthant_one(m: np.ndarray, S: np.ndarray, batch: _Batch) -> float:
    if batch.equi:
        mu, d, o = m[0], S[0, 0], S[0, 1]
        if d <= 0:
            return float(mu <= 0)
        B = batch.B
        r2 = d - o  # independent part of each input
        if r2 <= 1e-15 * d:
            return float(special.ndtr(-mu / math.sqrt(d)))
        if B is None:
            # large batch: some input is positive unless ... (probability 0)
            return 0.0
        if o < 0:
            # A negatively correlated batch (BatchNorm centring) has no 1-D reduction
            # of the orthant probability, but by Slepian's inequality it is at most
            # the independent one, Phi(-mu/sqrt(d))^B; report 0 when that bound is
            # below 1e-12 (e.g. 2^-B at mu = 0), NaN otherwise (no guess).
            with np.errstate(divide="ignore"):
                bound = math.exp(B * float(special.log_ndtr(-mu / math.sqrt(d))))
            return 0.0 if bound < 1e-12 else math.nan
        # h_a = mu + sqrt(o) Z + sqrt(r2) e_a, so
        # P = E_Z[Phi(-(mu + sqrt(o) Z) / sqrt(r2))^B]
        sr = math.sqrt(r2)
        so = math.sqrt(o)
        xs = -sr * special.ndtri(2.0 ** (-1.0 / B))  # where Phi(-x/sr)^B = 1/2
        if so == 0:
            return float(special.ndtr(-mu / sr) ** B)
        t, w = mf._offsets(
            mf._n_fine(so / sr * (1 + math.sqrt(2 * math.log(B + 1)))), 16
        )
        z = (xs - mu) / so + t
        wz = w * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        x = mu + so * z
        with np.errstate(divide="ignore"):
            lp = B * special.log_ndtr(-x / sr)
        return float(np.sum(wz * np.exp(lp)))
    B = m.size
    if B > _MVN_MAX:
        return math.nan
    sd = np.sqrt(np.diag(S))
    if np.any(sd == 0):
        keep = sd > 0
        if np.any(m[~keep] > 0):
            return 0.0
        m, S = m[keep], S[np.ix_(keep, keep)]
        if m.size == 0:
            return 1.0
    dist = stats.multivariate_normal(
        mean=m, cov=S, allow_singular=True, abseps=1e-8, releps=1e-8, maxpts=20000 * B
    )
    return float(dist.cdf(np.zeros(m.size)))


def _act_expect(act: Activation, g: _Gauss, batch: _Batch):
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


def _gamma_moment(act: Activation | None, g: _Gauss) -> np.ndarray:
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


def bn_gradient_gain(
    activation: str | Activation = "relu",
    gamma: float = 1.0,
    beta: float = 0.0,
    batch_size: int | None = None,
) -> float:
    """Per-block growth of the squared gradient in a deep BatchNorm network
    ``Dense -> BN(gamma, beta) -> phi`` (Yang et al. 2019, docs/theory.md section 6).

    Large batch: ``gamma^2 E[phi'(gamma z + beta)^2] / Var[phi(gamma z + beta)]``,
    z ~ N(0, 1) (ReLU at gamma = 1, beta = 0: pi/(pi - 1) = 1.466942...).
    ``batch_size`` B given: exact only for the identity activation, where the gain
    is (B - 2)/(B - 3); other activations raise NotImplementedError.
    """
    act = mf._act(activation)
    if batch_size is not None:
        if act.name != "identity":
            raise NotImplementedError(
                "the finite-batch BatchNorm gain is known in closed form only for the "
                f"identity activation ((B-2)/(B-3)), not {act.name!r}"
            )
        B = int(batch_size)
        if B <= 3:
            raise ValueError(f"batch_size must be > 3, got {batch_size}")
        return (B - 2) / (B - 3)
    g2 = gamma * gamma
    e1 = mf._expect_1d(act, "phi", np.array([beta]), np.array([g2]))[0]
    e2 = mf._expect_1d(act, "phi2", np.array([beta]), np.array([g2]))[0]
    d2 = mf._expect_1d(act, "dphi2", np.array([beta]), np.array([g2]))[0]
    return float(g2 * d2 / (e2 - e1 * e1))


def _check_batch(inputs, batch_size, q0, c0, d_in):
    if batch_size is not None:
        if (
            isinstance(batch_size, bool)
            or int(batch_size) != batch_size
            or batch_size < 2
        ):
            raise ValueError(
                f"batch_size must be an integer >= 2 or None, got {batch_size!r}"
            )
        batch_size = int(batch_size)
    if inputs is not None:
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != d_in or x.shape[0] < 2:
            raise ValueError(
                f"inputs must be a (B, {d_in}) array with B >= 2, got shape {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("inputs contain NaN or inf")
        if batch_size is not None and batch_size != x.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} disagrees with inputs ({x.shape[0]} rows); "
                "leave batch_size=None"
            )
        return x, x.shape[0]
    q0 = float(q0)
    c0 = float(c0)
    if not (q0 > 0 and math.isfinite(q0)):
        raise ValueError(f"input_second_moment must be > 0, got {q0}")
    if not -1 <= c0 <= 1:
        raise ValueError(f"input_correlation must be in [-1, 1], got {c0}")
    return None, batch_size


def analyze(
    network: Network,
    *,
    input_second_moment: float = 1.0,
    input_correlation: float = 0.0,
    inputs: npt.ArrayLike | None = None,
    batch_size: int | None = None,
) -> Profile:
    """Mean-field (infinite-width) Profile of ``network`` at initialisation.

    Parameters
    ----------
    network : Network
    input_second_moment : float
        E[x^2] per input feature (ignored with ``inputs``).
    input_correlation : float
        Uncentred cosine similarity of two inputs (ignored with ``inputs``).
    inputs : (B, d_in) array_like, optional
        A concrete batch; the full B x B kernel is propagated and stored in
        ``profile.kernels`` (one B x B second-moment matrix per row).
    batch_size : int, optional
        Batch size for the batch statistics (variance, squared mean, dead
        fraction, BatchNorm centring); ``None`` means the large-batch limit (dead
        fraction 0 unless the batch is fully correlated).

    Returns
    -------
    Profile
        ``source="analytic"``; the rules and their citations are in this module's
        docstring.

    Raises
    ------
    NotImplementedError
        For a layer without a theory rule (named in the message).
    """
    if not isinstance(network, Network):
        raise TypeError(f"analyze() needs a Network, got {type(network).__name__}")
    x, B = _check_batch(
        inputs, batch_size, input_second_moment, input_correlation, network.input_dim
    )
    small = mf.batchnorm_small_batch(B)
    if small is not None and any(isinstance(i.layer, BatchNorm) for i in network.infos):
        raise NotImplementedError(
            f"{small}; the mean-field rules need a batch of at least 4 (or the "
            "large-batch limit, batch_size=None)"
        )
    batch = _Batch(x is None, B)
    if x is None:
        q0, c0 = float(input_second_moment), float(input_correlation)
        state = _State(
            np.zeros(2),
            np.array([[q0, q0 * c0], [q0 * c0, q0]]),
            None,
            "the network input is not Gaussian",
        )
    else:
        state = _State(
            x.mean(axis=1),
            x @ x.T / x.shape[1],
            None,
            "the network input is not Gaussian",
        )
    infos = network.infos
    inits = network.param_inits()
    prof = Profile.empty(network, "analytic")
    cols = prof.columns
    n = len(infos)
    states: list[_State] = []
    pre_states: list[_State] = [state]  # input state of each row
    row_extra: list[dict[str, Any]] = []
    overflow_at = None
    for i, info in enumerate(infos):
        layer = info.layer
        extra: dict[str, Any] = {}
        if isinstance(layer, Dense):
            init = inits[i]
            fi, fo = info.fan_in, info.width
            mw, vw = init["weight"].mean(fi, fo), init["weight"].variance(fi, fo)
            if mw != 0.0:
                _refuse_weight_mean(info.name, init["weight"], mw, fi)
            b = init.get("bias")
            mb, vb = (
                (b.mean(fi, fo), b.variance(fi, fo)) if b is not None else (0.0, 0.0)
            )
            # --- bias law (issue 12, deliverable 3): a uniform or truncated-normal
            # bias is one draw per unit shared by the whole batch, so it enters as
            # a mixture over its nodes (meanfield.law_nodes), not as a Gaussian of
            # its variance; normal and constant biases fold into the Gaussian.
            law = _bias_law(b, fi, fo, info.name) if b is not None else None
            if law is None:
                m = fi * mw * state.ex + mb
                S = fi * vw * state.K + vb
                g = _single(m, S)
            else:
                S = fi * vw * state.K
                sd = math.sqrt(max(float(np.min(np.diag(S))), 0.0))
                nodes, wts = mf.law_nodes(law, sd)
                k = nodes.size
                g = _Gauss(
                    wts,
                    (fi * mw * state.ex)[None, :] + nodes[:, None],
                    np.broadcast_to(S, (k, *S.shape)).copy(),
                    np.ones(k),
                    np.zeros(k),
                )
            # --- end of the bias-law change
            ex, K = _moments(g)
            new = _State(ex, K, g)
            extra = {
                "fan_in": fi,
                "fan_out": fo,
                "w2": vw + mw * mw,
                "has_bias": b is not None,
            }
        elif isinstance(layer, BatchNorm):
            init = inits[i]
            nf = info.width
            gi, bi = init["weight"], init["bias"]
            mg, vg = gi.mean(nf, nf), gi.variance(nf, nf)
            mb, vb = bi.mean(nf, nf), bi.variance(nf, nf)
            CKC = batch.centre(state.K)
            s2 = float(np.mean(np.diag(CKC)))
            den = s2 + layer.eps
            cex = batch.centre_vec(state.ex)
            one = np.ones_like(state.ex)
            K = (
                (vg + mg * mg) * CKC / den
                + mg * mb * (np.outer(cex, one) + np.outer(one, cex)) / math.sqrt(den)
                + (vb + mb * mb) * np.outer(one, one)
            )
            ex = mg * cex / math.sqrt(den) + mb
            g = None
            why = ""
            if state.gauss is None:
                why = (
                    f"the input of {info.name} is not Gaussian ({state.why_not_gauss})"
                )
            else:
                try:
                    gn, gw = _param_nodes(gi, nf, "gamma", info.name)
                    bn_, bw = _param_nodes(bi, nf, "beta", info.name)
                except NotImplementedError as exc:
                    why = str(exc)
                else:
                    # the centred input is Gaussian (mixture): recentre each component
                    ms, Ss, ws = [], [], []
                    sg = state.gauss
                    for wk, mk, Sk in zip(sg.w, sg.m, sg.S, strict=True):
                        Cm = batch.centre_vec(mk)
                        CSC = batch.centre(Sk + np.outer(mk, mk)) - np.outer(Cm, Cm)
                        ms.append(Cm / math.sqrt(den))
                        Ss.append(CSC / den)
                        ws.append(wk)
                    # a Dense bias law's nodes differ only by a shift the centring
                    # removed: one component then stands for all of them
                    m0, S0 = ms[0], Ss[0]
                    scale = max(float(np.max(np.abs(S0))), 1e-300)
                    if len(ms) > 1 and all(
                        np.max(np.abs(mk - m0)) <= 1e-12 * math.sqrt(scale)
                        and np.max(np.abs(Sk - S0)) <= 1e-12 * scale
                        for mk, Sk in zip(ms, Ss, strict=True)
                    ):
                        ms, Ss, ws = [m0], [S0], [float(np.sum(ws))]
                    GG, BB = np.meshgrid(gn, bn_, indexing="ij")
                    WW = np.outer(gw, bw)
                    comp_w, comp_m, comp_S, comp_g, comp_b = [], [], [], [], []
                    for wk, mk, Sk in zip(ws, ms, Ss, strict=True):
                        nodes = zip(GG.ravel(), BB.ravel(), WW.ravel(), strict=True)
                        for gam, bet, wgb in nodes:
                            comp_w.append(wk * wgb)
                            comp_m.append(gam * mk + bet)
                            comp_S.append(gam * gam * Sk)
                            comp_g.append(gam)
                            comp_b.append(bet)
                    g = _Gauss(
                        np.array(comp_w),
                        np.array(comp_m),
                        np.array(comp_S),
                        np.array(comp_g),
                        np.array(comp_b),
                    )
            new = _State(ex, K, g, why)
            extra = {"s2": s2, "den": den, "g2": vg + mg * mg, "nf": nf}
        elif isinstance(layer, Activation):
            if state.gauss is None:
                raise NotImplementedError(
                    f"layer {info.name} ({layer.name}): no mean-field rule, "
                    f"{state.why_not_gauss}"
                )
            ex, K, d2, ppos = _act_expect(layer, state.gauss, batch)
            new = _State(ex, K, None, f"{info.name} output is not Gaussian")
            extra = {"dphi2": d2, "ppos": ppos, "gauss_in": state.gauss}
        else:
            raise NotImplementedError(
                f"layer {info.name} ({type(layer).__name__}): no mean-field rule"
            )
        qmax = float(np.max(np.abs(np.diag(new.K)))) if new.K.size else 0.0
        if not (
            np.all(np.isfinite(new.K))
            and np.all(np.isfinite(new.ex))
            and qmax < mf.Q_PRECISION
        ):
            overflow_at = i
            finite = np.all(np.isfinite(new.K)) and np.all(np.isfinite(new.ex))
            msg = (
                f"the signal reached q = {qmax:.3g} at layer {i} ({info.name}), "
                f"beyond {mf.Q_PRECISION:.0e}, where float64 can no longer hold "
                "products of second moments (the correlations would be lost); the "
                "profile stops here"
                if finite
                else f"the signal overflowed at layer {i} ({info.name})"
            )
            prof.findings.append(
                {
                    "kind": "overflow",
                    "layer": info.name,
                    "index": info.index,
                    "block": info.block,
                    "pass": "forward",
                    "seed": None,
                    "message": msg,
                }
            )
            break
        st = batch.stats(new.ex, new.K)
        for kcol, v in st.items():
            cols[kcol][i] = v
        if new.gauss is not None:
            cols["active_fraction"][i] = _pfrac(new.gauss)
            cols["dead_fraction"][i] = _orthant(new.gauss, batch)
        elif isinstance(layer, Activation):
            if layer.name == "sigmoid":
                cols["active_fraction"][i], cols["dead_fraction"][i] = 1.0, 0.0
            else:
                cols["active_fraction"][i] = extra["ppos"]
                cols["dead_fraction"][i] = _orthant(state.gauss, batch)
        states.append(new)
        row_extra.append(extra)
        state = new
        pre_states.append(state)
    kernels = [s.K.copy() for s in states] + [None] * (n - len(states))
    if x is not None:
        prof.kernels = kernels
    if overflow_at is None:
        _backward(infos, states, pre_states, row_extra, cols, batch, B)
    prof.summary = _summary(network, inits, prof)
    prof.meta = {
        "engine": "meanfield",
        "batch_size": B,
        "input_second_moment": None if x is not None else float(input_second_moment),
        "input_correlation": None if x is not None else float(input_correlation),
        "assumptions": "infinite width; gradient independence; large-batch "
        "BatchNorm; orthogonal weights as Gaussian of equal variance",
    }
    return prof


def _pfrac(g: _Gauss) -> float:
    v = np.diagonal(g.S, axis1=1, axis2=2)
    sd = np.sqrt(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(
            sd > 0, special.ndtr(g.m / np.where(sd > 0, sd, 1)), (g.m > 0).astype(float)
        )
    return float(g.w @ p.mean(axis=1))


def _backward(infos, states, pre_states, row_extra, cols, batch, B) -> None:
    n = len(infos)
    # gradient second moment at each row's output, per mixture component of the
    # row's output state when it is Gaussian (BN -> activation correlations)
    gt = np.ones(1)
    for i in range(n - 1, -1, -1):
        layer, extra = infos[i].layer, row_extra[i]
        st = states[i]
        if st.gauss is not None and gt.size == st.gauss.w.size:
            w, gcomp = st.gauss.w, gt
        else:
            w, gcomp = np.ones(1), np.array([float(np.mean(gt))])
        qt = float(w @ gcomp)
        cols["grad_second_moment"][i] = qt
        nxt = infos[i + 1].layer if i + 1 < n else None
        if isinstance(layer, Dense):
            xin = pre_states[i]
            stin = batch.stats(xin.ex, xin.K)
            if isinstance(nxt, BatchNorm):
                cols["weight_grad_norm2"][i] = (
                    extra["fan_in"] * extra["fan_out"] * qt * stin["variance"]
                )
                if extra["has_bias"]:
                    cols["bias_grad_norm2"][i] = 0.0
            else:
                cols["weight_grad_norm2"][i] = (
                    extra["fan_in"] * extra["fan_out"] * qt * stin["second_moment"]
                )
                if extra["has_bias"]:
                    cols["bias_grad_norm2"][i] = extra["fan_out"] * qt
            gt = np.array([extra["fan_out"] * extra["w2"] * qt])
        elif isinstance(layer, Activation):
            # gradient at the input, per component of the (Gaussian) input state
            gt = extra["dphi2"] * qt
        elif isinstance(layer, BatchNorm):
            g = st.gauss
            nf = extra["nf"]
            cols["beta_grad_norm2"][i] = nf * qt
            act = nxt if isinstance(nxt, Activation) else None
            if g is not None and gcomp.size == g.w.size and act is not None:
                # E[g^2 n^2] = q~_u E[phi'(h)^2 n^2]: gcomp = q~_u E[phi'^2] per comp
                qu = cols["grad_second_moment"][i + 1]
                en = _gamma_moment(act, g)
                cols["gamma_grad_norm2"][i] = nf * qu * float(g.w @ en)
                num = float(g.w @ (g.gamma**2 * gcomp))
            else:
                cols["gamma_grad_norm2"][i] = nf * qt * extra["s2"] / extra["den"]
                num = extra["g2"] * qt
            gain = num / extra["den"]
            if (
                B is not None
                and batch.equi
                and (
                    nxt is None
                    or isinstance(nxt, Dense)
                    or (isinstance(nxt, Activation) and nxt.name == "identity")
                )
                and pre_states[i].gauss is not None
                and B > 3
            ):
                gain *= (B - 2) / (B - 3)
            gt = np.array([gain])


def _summary(network: Network, inits, prof: Profile) -> dict[str, Any]:
    infos = network.infos
    acts = [info.layer for info in infos if isinstance(info.layer, Activation)]
    out: dict[str, Any] = {
        k: math.nan for k in ("chi1", "q_star", "c_star", "xi_q", "xi_c")
    }
    out["regime"] = None
    out["correlation_depth"] = prof.correlation_depth()
    out["gradient_ratio"] = prof.gradient_ratio()
    if not acts:
        return out
    act = Counter(acts).most_common(1)[0][0]
    has_bn = any(isinstance(info.layer, BatchNorm) for info in infos)
    sw, sb = [], []
    bn_gb = []
    for i, info in enumerate(infos):
        if isinstance(info.layer, Dense):
            fi, fo = info.fan_in, info.width
            wi, bi = inits[i]["weight"], inits[i].get("bias")
            sw.append(fi * wi.variance(fi, fo))
            sb.append(bi.variance(fi, fo) if bi is not None else 0.0)
        if isinstance(info.layer, BatchNorm):
            nf = info.width
            gi, bi = inits[i]["weight"], inits[i]["bias"]
            bn_gb.append(
                (
                    gi.mean(nf, nf),
                    gi.variance(nf, nf),
                    bi.mean(nf, nf),
                    bi.variance(nf, nf),
                )
            )
    if has_bn:
        mg, vg, mb, vb = bn_gb[0]
        if vg == 0 and vb == 0:
            chi = bn_gradient_gain(act, mg, mb)
            out["chi1"] = chi
            out["chi1_source"] = "batchnorm gradient gain (large batch)"
        else:
            # random gamma / beta: no closed form; use the per-block gradient gain of
            # this profile (the backward rule already integrates over gamma and beta)
            chi = _bulk_gradient_gain(prof)
            out["chi1"] = chi
            out["chi1_source"] = "per-block gradient gain of the profile"
        _set_regime(out, mf.regime(chi, source=out["chi1_source"]))
        return out
    if any(
        (
            inits[i].get("bias") is not None
            and inits[i]["bias"].mean(info.fan_in, info.width) != 0.0
        )
        or inits[i]["weight"].mean(info.fan_in, info.width) != 0.0
        for i, info in enumerate(infos)
        if isinstance(info.layer, Dense)
    ):
        # non-zero parameter means (e.g. a constant bias) shift the pre-activations;
        # the centred fixed-point maps do not apply, so report the gradient gain per
        # block, which equals chi1 layer by layer (Schoenholz et al. 2017, sec. 5)
        chi = _bulk_gradient_gain(prof)
        out["chi1"] = chi
        out["chi1_source"] = "per-block gradient gain of the profile"
        # the length map with the bias mean: is there a fixed point at all?
        mbs = [
            inits[i]["bias"].mean(info.fan_in, info.width)
            for i, info in enumerate(infos)
            if isinstance(info.layer, Dense) and inits[i].get("bias") is not None
        ]
        mb = float(np.median(mbs)) if mbs else 0.0
        w2 = float(np.median(sw))
        v = mf._fixed_point_v_mean(act, w2, mb, float(np.median(sb)), 1.0)
        out["q_star"] = v + mb * mb
        _set_regime(
            out,
            mf.regime(
                chi,
                q_star=out["q_star"],
                activation=act,
                tol=REGIME_TOL_GAIN,
                source=out["chi1_source"],
            ),
        )
        return out
    w2 = float(np.median(sw))
    b2 = float(np.median(sb))
    # q* = 0 exactly for tanh / erf / SELU without bias below the edge (meanfield)
    q = float(
        mf._fixed_point_q(act, np.array([w2]), np.array([b2]), np.ones(1), 1e-14, 5000)[
            0
        ]
    )
    chi = float(mf._chi1_at(act, np.array([w2]), np.array([q]))[0])
    out["q_star"] = q
    out["chi1"] = chi
    out["chi1_source"] = "fixed point"
    if math.isinf(q) and act.name in ("relu", "leaky_relu"):
        # chi1 = sigma_w2 (1 + a^2)/2 whatever q is: the gradient's rate per block
        chi = float(mf._chi1_at(act, np.array([w2]), np.array([1.0]))[0])
        out["chi1"] = chi
        out["chi1_source"] = "sigma_w2 E[phi'^2], the same at every q"
    _set_regime(
        out, mf.regime(chi, q_star=q, activation=act, source=out["chi1_source"])
    )
    if q == 0.0 and act.name in mf._SUBLINEAR:
        # the q -> 0 limit is a linear network: the correlation map is the identity
        # (c* undefined, xi_c infinite) and the length map has slope chi1
        out["c_star"] = math.nan
        out["xi_q"] = math.inf if chi == 1.0 else -1.0 / math.log(chi)
        out["xi_c"] = math.inf
    elif math.isfinite(q):
        out["c_star"] = float(mf.fixed_point_c(act, w2, b2))
        xq, xc = mf.depth_scales(act, w2, b2)
        out["xi_q"], out["xi_c"] = float(xq), float(xc)
    return out


def _bulk_gradient_gain(prof: Profile) -> float:
    """Geometric mean of the per-block growth of the gradient second moment,
    grad(dense_k) / grad(dense_{k+1}), over the deeper half of the blocks (where
    the transient from the input has died out)."""
    rows = [i for i, k in enumerate(prof.kind) if k == "dense"]
    g = prof.columns["grad_second_moment"][rows]
    w = prof.width[rows]
    ratios = []
    for k in range(len(rows) - 1):
        if w[k] != w[k + 1] or not (g[k] > 0 and g[k + 1] > 0):
            continue
        ratios.append(math.log(g[k] / g[k + 1]))
    if not ratios:
        return math.nan
    tail = ratios[len(ratios) // 2 :]
    return float(math.exp(sum(tail) / len(tail)))


def _set_regime(out: dict[str, Any], reg: mf.Regime) -> None:
    out["regime"] = reg.label
    out["regime_reason"] = reg.reason

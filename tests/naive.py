"""Deliberately simple loop-level references for the kernels (``initdiag.kernels``).

Every function here is written element by element in plain Python with the ``math``
module, in float64, straight from the formulas of the kernel contract
(/work/briefs/kernel_contract.md).  They are slow on purpose: use tiny shapes.  The
kernels of every backend (numpy, numba, c, cuda) are compared with them.

Naming: ``naive_<op>_<pass>``; every function takes and returns NumPy arrays (or a
float), never writes into its inputs, and returns float64 arrays.

NaN / inf semantics (shared with every backend):

* relu(v) = v if not (v <= 0) else 0, so relu(NaN) = NaN; relu'(v) is 1 for v > 0,
  0 for v <= 0 and NaN for v = NaN (the gradient is then NaN as well).
* leaky_relu(v) = v * slope if v < 0 else v; its derivative is slope for v < 0,
  1 for v >= 0, NaN for NaN.
* every other activation follows its formula below, so IEEE arithmetic decides
  (e.g. silu(-inf) = -inf * 0 = NaN).
"""

from __future__ import annotations

import math

import numpy as np

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRTPI = 2.0 / math.sqrt(math.pi)

ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "silu",
    "selu",
    "erf",
    "identity",
)

SUMMARY_FIELDS = (
    "mean",
    "second_moment",
    "variance",
    "squared_mean",
    "active_fraction",
    "dead_fraction",
    "zero_fraction",
    "nonfinite_count",
)


def _sigmoid(v: float) -> float:
    # 1 / (1 + exp(-v)); exp overflow (v < -709) -> inf -> 0, as IEEE would give
    try:
        e = math.exp(-v)
    except OverflowError:
        e = math.inf
    return 1.0 / (1.0 + e)


def _exp(v: float) -> float:
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def naive_act(v: float, act: str, slope: float = 0.01) -> float:
    """Scalar activation, float64."""
    v = float(v)
    if act == "relu":
        return 0.0 if v <= 0 else v
    if act == "leaky_relu":
        return v * slope if v < 0 else v
    if act == "tanh":
        return math.tanh(v)
    if act == "sigmoid":
        return _sigmoid(v)
    if act == "gelu":
        if math.isnan(v):
            return math.nan
        # x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2 (no cancellation for x << 0)
        return v * 0.5 * math.erfc(-v / _SQRT2)
    if act == "silu":
        return v * _sigmoid(v)
    if act == "selu":
        if v > 0:
            return SELU_SCALE * v
        if math.isnan(v):
            return math.nan
        return SELU_SCALE * SELU_ALPHA * math.expm1(v)
    if act == "erf":
        return math.erf(v)
    if act == "identity":
        return v
    raise ValueError(act)


def naive_act_deriv(v: float, act: str, slope: float = 0.01) -> float:
    """Scalar activation derivative act'(v), float64."""
    v = float(v)
    if math.isnan(v):
        return math.nan if act != "identity" else 1.0
    if act == "relu":
        return 1.0 if v > 0 else 0.0
    if act == "leaky_relu":
        return slope if v < 0 else 1.0
    if act == "tanh":
        t = math.tanh(v)
        return 1.0 - t * t
    if act == "sigmoid":
        s = _sigmoid(v)
        return s * (1.0 - s)
    if act == "gelu":
        # Phi(x) + x phi(x)
        return 0.5 * math.erfc(-v / _SQRT2) + v * _INV_SQRT2PI * math.exp(-0.5 * v * v)
    if act == "silu":
        s = _sigmoid(v)
        return s + v * s * (1.0 - s)
    if act == "selu":
        return SELU_SCALE if v > 0 else SELU_SCALE * SELU_ALPHA * _exp(v)
    if act == "erf":
        return _TWO_OVER_SQRTPI * math.exp(-v * v)
    if act == "identity":
        return 1.0
    raise ValueError(act)


def naive_activation_forward(x, act: str, slope: float = 0.01) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        out[idx] = naive_act(x[idx], act, slope)
    return out


def naive_activation_backward(dy, x, act: str, slope: float = 0.01) -> np.ndarray:
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        d = naive_act_deriv(x[idx], act, slope)
        if act == "relu" and d == 0.0:
            out[idx] = 0.0  # relu passes no gradient for x <= 0, even a NaN one
        else:
            out[idx] = dy[idx] * d
    return out


def naive_dense_preactivation(x, w, b=None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    B, n_in = x.shape
    n_out = w.shape[0]
    pre = np.empty((B, n_out))
    for i in range(B):
        for j in range(n_out):
            s = 0.0
            for k in range(n_in):
                s += x[i, k] * w[j, k]
            if b is not None:
                s += float(b[j])
            pre[i, j] = s
    return pre


def naive_dense_forward(x, w, b=None, act: str = "identity", slope: float = 0.01):
    """Return (out, pre): out = act(x @ w.T + b), pre the pre-activation."""
    pre = naive_dense_preactivation(x, w, b)
    return naive_activation_forward(pre, act, slope), pre


def naive_dense_backward(dy, x, w, bias: bool = True):
    """Return (dx, dw, db): dx = dy @ w, dw = dy.T @ x, db = dy.sum(0) (None)."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    B, n_out = dy.shape
    n_in = x.shape[1]
    dx = np.zeros((B, n_in))
    dw = np.zeros((n_out, n_in))
    db = np.zeros(n_out) if bias else None
    for i in range(B):
        for j in range(n_out):
            g = dy[i, j]
            for k in range(n_in):
                dx[i, k] += g * w[j, k]
                dw[j, k] += g * x[i, k]
            if bias:
                db[j] += g
    return dx, dw, db


def _col_mean_var(x, j):
    B = x.shape[0]
    m = 0.0
    for i in range(B):
        m += x[i, j]
    m /= B
    v = 0.0
    for i in range(B):
        d = x[i, j] - m
        v += d * d
    return m, v / B


def naive_batchnorm_forward(
    x, gamma, beta, eps: float = 1e-5, act: str = "identity", slope: float = 0.01
):
    """Training-mode BatchNorm (biased variance), then act -> (out, mean, invstd)."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    out = np.empty((B, n))
    mean = np.empty(n)
    invstd = np.empty(n)
    for j in range(n):
        m, v = _col_mean_var(x, j)
        s = 1.0 / math.sqrt(v + eps)
        mean[j] = m
        invstd[j] = s
        for i in range(B):
            z = float(gamma[j]) * (x[i, j] - m) * s + float(beta[j])
            out[i, j] = naive_act(z, act, slope)
    return out, mean, invstd


def naive_batchnorm_backward(
    dy, x, mean, invstd, gamma, beta, act: str = "identity", slope: float = 0.01
):
    """Return (dx, dgamma, dbeta) of the training-mode BatchNorm(+act) forward."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    dx = np.empty((B, n))
    dgamma = np.empty(n)
    dbeta = np.empty(n)
    for j in range(n):
        m = float(mean[j])
        s = float(invstd[j])
        gj = float(gamma[j])
        bj = 0.0 if beta is None else float(beta[j])
        g = []
        xhat = []
        for i in range(B):
            xh = (x[i, j] - m) * s
            z = gj * xh + bj
            d = naive_act_deriv(z, act, slope)
            if act == "relu" and d == 0.0:
                gi = 0.0
            else:
                gi = dy[i, j] * d
            g.append(gi)
            xhat.append(xh)
        sb = sum(g)
        sg = sum(gi * xh for gi, xh in zip(g, xhat, strict=False))
        dbeta[j] = sb
        dgamma[j] = sg
        for i in range(B):
            dx[i, j] = gj * s / B * (B * g[i] - sb - xhat[i] * sg)
    return dx, dgamma, dbeta


def naive_column_stats(x):
    """Per feature: (mean, biased var, fraction <= 0, fraction == 0), float64."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    mean = np.empty(n)
    var = np.empty(n)
    le0 = np.empty(n)
    eq0 = np.empty(n)
    for j in range(n):
        mean[j], var[j] = _col_mean_var(x, j)
        le0[j] = sum(1 for i in range(B) if x[i, j] <= 0) / B
        eq0[j] = sum(1 for i in range(B) if x[i, j] == 0) / B
    return mean, var, le0, eq0


def naive_layer_summary(x) -> np.ndarray:
    """The 8 numbers of SUMMARY_FIELDS for one layer output x (B, n), float64."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    N = B * n
    total = 0.0
    total2 = 0.0
    active = 0
    zeros = 0
    nonfinite = 0
    for i in range(B):
        for j in range(n):
            v = x[i, j]
            total += v
            total2 += v * v
            active += v > 0
            zeros += v == 0
            nonfinite += not math.isfinite(v)
    var_sum = 0.0
    sqm_sum = 0.0
    dead = 0
    for j in range(n):
        m, v = _col_mean_var(x, j)
        var_sum += v
        sqm_sum += m * m
        dead += all(x[i, j] <= 0 for i in range(B))
    return np.array(
        [
            total / N,
            total2 / N,
            var_sum / n,
            sqm_sum / n,
            active / N,
            dead / n,
            zeros / N,
            float(nonfinite),
        ]
    )


def naive_layer_summary_dict(x) -> dict:
    return dict(zip(SUMMARY_FIELDS, naive_layer_summary(x).tolist(), strict=False))


def naive_row_correlation(x, gram: bool = False):
    """Mean over ordered pairs a != b of <x_a, x_b> / (|x_a| |x_b|).

    Rows of zero norm have cosine 0 with everything; B = 1 gives NaN.  With
    ``gram=True`` also returns the B x B cosine matrix (diagonal 1, or 0 for a zero
    row).  Any NaN / inf entry makes the mean NaN (propagation, even when the
    offending row only meets zero rows).
    """
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    norms = [math.sqrt(sum(x[a, k] * x[a, k] for k in range(n))) for a in range(B)]
    G = np.zeros((B, B))
    for a in range(B):
        for b in range(B):
            if norms[a] == 0 or norms[b] == 0:
                G[a, b] = 0.0
            else:
                G[a, b] = sum(x[a, k] * x[b, k] for k in range(n)) / (
                    norms[a] * norms[b]
                )
    if B < 2 or not np.isfinite(x).all():
        c = math.nan  # no pair; or a NaN / inf entry, which propagates
    else:
        c = sum(G[a, b] for a in range(B) for b in range(B) if a != b) / (B * (B - 1))
    return (c, G) if gram else c


def _row_mean_var(x, i):
    # math.fsum (exactly rounded sums): float64 input with a large offset would
    # otherwise lose n eps64 |x| in the reference itself
    n = x.shape[1]
    m = math.fsum(x[i, j] for j in range(n)) / n
    v = math.fsum((x[i, j] - m) * (x[i, j] - m) for j in range(n))
    return m, v / n


def naive_layernorm_forward(
    x, gamma=None, beta=None, eps: float = 1e-5, act: str = "identity", slope=0.01
):
    """LayerNorm over the features of each row (biased variance), then act ->
    (out, mean, invstd); gamma / beta None: 1 / 0 (torch.nn.LayerNorm)."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    out = np.empty((B, n))
    mean = np.empty(B)
    invstd = np.empty(B)
    for i in range(B):
        m, v = _row_mean_var(x, i)
        s = math.inf if v + eps == 0 else 1.0 / math.sqrt(v + eps)  # NaN passes
        mean[i] = m
        invstd[i] = s
        for j in range(n):
            z = (x[i, j] - m) * s
            if gamma is not None:
                z = float(gamma[j]) * z
            if beta is not None:
                z += float(beta[j])
            out[i, j] = naive_act(z, act, slope)
    return out, mean, invstd


def naive_layernorm_backward(
    dy, x, mean, invstd, gamma=None, beta=None, act: str = "identity", slope=0.01
):
    """Return (dx, dgamma, dbeta) of the LayerNorm(+act) forward; dgamma and dbeta
    are None when gamma is None."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    dx = np.empty((B, n))
    dgamma = None if gamma is None else np.zeros(n)
    dbeta = None if gamma is None else np.zeros(n)
    for i in range(B):
        m = float(mean[i])
        s = float(invstd[i])
        h = []
        xhat = []
        for j in range(n):
            xh = (x[i, j] - m) * s
            gj = 1.0 if gamma is None else float(gamma[j])
            z = gj * xh + (0.0 if beta is None else float(beta[j]))
            d = naive_act_deriv(z, act, slope)
            g = 0.0 if act == "relu" and d == 0.0 else dy[i, j] * d
            if gamma is not None:
                dbeta[j] += g
                dgamma[j] += g * xh
            h.append(g * gj)
            xhat.append(xh)
        s1 = sum(h)
        s2 = sum(hj * xh for hj, xh in zip(h, xhat, strict=True))
        for j in range(n):
            dx[i, j] = s / n * (n * h[j] - s1 - xhat[j] * s2)
    return dx, dgamma, dbeta


# ------------------------------------------------------------------ fused passes
LAYER_STATS_FIELDS = (*SUMMARY_FIELDS, "correlation", "any_nonzero")


def naive_layer_stats(x):
    """(stats, colmean, colvar) of x (B, n): the 10 LAYER_STATS_FIELDS (here
    dead_fraction counts features with no entry > 0) and the per-feature batch
    mean and biased variance, float64."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    s = naive_layer_summary(x)
    colmean = np.empty(n)
    colvar = np.empty(n)
    dead = 0
    zeros = 0
    for j in range(n):
        colmean[j], colvar[j] = _col_mean_var(x, j)
        dead += not any(x[i, j] > 0 for i in range(B))
        zeros += sum(1 for i in range(B) if x[i, j] == 0)
    s[5] = dead / n
    anynz = 1.0 if zeros < B * n else 0.0
    return np.array([*s, naive_row_correlation(x), anynz]), colmean, colvar


def naive_unit_forward(x, mean, invstd, gamma, beta, act: str, slope: float = 0.01):
    """(y, h): y = gamma (x - mean) invstd + beta, h = act(y), float64."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    y = np.empty((B, n))
    h = np.empty((B, n))
    for i in range(B):
        for j in range(n):
            v = float(gamma[j]) * (x[i, j] - float(mean[j])) * float(invstd[j])
            y[i, j] = v + float(beta[j])
            h[i, j] = naive_act(y[i, j], act, slope)
    return y, h


def naive_unit_backward(
    g, x, mean, invstd, gamma, beta, act: str, slope: float, has_bn: bool, need_dx
):
    """(dx, sums, dgamma, dbeta, dxsum) of the unit backward, float64.

    g' = g act'(y); sums = [sum g^2, sum g'^2, sum dx^2]; with BatchNorm dbeta =
    sum_b g', dgamma = sum_b g' xhat and dx = gamma invstd / B (B g' - dbeta -
    xhat dgamma) (dx = g', dxsum = 0, sums[2] = 0 when not need_dx); without it
    dx = g', dgamma = dbeta = 0.  dxsum: the column sums of dx."""
    g = np.asarray(g, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    y, _ = naive_unit_forward(x, mean, invstd, gamma, beta, act, slope)
    gp = np.empty((B, n))
    for i in range(B):
        for j in range(n):
            d = naive_act_deriv(y[i, j], act, slope)
            gp[i, j] = 0.0 if (act == "relu" and d == 0.0) else g[i, j] * d
    sg = sum(g[i, j] ** 2 for i in range(B) for j in range(n))
    sgp = sum(gp[i, j] ** 2 for i in range(B) for j in range(n))
    dgamma = np.zeros(n)
    dbeta = np.zeros(n)
    dx = gp.copy()
    if has_bn:
        for j in range(n):
            xh = [(x[i, j] - float(mean[j])) * float(invstd[j]) for i in range(B)]
            dbeta[j] = sum(gp[i, j] for i in range(B))
            dgamma[j] = sum(gp[i, j] * xh[i] for i in range(B))
            if need_dx:
                f = float(gamma[j]) * float(invstd[j]) / B
                for i in range(B):
                    dx[i, j] = f * (B * gp[i, j] - dbeta[j] - xh[i] * dgamma[j])
    dxsum = np.array([sum(dx[i, j] for i in range(B)) for j in range(n)])
    sdx = sum(dx[i, j] ** 2 for i in range(B) for j in range(n))
    if has_bn and not need_dx:
        dxsum[:] = 0.0
        sdx = 0.0
    return dx, np.array([sg, sgp, sdx]), dgamma, dbeta, dxsum


def naive_gram(a) -> np.ndarray:
    """a a^T (B x B), float64."""
    a = np.asarray(a, dtype=np.float64)
    B, n = a.shape
    G = np.empty((B, B))
    for i in range(B):
        for k in range(B):
            G[i, k] = sum(a[i, j] * a[k, j] for j in range(n))
    return G


def naive_gram_dot(a, b) -> tuple[float, float]:
    """(sum_ij a_ij b_ij, trace a) of two full B x B matrices, float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    B = a.shape[0]
    s = sum(a[i, k] * b[i, k] for i in range(B) for k in range(B))
    return s, sum(a[i, i] for i in range(B))


# ------------------------------------------------------------------ residual ops
def naive_residual_add(skip, x, scale: float) -> np.ndarray:
    """skip + scale * x element by element (skip None: scale * x), float64."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    out = np.empty((B, n))
    for i in range(B):
        for j in range(n):
            v = float(scale) * float(x[i, j])
            out[i, j] = v if skip is None else float(skip[i, j]) + v
    return out


def naive_masked_scale(x, mask, scale: float) -> np.ndarray:
    """x * (mask * scale) element by element, float64: a dropped entry is x * 0,
    i.e. NaN where x is NaN or +-inf (PyTorch's dropout multiplies too)."""
    x = np.asarray(x, dtype=np.float64)
    B, n = x.shape
    out = np.empty((B, n))
    for i in range(B):
        for j in range(n):
            w = float(scale) if mask[i, j] else 0.0
            out[i, j] = float(x[i, j]) * w
    return out


# ------------------------------------------------------------------ optimizers
def naive_sgd_update(
    p, g, v, lr: float, momentum: float = 0.0, wd: float = 0.0, nesterov=False
):
    """One SGD step (torch.optim.SGD, dampening 0) element by element, float64:
    g' = g + wd p; v' = momentum v + g'; d = g' + momentum v' (nesterov) or v';
    p' = p - lr d (momentum 0: d = g').  Returns (p', v') (v' None without
    momentum)."""
    shape = np.shape(p)
    pf = np.asarray(p, dtype=np.float64).reshape(-1)
    gf = np.asarray(g, dtype=np.float64).reshape(-1)
    vf = None if v is None else np.asarray(v, dtype=np.float64).reshape(-1)
    p_new = np.empty(pf.size)
    v_new = None if momentum == 0 else np.empty(pf.size)
    for k in range(pf.size):
        gk = float(gf[k]) + wd * float(pf[k])
        if momentum != 0:
            vk = momentum * float(vf[k]) + gk
            v_new[k] = vk
            d = gk + momentum * vk if nesterov else vk
        else:
            d = gk
        p_new[k] = float(pf[k]) - lr * d
    return p_new.reshape(shape), None if v_new is None else v_new.reshape(shape)


def naive_adam_update(
    p, g, m, v, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, wd: float = 0.0, decoupled: bool = False,
):  # fmt: skip
    """One Adam step (Kingma & Ba 2015, Algorithm 1; torch.optim.Adam) or AdamW
    (Loshchilov & Hutter 2019; torch.optim.AdamW) element by element, float64:
    m' = beta1 m + (1 - beta1) g', v' = beta2 v + (1 - beta2) g'^2,
    p' = p - lr / (1 - beta1^t) * m' / (sqrt(v') / sqrt(1 - beta2^t) + eps),
    with g' = g + wd p (Adam) or p first scaled by 1 - lr wd (AdamW).
    Returns (p', m', v')."""
    shape = np.shape(p)
    pf, gf, mf, vf = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (p, g, m, v))
    bc1 = 1.0 - math.pow(beta1, step)
    bc2 = 1.0 - math.pow(beta2, step)
    out = [np.empty(pf.size) for _ in range(3)]
    for k in range(pf.size):
        pk, gk = float(pf[k]), float(gf[k])
        if decoupled:
            pk = pk * (1.0 - lr * wd)
        else:
            gk = gk + wd * pk
        mk = beta1 * float(mf[k]) + (1.0 - beta1) * gk
        vk = beta2 * float(vf[k]) + (1.0 - beta2) * gk * gk
        out[0][k] = pk - (lr / bc1) * mk / (math.sqrt(vk) / math.sqrt(bc2) + eps)
        out[1][k] = mk
        out[2][k] = vk
    return tuple(a.reshape(shape) for a in out)


# ------------------------------------------------------------------ loss heads
def naive_mse_loss_grad(y, t) -> tuple[float, np.ndarray]:
    """(mean (y - t)^2 over all entries, 2 (y - t) / N), float64 loops."""
    y = np.asarray(y, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    B, n = y.shape
    N = B * n
    s = 0.0
    grad = np.empty((B, n))
    for i in range(B):
        for j in range(n):
            d = float(y[i, j]) - float(t[i, j])
            s += d * d
            grad[i, j] = 2.0 * d / N
    return s / N, grad


def naive_softmax_xent_grad(z, labels) -> tuple[float, int, np.ndarray]:
    """(mean_b -log softmax(z_b)[y_b], #rows whose first argmax is y_b,
    (softmax(z) - onehot(y)) / B), float64 loops with the row maximum
    subtracted (math.fsum for the row sums).  A NaN is the row's argmax."""
    z = np.asarray(z, dtype=np.float64)
    B, C = z.shape
    grad = np.empty((B, C))
    total = 0.0
    correct = 0
    for b in range(B):
        row = [float(z[b, j]) for j in range(C)]
        arg = next((j for j in range(C) if math.isnan(row[j])), None)
        if arg is None:
            arg = max(range(C), key=lambda j: (row[j], -j))
        zm = row[arg]
        e = [_exp(r - zm) for r in row]
        s = math.fsum(e)
        y = int(labels[b])
        total += (zm + math.log(s) - row[y]) if s > 0 else math.nan
        correct += arg == y
        for j in range(C):
            grad[b, j] = (e[j] / s - (1.0 if j == y else 0.0)) / B
    return total / B, correct, grad

"""Loss heads fused with their gradient: mean squared error, softmax cross-entropy.

Contract (see ``initdiag.kernels``; every variant has the same signature, writes
``grad`` and ``res``, returns ``grad``, never validates or raises)::

    _mse_loss_grad_<b>(y, t, grad, res) -> grad        # res[0] = loss
    _softmax_xent_grad_<b>(z, labels, grad, res) -> grad
                                                       # res[0] = loss,
                                                       # res[1] = n_correct

``y``, ``t``, ``z`` and ``grad`` are C-contiguous (B, n) / (B, C) arrays of one
float dtype, ``labels`` a C-contiguous int64 (B,) array of class indices in
[0, C), ``res`` a float64 array of 1 / 2 cells.

Mean squared error (``torch.nn.MSELoss(reduction="mean")``), over all N = B n
entries::

    loss = (1 / N) sum_ij (y_ij - t_ij)^2      (d = y - t rounded to the dtype,
                                                d^2 summed in float64)
    grad = (y - t) * (2 / N)                   (in the dtype, 2 / N rounded to it:
                                                torch's mse_loss_backward order)

Softmax cross-entropy (``torch.nn.CrossEntropyLoss()``, mean over rows), per row b
with the max-subtracted log-sum-exp (no overflow for any finite logits; e.g.
Goodfellow, Bengio & Courville 2016, sec. 4.1), in float64::

    M_b = max_j z_bj,   S_b = sum_j exp(z_bj - M_b)
    loss = (1 / B) sum_b (M_b + log S_b - z_b,y_b)
    grad_bj = (exp(z_bj - M_b) / S_b - [j = y_b]) / B   (rounded once to the dtype)
    n_correct = #{b : argmax_j z_bj = y_b}   (the first maximum; a NaN is the
                                              maximum, as in np.argmax / torch)

Non-finite logits do not raise: a row holding NaN or +inf gives a NaN loss and
NaN gradients (inf - inf), a label whose logit alone is -inf an infinite loss;
the trainer records either as divergence.  The row losses are summed in row
order, so the result does not depend on the thread count.  In the numba and c
variants one row is one fused sweep (max and argmax, the exponential sum, the
gradient, while the row is in cache); the c variant runs rows in parallel from
:func:`loss_threads`'s threshold on (512k entries for the softmax, 2M for the
squared error; the reference batch's head is 512 x 10); the numba variant stays
serial (below that threshold a parallel region does not pay, and ``prange``
would more than double its compile time); the cuda variant (``_cuda_loss``)
runs a block per row; the numpy variant is the reference.
"""

from __future__ import annotations

import math

import numpy as np

from ._threading import COST_BN_BACKWARD, COST_STATS, njit
from .optim import training_threads


def loss_threads(N: int, softmax: bool) -> int:
    """Threads of the c variant for one loss head over N entries: the squared
    error costs about a statistics pass, the softmax (two exponentials an entry)
    a BatchNorm backward."""
    return training_threads(N, COST_BN_BACKWARD if softmax else COST_STATS, c=True)


# --------------------------------------------------------------------------- numpy
def _mse_loss_grad_numpy(y, t, grad, res):
    """NumPy reference of the mean squared error and its gradient."""
    with np.errstate(all="ignore"):
        np.subtract(y, t, out=grad)
        d = grad.astype(np.float64).reshape(-1)
        res[0] = np.dot(d, d) / d.size
        np.multiply(grad, grad.dtype.type(2.0 / d.size), out=grad)
    return grad


def _softmax_xent_grad_numpy(z, labels, grad, res):
    """NumPy reference of the softmax cross-entropy and its gradient."""
    B = z.shape[0]
    rows = np.arange(B)
    with np.errstate(all="ignore"):
        z64 = z.astype(np.float64)
        zmax = z64.max(axis=1, keepdims=True)
        e = np.exp(z64 - zmax)
        s = e.sum(axis=1)
        res[0] = np.sum(np.log(s) + (zmax[:, 0] - z64[rows, labels])) / B
        res[1] = np.count_nonzero(np.argmax(z, axis=1) == labels)
        p = e / s[:, None]
        p[rows, labels] -= 1.0
        np.multiply(p, 1.0 / B, out=p)
        grad[...] = p
    return grad


# --------------------------------------------------------------------------- numba
@njit(cache=True, error_model="numpy")
def _mse_row_nb(y, t, g, scale):
    """One row: g = (y - t) * scale; returns sum (y - t)^2 in float64."""
    s = 0.0
    for j in range(y.shape[0]):
        d = y[j] - t[j]
        s += np.float64(d) * np.float64(d)
        g[j] = d * scale
    return s


@njit(cache=True, error_model="numpy")
def _mse_nb(y, t, grad, rows, scale):
    """:func:`_mse_row_nb` over the rows, into ``rows``; returns the mean, summed
    in row order."""
    B, n = y.shape
    for i in range(B):
        rows[i] = _mse_row_nb(y[i], t[i], grad[i], scale)
    acc = 0.0
    for i in range(B):
        acc += rows[i]
    return acc / (B * n)


@njit(cache=True, error_model="numpy")
def _xent_row_nb(z, y, g, invB):
    """One row: the fused max / argmax, exponential sum and gradient; returns
    (row loss, 1.0 if the first argmax is the label else 0.0)."""
    C = z.shape[0]
    zm = z[0]
    arg = 0
    if zm == zm:
        for j in range(1, C):
            if z[j] > zm or z[j] != z[j]:
                zm = z[j]
                arg = j
                if zm != zm:
                    break
    zmd = np.float64(zm)
    s = 0.0
    for j in range(C):
        s += math.exp(np.float64(z[j]) - zmd)
    inv = 1.0 / s
    for j in range(C):
        pj = math.exp(np.float64(z[j]) - zmd) * inv
        if j == y:
            pj -= 1.0
        g[j] = pj * invB
    return math.log(s) + (zmd - np.float64(z[y])), 1.0 if arg == y else 0.0


@njit(cache=True, error_model="numpy")
def _xent_nb(z, labels, grad, rows):
    """:func:`_xent_row_nb` over the rows, into ``rows`` (2 B); returns (mean
    loss, correct rows) summed in row order."""
    B = z.shape[0]
    invB = 1.0 / B
    for i in range(B):
        rows[i], rows[B + i] = _xent_row_nb(z[i], labels[i], grad[i], invB)
    acc = 0.0
    correct = 0.0
    for i in range(B):
        acc += rows[i]
        correct += rows[B + i]
    return acc * invB, correct


def _mse_loss_grad_numba(y, t, grad, res):
    """Numba variant of the mean squared error and its gradient (serial)."""
    scale = y.dtype.type(2.0 / y.size)
    res[0] = _mse_nb(y, t, grad, np.empty(y.shape[0]), scale)
    return grad


def _softmax_xent_grad_numba(z, labels, grad, res):
    """Numba variant of the softmax cross-entropy and its gradient (serial)."""
    res[0], res[1] = _xent_nb(z, labels, grad, np.empty(2 * z.shape[0]))
    return grad


# --------------------------------------------------------------------------- c
def _mse_loss_grad_c(y, t, grad, res):
    """C variant (idg_mse_loss_grad); the row scratch from here (the C core never
    allocates)."""
    from ._c import check, fn, ptr

    B, n = y.shape
    rows = np.empty(B)
    nt = loss_threads(y.size, softmax=False)
    check(
        fn("idg_mse_loss_grad", y.dtype)(
            ptr(y), ptr(t), B, n, ptr(grad), ptr(rows), ptr(res), nt
        ),
        "idg_mse_loss_grad",
    )
    return grad


def _softmax_xent_grad_c(z, labels, grad, res):
    """C variant (idg_softmax_xent_grad); labels go in as ``long long`` (int64)."""
    from ._c import check, fn, load, ptr

    B, C = z.shape
    rows = np.empty(2 * B)
    nt = loss_threads(z.size, softmax=True)
    lab = load()[0].from_buffer("long long[]", labels)
    check(
        fn("idg_softmax_xent_grad", z.dtype)(
            ptr(z), lab, B, C, ptr(grad), ptr(rows), ptr(res), nt
        ),
        "idg_softmax_xent_grad",
    )
    return grad

"""The data a training run sees: the synthetic task that ships with initdiag,
scikit-learn's bundled digits, or the user's arrays.

The synthetic task (:func:`subspace_mixture`) is a classification a linear model
cannot solve and a deep network must learn features for: ``n_classes * clusters``
Gaussian clusters in a random low-dimensional subspace, each cluster labelled with a
class at random, embedded in isotropic noise in the network's full input dimension,
scaled so that every input feature has second moment 1 (the input ``analyze`` and
``simulate`` assume).  It is made from a seed, so every variant of a study trains on
the same examples; nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Dataset", "make_dataset", "subspace_mixture", "digits", "from_arrays"]

#: the synthetic task's shape: examples, classes, clusters per class, subspace
SYNTHETIC = {"n_train": 4096, "n_test": 1024, "n_classes": 10, "clusters": 3, "k": 8}


@dataclass(frozen=True)
class Dataset:
    """Training and held-out examples.  ``y`` holds integer class labels
    (``n_classes`` > 0: softmax cross-entropy) or float targets of shape
    (n, outputs) (``n_classes == 0``: mean squared error)."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def outputs(self) -> int:
        """Width of the network output the loss needs."""
        return self.n_classes if self.n_classes else int(self.y_train.shape[1])

    @property
    def loss(self) -> str:
        return "cross_entropy" if self.n_classes else "mse"

    def chance_loss(self) -> float:
        """The loss of the best constant prediction on the training set: the
        entropy of the class frequencies (cross-entropy), the targets' variance
        (mean squared error)."""
        if self.n_classes:
            f = np.bincount(self.y_train, minlength=self.n_classes) / self.y_train.size
            f = f[f > 0]
            return float(-(f * np.log(f)).sum())
        return float(np.mean(np.var(self.y_train, axis=0)))

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_train": int(self.X_train.shape[0]),
            "n_test": int(self.X_test.shape[0]),
            "input_dim": self.input_dim,
            "n_classes": self.n_classes,
            "outputs": self.outputs,
            "loss": self.loss,
            "chance_loss": self.chance_loss(),
            "description": self.description,
            **self.meta,
        }


def subspace_mixture(
    input_dim: int,
    *,
    n_train: int = SYNTHETIC["n_train"],
    n_test: int = SYNTHETIC["n_test"],
    n_classes: int = SYNTHETIC["n_classes"],
    clusters: int = SYNTHETIC["clusters"],
    k: int = SYNTHETIC["k"],
    signal: float = 0.8,
    spread: float = 0.35,
    seed: int = 0,
) -> Dataset:
    """Gaussian clusters in a random ``k``-dimensional subspace, labelled at random.

    Cluster centres ``mu_j ~ N(0, I_k)`` (``n_classes * clusters`` of them, cluster
    ``j`` labelled ``j mod n_classes`` after a random permutation), an example
    ``z = (mu_j + spread * e) / sqrt(1 + spread^2)`` in the subspace (unit second
    moment per coordinate), embedded as
    ``x = signal * sqrt(d / k) * Q z + sqrt(1 - signal^2) * n`` with ``Q`` (d, k)
    orthonormal and ``n ~ N(0, I_d)``: ``E[x_i^2] = 1`` for every feature.
    """
    d = int(input_dim)
    if d < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    k = min(int(k), d)
    gen = np.random.default_rng([int(seed), 0x7A5C])
    q, _ = np.linalg.qr(gen.standard_normal((d, k)))
    n_cl = n_classes * clusters
    centres = gen.standard_normal((n_cl, k))
    labels = gen.permutation(np.arange(n_cl) % n_classes)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        j = gen.integers(0, n_cl, n)
        z = (centres[j] + spread * gen.standard_normal((n, k))) / math.sqrt(
            1.0 + spread**2
        )
        x = signal * math.sqrt(d / k) * (z @ q.T)
        x += math.sqrt(1.0 - signal**2) * gen.standard_normal((n, d))
        return x, labels[j].astype(np.int64)

    Xtr, ytr = draw(int(n_train))
    Xte, yte = draw(int(n_test))
    return Dataset(
        "synthetic",
        Xtr,
        ytr,
        Xte,
        yte,
        n_classes,
        f"{n_classes} classes, {n_cl} Gaussian clusters in a random {k}-dimensional "
        f"subspace of R^{d} (signal {signal}, cluster spread {spread}), "
        f"{n_train} training / {n_test} held-out examples, seed {seed}",
        {"seed": int(seed), "clusters": n_cl, "subspace": k},
    )


def digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 examples, 64 features; read from
    the package, never downloaded), features standardised on the training split,
    a seeded held-out split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "data='digits' needs scikit-learn (pip install scikit-learn); or pass "
            "data=None for the synthetic task, or your own (X, y)"
        ) from None
    X, y = load_digits(return_X_y=True)
    gen = np.random.default_rng([int(seed), 0xD161])
    idx = gen.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = idx[:n_test], idx[n_test:]
    mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0)
    sd[sd == 0] = 1.0  # constant border pixels stay 0
    X = (X - mu) / sd
    return Dataset(
        "digits",
        X[tr],
        y[tr].astype(np.int64),
        X[te],
        y[te].astype(np.int64),
        10,
        f"scikit-learn digits, {len(tr)} training / {n_test} held-out examples, "
        "features standardised",
        {"seed": int(seed)},
    )


def _check_xy(X: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.dtype.kind not in "fiu":
        raise ValueError(
            f"{what}: X must be a 2-D real array (examples, features), got shape "
            f"{X.shape} and dtype {X.dtype}"
        )
    if y.shape[:1] != X.shape[:1] or y.ndim not in (1, 2):
        raise ValueError(
            f"{what}: y must have one entry (class label) or one row (targets) per "
            f"example: X has {X.shape[0]} rows, y has shape {y.shape}"
        )
    if not np.all(np.isfinite(X)) or (
        y.dtype.kind == "f" and not np.all(np.isfinite(y))
    ):
        raise ValueError(f"{what}: X and y must be finite (found NaN or inf)")
    return X.astype(np.float64), y


def from_arrays(data: tuple, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The user's data: ``(X, y)`` (a seeded held-out split of ``test_fraction``) or
    ``(X_train, y_train, X_test, y_test)``.  Integer ``y`` of shape (n,) are class
    labels (softmax cross-entropy over ``max(y) + 1`` classes), float ``y`` targets
    (mean squared error; shape (n,) is read as one output)."""
    if len(data) == 2:
        X, y = _check_xy(*data, "data")
        gen = np.random.default_rng([int(seed), 0xDA7A])
        idx = gen.permutation(len(X))
        n_test = max(1, int(round(test_fraction * len(X))))
        if len(X) - n_test < 2:
            raise ValueError(
                f"data: {len(X)} examples leave fewer than 2 for training after a "
                f"{test_fraction:.0%} held-out split; pass more examples or "
                "(X_train, y_train, X_test, y_test)"
            )
        Xtr, ytr, Xte, yte = (
            X[idx[n_test:]],
            y[idx[n_test:]],
            X[idx[:n_test]],
            y[idx[:n_test]],
        )
    elif len(data) == 4:
        Xtr, ytr = _check_xy(data[0], data[1], "training data")
        Xte, yte = _check_xy(data[2], data[3], "held-out data")
        if Xte.shape[1] != Xtr.shape[1]:
            raise ValueError(
                f"data: training X has {Xtr.shape[1]} features, held-out X "
                f"{Xte.shape[1]}"
            )
    else:
        raise ValueError(
            f"data must be (X, y) or (X_train, y_train, X_test, y_test), got a "
            f"sequence of {len(data)}"
        )
    if ytr.dtype.kind in "iub":
        if ytr.ndim != 1 or ytr.min() < 0 or yte.min() < 0:
            raise ValueError(
                "data: integer y are class labels: a 1-D array of labels >= 0, got "
                f"shape {ytr.shape}, smallest {min(ytr.min(), yte.min())}"
            )
        n_classes = int(max(ytr.max(), yte.max())) + 1
        ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    else:
        n_classes = 0
        ytr = ytr.reshape(len(ytr), -1).astype(np.float64)
        yte = yte.reshape(len(yte), -1).astype(np.float64)
    return Dataset(
        "user",
        Xtr,
        ytr,
        Xte,
        yte,
        n_classes,
        f"user data, {len(Xtr)} training / {len(Xte)} held-out examples",
    )


def make_dataset(data: Any, input_dim: int, seed: int = 0) -> Dataset:
    """``None``: the synthetic task in the network's input dimension; ``"digits"``;
    a :class:`Dataset`; the user's arrays (:func:`from_arrays`)."""
    if data is None or data == "synthetic":
        ds = subspace_mixture(input_dim, seed=seed)
    elif isinstance(data, str):
        if data != "digits":
            raise ValueError(
                f"unknown data {data!r}; use None (the synthetic task), 'digits' or "
                "(X, y) arrays"
            )
        ds = digits(seed)
    elif isinstance(data, Dataset):
        ds = data
    elif isinstance(data, (tuple, list)):
        ds = from_arrays(tuple(data), seed)
    else:
        raise TypeError(
            f"data must be None, 'digits', a Dataset or (X, y) arrays, got "
            f"{type(data).__name__}"
        )
    if ds.input_dim != input_dim:
        raise ValueError(
            f"the data has {ds.input_dim} features but the network's input_dim is "
            f"{input_dim}; build the network with input_dim={ds.input_dim}"
        )
    return ds

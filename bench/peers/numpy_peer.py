"""Plain-NumPy peer: Linear -> BatchNorm -> ReLU blocks, Kaiming-normal weights, zero
biases; per seed sample, forward, backward and every Profile statistic of every layer.
"""

from __future__ import annotations

import numpy as np


def _stats(h: np.ndarray) -> dict[str, float]:
    cm = h.mean(axis=0, dtype=np.float64)
    u = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-30)
    s = u.sum(axis=0, dtype=np.float64)
    B = h.shape[0]
    return {
        "mean": float(cm.mean()),
        "second_moment": float(np.mean(np.square(h, dtype=np.float64))),
        "variance": float(h.var(axis=0, dtype=np.float64).mean()),
        "squared_mean": float(np.mean(cm * cm)),
        "correlation": float((s @ s - np.sum(u * u, dtype=np.float64)) / (B * (B - 1))),
        "active_fraction": float(np.mean(h > 0)),
        "dead_fraction": float(np.mean(np.all(h <= 0, axis=0))),
    }


def run(
    depth: int = 20,
    width: int = 1024,
    batch: int = 512,
    seeds: int = 8,
    dtype=np.float32,
    eps: float = 1e-5,
) -> list[list[dict[str, float]]]:
    """Per seed, a list of per-row statistics dicts (rows: dense, bn, relu, ...)."""
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, width), dtype=dtype)
        std = np.sqrt(2.0 / width).astype(dtype)
        ws = [
            rng.standard_normal((width, width), dtype=dtype) * std for _ in range(depth)
        ]
        bs = [np.zeros(width, dtype) for _ in range(depth)]
        gammas = [np.ones(width, dtype) for _ in range(depth)]
        betas = [np.zeros(width, dtype) for _ in range(depth)]
        rows: list[dict[str, float]] = []
        cache = []
        h = x
        for w, b, ga, be in zip(ws, bs, gammas, betas, strict=True):
            xin = h
            z = xin @ w.T + b
            rows.append(_stats(z))
            mu = z.mean(axis=0)
            inv = 1.0 / np.sqrt(z.var(axis=0) + eps)
            xhat = (z - mu) * inv
            y = ga * xhat + be
            rows.append(_stats(y))
            h = np.maximum(y, 0)
            rows.append(_stats(h))
            cache.append((xin, xhat, inv, y))
        g = rng.standard_normal(h.shape, dtype=dtype)
        m_out = float(np.mean(np.square(g, dtype=np.float64)))
        norm = 1.0 / (batch * m_out)
        r = len(rows) - 1
        for (xin, xhat, inv, y), w, ga in zip(
            reversed(cache), reversed(ws), reversed(gammas), strict=True
        ):
            rows[r]["grad_second_moment"] = (
                float(np.mean(np.square(g, dtype=np.float64))) / m_out
            )
            g = g * (y > 0)
            rows[r - 1]["grad_second_moment"] = (
                float(np.mean(np.square(g, dtype=np.float64))) / m_out
            )
            dbeta = g.sum(axis=0)
            dgamma = (g * xhat).sum(axis=0)
            rows[r - 1]["gamma_grad_norm2"] = float(dgamma @ dgamma) * norm
            rows[r - 1]["beta_grad_norm2"] = float(dbeta @ dbeta) * norm
            g = ga * inv / batch * (batch * g - dbeta - xhat * dgamma)
            rows[r - 2]["grad_second_moment"] = (
                float(np.mean(np.square(g, dtype=np.float64))) / m_out
            )
            dw = g.T @ xin
            db = g.sum(axis=0)
            rows[r - 2]["weight_grad_norm2"] = (
                float(np.sum(np.square(dw, dtype=np.float64))) * norm
            )
            rows[r - 2]["bias_grad_norm2"] = float(db @ db) * norm
            if r > 2:  # no input gradient needed below the first layer
                g = g @ w
            r -= 3
        out.append(rows)
    return out
